//! Access logs (`--access-log stderr|FILE`): one JSON line per HTTP request
//! (written when its response body has gone out, so the byte count and the
//! duration are whole) and one per TCP stream (written when it closes), on
//! both sides of the mesh. Lines go through a bounded queue to a writer
//! task: a slow disk never slows a request, and lines that do not fit are
//! dropped and counted (`weft_access_log_dropped_total`).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::body::{BoxError, ProxyBody};

/// Lines waiting for the writer; beyond this they are dropped. 4096 lines
/// (~2 MiB) absorb a burst while the disk stalls for a moment.
const QUEUE_LINES: usize = 4096;

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stderr,
    File(PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("give `stderr` or a file path".into()),
            "stderr" | "-" => Ok(AccessLogTarget::Stderr),
            path => Ok(AccessLogTarget::File(PathBuf::from(path))),
        }
    }
}

impl Serialize for AccessLogTarget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AccessLogTarget::Stderr => s.serialize_str("stderr"),
            AccessLogTarget::File(p) => s.serialize_str(&p.display().to_string()),
        }
    }
}

/// One line of the access log. Absent fields are omitted.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Entry {
    /// When the request or stream started (RFC 3339, UTC, milliseconds).
    pub start: String,
    /// `outbound` (from our app) or `inbound` (from a peer sidecar).
    pub direction: &'static str,
    /// `http` or `tcp`.
    pub protocol: &'static str,
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The other side's SPIFFE ID (the server outbound, the caller inbound).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub peer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Until the last byte (HTTP: of the response body; TCP: of the stream).
    pub duration_ms: f64,
    /// HTTP: the request's Content-Length, if it declared one; TCP: bytes
    /// from the app (outbound) or the peer (inbound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_bytes: Option<u64>,
    /// HTTP: response body bytes delivered; TCP: bytes towards the app
    /// (outbound) or the peer (inbound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
    /// Outbound HTTP: tries sent to peers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// What the sidecar did or saw: `retried`, `sidecar_error`, `fault`,
    /// `overflow`, `denied`, `mirror`, `body_incomplete`, `error`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The access log of one sidecar.
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    dropped: Counter,
}

impl AccessLog {
    /// Open the target (a file is created or appended to, so a bad path
    /// fails at start) and return the log and its writer task.
    pub fn open(
        target: &AccessLogTarget,
        dropped: Counter,
    ) -> std::io::Result<(AccessLog, impl std::future::Future<Output = ()>)> {
        let out: Pin<Box<dyn tokio::io::AsyncWrite + Send>> = match target {
            AccessLogTarget::Stderr => Box::pin(tokio::io::stderr()),
            AccessLogTarget::File(p) => Box::pin(tokio::fs::File::from_std(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
        };
        let (tx, rx) = mpsc::channel(QUEUE_LINES);
        Ok((AccessLog { tx, dropped }, write_lines(rx, out)))
    }

    /// Queue one entry; never waits.
    pub fn log(&self, entry: &Entry) {
        let Ok(mut line) = serde_json::to_string(entry) else {
            return;
        };
        line.push('\n');
        if self.tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

async fn write_lines(
    mut rx: mpsc::Receiver<String>,
    out: Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
) {
    let mut out = tokio::io::BufWriter::new(out);
    while let Some(line) = rx.recv().await {
        let mut ok = out.write_all(line.as_bytes()).await.is_ok();
        // Write what is queued, then flush once: lines reach the file
        // within one queue drain, without a syscall per line under load.
        while let Ok(line) = rx.try_recv() {
            ok &= out.write_all(line.as_bytes()).await.is_ok();
        }
        if !(ok && out.flush().await.is_ok()) {
            tracing::warn!("access log write failed");
        }
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// An HTTP request being logged: what is known when it arrives.
pub(crate) struct HttpLog {
    log: Option<Arc<AccessLog>>,
    entry: Entry,
    started: Instant,
}

impl HttpLog {
    /// Note the request (after the tracer set its headers, so the trace ID
    /// is the one the next hop sees).
    pub fn start<B>(
        log: Option<&Arc<AccessLog>>,
        direction: &'static str,
        service: &str,
        req: &Request<B>,
    ) -> HttpLog {
        let Some(log) = log else {
            return HttpLog {
                log: None,
                entry: Entry::default(),
                started: Instant::now(),
            };
        };
        let h = req.headers();
        let entry = Entry {
            start: timestamp(SystemTime::now()),
            direction,
            protocol: "http",
            service: service.to_string(),
            method: Some(req.method().to_string()),
            path: Some(req.uri().path().to_string()),
            request_bytes: h
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            trace_id: super::context::extract(h)
                .parent
                .map(|p| super::context::hex(&p.trace_id)),
            flags: if h.contains_key(crate::headers::MIRROR) {
                vec!["mirror"]
            } else {
                Vec::new()
            },
            ..Entry::default()
        };
        HttpLog {
            log: Some(log.clone()),
            entry,
            started: Instant::now(),
        }
    }

    /// Wrap the response: the line is written when its body ends (or the
    /// receiver goes away). `route` and `attempts` are outbound only.
    pub fn respond(
        mut self,
        resp: Response<ProxyBody>,
        peer: &str,
        route: Option<&str>,
        attempts: Option<u32>,
    ) -> Response<ProxyBody> {
        if self.log.is_none() {
            return resp;
        }
        let e = &mut self.entry;
        e.status = Some(resp.status().as_u16());
        e.peer = peer.to_string();
        e.route = route.map(str::to_string);
        e.attempts = attempts;
        if attempts.is_some_and(|a| a > 1) {
            e.flags.push("retried");
        }
        e.flags.extend(flags(resp.headers()));
        resp.map(|body| {
            Logged {
                inner: body,
                bytes: 0,
                done: false,
                http: self,
            }
            .boxed_unsync()
        })
    }
}

fn flags(h: &HeaderMap) -> impl Iterator<Item = &'static str> + '_ {
    [
        (crate::headers::ERROR, "sidecar_error"),
        (crate::headers::FAULT, "fault"),
        (crate::headers::OVERFLOW, "overflow"),
        (crate::headers::DENIED, "denied"),
    ]
    .into_iter()
    .filter(|(header, _)| h.contains_key(*header))
    .map(|(_, flag)| flag)
}

/// A response body that counts its bytes and writes the log line at its end.
struct Logged {
    inner: ProxyBody,
    bytes: u64,
    done: bool,
    http: HttpLog,
}

impl Logged {
    fn finish(&mut self, flag: Option<&'static str>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let Some(log) = &self.http.log else { return };
        let e = &mut self.http.entry;
        e.response_bytes = Some(self.bytes);
        e.duration_ms = self.http.started.elapsed().as_secs_f64() * 1000.0;
        e.flags.extend(flag);
        log.log(e);
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(None);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(Some("error")),
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // An empty body may never be polled; otherwise the receiver left early.
        let flag = (!self.inner.is_end_stream()).then_some("body_incomplete");
        self.finish(flag);
    }
}

/// Log a finished TCP stream.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tcp(
    log: Option<&Arc<AccessLog>>,
    direction: &'static str,
    service: &str,
    peer: &str,
    started: (SystemTime, Instant),
    request_bytes: u64,
    response_bytes: u64,
    error: Option<String>,
) {
    let Some(log) = log else { return };
    log.log(&Entry {
        start: timestamp(started.0),
        direction,
        protocol: "tcp",
        service: service.to_string(),
        peer: peer.to_string(),
        duration_ms: started.1.elapsed().as_secs_f64() * 1000.0,
        request_bytes: Some(request_bytes),
        response_bytes: Some(response_bytes),
        flags: if error.is_some() {
            vec!["error"]
        } else {
            Vec::new()
        },
        error,
        ..Entry::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!("stderr".parse(), Ok(AccessLogTarget::Stderr));
        assert_eq!("-".parse(), Ok(AccessLogTarget::Stderr));
        assert_eq!(
            "/var/log/weft.jsonl".parse(),
            Ok(AccessLogTarget::File("/var/log/weft.jsonl".into()))
        );
        assert!("".parse::<AccessLogTarget>().is_err());
    }

    #[tokio::test]
    async fn http_lines_carry_status_bytes_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.jsonl");
        let dropped = Counter::default();
        let (log, writer) = AccessLog::open(&AccessLogTarget::File(path.clone()), dropped).unwrap();
        let log = Arc::new(log);
        let task = tokio::spawn(writer);
        let req = Request::post("/pay?secret=1")
            .header("content-length", "5")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(())
            .unwrap();
        let h = HttpLog::start(Some(&log), "outbound", "payment", &req);
        let mut resp = Response::new(crate::body::full("hello world"));
        *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        resp.headers_mut()
            .insert(crate::headers::ERROR, "1".parse().unwrap());
        let resp = h.respond(resp, "spiffe://td/sa/p", Some("default"), Some(3));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello world");
        // A second request whose receiver leaves without reading.
        let h = HttpLog::start(Some(&log), "inbound", "payment", &req);
        drop(h.respond(Response::new(crate::body::full("x")), "", None, None));
        drop(log);
        task.await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let a = &lines[0];
        assert_eq!(a["direction"], "outbound");
        assert_eq!(a["protocol"], "http");
        assert_eq!(a["service"], "payment");
        assert_eq!(a["route"], "default");
        assert_eq!(a["peer"], "spiffe://td/sa/p");
        assert_eq!(a["method"], "POST");
        assert_eq!(a["path"], "/pay", "no query string in logs");
        assert_eq!(a["status"], 503);
        assert_eq!(a["request_bytes"], 5);
        assert_eq!(a["response_bytes"], 11);
        assert_eq!(a["attempts"], 3);
        assert_eq!(a["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(a["flags"], serde_json::json!(["retried", "sidecar_error"]));
        assert!(a["start"].as_str().unwrap().ends_with('Z'));
        let b = &lines[1];
        assert_eq!(b["direction"], "inbound");
        assert!(b.get("route").is_none() && b.get("peer").is_none());
        assert_eq!(b["flags"], serde_json::json!(["body_incomplete"]));
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = mpsc::channel(1);
        let log = AccessLog {
            tx,
            dropped: Counter::default(),
        };
        for _ in 0..3 {
            log.log(&Entry::default());
        }
        assert_eq!(log.dropped.get(), 2);
    }

    #[test]
    fn tcp_entries() {
        let (tx, mut rx) = mpsc::channel(1);
        let log = Arc::new(AccessLog {
            tx,
            dropped: Counter::default(),
        });
        let started = (SystemTime::now(), Instant::now());
        tcp(
            Some(&log),
            "inbound",
            "db",
            "spiffe://td/sa/c",
            started,
            10,
            20,
            Some("reset".into()),
        );
        let v: serde_json::Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
        assert_eq!(v["protocol"], "tcp");
        assert_eq!(v["request_bytes"], 10);
        assert_eq!(v["response_bytes"], 20);
        assert_eq!(v["error"], "reset");
        assert_eq!(v["flags"], serde_json::json!(["error"]));
    }
}
