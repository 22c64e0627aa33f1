//! The exporter task: drains the span queue in batches (full, or
//! `batch_interval` after its first span) and POSTs each batch to every
//! configured endpoint, concurrently. One batch is in flight at a time;
//! while a collector is slow or down, the queue fills and the tracer drops
//! new spans (counted), so requests never wait for the collector. A flush
//! request (at shutdown) sends everything queued at once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{mpsc, oneshot};

use super::export::{encode_otlp, encode_zipkin, Resource};
use super::{Span, TraceConfig, TraceError};
use crate::metrics::{Metrics, ReasonLabels, TraceExportLabels};

/// One collector endpoint and the encoding it takes.
struct Target {
    format: &'static str,
    uri: http::Uri,
    content_type: &'static str,
    encode: fn(&Resource, &[Span]) -> Vec<u8>,
}

/// Parse an endpoint URL: plain `http://` only (run a local collector or
/// agent to reach a TLS one); an empty path gets the format's standard one.
pub(super) fn endpoint(url: &str, default_path: &str) -> Result<http::Uri, TraceError> {
    let err = |reason: &str| TraceError::Endpoint {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: http::Uri = url.parse().map_err(|e| err(&format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(err("only http:// endpoints are supported"));
    }
    if uri.authority().is_none() {
        return Err(err("no host:port"));
    }
    match uri.path() {
        "" | "/" => format!("{}{default_path}", url.trim_end_matches('/'))
            .parse()
            .map_err(|e| err(&format!("not a URL: {e}"))),
        _ => Ok(uri),
    }
}

/// Asks the exporter to send everything queued now; answered when done.
pub(super) type Flush = oneshot::Sender<()>;

pub(super) fn run(
    mut rx: mpsc::Receiver<Span>,
    mut flush_rx: mpsc::Receiver<Flush>,
    cfg: TraceConfig,
    resource: Resource,
    metrics: Arc<Metrics>,
) -> Result<impl Future<Output = ()>, TraceError> {
    let mut targets = Vec::new();
    if let Some(u) = &cfg.otlp_endpoint {
        targets.push(Target {
            format: "otlp",
            uri: endpoint(u, "/v1/traces")?,
            content_type: "application/x-protobuf",
            encode: encode_otlp,
        });
    }
    if let Some(u) = &cfg.zipkin_endpoint {
        targets.push(Target {
            format: "zipkin",
            uri: endpoint(u, "/api/v2/spans")?,
            content_type: "application/json",
            encode: encode_zipkin,
        });
    }
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(http);
    let targets = Arc::new(targets);
    let resource = Arc::new(resource);
    let timeout = cfg.export_timeout;
    let send = move |batch: Vec<Span>| {
        let (client, targets, resource, metrics) = (
            client.clone(),
            targets.clone(),
            resource.clone(),
            metrics.clone(),
        );
        async move {
            // Every collector at once: a slow one does not hold back the
            // others' copy of this batch.
            futures::future::join_all(
                targets
                    .iter()
                    .map(|t| export(&client, t, &resource, &batch, timeout, &metrics)),
            )
            .await;
        }
    };
    Ok(async move {
        let mut batch: Vec<Span> = Vec::with_capacity(cfg.batch_spans);
        let mut open = true;
        while open {
            let mut flush = None;
            tokio::select! {
                s = rx.recv() => match s {
                    Some(s) => batch.push(s),
                    None => open = false,
                },
                Some(f) = flush_rx.recv() => flush = Some(f),
            }
            // Fill the batch: until full, its time is up, or a flush.
            let deadline = tokio::time::Instant::now() + cfg.batch_interval;
            while open && flush.is_none() && !batch.is_empty() && batch.len() < cfg.batch_spans {
                tokio::select! {
                    s = rx.recv() => match s {
                        Some(s) => batch.push(s),
                        None => open = false,
                    },
                    Some(f) = flush_rx.recv() => flush = Some(f),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            if flush.is_some() {
                // Everything queued now goes out, in full batches.
                while let Ok(s) = rx.try_recv() {
                    batch.push(s);
                    if batch.len() >= cfg.batch_spans {
                        send(std::mem::take(&mut batch)).await;
                    }
                }
            }
            if !batch.is_empty() {
                send(std::mem::take(&mut batch)).await;
            }
            if let Some(f) = flush {
                let _ = f.send(());
            }
        }
    })
}

async fn export(
    client: &Client<HttpConnector, Full<Bytes>>,
    target: &Target,
    resource: &Resource,
    spans: &[Span],
    timeout: Duration,
    metrics: &Metrics,
) {
    let body = (target.encode)(resource, spans);
    let req = http::Request::post(target.uri.clone())
        .header(http::header::CONTENT_TYPE, target.content_type)
        .body(Full::new(Bytes::from(body)));
    let result = match req {
        Ok(req) => match tokio::time::timeout(timeout, client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(format!("HTTP {}", resp.status())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )),
        },
        Err(e) => Err(e.to_string()),
    };
    let labels = |result| TraceExportLabels {
        format: target.format,
        result,
    };
    match result {
        Ok(()) => {
            metrics
                .trace_export_batches
                .get_or_create(&labels("success"))
                .inc();
            metrics
                .trace_spans_exported
                .get_or_create(&labels("success"))
                .inc_by(spans.len() as u64);
        }
        Err(e) => {
            tracing::debug!(endpoint = %target.uri, error = %e, spans = spans.len(), "span export failed");
            metrics
                .trace_export_batches
                .get_or_create(&labels("failure"))
                .inc();
            metrics
                .trace_spans_dropped
                .get_or_create(&ReasonLabels {
                    reason: "export_failed",
                })
                .inc_by(spans.len() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let u = endpoint("http://127.0.0.1:4318", "/v1/traces").unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:4318/v1/traces");
        let u = endpoint("http://zipkin:9411/", "/api/v2/spans").unwrap();
        assert_eq!(u.to_string(), "http://zipkin:9411/api/v2/spans");
        let u = endpoint("http://c:4318/custom", "/v1/traces").unwrap();
        assert_eq!(u.path(), "/custom");
        assert!(endpoint("https://c:4318", "/v1/traces").is_err());
        assert!(endpoint("c:4318", "/v1/traces").is_err());
        assert!(endpoint("http://", "/v1/traces").is_err());
        assert!(endpoint("", "/v1/traces").is_err());
    }
}
