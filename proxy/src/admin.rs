//! The admin server (default 127.0.0.1:15000): `/ready`, `/live`,
//! `/metrics` (Prometheus text), `/config` (effective config as JSON) and
//! `/certs` (our identity and certificate expiry), `/clusters` (every
//! service's endpoints with health, latency estimate, in-flight requests and
//! ejection state; circuit breaker and retry budget use).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::{self, ProxyBody};
use crate::sidecar::Ctx;

pub(crate) async fn serve(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx2 = ctx.clone();
        ctx.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx2.clone();
                async move { Ok::<_, Infallible>(handle(&ctx, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn handle(ctx: &Ctx, req: Request<Incoming>) -> Response<ProxyBody> {
    match req.uri().path() {
        // Alive while draining too: a restart now would only cut the drain short.
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => ready(ctx),
        "/metrics" => {
            // OpenMetrics for scrapers that ask for it (Prometheus does);
            // the classic text format for everyone else (curl, promtool).
            let openmetrics = req
                .headers()
                .get_all(http::header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let (body, content_type) = if openmetrics {
                (
                    ctx.metrics.encode(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            } else {
                (
                    ctx.metrics.encode_prometheus(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            };
            let mut r = text(StatusCode::OK, body);
            r.headers_mut()
                .insert("content-type", http::HeaderValue::from_static(content_type));
            r
        }
        "/config" => {
            let cfg = serde_json::json!({
                "sidecar": ctx.effective,
                "mesh": ctx.state.load().mesh(),
            });
            json(&cfg)
        }
        "/certs" => {
            let unix = |t: Option<std::time::SystemTime>| t.map(crate::identity::unix);
            let not_after = ctx.tls.not_after();
            let left = not_after
                .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
                .map(|d| d.as_secs());
            json(&serde_json::json!({
                "identity": ctx.tls.identity().to_string(),
                "trust_domain": ctx.tls.trust_domain(),
                "serial": ctx.tls.serial(),
                "not_before_unix": unix(ctx.tls.not_before()),
                "not_after_unix": unix(not_after),
                "expires_in_seconds": left,
                "trust_bundle_roots": ctx.tls.bundle_roots(),
            }))
        }
        "/clusters" => json(&ctx.state.load().snapshot()),
        "/logging" => logging(&req),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /ready /live /metrics /config /certs /clusters /logging\n".into(),
        ),
    }
}

/// `/ready`: 200 once every listener is up (start-up sets `ctx.ready`
/// after binding them all) while the certificate is valid; 503 before,
/// after expiry, and from the start of a drain on, so Kubernetes takes the
/// pod out of its Services' endpoints.
fn ready(ctx: &Ctx) -> Response<ProxyBody> {
    let now = std::time::SystemTime::now();
    let valid = ctx.tls.not_after().is_none_or(|na| now < na)
        && ctx.tls.not_before().is_none_or(|nb| nb <= now);
    let (status, why) = if ctx.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !ctx.ready.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: starting")
    } else if !valid {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: certificate not valid now",
        )
    } else {
        (StatusCode::OK, "ready")
    };
    text(status, format!("{why}\n"))
}

/// `GET /logging`: the log filter in force; `POST /logging?level=FILTER`:
/// change it (admin port only, which listens on loopback by default).
fn logging(req: &Request<Incoming>) -> Response<ProxyBody> {
    let unavailable = || {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", crate::logging::LevelError::Unavailable),
        )
    };
    if req.method() == http::Method::GET {
        return match crate::logging::current() {
            Some(f) => text(StatusCode::OK, format!("{f}\n")),
            None => unavailable(),
        };
    }
    if req.method() != http::Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /logging shows the log filter; POST /logging?level=debug changes it\n".into(),
        );
    }
    let level = req.uri().query().unwrap_or("").split('&').find_map(|kv| {
        kv.strip_prefix("level=").map(|v| {
            v.replace("%2C", ",")
                .replace("%3D", "=")
                .replace("%3A", ":")
        })
    });
    let Some(level) = level.filter(|l| !l.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "give the filter as ?level=debug (or e.g. ?level=info,weft_proxy=debug)\n".into(),
        );
    };
    match crate::logging::set(&level) {
        Ok(()) => text(StatusCode::OK, format!("{level}\n")),
        Err(crate::logging::LevelError::Unavailable) => unavailable(),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", http::HeaderValue::from_static("text/plain"));
    r
}

fn json(v: &serde_json::Value) -> Response<ProxyBody> {
    let body = serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    let mut r = Response::new(body::full(body));
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}
