//! Span encoders, with no I/O: OTLP/HTTP protobuf (an
//! `ExportTraceServiceRequest`, which Jaeger and the OpenTelemetry
//! Collector read on `/v1/traces`) and Zipkin v2 JSON (`POST /api/v2/spans`).
//!
//! The OTLP messages are the subset of `opentelemetry/proto` (v1) that we
//! write, declared with prost's derive: field numbers and types match the
//! published `.proto` files, so any OTLP receiver decodes them; fields we
//! never set are simply absent.

use serde_json::{json, Map, Value as Json};

use super::context::hex;
use super::span::{unix_nanos, Kind, Span, Value};

/// The OTLP messages (package `opentelemetry.proto.*.v1`).
pub mod otlp {
    /// `collector/trace/v1/trace_service.proto`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    /// `trace/v1/trace.proto`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }

    /// `resource/v1/resource.proto`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Span>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }

    /// `common/v1/common.proto`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(string, tag = "3")]
        pub trace_state: String,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        /// `SpanKind`: 2 = SERVER, 3 = CLIENT.
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        #[prost(message, optional, tag = "15")]
        pub status: Option<Status>,
        /// W3C trace flags in the low byte (bit 0: sampled).
        #[prost(fixed32, tag = "16")]
        pub flags: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(string, tag = "2")]
        pub message: String,
        /// `StatusCode`: 0 = UNSET, 1 = OK, 2 = ERROR.
        #[prost(int32, tag = "3")]
        pub code: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(oneof = "any_value::Value", tags = "1, 2, 3")]
        pub value: Option<any_value::Value>,
    }

    pub mod any_value {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(string, tag = "1")]
            StringValue(String),
            #[prost(bool, tag = "2")]
            BoolValue(bool),
            #[prost(int64, tag = "3")]
            IntValue(i64),
        }
    }

    pub const SPAN_KIND_SERVER: i32 = 2;
    pub const SPAN_KIND_CLIENT: i32 = 3;
    pub const STATUS_CODE_ERROR: i32 = 2;
}

/// Who produced the spans: the sidecar's resource.
#[derive(Debug, Clone)]
pub struct Resource {
    /// `service.name`, which Jaeger and Zipkin group spans by.
    pub service_name: String,
    /// The sidecar's SPIFFE ID.
    pub identity: String,
}

/// Instrumentation scope name in OTLP.
const SCOPE: &str = "weft-proxy";

fn kv(key: &str, value: &Value) -> otlp::KeyValue {
    use otlp::any_value::Value as V;
    let v = match value {
        Value::Str(s) => V::StringValue(s.clone()),
        Value::Int(i) => V::IntValue(*i),
        Value::Bool(b) => V::BoolValue(*b),
    };
    otlp::KeyValue {
        key: key.to_string(),
        value: Some(otlp::AnyValue { value: Some(v) }),
    }
}

/// An OTLP/HTTP request body (`Content-Type: application/x-protobuf`).
pub fn encode_otlp(resource: &Resource, spans: &[Span]) -> Vec<u8> {
    prost::Message::encode_to_vec(&otlp_request(resource, spans))
}

/// The message [`encode_otlp`] encodes.
pub fn otlp_request(resource: &Resource, spans: &[Span]) -> otlp::ExportTraceServiceRequest {
    let spans = spans
        .iter()
        .map(|s| otlp::Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            trace_state: s.trace_state.clone(),
            parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            name: s.name.clone(),
            kind: match s.kind {
                Kind::Client => otlp::SPAN_KIND_CLIENT,
                Kind::Server => otlp::SPAN_KIND_SERVER,
            },
            start_time_unix_nano: unix_nanos(s.start),
            end_time_unix_nano: unix_nanos(s.end),
            attributes: s.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
            // Spans are only recorded when sampled.
            flags: 1,
            status: s.error.as_ref().map(|m| otlp::Status {
                message: m.clone(),
                code: otlp::STATUS_CODE_ERROR,
            }),
        })
        .collect();
    otlp::ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(otlp::Resource {
                attributes: vec![
                    kv("service.name", &resource.service_name.as_str().into()),
                    kv("weft.identity", &resource.identity.as_str().into()),
                    kv("telemetry.sdk.name", &SCOPE.into()),
                ],
            }),
            scope_spans: vec![otlp::ScopeSpans {
                scope: Some(otlp::InstrumentationScope {
                    name: SCOPE.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// Decode an OTLP/HTTP protobuf body (tests and receivers).
pub fn decode_otlp(body: &[u8]) -> Result<otlp::ExportTraceServiceRequest, prost::DecodeError> {
    prost::Message::decode(body)
}

/// A Zipkin v2 JSON body: an array of spans. Timestamps and durations are
/// microseconds; a duration under 1 µs is written as 1 (Zipkin reads 0 as
/// "unknown").
pub fn encode_zipkin(resource: &Resource, spans: &[Span]) -> Vec<u8> {
    let list: Vec<Json> = spans.iter().map(|s| zipkin_span(resource, s)).collect();
    serde_json::to_vec(&list).unwrap_or_else(|_| b"[]".to_vec())
}

fn zipkin_span(resource: &Resource, s: &Span) -> Json {
    let start = unix_nanos(s.start) / 1000;
    let duration = (unix_nanos(s.end).saturating_sub(unix_nanos(s.start)) / 1000).max(1);
    let mut tags = Map::new();
    for (k, v) in &s.attributes {
        tags.insert((*k).to_string(), Json::String(v.to_text()));
    }
    if let Some(e) = &s.error {
        // Zipkin's convention: an `error` tag marks the span failed.
        tags.insert("error".into(), Json::String(e.clone()));
    }
    let mut span = json!({
        "traceId": hex(&s.trace_id),
        "id": hex(&s.span_id),
        "name": s.name,
        "kind": match s.kind { Kind::Client => "CLIENT", Kind::Server => "SERVER" },
        "timestamp": start,
        "duration": duration,
        "localEndpoint": { "serviceName": resource.service_name },
        "tags": tags,
    });
    if let Some(obj) = span.as_object_mut() {
        if let Some(p) = s.parent_span_id {
            obj.insert("parentId".into(), Json::String(hex(&p)));
        }
        if let Some(r) = &s.remote_service {
            obj.insert("remoteEndpoint".into(), json!({ "serviceName": r }));
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn span() -> Span {
        let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        Span {
            trace_id: [0x4b; 16],
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            parent_span_id: Some([9; 8]),
            trace_state: "vendor=x".into(),
            name: "GET payment".into(),
            kind: Kind::Client,
            start,
            end: start + Duration::from_micros(1500),
            attributes: vec![
                ("weft.service", "payment".into()),
                ("http.response.status_code", 503i64.into()),
                ("weft.retried", true.into()),
            ],
            error: Some("HTTP 503".into()),
            remote_service: Some("payment".into()),
        }
    }

    fn resource() -> Resource {
        Resource {
            service_name: "customer".into(),
            identity: "spiffe://td/ns/test/sa/customer".into(),
        }
    }

    /// The exact bytes prost writes for one small span, checked field by
    /// field against the OTLP `.proto` numbering: a change to a tag or a
    /// wire type shows up here, not only in a collector.
    #[test]
    fn otlp_wire_format_of_a_span() {
        let s = otlp::Span {
            trace_id: vec![0xaa; 16],
            span_id: vec![0xbb; 8],
            name: "n".into(),
            kind: otlp::SPAN_KIND_CLIENT,
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            flags: 1,
            ..Default::default()
        };
        let bytes = prost::Message::encode_to_vec(&s);
        let mut want = vec![0x0a, 16];
        want.extend([0xaa; 16]); // 1: trace_id, bytes
        want.extend([0x12, 8]);
        want.extend([0xbb; 8]); // 2: span_id, bytes
        want.extend([0x2a, 1, b'n']); // 5: name, string
        want.extend([0x30, 3]); // 6: kind, varint
        want.extend([0x39, 1, 0, 0, 0, 0, 0, 0, 0]); // 7: start, fixed64
        want.extend([0x41, 2, 0, 0, 0, 0, 0, 0, 0]); // 8: end, fixed64
        want.extend([0x85, 0x01, 1, 0, 0, 0]); // 16: flags, fixed32
        assert_eq!(bytes, want);
    }

    #[test]
    fn otlp_round_trips() {
        let body = encode_otlp(&resource(), &[span()]);
        let req = decode_otlp(&body).unwrap();
        let rs = &req.resource_spans[0];
        let attrs = &rs.resource.as_ref().unwrap().attributes;
        assert_eq!(attrs[0].key, "service.name");
        let s = &rs.scope_spans[0].spans[0];
        assert_eq!(s.trace_id, vec![0x4b; 16]);
        assert_eq!(s.span_id, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(s.parent_span_id, vec![9; 8]);
        assert_eq!(s.trace_state, "vendor=x");
        assert_eq!(s.kind, otlp::SPAN_KIND_CLIENT);
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_123_456_789);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 1_500_000);
        assert_eq!(s.status.as_ref().unwrap().code, otlp::STATUS_CODE_ERROR);
        let status = s
            .attributes
            .iter()
            .find(|a| a.key == "http.response.status_code")
            .unwrap();
        assert_eq!(
            status.value.as_ref().unwrap().value,
            Some(otlp::any_value::Value::IntValue(503))
        );
        assert!(decode_otlp(b"\xff\xff garbage").is_err());
    }

    #[test]
    fn zipkin_json_shape() {
        let mut root = span();
        root.parent_span_id = None;
        root.error = None;
        root.kind = Kind::Server;
        root.remote_service = None;
        let body = encode_zipkin(&resource(), &[span(), root]);
        let v: Json = serde_json::from_slice(&body).unwrap();
        let a = &v[0];
        assert_eq!(a["traceId"], "4b".repeat(16));
        assert_eq!(a["id"], "0102030405060708");
        assert_eq!(a["parentId"], "0909090909090909");
        assert_eq!(a["kind"], "CLIENT");
        assert_eq!(a["timestamp"], 1_700_000_000_123_456u64);
        assert_eq!(a["duration"], 1500);
        assert_eq!(a["localEndpoint"]["serviceName"], "customer");
        assert_eq!(a["remoteEndpoint"]["serviceName"], "payment");
        assert_eq!(a["tags"]["http.response.status_code"], "503");
        assert_eq!(a["tags"]["weft.retried"], "true");
        assert_eq!(a["tags"]["error"], "HTTP 503");
        let b = &v[1];
        assert_eq!(b["kind"], "SERVER");
        assert!(b.get("parentId").is_none() && b.get("remoteEndpoint").is_none());
        assert!(b["tags"].get("error").is_none());
    }
}
