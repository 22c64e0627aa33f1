//! Test harness for Weft's end-to-end tests: a CA made at test time, real
//! sidecars (in-process, on loopback, ephemeral ports), real apps, and
//! helpers to read what the sidecars export. No mocks: every byte crosses
//! real QUIC with real mTLS.

pub mod fleet;
pub mod fuzz;
pub mod impair;
pub mod netns;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weft_proxy::mesh::{Endpoint, Mesh, Protocol, Service};
use weft_proxy::metrics::{parse_text, Sample};
use weft_proxy::{IdentitySource, Limits, Sidecar, SidecarConfig};
use weft_transport::Credentials;

pub const TD: &str = "test.weft.local";

/// A CA created in a temporary directory for one test.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub ca: weft_ca::Ca,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = weft_ca::Ca::init(dir.path(), trust_domain).expect("init CA");
        TestCa { dir, ca }
    }

    /// Credentials for `spiffe://<td>/ns/test/sa/<name>`.
    pub fn creds(&self, name: &str) -> Credentials {
        self.creds_for(&self.id(name), Duration::from_secs(3600))
    }

    pub fn id(&self, name: &str) -> String {
        format!("spiffe://{}/ns/test/sa/{name}", self.ca.trust_domain())
    }

    /// Write `name`'s certificate, key and bundle (1 h) where `--cert-dir DIR` reads them.
    pub fn write_certs(&self, name: &str, dir: &std::path::Path) {
        self.ca
            .issue(&self.id(name), Duration::from_secs(3600))
            .expect("issue")
            .write_to(dir)
            .expect("write certs");
    }

    pub fn creds_for(&self, id: &str, ttl: Duration) -> Credentials {
        let issued = self.ca.issue(id, ttl).expect("issue");
        Credentials::from_pem(
            issued.cert_chain_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            issued.bundle_pem.as_bytes(),
        )
        .expect("parse issued credentials")
    }
}

pub fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// A mesh with the given services and no endpoints yet.
pub fn mesh(trust_domain: &str, services: &[(&str, Protocol)]) -> Mesh {
    Mesh {
        services: services
            .iter()
            .map(|(name, protocol)| (name.to_string(), Service::new(name, *protocol)))
            .collect(),
        ..Mesh::new(trust_domain)
    }
}

pub fn with_endpoint(mut mesh: Mesh, service: &str, addr: SocketAddr) -> Mesh {
    if let Some(s) = mesh.services.get_mut(service) {
        s.endpoints.push(Endpoint {
            addr,
            labels: BTreeMap::new(),
        });
    }
    mesh
}

pub async fn sidecar(
    mesh: &Mesh,
    creds: Credentials,
    app: Option<SocketAddr>,
    upstreams: &[&str],
    limits: Limits,
) -> Sidecar {
    Sidecar::start(sidecar_config(mesh, creds, app, upstreams, limits))
        .await
        .expect("sidecar starts")
}

/// Start a sidecar from `cfg` on `addr`, the address of one that was just
/// dropped: polls until the old endpoint's socket has closed and the port
/// is free again (at most 10 s).
pub async fn restart_on(mut cfg: SidecarConfig, addr: SocketAddr) -> Sidecar {
    cfg.inbound = addr;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Sidecar::start(cfg.clone()).await {
            Ok(s) => return s,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("could not restart a sidecar on {addr}: {e}"),
        }
    }
}

/// The configuration [`sidecar`] starts, for tests that change more of it
/// (a fixed inbound address, say) before starting it.
pub fn sidecar_config(
    mesh: &Mesh,
    creds: Credentials,
    app: Option<SocketAddr>,
    upstreams: &[&str],
    limits: Limits,
) -> SidecarConfig {
    SidecarConfig {
        mesh: mesh.clone(),
        identity: IdentitySource::Static(creds),
        inbound: any_port(),
        admin: any_port(),
        app,
        upstreams: upstreams
            .iter()
            .map(|s| (s.to_string(), any_port()))
            .collect(),
        udp_upstreams: Vec::new(),
        limits,
        tracing: Default::default(),
        capture: Default::default(),
        dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
    }
}

/// A client sidecar (`customer`, with upstream listeners for `services`) and
/// a server sidecar (`server`) in front of `app`, which serves every service.
pub struct Pair {
    pub ca: TestCa,
    pub client: Sidecar,
    pub server: Sidecar,
    pub mesh: Mesh,
}

impl Pair {
    pub async fn start(services: &[(&str, Protocol)], app: SocketAddr) -> Pair {
        Self::start_with(services, app, Limits::default()).await
    }

    pub async fn start_with(
        services: &[(&str, Protocol)],
        app: SocketAddr,
        limits: Limits,
    ) -> Pair {
        let ca = TestCa::new(TD);
        let m = mesh(TD, services);
        let names: Vec<&str> = services.iter().map(|(n, _)| *n).collect();
        let server = sidecar(&m, ca.creds("server"), Some(app), &[], limits.clone()).await;
        let client = sidecar(&m, ca.creds("customer"), None, &names, limits).await;
        let mut m = m;
        for n in &names {
            m = with_endpoint(m, n, server.inbound_addr);
        }
        client.set_mesh(m.clone());
        server.set_mesh(m.clone());
        Pair {
            ca,
            client,
            server,
            mesh: m,
        }
    }

    /// The local address the app uses to reach `service` through the client sidecar.
    pub fn upstream(&self, service: &str) -> SocketAddr {
        self.client.upstream_addrs[service]
    }
}

/// What the HTTP test app saw.
#[derive(Default)]
pub struct AppSeen {
    pub requests: AtomicU64,
    pub body_bytes: AtomicU64,
    pub connections: AtomicU64,
}

/// An HTTP/1.1 app. Responses:
/// - `GET /big?bytes=N`: N bytes of a repeating pattern;
/// - any other request: a body echoing the request body, with headers
///   `x-seen-peer-id` (the `x-weft-peer-id` it received, or "none"),
///   `x-seen-method`, `x-seen-path`, `x-seen-host`, `x-seen-len`.
pub async fn http_app() -> (SocketAddr, Arc<AppSeen>) {
    let listener = TcpListener::bind(any_port()).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AppSeen::default());
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            seen2.connections.fetch_add(1, Ordering::SeqCst);
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            seen.requests.fetch_add(1, Ordering::SeqCst);
                            let h = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("none")
                                    .to_string()
                            };
                            let peer = h("x-weft-peer-id");
                            let host = h("host");
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let query = req.uri().query().unwrap_or("").to_string();
                            if path == "/big" {
                                let n: usize = query
                                    .strip_prefix("bytes=")
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(0);
                                let body = pattern(n);
                                return Ok::<_, std::convert::Infallible>(http::Response::new(
                                    Full::new(Bytes::from(body)),
                                ));
                            }
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            seen.body_bytes
                                .fetch_add(body.len() as u64, Ordering::SeqCst);
                            let resp = http::Response::builder()
                                .header("x-seen-peer-id", peer)
                                .header("x-seen-method", method)
                                .header("x-seen-path", path)
                                .header("x-seen-host", host)
                                .header("x-seen-len", body.len().to_string())
                                .body(Full::new(body))
                                .expect("response");
                            Ok(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Deterministic test bytes.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// What the TCP echo app saw.
#[derive(Default)]
pub struct EchoSeen {
    pub connections: AtomicU64,
    pub bytes: AtomicU64,
}

/// A TCP echo app: echoes everything, and closes its write side after the
/// client half-closes (so half-close must cross the mesh for a test to end).
pub async fn tcp_echo_app() -> (SocketAddr, Arc<EchoSeen>) {
    let listener = TcpListener::bind(any_port()).await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(EchoSeen::default());
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            seen2.connections.fetch_add(1, Ordering::SeqCst);
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            seen.bytes.fetch_add(n as u64, Ordering::SeqCst);
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, seen)
}

/// Fetch and parse a sidecar's `/metrics` over HTTP, as Prometheus would.
pub async fn scrape(admin: SocketAddr) -> Vec<Sample> {
    let (status, body) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200, "/metrics status");
    parse_text(&body)
}

/// GET a path on an admin server: (status, body).
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let resp = client
        .get(format!("http://{admin}{path}").parse().expect("uri"))
        .await
        .expect("admin request");
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("admin body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub use weft_proxy::metrics::sum as metric_sum;

/// `weft_quic_connections_total{direction, alpn}` from scraped samples.
pub fn quic_connections(samples: &[Sample], direction: &str, alpn: &str) -> f64 {
    metric_sum(
        samples,
        "weft_quic_connections_total",
        &[("direction", direction), ("alpn", alpn)],
    )
}

/// Path of a workspace binary (`weft`, `weft-ca`), built by cargo for the
/// integration tests of its own crate (`cargo test --workspace` builds both);
/// built on demand if missing. A partial `cargo test -p weft-tests` can leave
/// it stale: run `cargo build --workspace` first. (Rebuilding it from here
/// is worse: `cargo build -p` unifies features differently from the
/// workspace build and relinks the binary for minutes inside a test.)
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> -> target/debug/<name>
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let pkg = if name == "weft" {
            "weft-proxy"
        } else {
            "weft-ca"
        };
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", pkg, "--bin", name])
            .status()
            .expect("cargo build");
        assert!(status.success(), "building {name}");
    }
    path
}

/// The workspace root (the directory above `tests/`).
pub fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `name` from PATH, if it is there.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A `weft sidecar` process from [`start_weft`], killed when dropped.
pub struct WeftProcess {
    pub child: tokio::process::Child,
    /// Its `weft sidecar ready: …` line.
    pub ready: String,
    /// Everything it writes to stderr, once it exits.
    pub stderr: tokio::task::JoinHandle<String>,
}

impl WeftProcess {
    /// A `key=value` field of the ready line, e.g. `field("admin=")`.
    pub fn field(&self, key: &str) -> &str {
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {:?}", self.ready))
    }

    /// The admin address from the ready line.
    pub fn admin(&self) -> SocketAddr {
        self.field("admin=").parse().expect("admin address")
    }
}

/// Spawn `cmd` (a `weft sidecar …`, maybe behind `ip netns exec` or
/// `setpriv`) with its output piped, and wait for its ready line; panics
/// with its stderr if it exits first. Its stdout keeps being drained and
/// its stderr collected, so it never blocks on a full pipe.
pub async fn start_weft(mut cmd: tokio::process::Command) -> WeftProcess {
    use tokio::io::AsyncBufReadExt;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn weft sidecar");
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut err_pipe = child.stderr.take().expect("stderr");
    let stderr = tokio::spawn(async move {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s).await;
        s
    });
    let ready = loop {
        match stdout.next_line().await.expect("read stdout") {
            Some(l) if l.starts_with("weft sidecar ready:") => break l,
            Some(_) => continue,
            None => {
                let status = child.wait().await;
                let err = stderr.await.unwrap_or_default();
                panic!("weft sidecar exited before it was ready: {status:?}\n{err}");
            }
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    WeftProcess {
        child,
        ready,
        stderr,
    }
}

/// Poll `f` until it returns true or `timeout` passes (readiness, not sleep-as-sync).
pub async fn wait_until<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Helpers for the HTTP and TCP data-path tests (tests/http.rs, tests/tcp.rs).

/// Period of [`pattern`].
const PATTERN_PERIOD: usize = 251;

/// `total` bytes of [`pattern`] as chunks of at most `chunk` bytes, without
/// materialising them: each chunk is a zero-copy slice of one shared buffer.
pub fn pattern_chunks(total: usize, chunk: usize) -> impl Iterator<Item = Bytes> + Send + 'static {
    let chunk = chunk.max(1);
    let period_buf = Bytes::from(pattern(chunk + PATTERN_PERIOD));
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        if offset >= total {
            return None;
        }
        let len = chunk.min(total - offset);
        let start = offset % PATTERN_PERIOD;
        offset += len;
        Some(period_buf.slice(start..start + len))
    })
}

/// A running SHA-256 (from the TLS provider the mesh already uses, so it is
/// optimised even in debug builds).
pub struct Checksum {
    ctx: Box<dyn rustls::crypto::hash::Context>,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    pub fn new() -> Self {
        let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .expect("TLS 1.3 suite");
        Checksum {
            ctx: suite.common.hash_provider.start(),
            len: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        self.ctx.update(data);
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hex digest.
    pub fn hex(self) -> String {
        self.ctx
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Length and digest of the first `n` bytes of [`pattern`].
    pub fn of_pattern(n: usize) -> (u64, String) {
        let mut c = Checksum::new();
        for chunk in pattern_chunks(n, 1 << 20) {
            c.update(&chunk);
        }
        (c.len(), c.hex())
    }
}

/// An HTTP/1.1 app that describes the request it received: the response body
/// is `METHOD PATH?QUERY` on the first line, then one `name: value` line per
/// header field, in the order received. It also counts requests in `AppSeen`.
pub async fn http_describe_app() -> (SocketAddr, Arc<AppSeen>) {
    let listener = TcpListener::bind(any_port()).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AppSeen::default());
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            seen2.connections.fetch_add(1, Ordering::SeqCst);
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            seen.requests.fetch_add(1, Ordering::SeqCst);
                            let target = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.as_str())
                                .unwrap_or("/");
                            let mut text = format!("{} {target}\n", req.method());
                            for (name, value) in req.headers() {
                                text.push_str(&format!(
                                    "{name}: {}\n",
                                    String::from_utf8_lossy(value.as_bytes())
                                ));
                            }
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            seen.body_bytes
                                .fetch_add(body.len() as u64, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(text),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Parse the body of [`http_describe_app`]: (request line, header fields).
pub fn parse_description(body: &[u8]) -> (String, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(body);
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default().to_string();
    let fields = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (first, fields)
}

/// An HTTP/1.1 app for bulk transfers that never buffers a whole body:
/// - `GET /big?bytes=N`: streams N bytes of [`pattern`] in 64 KiB chunks;
/// - any other request: consumes the request body as it arrives and answers
///   `x-seen-len` (its length) and `x-seen-sha256` (its SHA-256, hex).
pub async fn http_stream_app() -> (SocketAddr, Arc<AppSeen>) {
    let listener = TcpListener::bind(any_port()).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AppSeen::default());
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            seen2.connections.fetch_add(1, Ordering::SeqCst);
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            type Body = http_body_util::combinators::BoxBody<
                                Bytes,
                                std::convert::Infallible,
                            >;
                            seen.requests.fetch_add(1, Ordering::SeqCst);
                            if req.uri().path() == "/big" {
                                let n: usize = req
                                    .uri()
                                    .query()
                                    .and_then(|q| q.strip_prefix("bytes="))
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(0);
                                let frames =
                                    futures::stream::iter(pattern_chunks(n, 64 << 10).map(|b| {
                                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                            b,
                                        ))
                                    }));
                                let body: Body = http_body_util::StreamBody::new(frames).boxed();
                                return Ok::<_, hyper::Error>(http::Response::new(body));
                            }
                            let mut body = req.into_body();
                            let mut sum = Checksum::new();
                            while let Some(frame) = body.frame().await {
                                if let Ok(data) = frame?.into_data() {
                                    seen.body_bytes
                                        .fetch_add(data.len() as u64, Ordering::SeqCst);
                                    sum.update(&data);
                                }
                            }
                            let resp = http::Response::builder()
                                .header("x-seen-len", sum.len().to_string())
                                .header("x-seen-sha256", sum.hex())
                                .body(Full::new(Bytes::new()).boxed())
                                .expect("response");
                            Ok(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// What [`tcp_echo_app_tracked`] saw, including how each connection ended.
#[derive(Default)]
pub struct EchoTracked {
    pub connections: AtomicU64,
    pub bytes: AtomicU64,
    /// Connections whose reader saw a clean EOF (the peer half-closed).
    pub closed_eof: AtomicU64,
    /// Connections that ended with an error (reset, broken pipe).
    pub closed_error: AtomicU64,
}

impl EchoTracked {
    pub fn closed(&self) -> u64 {
        self.closed_eof.load(Ordering::SeqCst) + self.closed_error.load(Ordering::SeqCst)
    }
}

/// Like [`tcp_echo_app`], but records how each connection ended.
pub async fn tcp_echo_app_tracked() -> (SocketAddr, Arc<EchoTracked>) {
    let listener = TcpListener::bind(any_port()).await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(EchoTracked::default());
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            seen2.connections.fetch_add(1, Ordering::SeqCst);
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let clean = loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break true,
                        Err(_) => break false,
                        Ok(n) => {
                            seen.bytes.fetch_add(n as u64, Ordering::SeqCst);
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break false;
                            }
                        }
                    }
                };
                if clean {
                    let _ = stream.shutdown().await;
                    seen.closed_eof.fetch_add(1, Ordering::SeqCst);
                } else {
                    seen.closed_error.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, seen)
}

// ---------------------------------------------------------------------------
// Helpers for the security, robustness and CLI tests (tests/security.rs,
// tests/robustness.rs, tests/cli.rs): a raw QUIC client that can play a
// misbehaving or foreign peer, and a one-shot HTTP/1.1 GET.

/// A server-certificate verifier for test clients: the chain must lead to
/// one of the given roots; the server name is ignored, because mesh leaves
/// carry only a URI SAN (the sidecars check the SPIFFE ID instead).
#[derive(Debug)]
pub struct ChainOnlyVerifier {
    roots: rustls::RootCertStore,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ChainOnlyVerifier {
    pub fn new(roots: &[rustls_pki_types::CertificateDer<'static>]) -> Arc<Self> {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).expect("trust anchor");
        }
        Arc::new(ChainOnlyVerifier {
            roots: store,
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        })
    }
}

impl rustls::client::danger::ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client certificate chain and its key, as [`quic_client`] takes them.
pub type ClientCert = (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
);

/// The chain and key of mesh credentials.
pub fn client_cert(creds: &Credentials) -> ClientCert {
    (creds.chain.clone(), creds.key.clone_key())
}

/// A plain quinn client endpoint on loopback: TLS 1.3 (aws-lc-rs), trusting
/// `roots` for the server's chain, presenting `cert` if given, offering `alpn`.
pub fn quic_client(
    roots: &[rustls_pki_types::CertificateDer<'static>],
    cert: Option<ClientCert>,
    alpn: &[u8],
) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(ChainOnlyVerifier::new(roots));
    let mut tls = match cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS config");
    let mut endpoint = quinn::Endpoint::client(any_port()).expect("client endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// Whether a connection ended with a QUIC CRYPTO_ERROR, i.e. a TLS alert
/// (sent by either side).
pub fn is_tls_alert(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        quinn::ConnectionError::TransportError(t) => t.code,
        _ => return false,
    };
    (0x100..0x200).contains(&u64::from(code))
}

/// One HTTP/1.1 GET on a new TCP connection: (status, headers, body).
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> (u16, http::HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

/// A GET with `:authority` = `authority` over our own HTTP/3 client,
/// presenting `cert` (or none). Ok is the response status; Err is how the
/// connection ended.
pub async fn h3_attempt(
    addr: SocketAddr,
    roots: &[rustls_pki_types::CertificateDer<'static>],
    cert: Option<ClientCert>,
    authority: &str,
) -> Result<u16, quinn::ConnectionError> {
    let endpoint = quic_client(roots, cert, b"h3");
    let conn = endpoint.connect(addr, "weft.mesh").expect("dial").await?;
    let result = async {
        let (mut driver, mut sender) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move { futures::future::poll_fn(|cx| driver.poll_close(cx)).await });
        let req = http::Request::get(format!("https://{authority}/attempt"))
            .body(())
            .expect("request");
        let mut stream = sender.send_request(req).await.map_err(|e| e.to_string())?;
        // Finishing may race with an early answer; the response is what counts.
        let _ = stream.finish().await;
        let resp = stream.recv_response().await.map_err(|e| e.to_string())?;
        Ok::<u16, String>(resp.status().as_u16())
    }
    .await;
    match result {
        Ok(status) => Ok(status),
        Err(_) => Err(conn.closed().await),
    }
}
