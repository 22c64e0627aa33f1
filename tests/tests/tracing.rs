//! Distributed tracing end to end: a client and a server sidecar export
//! spans to a collector started by the test (a hyper server decoding OTLP
//! protobuf and Zipkin JSON), in front of an app that reports the trace
//! headers it received, as an app that only forwards them would pass them on.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use weft_proxy::mesh::Protocol;
use weft_proxy::trace::context::{self, hex};
use weft_proxy::trace::export::{decode_otlp, otlp};
use weft_proxy::{IdentitySource, Limits, Sidecar, SidecarConfig, TraceConfig};
use weft_tests::*;

const WAIT: Duration = Duration::from_secs(20);

/// A span as the collector received it, in either format.
#[derive(Debug, Clone)]
struct Got {
    format: &'static str,
    service: String,
    trace_id: String,
    span_id: String,
    parent: Option<String>,
    kind: String,
    error: bool,
    attrs: BTreeMap<String, String>,
}

/// A trace collector on loopback: `POST /v1/traces` (OTLP protobuf) and
/// `POST /api/v2/spans` (Zipkin v2 JSON).
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

impl Collector {
    async fn start() -> (SocketAddr, Collector) {
        let listener = TcpListener::bind(any_port()).await.expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        let c = Collector::default();
        let c2 = c.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let c = c2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let c = c.clone();
                            async move {
                                let path = req.uri().path().to_string();
                                let ctype = req
                                    .headers()
                                    .get("content-type")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let status = match (path.as_str(), ctype.as_str()) {
                                    ("/v1/traces", "application/x-protobuf") => {
                                        c.otlp(&body);
                                        200
                                    }
                                    ("/api/v2/spans", "application/json") => {
                                        c.zipkin(&body);
                                        202
                                    }
                                    _ => 404,
                                };
                                let mut resp = http::Response::new(Full::new(Bytes::new()));
                                *resp.status_mut() =
                                    http::StatusCode::from_u16(status).expect("status");
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (addr, c)
    }

    fn otlp(&self, body: &[u8]) {
        let req = decode_otlp(body).expect("a valid OTLP ExportTraceServiceRequest");
        let text = |v: &Option<otlp::AnyValue>| match v.as_ref().and_then(|v| v.value.as_ref()) {
            Some(otlp::any_value::Value::StringValue(s)) => s.clone(),
            Some(otlp::any_value::Value::IntValue(i)) => i.to_string(),
            Some(otlp::any_value::Value::BoolValue(b)) => b.to_string(),
            None => String::new(),
        };
        let mut out = self.spans.lock().expect("lock");
        for rs in &req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push(Got {
                        format: "otlp",
                        service: service.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                        kind: match s.kind {
                            otlp::SPAN_KIND_CLIENT => "CLIENT".into(),
                            otlp::SPAN_KIND_SERVER => "SERVER".into(),
                            k => format!("kind {k}"),
                        },
                        error: s
                            .status
                            .as_ref()
                            .is_some_and(|st| st.code == otlp::STATUS_CODE_ERROR),
                        attrs: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(&a.value)))
                            .collect(),
                    });
                }
            }
        }
    }

    fn zipkin(&self, body: &[u8]) {
        let v: serde_json::Value = serde_json::from_slice(body).expect("Zipkin JSON");
        let list = v.as_array().expect("a JSON array of spans");
        let s = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_string();
        let mut out = self.spans.lock().expect("lock");
        for z in list {
            assert!(z["timestamp"].as_u64().is_some_and(|t| t > 0), "{z}");
            assert!(z["duration"].as_u64().is_some_and(|d| d > 0), "{z}");
            let tags: BTreeMap<String, String> = z["tags"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), s(v))).collect())
                .unwrap_or_default();
            out.push(Got {
                format: "zipkin",
                service: s(&z["localEndpoint"]["serviceName"]),
                trace_id: s(&z["traceId"]),
                span_id: s(&z["id"]),
                parent: z.get("parentId").map(s),
                kind: s(&z["kind"]),
                error: tags.contains_key("error"),
                attrs: tags,
            });
        }
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Got> {
        let spans = self.spans.lock().expect("lock");
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Wait until `n` spans of the trace arrived.
    async fn wait(&self, trace_id: &str, n: usize) -> Vec<Got> {
        let ok = wait_until(WAIT, || async { self.of_trace(trace_id).len() >= n }).await;
        let got = self.of_trace(trace_id);
        assert!(ok, "expected {n} spans of trace {trace_id}, got {got:#?}");
        got
    }
}

/// An app that answers with the trace headers it received, as
/// `x-seen-<header>` ("none" if absent). `/status/N` answers status N.
async fn trace_app() -> SocketAddr {
    let listener = TcpListener::bind(any_port()).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let mut resp = http::Response::builder();
                        for h in [
                            "traceparent",
                            "tracestate",
                            "b3",
                            "x-b3-traceid",
                            "x-b3-spanid",
                            "x-b3-parentspanid",
                            "x-b3-sampled",
                        ] {
                            let v = req
                                .headers()
                                .get(h)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("none");
                            resp = resp.header(format!("x-seen-{h}"), v);
                        }
                        let status = req
                            .uri()
                            .path()
                            .strip_prefix("/status/")
                            .and_then(|s| s.parse::<u16>().ok())
                            .unwrap_or(200);
                        Ok::<_, Infallible>(
                            resp.status(status)
                                .body(Full::new(Bytes::from_static(b"ok")))
                                .expect("response"),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A client sidecar (`customer`) and a server sidecar (`server`) in front
/// of `app`, both tracing with `cfg`.
struct Traced {
    ca: TestCa,
    client: Sidecar,
    server: Sidecar,
}

async fn start(app: SocketAddr, cfg: TraceConfig) -> Traced {
    start_with(app, cfg.clone(), cfg).await
}

/// Like [`start`], with settings for each side; `raw` is a TCP service
/// that reaches the same app.
async fn start_with(app: SocketAddr, client_cfg: TraceConfig, server_cfg: TraceConfig) -> Traced {
    let ca = TestCa::new(TD);
    let m = mesh(TD, &[("payment", Protocol::Http), ("raw", Protocol::Tcp)]);
    let config = |name: &str,
                  app: Option<SocketAddr>,
                  upstreams: Vec<(String, SocketAddr)>,
                  tracing: &TraceConfig| SidecarConfig {
        mesh: m.clone(),
        identity: IdentitySource::Static(ca.creds(name)),
        inbound: any_port(),
        admin: any_port(),
        app,
        upstreams,
        udp_upstreams: Vec::new(),
        limits: Limits::default(),
        tracing: tracing.clone(),
        capture: Default::default(),
        dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
    };
    let server = Sidecar::start(config("server", Some(app), vec![], &server_cfg))
        .await
        .expect("server sidecar");
    let upstreams = vec![
        ("payment".to_string(), any_port()),
        ("raw".to_string(), any_port()),
    ];
    let client = Sidecar::start(config("customer", None, upstreams, &client_cfg))
        .await
        .expect("client sidecar");
    let m = with_endpoint(m.clone(), "payment", server.inbound_addr);
    let m = with_endpoint(m, "raw", server.inbound_addr);
    client.set_mesh(m.clone());
    server.set_mesh(m);
    Traced { ca, client, server }
}

fn config(otlp: Option<SocketAddr>, zipkin: Option<SocketAddr>) -> TraceConfig {
    TraceConfig {
        otlp_endpoint: otlp.map(|a| format!("http://{a}/v1/traces")),
        zipkin_endpoint: zipkin.map(|a| format!("http://{a}/api/v2/spans")),
        sample_ratio: 1.0,
        batch_interval: Duration::from_millis(50),
        ..TraceConfig::default()
    }
}

/// GET `path` through the client sidecar with extra request headers:
/// (status, response headers).
async fn get(t: &Traced, path: &str, headers: &[(&str, &str)]) -> (u16, http::HeaderMap) {
    let addr = t.client.upstream_addrs["payment"];
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", "payment");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let _ = resp.into_body().collect().await;
    (status, h)
}

/// What the app saw in header `name`, parsed as a context if it is one.
fn seen(h: &http::HeaderMap, name: &str) -> String {
    h.get(format!("x-seen-{name}"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("missing")
        .to_string()
}

fn seen_parent(h: &http::HeaderMap) -> context::Parent {
    let tp = seen(h, "traceparent");
    context::parse_traceparent(&tp).unwrap_or_else(|| panic!("app got traceparent {tp:?}"))
}

fn one<'a>(spans: &'a [Got], kind: &str) -> &'a Got {
    let of_kind: Vec<&Got> = spans.iter().filter(|s| s.kind == kind).collect();
    assert_eq!(of_kind.len(), 1, "one {kind} span expected: {spans:#?}");
    of_kind[0]
}

/// Both sidecars report their hop of one request, in one trace, linked
/// client → server → app.
async fn both_hops_form_one_trace(format: &'static str) {
    let app = trace_app().await;
    let (collector_addr, collector) = Collector::start().await;
    let cfg = match format {
        "otlp" => config(Some(collector_addr), None),
        _ => config(None, Some(collector_addr)),
    };
    let t = start(app, cfg).await;
    let (status, h) = get(&t, "/pay", &[]).await;
    assert_eq!(status, 200);
    let app_ctx = seen_parent(&h);
    assert_eq!(app_ctx.sampled, Some(true));
    let trace = hex(&app_ctx.trace_id);
    let spans = collector.wait(&trace, 2).await;
    assert!(spans.iter().all(|s| s.format == format));
    let client = one(&spans, "CLIENT");
    let server = one(&spans, "SERVER");
    // A new trace: the client span is its root.
    assert_eq!(client.parent, None);
    assert_eq!(server.parent.as_deref(), Some(client.span_id.as_str()));
    assert_eq!(hex(&app_ctx.span_id), server.span_id, "the app's parent");
    assert_eq!(client.service, "customer");
    assert_eq!(server.service, "server");
    let a = &client.attrs;
    assert_eq!(a["weft.service"], "payment");
    assert_eq!(a["weft.route"], "default");
    assert_eq!(a["weft.peer.identity"], t.ca.id("server"));
    assert_eq!(a["weft.attempts"], "1");
    assert_eq!(a["weft.retries"], "0");
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["url.path"], "/pay");
    let a = &server.attrs;
    assert_eq!(a["weft.peer.identity"], t.ca.id("customer"));
    assert_eq!(a["weft.attempt"], "1");
    assert_eq!(a["weft.service"], "payment");
    assert_eq!(a["http.response.status_code"], "200");
    assert!(!client.error && !server.error);

    // A 5xx from the app marks both spans failed.
    let (status, h) = get(&t, "/status/503", &[]).await;
    assert_eq!(status, 503);
    let spans = collector.wait(&hex(&seen_parent(&h).trace_id), 2).await;
    assert!(spans.iter().all(|s| s.error), "{spans:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_spans_from_both_sidecars_form_one_trace() {
    both_hops_form_one_trace("otlp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipkin_spans_from_both_sidecars_form_one_trace() {
    both_hops_form_one_trace("zipkin").await;
}

/// An app's own context is continued: same trace, our client span a child
/// of the app's span; `tracestate` passes unchanged; B3 headers (single or
/// multi) are rewritten consistently for the app behind the server sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_context_is_continued_in_w3c_and_b3() {
    let app = trace_app().await;
    let (collector_addr, collector) = Collector::start().await;
    // Ratio 0: only the callers' sampled flags get anything recorded.
    let mut cfg = config(Some(collector_addr), Some(collector_addr));
    cfg.sample_ratio = 0.0;
    let t = start(app, cfg).await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let tp = format!("00-{trace}-{caller}-01");
    let (status, h) = get(
        &t,
        "/",
        &[("traceparent", &tp), ("tracestate", "vendor=abc,other=1")],
    )
    .await;
    assert_eq!(status, 200);
    let app_ctx = seen_parent(&h);
    assert_eq!(hex(&app_ctx.trace_id), trace);
    assert_eq!(seen(&h, "tracestate"), "vendor=abc,other=1");
    assert_eq!(seen(&h, "b3"), "none", "no B3 unless the caller used it");
    // Both formats, two sidecars: four spans.
    let spans = collector.wait(trace, 4).await;
    for format in ["otlp", "zipkin"] {
        let of: Vec<Got> = spans
            .iter()
            .filter(|s| s.format == format)
            .cloned()
            .collect();
        let client = one(&of, "CLIENT");
        let server = one(&of, "SERVER");
        assert_eq!(client.parent.as_deref(), Some(caller));
        assert_eq!(server.parent.as_deref(), Some(client.span_id.as_str()));
        assert_eq!(hex(&app_ctx.span_id), server.span_id);
    }

    // B3 single header.
    let trace = "a3ce929d0e0e4736a3ce929d0e0e4736";
    let b3 = format!("{trace}-{caller}-1");
    let (_, h) = get(&t, "/", &[("b3", &b3)]).await;
    let spans = collector.wait(trace, 4).await;
    let client = one_of(&spans, "CLIENT", "otlp");
    let server = one_of(&spans, "SERVER", "otlp");
    assert_eq!(client.parent.as_deref(), Some(caller));
    let app_b3 = seen(&h, "b3");
    assert_eq!(
        app_b3,
        format!("{trace}-{}-1-{}", server.span_id, client.span_id),
        "the app's b3 names the server span, child of the client span"
    );
    assert_eq!(hex(&seen_parent(&h).span_id), server.span_id);

    // B3 multi headers.
    let trace = "b3b3b3b3b3b3b3b3a3ce929d0e0e4736";
    let (_, h) = get(
        &t,
        "/",
        &[
            ("x-b3-traceid", trace),
            ("x-b3-spanid", caller),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let spans = collector.wait(trace, 4).await;
    let client = one_of(&spans, "CLIENT", "zipkin");
    let server = one_of(&spans, "SERVER", "zipkin");
    assert_eq!(client.parent.as_deref(), Some(caller));
    assert_eq!(seen(&h, "x-b3-traceid"), trace);
    assert_eq!(seen(&h, "x-b3-spanid"), server.span_id);
    assert_eq!(seen(&h, "x-b3-parentspanid"), client.span_id);
    assert_eq!(seen(&h, "x-b3-sampled"), "1");
}

fn one_of(spans: &[Got], kind: &str, format: &str) -> Got {
    let of: Vec<Got> = spans
        .iter()
        .filter(|s| s.format == format)
        .cloned()
        .collect();
    one(&of, kind).clone()
}

/// A caller's "not sampled" is obeyed: no spans, but the context still
/// reaches the app (same trace, flag 00), so its own tracer agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_requests_make_no_spans_but_forward_context() {
    let app = trace_app().await;
    let (collector_addr, collector) = Collector::start().await;
    let t = start(app, config(Some(collector_addr), None)).await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller = "b7ad6b7169203331";
    let (status, h) = get(
        &t,
        "/",
        &[("traceparent", &format!("00-{trace}-{caller}-00"))],
    )
    .await;
    assert_eq!(status, 200);
    let app_ctx = seen_parent(&h);
    assert_eq!(hex(&app_ctx.trace_id), trace);
    assert_eq!(app_ctx.sampled, Some(false));
    assert_ne!(hex(&app_ctx.span_id), caller, "a new parent for the app");
    // B3 "don't sample" is obeyed too.
    let (_, h) = get(&t, "/", &[("b3", "0")]).await;
    let b3_ctx = seen_parent(&h);
    assert_eq!(b3_ctx.sampled, Some(false));
    let b3 = seen(&h, "b3");
    assert_eq!(b3.split('-').nth(2), Some("0"), "{b3}");

    // A sampled request afterwards: once its spans are in, any span of the
    // earlier requests would be too (one queue, exported in order).
    let (_, h) = get(&t, "/", &[]).await;
    collector.wait(&hex(&seen_parent(&h).trace_id), 2).await;
    assert!(collector.of_trace(trace).is_empty());
    assert!(collector.of_trace(&hex(&b3_ctx.trace_id)).is_empty());
    assert_eq!(collector.spans.lock().expect("lock").len(), 2);
}

/// A collector that accepts connections and never answers, and one that
/// refuses them: requests neither fail nor wait; spans that do not fit the
/// queue are dropped and counted, and so are failed exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_never_fails_or_slows_requests() {
    let app = trace_app().await;
    let black_hole = TcpListener::bind(any_port()).await.expect("bind");
    let hole_addr = black_hole.local_addr().expect("addr");
    let held = Arc::new(Mutex::new(Vec::new()));
    let held2 = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = black_hole.accept().await {
            held2.lock().expect("lock").push(s);
        }
    });
    let refused = {
        let l = std::net::TcpListener::bind(any_port()).expect("bind");
        l.local_addr().expect("addr")
    };
    let mut cfg = config(Some(hole_addr), Some(refused));
    cfg.queue_spans = 4;
    cfg.batch_spans = 2;
    cfg.batch_interval = Duration::from_millis(10);
    cfg.export_timeout = Duration::from_secs(120);
    let t = start(app, cfg).await;

    let started = Instant::now();
    let n = 100;
    for i in 0..n {
        let sent = Instant::now();
        let (status, _) = get(&t, "/", &[]).await;
        assert_eq!(status, 200, "request {i}");
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "request {i} took {:?}",
            sent.elapsed()
        );
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "{n} requests took {took:?}");

    let admin = t.client.admin_addr;
    let ok = wait_until(WAIT, || async {
        let m = scrape(admin).await;
        metric_sum(
            &m,
            "weft_trace_export_batches_total",
            &[("format", "zipkin"), ("result", "failure")],
        ) >= 1.0
    })
    .await;
    let m = scrape(admin).await;
    assert!(ok, "a refused export is counted");
    let dropped = metric_sum(
        &m,
        "weft_trace_spans_dropped_total",
        &[("reason", "queue_full")],
    );
    // 100 client spans; at most the queue and one batch in flight are kept.
    assert!(dropped >= (n - 4 - 2) as f64, "dropped {dropped}");
    assert!(
        !held.lock().expect("lock").is_empty(),
        "the exporter did try"
    );

    // Shutting down waits for queued spans only briefly.
    let stopping = Instant::now();
    t.client.shutdown().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        stopping.elapsed()
    );
}

/// `--access-log`: each side writes one JSON line per HTTP request and per
/// TCP stream, with the peer's identity, status, bytes and the trace ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_from_both_sides() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_proxy::trace::access_log::AccessLogTarget;
    let app = trace_app().await;
    let (collector_addr, _collector) = Collector::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client_log = dir.path().join("client.jsonl");
    let server_log = dir.path().join("server.jsonl");
    let mut client_cfg = config(Some(collector_addr), None);
    client_cfg.access_log = Some(AccessLogTarget::File(client_log.clone()));
    let mut server_cfg = client_cfg.clone();
    server_cfg.access_log = Some(AccessLogTarget::File(server_log.clone()));
    let t = start_with(app, client_cfg, server_cfg).await;

    let (status, h) = get(&t, "/pay?card=secret", &[]).await;
    assert_eq!(status, 200);
    let trace = hex(&seen_parent(&h).trace_id);

    // A TCP stream carrying one HTTP/1.1 exchange with the same app.
    let mut tcp = tokio::net::TcpStream::connect(t.client.upstream_addrs["raw"])
        .await
        .expect("connect raw");
    let request = b"GET /raw HTTP/1.1\r\nhost: raw\r\nconnection: close\r\n\r\n";
    tcp.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.expect("read");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(tcp);

    let client_lines = json_lines(&client_log, 2).await;
    let server_lines = json_lines(&server_log, 2).await;

    let out = by_protocol(&client_lines, "http");
    assert_eq!(out["direction"], "outbound");
    assert_eq!(out["service"], "payment");
    assert_eq!(out["route"], "default");
    assert_eq!(out["peer"], t.ca.id("server").as_str());
    assert_eq!(out["method"], "GET");
    assert_eq!(out["path"], "/pay", "the query string is not logged");
    assert_eq!(out["status"], 200);
    assert_eq!(out["response_bytes"], 2);
    assert_eq!(out["attempts"], 1);
    assert_eq!(out["trace_id"], trace.as_str());
    assert!(out["duration_ms"].as_f64().is_some_and(|d| d > 0.0));
    let inb = by_protocol(&server_lines, "http");
    assert_eq!(inb["direction"], "inbound");
    assert_eq!(inb["peer"], t.ca.id("customer").as_str());
    assert_eq!(inb["status"], 200);
    assert_eq!(inb["response_bytes"], 2);
    assert_eq!(inb["trace_id"], trace.as_str());

    let out = by_protocol(&client_lines, "tcp");
    let inb = by_protocol(&server_lines, "tcp");
    for (l, peer) in [(&out, t.ca.id("server")), (&inb, t.ca.id("customer"))] {
        assert_eq!(l["service"], "raw");
        assert_eq!(l["peer"], peer.as_str());
        assert_eq!(l["request_bytes"], request.len() as u64, "{l}");
        assert_eq!(l["response_bytes"], answer.len() as u64, "{l}");
    }
}

/// The JSON lines of `path`, once it has at least `n`.
async fn json_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let read = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect::<Vec<serde_json::Value>>()
    };
    let ok = wait_until(WAIT, || async { read().len() >= n }).await;
    let got = read();
    assert!(ok, "{n} lines in {}: {got:?}", path.display());
    got
}

fn by_protocol(lines: &[serde_json::Value], protocol: &str) -> serde_json::Value {
    lines
        .iter()
        .find(|l| l["protocol"] == protocol)
        .unwrap_or_else(|| panic!("a {protocol} line in {lines:?}"))
        .clone()
}

/// An app that forwards the trace headers of each request it serves to a
/// call of its own (through its sidecar, to `next`), and answers with what
/// that call returned.
async fn forwarding_app(next: Arc<std::sync::OnceLock<SocketAddr>>) -> SocketAddr {
    let listener = TcpListener::bind(any_port()).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let next = next.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let next = next.clone();
                        async move {
                            let Some(next) = next.get().copied() else {
                                return Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(500)
                                        .body(Full::new(Bytes::new()))
                                        .expect("response"),
                                );
                            };
                            let stream =
                                tokio::net::TcpStream::connect(next).await.expect("connect");
                            let (mut sender, conn) =
                                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                                    .await
                                    .expect("handshake");
                            tokio::spawn(conn);
                            let mut call = http::Request::get("/ledger").header("host", "ledger");
                            for h in context::PROPAGATED {
                                if let Some(v) = req.headers().get(*h) {
                                    call = call.header(*h, v);
                                }
                            }
                            let resp = sender
                                .send_request(call.body(Full::new(Bytes::new())).expect("request"))
                                .await
                                .expect("ledger response");
                            let mut out = http::Response::builder().status(resp.status());
                            for (k, v) in resp.headers() {
                                if k.as_str().starts_with("x-seen-") {
                                    out = out.header(k, v);
                                }
                            }
                            Ok(out.body(Full::new(Bytes::new())).expect("response"))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Three hops: customer → payment → ledger, where the payment app only
/// forwards the trace headers to its own call. One trace, each span the
/// child of the one before, down to the ledger app's parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_forwards_headers_continues_the_trace() {
    let (collector_addr, collector) = Collector::start().await;
    let cfg = config(Some(collector_addr), None);
    let ca = TestCa::new(TD);
    let m = mesh(
        TD,
        &[("payment", Protocol::Http), ("ledger", Protocol::Http)],
    );
    let start = |name: &str, app: Option<SocketAddr>, upstream: Option<&str>| {
        Sidecar::start(SidecarConfig {
            mesh: m.clone(),
            identity: IdentitySource::Static(ca.creds(name)),
            inbound: any_port(),
            admin: any_port(),
            app,
            upstreams: upstream
                .map(|s| (s.to_string(), any_port()))
                .into_iter()
                .collect(),
            udp_upstreams: Vec::new(),
            limits: Limits::default(),
            tracing: cfg.clone(),
            capture: Default::default(),
            dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
        })
    };
    let ledger_app = trace_app().await;
    let next = Arc::new(std::sync::OnceLock::new());
    let payment_app = forwarding_app(next.clone()).await;
    let ledger = start("ledger", Some(ledger_app), None)
        .await
        .expect("ledger");
    let payment = start("payment", Some(payment_app), Some("ledger"))
        .await
        .expect("payment");
    let customer = start("customer", None, Some("payment"))
        .await
        .expect("customer");
    next.set(payment.upstream_addrs["ledger"])
        .expect("set once");
    let m = with_endpoint(m.clone(), "payment", payment.inbound_addr);
    let m = with_endpoint(m, "ledger", ledger.inbound_addr);
    for s in [&customer, &payment, &ledger] {
        s.set_mesh(m.clone());
    }

    let (status, h, _) = http_get(customer.upstream_addrs["payment"], "payment", "/pay").await;
    assert_eq!(status, 200);
    let ledger_ctx = seen_parent(&h);
    let spans = collector.wait(&hex(&ledger_ctx.trace_id), 4).await;
    let find = |service: &str, kind: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.kind == kind)
            .unwrap_or_else(|| panic!("{kind} span of {service} in {spans:#?}"))
    };
    let customer_client = find("customer", "CLIENT");
    let payment_server = find("payment", "SERVER");
    let payment_client = find("payment", "CLIENT");
    let ledger_server = find("ledger", "SERVER");
    assert_eq!(customer_client.parent, None);
    assert_eq!(
        payment_server.parent.as_ref(),
        Some(&customer_client.span_id)
    );
    assert_eq!(
        payment_client.parent.as_ref(),
        Some(&payment_server.span_id)
    );
    assert_eq!(ledger_server.parent.as_ref(), Some(&payment_client.span_id));
    assert_eq!(hex(&ledger_ctx.span_id), ledger_server.span_id);
    assert_eq!(payment_client.attrs["weft.service"], "ledger");
}

/// Spans still queued when a sidecar shuts down are sent before it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_spans_are_sent_at_shutdown() {
    let app = trace_app().await;
    let (collector_addr, collector) = Collector::start().await;
    let mut cfg = config(Some(collector_addr), None);
    // Nothing would leave by time for an hour.
    cfg.batch_interval = Duration::from_secs(3600);
    let t = start(app, cfg).await;
    let (status, h) = get(&t, "/", &[]).await;
    assert_eq!(status, 200);
    let trace = hex(&seen_parent(&h).trace_id);
    assert!(collector.of_trace(&trace).is_empty(), "held for the batch");
    let Traced { client, server, .. } = t;
    server.shutdown().await;
    client.shutdown().await;
    let spans = collector.of_trace(&trace);
    assert_eq!(spans.len(), 2, "{spans:#?}");
}
