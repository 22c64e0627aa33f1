//! The load generator: HTTP/1.1 keep-alive, HTTP/2 and connection churn
//! (a new TCP connection per request), each open loop (a constant rate on a
//! fixed timetable) or closed loop (as fast as answers come back); and TCP
//! bulk throughput over N streams.
//!
//! Open loop avoids coordinated omission as wrk2 and fortio do: every
//! worker (one per HTTP/1 connection, one per HTTP/2 stream slot) sends on
//! a fixed timetable, and when the previous answer on that worker came back
//! after the next send was due, the latency counts from the time the send
//! was due, not from when it went out. When the worker was idle and only
//! the timer woke late, the latency counts from the actual send (timer
//! jitter is the load generator's, not the server's).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, HOST};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stats::{new_histogram, record, Latency};

/// Where HTTP requests go: `http://host:port/path`.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    pub addr: SocketAddr,
    pub authority: String,
    pub path: String,
}

impl HttpTarget {
    pub fn parse(url: &str) -> anyhow::Result<HttpTarget> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("{url:?} is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!(
                "{url:?}: only http:// URLs are supported (the proxies terminate TLS themselves)"
            );
        }
        let authority = uri
            .authority()
            .with_context(|| format!("{url:?} has no host:port"))?
            .to_string();
        let host_port = if uri.port_u16().is_some() {
            authority.clone()
        } else {
            format!("{authority}:80")
        };
        let addr = host_port
            .to_socket_addrs()
            .with_context(|| format!("resolving {host_port}"))?
            .next()
            .with_context(|| format!("{host_port} resolves to no address"))?;
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        Ok(HttpTarget {
            addr,
            authority,
            path,
        })
    }

    pub fn for_addr(addr: SocketAddr) -> HttpTarget {
        HttpTarget {
            addr,
            authority: addr.to_string(),
            path: "/".into(),
        }
    }
}

/// How requests travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// HTTP/1.1 keep-alive: one request in flight per connection.
    Http1,
    /// HTTP/2 (prior knowledge, h2c): `concurrency` streams in flight per connection.
    Http2,
    /// HTTP/1.1 with a new TCP connection for every request.
    Churn,
}

#[derive(Debug, Clone)]
pub struct HttpOpts {
    pub target: HttpTarget,
    pub mode: HttpMode,
    /// TCP connections (for churn: workers, each opening one connection per request).
    pub connections: usize,
    /// Requests in flight per connection (HTTP/2 only; HTTP/1 is always 1).
    pub concurrency: usize,
    pub duration: Duration,
    /// Total requests per second (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    /// Request body bytes (0: GET without a body; otherwise POST).
    pub req_body: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpReport {
    pub mode: HttpMode,
    pub connections: usize,
    pub concurrency: usize,
    /// Requested rate, `null` for closed loop.
    pub rate: Option<f64>,
    pub duration_s: f64,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub response_bytes: u64,
    pub latency: Latency,
    /// The first error seen, to tell a broken setup from a slow one.
    pub first_error: Option<String>,
}

/// A connection's request sender.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn connect(addr: SocketAddr, mode: HttpMode) -> anyhow::Result<Sender> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let io = TokioIo::new(tcp);
        Ok(match mode {
            HttpMode::Http1 | HttpMode::Churn => {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Sender::H1(send)
            }
            HttpMode::Http2 => {
                let (send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Sender::H2(send)
            }
        })
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Send one request; `Ok(bytes of the response body)` for a 200.
    async fn send(&mut self, req: http::Request<Full<Bytes>>) -> anyhow::Result<u64> {
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        read_response(resp).await
    }
}

async fn read_response(resp: http::Response<Incoming>) -> anyhow::Result<u64> {
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != http::StatusCode::OK {
        bail!(
            "status {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
    }
    Ok(body.len() as u64)
}

/// What every worker needs to build requests.
struct RequestTemplate {
    uri: http::Uri,
    authority: String,
    body: Bytes,
}

impl RequestTemplate {
    fn build(&self) -> anyhow::Result<http::Request<Full<Bytes>>> {
        let method = if self.body.is_empty() {
            http::Method::GET
        } else {
            http::Method::POST
        };
        let mut b = http::Request::builder()
            .method(method)
            .uri(self.uri.clone())
            .header(HOST, self.authority.as_str());
        if !self.body.is_empty() {
            b = b.header(CONTENT_TYPE, "application/octet-stream");
        }
        Ok(b.body(Full::new(self.body.clone()))?)
    }
}

struct WorkerOut {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    bytes: u64,
    first_error: Option<String>,
    last_done: Instant,
}

struct Worker {
    addr: SocketAddr,
    mode: HttpMode,
    template: Arc<RequestTemplate>,
    /// (first send, interval) for open loop.
    schedule: Option<(Instant, Duration)>,
    end: Instant,
    done: Arc<AtomicU64>,
}

impl Worker {
    async fn run(self, mut sender: Option<Sender>) -> WorkerOut {
        let mut out = WorkerOut {
            hist: new_histogram(),
            ok: 0,
            errors: 0,
            bytes: 0,
            first_error: None,
            last_done: Instant::now(),
        };
        let mut k: u32 = 0;
        let mut prev_done = Instant::now();
        loop {
            let start_ref = match self.schedule {
                Some((first, interval)) => {
                    let due = first + interval * k;
                    k = k.saturating_add(1);
                    if due >= self.end {
                        break;
                    }
                    // The previous answer held this worker past `due`: count from `due`.
                    let held_up = prev_done > due;
                    tokio::time::sleep_until(due.into()).await;
                    if held_up {
                        due
                    } else {
                        Instant::now()
                    }
                }
                None => {
                    let now = Instant::now();
                    if now >= self.end {
                        break;
                    }
                    now
                }
            };
            let result = self.one(&mut sender).await;
            let now = Instant::now();
            match result {
                Ok(n) => {
                    record(&mut out.hist, now - start_ref);
                    out.ok += 1;
                    out.bytes += n;
                }
                Err(e) => {
                    out.errors += 1;
                    if out.first_error.is_none() {
                        out.first_error = Some(format!("{e:#}"));
                    }
                    if sender.as_ref().is_none_or(Sender::is_closed) {
                        sender = None;
                    }
                    // Do not spin on a target that refuses everything.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            prev_done = Instant::now();
            out.last_done = prev_done;
            self.done.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    async fn one(&self, sender: &mut Option<Sender>) -> anyhow::Result<u64> {
        let req = self.template.build()?;
        if self.mode == HttpMode::Churn {
            // The connection is part of what is measured, and dropped after.
            let mut s = Sender::connect(self.addr, self.mode).await?;
            return s.send(req).await;
        }
        let s = match sender {
            Some(s) if !s.is_closed() => s,
            _ => sender.insert(Sender::connect(self.addr, self.mode).await?),
        };
        s.send(req).await
    }
}

/// Run one HTTP load test. `bar` shows progress (pass a hidden bar for none).
pub async fn run_http(opts: &HttpOpts, bar: &ProgressBar) -> anyhow::Result<HttpReport> {
    if opts.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let concurrency = match opts.mode {
        HttpMode::Http2 => opts.concurrency.max(1),
        _ => 1,
    };
    if let Some(r) = opts.rate {
        if !(r > 0.0 && r.is_finite()) {
            bail!("--rate must be a positive number of requests per second");
        }
    }
    let uri: http::Uri = match opts.mode {
        // HTTP/2 carries :scheme and :authority, so the URI must be absolute.
        HttpMode::Http2 => format!("http://{}{}", opts.target.authority, opts.target.path),
        _ => opts.target.path.clone(),
    }
    .parse()
    .context("building the request URI")?;
    let template = Arc::new(RequestTemplate {
        uri,
        authority: opts.target.authority.clone(),
        body: Bytes::from(vec![b'x'; opts.req_body]),
    });

    // Connect first, so the clock starts with every connection open.
    let mut senders = Vec::with_capacity(opts.connections);
    for _ in 0..opts.connections {
        senders.push(match opts.mode {
            HttpMode::Churn => None,
            mode => Some(Sender::connect(opts.target.addr, mode).await?),
        });
    }
    let workers = opts.connections * concurrency;
    let start = Instant::now() + Duration::from_millis(5);
    let end = start + opts.duration;
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(workers);
    for (c, sender) in senders.into_iter().enumerate() {
        for s in 0..concurrency {
            let index = c * concurrency + s;
            let schedule = opts.rate.map(|rate| {
                // Each worker sends every `workers / rate` s, staggered evenly.
                let interval = Duration::from_secs_f64(workers as f64 / rate);
                (
                    start + interval.mul_f64(index as f64 / workers as f64),
                    interval,
                )
            });
            let sender = match &sender {
                Some(Sender::H2(h2)) => Some(Sender::H2(h2.clone())),
                _ => None,
            };
            let worker = Worker {
                addr: opts.target.addr,
                mode: opts.mode,
                template: template.clone(),
                schedule,
                end,
                done: done.clone(),
            };
            tasks.push((worker, sender));
        }
        // The HTTP/1 sender belongs to its connection's only worker.
        if let Some(Sender::H1(h1)) = sender {
            if let Some(last) = tasks.last_mut() {
                last.1 = Some(Sender::H1(h1));
            }
        }
    }
    let handles: Vec<_> = tasks
        .into_iter()
        .map(|(w, s)| tokio::spawn(w.run(s)))
        .collect();

    let ticker = spawn_ticker(bar.clone(), done.clone(), start, opts.duration);
    let mut hist = new_histogram();
    let (mut ok, mut errors, mut bytes) = (0, 0, 0);
    let mut first_error = None;
    let mut last = end;
    for h in handles {
        let out = h.await.context("a load worker panicked")?;
        // Same bounds on both sides: adding cannot fail.
        let _ = hist.add(&out.hist);
        ok += out.ok;
        errors += out.errors;
        bytes += out.bytes;
        last = last.max(out.last_done);
        if first_error.is_none() {
            first_error = out.first_error;
        }
    }
    ticker.abort();
    let elapsed = last
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-6);
    Ok(HttpReport {
        mode: opts.mode,
        connections: opts.connections,
        concurrency,
        rate: opts.rate,
        duration_s: elapsed,
        requests: ok,
        errors,
        rps: ok as f64 / elapsed,
        response_bytes: bytes,
        latency: Latency::from_histogram(&hist),
        first_error,
    })
}

/// Move `bar` along with time and show requests done so far.
fn spawn_ticker(
    bar: ProgressBar,
    done: Arc<AtomicU64>,
    start: Instant,
    duration: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let t = start.elapsed().min(duration);
            bar.set_position(t.as_millis() as u64);
            let n = done.load(Ordering::Relaxed);
            let rate = n as f64 / t.as_secs_f64().max(1e-3);
            bar.set_message(format!("{n} requests, {rate:.0}/s"));
        }
    })
}

#[derive(Debug, Clone)]
pub struct TcpOpts {
    pub addr: SocketAddr,
    pub streams: usize,
    pub duration: Duration,
    pub chunk: usize,
    /// Bytes sent first (the built-in backend's `SINK` marker), if any.
    pub prefix: Option<&'static [u8]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpReport {
    pub streams: usize,
    pub duration_s: f64,
    pub bytes: u64,
    pub gbit_per_s: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// How long to wait for the far end to take the last bytes and close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Bulk throughput: every stream writes for `duration`, half-closes, and
/// waits for the sink to close, so every byte counted was received.
pub async fn run_tcp(opts: &TcpOpts, bar: &ProgressBar) -> anyhow::Result<TcpReport> {
    if opts.streams == 0 || opts.chunk == 0 {
        bail!("--streams and --chunk must be at least 1");
    }
    let mut conns = Vec::with_capacity(opts.streams);
    for _ in 0..opts.streams {
        let s = TcpStream::connect(opts.addr)
            .await
            .with_context(|| format!("connecting to {}", opts.addr))?;
        s.set_nodelay(true)?;
        conns.push(s);
    }
    let start = Instant::now();
    let end = start + opts.duration;
    let sent = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let chunk = vec![0x5a_u8; opts.chunk];
            let prefix = opts.prefix;
            let sent = sent.clone();
            tokio::spawn(async move {
                let r: anyhow::Result<(u64, Instant)> = async {
                    if let Some(p) = prefix {
                        s.write_all(p).await?;
                    }
                    let mut n = 0u64;
                    while Instant::now() < end {
                        s.write_all(&chunk).await?;
                        n += chunk.len() as u64;
                        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                    s.shutdown().await?;
                    let mut rest = [0u8; 4096];
                    tokio::time::timeout(DRAIN_TIMEOUT, async {
                        while s.read(&mut rest).await? > 0 {}
                        anyhow::Ok(())
                    })
                    .await
                    .context("the far end did not close after the last byte")??;
                    Ok((n, Instant::now()))
                }
                .await;
                r
            })
        })
        .collect();
    let ticker = spawn_bytes_ticker(bar.clone(), sent, start, opts.duration);
    let (mut bytes, mut errors, mut first_error, mut last) = (0, 0, None, end);
    for h in handles {
        match h.await.context("a bulk stream panicked")? {
            Ok((n, done)) => {
                bytes += n;
                last = last.max(done);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    ticker.abort();
    let elapsed = last
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-6);
    Ok(TcpReport {
        streams: opts.streams,
        duration_s: elapsed,
        bytes,
        gbit_per_s: bytes as f64 * 8.0 / elapsed / 1e9,
        errors,
        first_error,
    })
}

fn spawn_bytes_ticker(
    bar: ProgressBar,
    sent: Arc<AtomicU64>,
    start: Instant,
    duration: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let t = start.elapsed().min(duration);
            bar.set_position(t.as_millis() as u64);
            let gbit = sent.load(Ordering::Relaxed) as f64 * 8.0 / t.as_secs_f64().max(1e-3) / 1e9;
            bar.set_message(format!("{gbit:.2} Gbit/s"));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = HttpTarget::parse("http://127.0.0.1:8080/x?y=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/x?y=1");
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert!(HttpTarget::parse("https://127.0.0.1:1/").is_err());
        assert!(HttpTarget::parse("not a url").is_err());
    }
}
