//! Distributed tracing: every sidecar hop of an HTTP request is a span — a
//! CLIENT span on the outbound sidecar, a SERVER span on the inbound one —
//! and the trace context travels in `traceparent` (and B3, if the app uses
//! it), so the app's own spans, which only forward the headers, hang below
//! ours. Spans go to a bounded queue that an exporter task drains in
//! batches to OTLP/HTTP and/or Zipkin; a request never waits for it.
//!
//! Flow of one request: app → [outbound: extract the app's context or start
//! a trace; CLIENT span; `traceparent` parent = CLIENT span] → peer →
//! [inbound: extract; SERVER span, child of CLIENT; `traceparent` parent =
//! SERVER span] → app.
//!
//! Without an export endpoint tracing is off: no spans, and trace headers
//! pass through untouched (a span ID nobody reports would break the app's
//! traces).
//!
//! The per-request access log ([`access_log`]) hangs off the same
//! [`Tracer`], which is the sidecar's one handle for per-request telemetry.

pub mod access_log;
pub mod context;
pub mod export;
mod exporter;
pub mod span;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, Request, Response};
use tokio::sync::mpsc;

use crate::metrics::{Metrics, ReasonLabels};
use access_log::{AccessLog, AccessLogTarget, HttpLog};
use context::{Extracted, Outgoing};
pub use export::Resource;

/// How long a shutdown waits for queued spans to reach the collectors:
/// enough for a healthy collector, well inside a Kubernetes grace period.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);
pub use span::{Kind, Span, Value};

/// Tracing settings of one sidecar (`--trace-*` flags).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TraceConfig {
    /// OTLP/HTTP protobuf endpoint, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// Zipkin v2 endpoint, e.g. `http://127.0.0.1:9411/api/v2/spans`.
    pub zipkin_endpoint: Option<String>,
    /// Share of new traces (no sampling decision from the caller) recorded.
    pub sample_ratio: f64,
    /// `service.name` of our spans; default: the service account of our SPIFFE ID.
    pub service_name: Option<String>,
    /// Spans waiting for export; more are dropped and counted.
    pub queue_spans: usize,
    /// Spans per export request.
    pub batch_spans: usize,
    /// Longest a span waits for its batch to fill.
    pub batch_interval: Duration,
    /// Longest one export request may take.
    pub export_timeout: Duration,
    /// JSON lines per request and TCP stream (see [`access_log`]); off if `None`.
    pub access_log: Option<AccessLogTarget>,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            otlp_endpoint: None,
            zipkin_endpoint: None,
            // A sidecar sees every request of its app: recording all of them
            // costs the collector far more than it costs us. 1 % (Istio's
            // default too) still catches every systematic problem within
            // seconds at modest traffic; apps that decide themselves (a
            // sampled `traceparent`) are always followed, and debugging
            // sets 1.0.
            sample_ratio: 0.01,
            service_name: None,
            // 2048 spans ≈ 1 MiB: rides out a collector restart of a few
            // seconds at 1k sampled req/s without unbounded memory.
            queue_spans: 2048,
            // OpenTelemetry SDK's default batch size: well under the 4 MiB
            // default body limit of OTLP receivers.
            batch_spans: 512,
            // Traces show up within a second in the UI; at most one export
            // per second per sidecar while traffic is light.
            batch_interval: Duration::from_secs(1),
            // Same as the OpenTelemetry SDK exporter default.
            export_timeout: Duration::from_secs(10),
            access_log: None,
        }
    }
}

impl TraceConfig {
    /// Whether spans are made at all (some endpoint is set).
    pub fn enabled(&self) -> bool {
        self.otlp_endpoint.is_some() || self.zipkin_endpoint.is_some()
    }

    /// Check the settings; each error says what to change.
    pub fn validate(&self) -> Result<(), TraceError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(TraceError::Ratio(self.sample_ratio));
        }
        if self.queue_spans == 0 || self.batch_spans == 0 {
            return Err(TraceError::Zero);
        }
        if let Some(u) = &self.otlp_endpoint {
            exporter::endpoint(u, "/v1/traces")?;
        }
        if let Some(u) = &self.zipkin_endpoint {
            exporter::endpoint(u, "/api/v2/spans")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--trace-sample-ratio {0}: must be between 0.0 and 1.0")]
    Ratio(f64),
    #[error("--trace-queue-spans and --trace-batch-spans must be at least 1")]
    Zero,
    #[error("trace endpoint {url:?}: {reason} (expected e.g. http://127.0.0.1:4318/v1/traces)")]
    Endpoint { url: String, reason: String },
    #[error("--access-log {path}: {source} (give a writable file, or `stderr`)")]
    AccessLog {
        path: String,
        source: std::io::Error,
    },
}

impl Resource {
    /// The resource of a sidecar with this identity.
    pub fn of(cfg: &TraceConfig, identity: &weft_transport::SpiffeId) -> Resource {
        let id = identity.as_str();
        Resource {
            service_name: cfg
                .service_name
                .clone()
                .or_else(|| service_account(id).map(str::to_string))
                .unwrap_or_else(|| "weft".into()),
            identity: id.to_string(),
        }
    }
}

/// The sidecar's tracer: decides sampling, makes span IDs, queues spans;
/// and holds the access log, if any.
pub(crate) struct Tracer {
    /// `None`: tracing is off.
    queue: Option<mpsc::Sender<Span>>,
    /// Asks the exporter to send what is queued (at shutdown).
    flush: Option<mpsc::Sender<exporter::Flush>>,
    sample_ratio: f64,
    metrics: Arc<Metrics>,
    access: Option<Arc<AccessLog>>,
}

impl Tracer {
    /// The tracer and, if tracing or the access log is on, the task to
    /// spawn (span exporter, access log writer).
    pub fn new(
        cfg: &TraceConfig,
        resource: Resource,
        metrics: Arc<Metrics>,
    ) -> Result<(Tracer, Option<impl std::future::Future<Output = ()>>), TraceError> {
        cfg.validate()?;
        let mut tracer = Tracer {
            queue: None,
            sample_ratio: cfg.sample_ratio,
            metrics: metrics.clone(),
            access: None,
            flush: None,
        };
        let writer = match &cfg.access_log {
            Some(target) => {
                let (log, writer) = AccessLog::open(target, metrics.access_log_dropped.clone())
                    .map_err(|source| TraceError::AccessLog {
                        path: match target {
                            AccessLogTarget::Stderr => "stderr".into(),
                            AccessLogTarget::File(p) => p.display().to_string(),
                        },
                        source,
                    })?;
                tracer.access = Some(Arc::new(log));
                Some(writer)
            }
            None => None,
        };
        let exporter = if cfg.enabled() {
            let (tx, rx) = mpsc::channel(cfg.queue_spans);
            let (flush_tx, flush_rx) = mpsc::channel(1);
            tracer.queue = Some(tx);
            tracer.flush = Some(flush_tx);
            Some(exporter::run(rx, flush_rx, cfg.clone(), resource, metrics)?)
        } else {
            None
        };
        if writer.is_none() && exporter.is_none() {
            return Ok((tracer, None));
        }
        let task = async move {
            let exporter = async {
                if let Some(e) = exporter {
                    e.await
                }
            };
            let writer = async {
                if let Some(w) = writer {
                    w.await
                }
            };
            tokio::join!(exporter, writer);
        };
        Ok((tracer, Some(task)))
    }

    /// Send the spans still queued, waiting at most `timeout` (a dead
    /// collector must not hold up a shutdown).
    pub async fn flush(&self, timeout: Duration) {
        let Some(flush) = &self.flush else { return };
        let _ = tokio::time::timeout(timeout, async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if flush.send(tx).await.is_ok() {
                let _ = rx.await;
            }
        })
        .await;
    }

    /// Start an access log entry for an HTTP request (a no-op without
    /// `--access-log`). Call after [`Tracer::client`]/[`Tracer::server`].
    pub fn http_log<B>(&self, direction: &'static str, service: &str, req: &Request<B>) -> HttpLog {
        HttpLog::start(self.access.as_ref(), direction, service, req)
    }

    /// Log a finished TCP stream (a no-op without `--access-log`).
    #[allow(clippy::too_many_arguments)]
    pub fn tcp_log(
        &self,
        direction: &'static str,
        service: &str,
        peer: &str,
        started: (SystemTime, std::time::Instant),
        request_bytes: u64,
        response_bytes: u64,
        error: Option<String>,
    ) {
        access_log::tcp(
            self.access.as_ref(),
            direction,
            service,
            peer,
            started,
            request_bytes,
            response_bytes,
            error,
        );
    }

    /// The outbound side: continue the app's trace (or start one), and set
    /// the headers the peer sidecar reads, with our CLIENT span as parent.
    pub fn client<B>(&self, service: &str, req: &mut Request<B>) -> Pending {
        if self.queue.is_none() {
            return Pending(None);
        }
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let mut p = self.start(Kind::Client, &method, &path, service, req.headers_mut());
        p.remote(service);
        p
    }

    /// The inbound side: a SERVER span, child of the caller's span, and the
    /// app gets our span as its parent.
    pub fn server<B>(&self, service: &str, peer: &str, req: &mut Request<B>) -> Pending {
        if self.queue.is_none() {
            return Pending(None);
        }
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let mut p = self.start(Kind::Server, &method, &path, service, req.headers_mut());
        p.attr("weft.peer.identity", peer);
        p.remote(service_account(peer).unwrap_or(peer));
        p
    }

    fn start(
        &self,
        kind: Kind,
        method: &Method,
        path: &str,
        service: &str,
        headers: &mut HeaderMap,
    ) -> Pending {
        if self.queue.is_none() {
            return Pending(None);
        }
        let Extracted {
            parent,
            sampled_only,
            formats,
            w3c_parent,
        } = context::extract(headers);
        if !w3c_parent {
            // A new trace, or one from B3: any tracestate is not its state.
            headers.remove(context::TRACESTATE);
        }
        let trace_id = parent
            .map(|p| p.trace_id)
            .unwrap_or_else(span::new_trace_id);
        let sampled = parent
            .and_then(|p| p.sampled)
            .or(sampled_only)
            .unwrap_or_else(|| span::sample(&trace_id, self.sample_ratio));
        let span_id = span::new_span_id();
        let parent_span_id = parent.map(|p| p.span_id);
        context::inject(
            headers,
            &Outgoing {
                trace_id,
                span_id,
                parent_span_id,
                sampled,
            },
            formats,
        );
        if !sampled {
            return Pending(None);
        }
        let trace_state = headers
            .get(context::TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Pending(Some(Box::new(Span {
            trace_id,
            span_id,
            parent_span_id,
            trace_state,
            name: format!("{method} {service}"),
            kind,
            start: SystemTime::now(),
            end: SystemTime::now(),
            attributes: vec![
                ("weft.service", service.into()),
                ("http.request.method", method.as_str().into()),
                ("url.path", path.into()),
            ],
            error: None,
            remote_service: None,
        })))
    }

    /// Queue a finished span; never waits. A full queue drops it (counted).
    fn record(&self, span: Span) {
        let Some(q) = &self.queue else { return };
        if q.try_send(span).is_err() {
            self.metrics
                .trace_spans_dropped
                .get_or_create(&ReasonLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }
}

/// A span being recorded, or nothing (tracing off, or not sampled).
pub(crate) struct Pending(Option<Box<Span>>);

impl Pending {
    pub fn attr(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(s) = &mut self.0 {
            s.attributes.push((key, value.into()));
        }
    }

    fn remote(&mut self, service: &str) {
        if let Some(s) = &mut self.0 {
            s.remote_service = Some(service.to_string());
        }
    }

    /// End the span with the response the app gets (status, and the
    /// sidecar's marks on it: generated error, fault, overflow).
    pub fn finish<B>(mut self, tracer: &Tracer, resp: &Response<B>) {
        let status = resp.status();
        let h = resp.headers();
        self.attr("http.response.status_code", i64::from(status.as_u16()));
        for (header, attr) in [
            (crate::headers::ERROR, "weft.sidecar_error"),
            (crate::headers::FAULT, "weft.fault"),
            (crate::headers::OVERFLOW, "weft.overflow"),
            (crate::headers::DENIED, "weft.denied"),
        ] {
            if let Some(v) = h.get(header).and_then(|v| v.to_str().ok()) {
                self.attr(attr, v.to_string());
            }
        }
        let Some(mut s) = self.0.take() else { return };
        s.end = SystemTime::now();
        if status.is_server_error() {
            s.error = Some(match status.canonical_reason() {
                Some(r) => format!("HTTP {} {r}", status.as_u16()),
                None => format!("HTTP {}", status.as_u16()),
            });
        }
        tracer.record(*s);
    }
}

/// End an outbound request's CLIENT span: the route taken, the peer that
/// answered, how many tries it took.
pub(crate) fn client_done<B>(
    mut span: Pending,
    tracer: &Tracer,
    resp: &Response<B>,
    route: &str,
    peer: &str,
    attempts: u32,
) {
    span.attr("weft.route", route);
    if !peer.is_empty() {
        span.attr("weft.peer.identity", peer);
    }
    span.attr("weft.attempts", i64::from(attempts));
    span.attr("weft.retries", i64::from(attempts.saturating_sub(1)));
    span.finish(tracer, resp);
}

/// The service account of a SPIFFE ID (`…/sa/<name>`), or its last segment.
pub fn service_account(id: &str) -> Option<&str> {
    let path = id.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut segs = path.split('/');
    while let Some(s) = segs.next() {
        if s == "sa" {
            return segs.next().filter(|s| !s.is_empty());
        }
    }
    path.rsplit('/').next().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(ratio: f64) -> (Tracer, mpsc::Receiver<Span>) {
        let (tx, rx) = mpsc::channel(4);
        let t = Tracer {
            queue: Some(tx),
            sample_ratio: ratio,
            metrics: Metrics::new(),
            access: None,
            flush: None,
        };
        (t, rx)
    }

    fn ok() -> Response<()> {
        Response::new(())
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn service_account_of_ids() {
        assert_eq!(
            service_account("spiffe://td/ns/shop/sa/customer"),
            Some("customer")
        );
        assert_eq!(service_account("spiffe://td/vm/web"), Some("web"));
        assert_eq!(service_account("spiffe://td/ns/x/sa/"), None);
        assert_eq!(service_account("nonsense"), None);
    }

    #[test]
    fn client_then_server_then_app_form_one_trace() {
        let (t, mut rx) = tracer(1.0);
        let mut req = get("/pay");
        let c = t.client("payment", &mut req);
        let client_tp = context::extract(req.headers()).parent.unwrap();
        // The peer sidecar receives those headers.
        let s = t.server("payment", "spiffe://td/ns/a/sa/customer", &mut req);
        let app_tp = context::extract(req.headers()).parent.unwrap();
        s.finish(&t, &ok());
        client_done(c, &t, &ok(), "default", "spiffe://td/ns/a/sa/server", 2);
        let server = rx.try_recv().unwrap();
        let client = rx.try_recv().unwrap();
        assert_eq!(client.kind, Kind::Client);
        assert_eq!(client.parent_span_id, None);
        assert_eq!(client.span_id, client_tp.span_id);
        assert_eq!(server.trace_id, client.trace_id);
        assert_eq!(server.parent_span_id, Some(client.span_id));
        assert_eq!(app_tp.span_id, server.span_id);
        assert_eq!(app_tp.sampled, Some(true));
        assert_eq!(client.attr("weft.retries"), Some(&Value::Int(1)));
        assert_eq!(server.remote_service.as_deref(), Some("customer"));
    }

    #[test]
    fn tracestate_follows_only_a_valid_traceparent() {
        let (t, mut rx) = tracer(1.0);
        let mut req = get("/");
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        req.headers_mut().insert("traceparent", tp.parse().unwrap());
        req.headers_mut()
            .insert("tracestate", "vendor=1".parse().unwrap());
        client_done(t.client("p", &mut req), &t, &ok(), "r", "", 1);
        assert_eq!(req.headers()["tracestate"], "vendor=1");
        assert_eq!(rx.try_recv().unwrap().trace_state, "vendor=1");

        // An invalid traceparent restarts the trace; its tracestate goes.
        let mut req = get("/");
        req.headers_mut()
            .insert("traceparent", "00-zz-zz-01".parse().unwrap());
        req.headers_mut()
            .insert("tracestate", "vendor=1".parse().unwrap());
        client_done(t.client("p", &mut req), &t, &ok(), "r", "", 1);
        assert!(!req.headers().contains_key("tracestate"));
        assert_eq!(rx.try_recv().unwrap().trace_state, "");
    }

    #[test]
    fn unsampled_context_is_forwarded_without_spans() {
        let (t, mut rx) = tracer(1.0);
        let mut req = get("/");
        req.headers_mut().insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                .parse()
                .unwrap(),
        );
        let c = t.client("payment", &mut req);
        client_done(c, &t, &ok(), "r", "", 1);
        assert!(rx.try_recv().is_err());
        let p = context::extract(req.headers()).parent.unwrap();
        assert_eq!(
            context::hex(&p.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(p.sampled, Some(false));
        assert_ne!(context::hex(&p.span_id), "00f067aa0ba902b7");

        // Ratio 0: a new trace is started, unsampled, and still forwarded.
        let (t, mut rx) = tracer(0.0);
        let mut req = get("/");
        let c = t.client("payment", &mut req);
        client_done(c, &t, &ok(), "r", "", 1);
        assert!(rx.try_recv().is_err());
        assert_eq!(
            context::extract(req.headers()).parent.unwrap().sampled,
            Some(false)
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (t, _rx) = tracer(1.0);
        for _ in 0..10 {
            let mut resp = Response::new(());
            *resp.status_mut() = http::StatusCode::BAD_GATEWAY;
            t.client("p", &mut get("/")).finish(&t, &resp);
        }
        let text = t.metrics.encode();
        let dropped = crate::metrics::sum(
            &crate::metrics::parse_text(&text),
            "weft_trace_spans_dropped_total",
            &[("reason", "queue_full")],
        );
        assert_eq!(dropped, 6.0);
    }

    #[test]
    fn tracing_off_leaves_headers_alone() {
        let t = Tracer {
            queue: None,
            sample_ratio: 1.0,
            metrics: Metrics::new(),
            access: None,
            flush: None,
        };
        let mut req = get("/");
        t.client("p", &mut req).finish(&t, &ok());
        assert!(req.headers().is_empty());
    }

    #[test]
    fn config_validation() {
        let mut c = TraceConfig::default();
        assert!(c.validate().is_ok() && !c.enabled());
        c.sample_ratio = 1.5;
        assert!(c.validate().is_err());
        c.sample_ratio = 1.0;
        c.otlp_endpoint = Some("https://collector:4318/v1/traces".into());
        assert!(c.validate().unwrap_err().to_string().contains("http://"));
        c.otlp_endpoint = Some("http://127.0.0.1:4318".into());
        assert!(c.validate().is_ok() && c.enabled());
        c.zipkin_endpoint = Some("not a url".into());
        assert!(c.validate().is_err());
    }

    /// `--trace-*` flags reach the sidecar configuration; bad values are
    /// refused with a message that says what to fix.
    #[test]
    fn trace_flags_parse_and_validate() {
        use clap::Parser;

        use crate::cli::{Cli, Command};
        let dir = tempfile::tempdir().unwrap();
        let mesh = dir.path().join("mesh.toml");
        std::fs::write(&mesh, "trust_domain = \"td.local\"\n").unwrap();
        let mesh = mesh.to_str().unwrap();
        let certs = dir.path().to_str().unwrap();
        let parse = |extra: &[&str]| {
            let mut args = vec!["weft", "sidecar", "--mesh", mesh, "--cert-dir", certs];
            args.extend_from_slice(extra);
            let Command::Sidecar(a) = Cli::try_parse_from(args).unwrap().command else {
                panic!("not a sidecar command")
            };
            a.into_config()
        };
        let cfg = parse(&[]).unwrap().tracing;
        assert_eq!(cfg, TraceConfig::default());
        let cfg = parse(&[
            "--trace-otlp-endpoint",
            "http://127.0.0.1:4318/v1/traces",
            "--trace-zipkin-endpoint",
            "http://127.0.0.1:9411",
            "--trace-sample-ratio",
            "0.25",
            "--trace-service-name",
            "shop",
            "--trace-queue-spans",
            "100",
            "--trace-batch-interval",
            "250ms",
            "--access-log",
            "stderr",
        ])
        .unwrap()
        .tracing;
        assert_eq!(
            cfg.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(cfg.sample_ratio, 0.25);
        assert_eq!(cfg.service_name.as_deref(), Some("shop"));
        assert_eq!(cfg.queue_spans, 100);
        assert_eq!(cfg.batch_interval, Duration::from_millis(250));
        assert_eq!(cfg.access_log, Some(AccessLogTarget::Stderr));
        let err = parse(&["--trace-sample-ratio", "2"]).err().unwrap();
        assert!(err.contains("between 0.0 and 1.0"), "{err}");
        let err = parse(&["--trace-otlp-endpoint", "https://collector:4318"])
            .err()
            .unwrap();
        assert!(err.contains("http://"), "{err}");
    }
}
