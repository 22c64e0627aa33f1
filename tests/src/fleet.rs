//! A small mesh for traffic-policy tests: one client sidecar (`customer`)
//! with an upstream listener per service, and any number of server
//! sidecars, each in front of its own [`BehavingApp`] whose failures and
//! delays a test can change while traffic flows. The mesh file is real
//! text on disk, written from the servers' addresses plus the test's policy
//! TOML, and the client watches it, so edits go through the reload path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use weft_proxy::{Limits, Mesh, Sidecar};

use crate::{admin_get, any_port, metric_sum, scrape, sidecar, TestCa, TD};

/// How often the client re-reads the mesh file in these tests.
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(100);

/// What a [`BehavingApp`] does; change it at any time.
#[derive(Default)]
pub struct Behaviour {
    /// Share of requests (0..=100) answered with `fail_status`.
    pub fail_percent: AtomicU32,
    /// Status of failed answers (default 503).
    pub fail_status: AtomicU16,
    /// Delay before answering, in milliseconds.
    pub delay_ms: AtomicU64,
}

/// What a [`BehavingApp`] saw.
#[derive(Default)]
pub struct Seen {
    /// Requests that arrived (mirrored ones included).
    pub requests: AtomicU64,
    /// Requests carrying `x-weft-mirror: 1`.
    pub mirrored: AtomicU64,
    /// Requests answered with the failure status.
    pub failed: AtomicU64,
    /// Requests whose caller went away before the (delayed) answer.
    pub cancelled: AtomicU64,
    /// Headers of the last request (lower-case names).
    pub last_headers: Mutex<BTreeMap<String, String>>,
}

/// An HTTP/1.1 app that answers `200 <name>` (or fails, or waits, as its
/// [`Behaviour`] says). The response carries `x-app: <name>`.
pub struct BehavingApp {
    pub addr: SocketAddr,
    pub name: String,
    pub behaviour: Arc<Behaviour>,
    pub seen: Arc<Seen>,
}

impl BehavingApp {
    pub async fn start(name: &str) -> BehavingApp {
        let listener = TcpListener::bind(any_port()).await.expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let behaviour = Arc::new(Behaviour {
            fail_status: AtomicU16::new(503),
            ..Default::default()
        });
        let seen = Arc::new(Seen::default());
        let (b, s, n) = (behaviour.clone(), seen.clone(), name.to_string());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (b, s, n) = (b.clone(), s.clone(), n.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            answer(b.clone(), s.clone(), n.clone(), req)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        BehavingApp {
            addr,
            name: name.to_string(),
            behaviour,
            seen,
        }
    }

    pub fn set(&self, fail_percent: u32, delay: Duration) {
        self.behaviour
            .fail_percent
            .store(fail_percent, Ordering::SeqCst);
        self.behaviour
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn requests(&self) -> u64 {
        self.seen.requests.load(Ordering::SeqCst)
    }
}

/// Counts a request as cancelled if its handler is dropped before it answers.
struct CancelGuard(Option<Arc<Seen>>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn answer(
    b: Arc<Behaviour>,
    s: Arc<Seen>,
    name: String,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    s.requests.fetch_add(1, Ordering::SeqCst);
    if req.headers().get("x-weft-mirror").is_some() {
        s.mirrored.fetch_add(1, Ordering::SeqCst);
    }
    *s.last_headers.lock().expect("lock") = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut guard = CancelGuard(Some(s.clone()));
    let delay = b.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    guard.0 = None;
    let fail = rand::random_range(0..100) < b.fail_percent.load(Ordering::SeqCst);
    let status = if fail {
        s.failed.fetch_add(1, Ordering::SeqCst);
        b.fail_status.load(Ordering::SeqCst)
    } else {
        200
    };
    let resp = http::Response::builder()
        .status(status)
        .header("x-app", &name)
        .header("x-body-len", body.len().to_string())
        .body(Full::new(Bytes::from(name)))
        .expect("response");
    Ok(resp)
}

/// One server sidecar and its app, serving `service` with `labels`.
pub struct Server {
    pub service: String,
    pub labels: BTreeMap<String, String>,
    pub app: BehavingApp,
    pub sidecar: Sidecar,
}

/// A server to start: service name, endpoint labels, app name.
pub struct ServerSpec {
    pub service: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    pub name: &'static str,
}

pub fn spec(
    service: &'static str,
    name: &'static str,
    labels: &'static [(&'static str, &'static str)],
) -> ServerSpec {
    ServerSpec {
        service,
        labels,
        name,
    }
}

/// The client sidecar, the servers and the mesh file.
pub struct Fleet {
    pub ca: TestCa,
    pub client: Sidecar,
    pub servers: Vec<Server>,
    pub dir: tempfile::TempDir,
    pub mesh_path: PathBuf,
    /// Services and their endpoints, the part of the mesh file tests do not write.
    services: String,
}

impl Fleet {
    /// Start servers for `specs` and a client; `policy` is TOML appended to
    /// the generated mesh file (routes, circuit breakers, …). Services with
    /// no server can be declared by `extra_services` (name → endpoints TOML).
    pub async fn start(specs: &[ServerSpec], policy: &str) -> Fleet {
        Self::start_with(specs, &[], policy).await
    }

    pub async fn start_with(
        specs: &[ServerSpec],
        extra_services: &[(&str, &str)],
        policy: &str,
    ) -> Fleet {
        let ca = TestCa::new(TD);
        let mut names: Vec<&str> = specs.iter().map(|s| s.service).collect();
        names.extend(extra_services.iter().map(|(n, _)| *n));
        names.sort();
        names.dedup();
        // Servers first, with a placeholder mesh naming every service (a
        // server accepts requests only for services in its mesh).
        let placeholder = crate::mesh(
            TD,
            &names
                .iter()
                .map(|n| (*n, weft_proxy::mesh::Protocol::Http))
                .collect::<Vec<_>>(),
        );
        let mut servers = Vec::new();
        for s in specs {
            let app = BehavingApp::start(s.name).await;
            let sc = sidecar(
                &placeholder,
                ca.creds(s.name),
                Some(app.addr),
                &[],
                Limits::default(),
            )
            .await;
            servers.push(Server {
                service: s.service.to_string(),
                labels: s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                app,
                sidecar: sc,
            });
        }
        let mut services = String::new();
        for name in &names {
            let mut eps: Vec<String> = servers
                .iter()
                .filter(|s| s.service == *name)
                .map(|s| {
                    let labels: Vec<String> = s
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k} = \"{v}\""))
                        .collect();
                    format!(
                        "{{ addr = \"{}\", labels = {{ {} }} }}",
                        s.sidecar.inbound_addr,
                        labels.join(", ")
                    )
                })
                .collect();
            if let Some((_, extra)) = extra_services.iter().find(|(n, _)| n == name) {
                eps.push(extra.to_string());
            }
            services.push_str(&format!(
                "[services.{name}]\nendpoints = [{}]\n",
                eps.join(", ")
            ));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mesh_path = dir.path().join("mesh.toml");
        let text = compose("", &services, policy);
        std::fs::write(&mesh_path, &text).expect("write mesh");
        let mesh = Mesh::parse(&text, "mesh.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        // Servers read the same file: server-side policy (authorization,
        // TCP idle timeouts) changes with it too.
        for s in &mut servers {
            s.sidecar.set_mesh(mesh.clone());
            s.sidecar
                .watch_mesh_file(mesh_path.clone(), RELOAD_INTERVAL);
        }
        let mut client =
            sidecar(&mesh, ca.creds("customer"), None, &names, Limits::default()).await;
        client.watch_mesh_file(mesh_path.clone(), RELOAD_INTERVAL);
        Fleet {
            ca,
            client,
            servers,
            dir,
            mesh_path,
            services,
        }
    }

    /// The local address the app uses to reach `service`.
    pub fn upstream(&self, service: &str) -> SocketAddr {
        self.client.upstream_addrs[service]
    }

    /// The server whose app is called `name`.
    pub fn server(&self, name: &str) -> &Server {
        self.servers
            .iter()
            .find(|s| s.app.name == name)
            .unwrap_or_else(|| panic!("no server {name}"))
    }

    /// Rewrite the mesh file with new policy TOML and wait until every
    /// sidecar has applied it (its `weft_config_reloads_total{result="success"}` grows).
    pub async fn set_policy(&self, policy: &str) {
        self.set_mesh_text("", policy).await
    }

    /// Like [`Fleet::set_policy`], with `top` (top-level keys such as
    /// `default_authorization`) placed before the service tables.
    pub async fn set_mesh_text(&self, top: &str, policy: &str) {
        let admins: Vec<SocketAddr> = std::iter::once(self.client.admin_addr)
            .chain(self.servers.iter().map(|s| s.sidecar.admin_addr))
            .collect();
        let mut before = Vec::new();
        for a in &admins {
            before.push(reloads_of(*a, "success").await);
        }
        let text = compose(top, &self.services, policy);
        Mesh::parse(&text, "mesh.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        // Write a new file and rename it over the old one, as kubelet and
        // careful editors do: a poll never sees a half-written file.
        let tmp = self.mesh_path.with_extension("toml.new");
        std::fs::write(&tmp, text).expect("write mesh");
        std::fs::rename(&tmp, &self.mesh_path).expect("replace mesh");
        for (a, b) in admins.iter().zip(before) {
            let applied = crate::wait_until(Duration::from_secs(10), || async {
                reloads_of(*a, "success").await > b
            })
            .await;
            assert!(applied, "sidecar {a} did not apply the new mesh file");
        }
    }

    /// `weft_config_reloads_total{result}` of the client.
    pub async fn reloads(&self, result: &str) -> f64 {
        reloads_of(self.client.admin_addr, result).await
    }

    /// Sum of a client metric over samples with these labels.
    pub async fn client_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&scrape(self.client.admin_addr).await, name, labels)
    }

    /// The client's `/clusters` as JSON.
    pub async fn clusters(&self) -> serde_json::Value {
        let (status, body) = admin_get(self.client.admin_addr, "/clusters").await;
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("clusters json")
    }
}

/// A mesh file: trust domain, top-level keys, services, then policy tables.
fn compose(top: &str, services: &str, policy: &str) -> String {
    format!("trust_domain = \"{TD}\"\n{top}{services}{policy}")
}

/// `weft_config_reloads_total{result}` of the sidecar with this admin address.
async fn reloads_of(admin: SocketAddr, result: &str) -> f64 {
    metric_sum(
        &scrape(admin).await,
        "weft_config_reloads_total",
        &[("result", result)],
    )
}

/// A keep-alive HTTP/1.1 client for one upstream listener.
pub struct Client {
    inner: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    base: String,
}

/// One answer as the app behind the mesh gave it (or the sidecar did).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
    pub elapsed: Duration,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Client {
    pub fn new(upstream: SocketAddr) -> Client {
        Client {
            inner:
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http(),
            base: format!("http://{upstream}"),
        }
    }

    /// Send a request; `Err` only if the sidecar itself could not be reached.
    /// The request is built before the call returns, so the future borrows nothing.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> impl std::future::Future<Output = Result<Answer, String>> + Send + 'static {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body)));
        let inner = self.inner.clone();
        async move {
            let req = req.map_err(|e| e.to_string())?;
            let start = std::time::Instant::now();
            let resp = inner.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok(Answer {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
                elapsed: start.elapsed(),
            })
        }
    }

    pub fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> impl std::future::Future<Output = Result<Answer, String>> + Send + 'static {
        self.send("GET", path, headers, b"")
    }
}

/// Run `n` requests with up to `concurrency` in flight; answers in order
/// (answer `i` is request `i`). A slow request holds up starting requests
/// past the window; when only counts matter, [`load_unordered`] does not.
pub async fn load<F, Fut>(n: usize, concurrency: usize, f: F) -> Vec<Result<Answer, String>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Answer, String>>,
{
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(f)
        .buffered(concurrency.max(1))
        .collect()
        .await
}

/// Like [`load`], answers in completion order: one slow request (a retry's
/// backoff) never holds up starting the next ones.
pub async fn load_unordered<F, Fut>(
    n: usize,
    concurrency: usize,
    f: F,
) -> Vec<Result<Answer, String>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Answer, String>>,
{
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

/// Count answers by the `x-app` header (sidecar errors count as "error:<status>").
pub fn by_app(answers: &[Result<Answer, String>]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for a in answers {
        let key = match a {
            Ok(a) => match a.header("x-app") {
                Some(app) if a.status == 200 => app.to_string(),
                _ => format!("status:{}", a.status),
            },
            Err(e) => format!("error:{e}"),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

/// The `q`-quantile (0..=1) of the answers' latencies.
pub fn quantile(answers: &[Result<Answer, String>], q: f64) -> Duration {
    let mut v: Vec<Duration> = answers
        .iter()
        .filter_map(|a| a.as_ref().ok().map(|a| a.elapsed))
        .collect();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Requests in a loop on `workers` tasks until stopped: how many succeeded
/// and failed, when failures happened, and the first few for messages.
pub struct Background {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub first_failure: Mutex<Option<std::time::Instant>>,
    pub last_failure: Mutex<Option<std::time::Instant>>,
    /// The first few failures (status and body, or the client error).
    pub samples: Mutex<Vec<String>>,
    stopping: std::sync::atomic::AtomicBool,
}

/// Start `GET /pay` loops against `upstream` (a sidecar's upstream listener).
pub fn background(upstream: SocketAddr, workers: usize) -> Arc<Background> {
    let b = Arc::new(Background {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_failure: Mutex::new(None),
        last_failure: Mutex::new(None),
        samples: Mutex::new(Vec::new()),
        stopping: std::sync::atomic::AtomicBool::new(false),
    });
    for _ in 0..workers {
        let b = b.clone();
        tokio::spawn(async move {
            let client = Client::new(upstream);
            while !b.stopping.load(Ordering::SeqCst) {
                match client.get("/pay", &[]).await {
                    Ok(a) if a.status == 200 => {
                        b.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => {
                        b.record_failure(other);
                        // A failing mesh answers at once; do not spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    }
    b
}

impl Background {
    fn record_failure(&self, answer: Result<Answer, String>) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let now = std::time::Instant::now();
        self.first_failure.lock().expect("lock").get_or_insert(now);
        *self.last_failure.lock().expect("lock") = Some(now);
        let mut samples = self.samples.lock().expect("lock");
        if samples.len() < 5 {
            samples.push(match answer {
                Ok(a) => format!("{} {}", a.status, a.body.trim()),
                Err(e) => e,
            });
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Stop the loops (each finishes its current request).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Some request succeeded since `before` (waits a little for one);
    /// returns the new count.
    pub async fn assert_flows(&self, before: u64, when: &str) -> u64 {
        let flowed =
            crate::wait_until(Duration::from_secs(5), || async { self.ok() > before }).await;
        assert!(flowed, "no successful request {when}");
        self.ok()
    }

    pub fn assert_no_failure(&self) {
        let failed = self.failed();
        assert_eq!(
            failed,
            0,
            "{failed} failed requests of {}: {:?}",
            failed + self.ok(),
            self.samples.lock().expect("lock")
        );
    }
}

/// A client sidecar (`customer`, with an upstream listener for `payment`)
/// and a server sidecar (`payment`, in front of a [`BehavingApp`]), each
/// with the identity source `identity(name)` gives (e.g. a CA and a token).
pub async fn ca_pair(
    identity: impl Fn(&str) -> weft_proxy::IdentitySource,
) -> (Sidecar, Sidecar, BehavingApp) {
    let app = BehavingApp::start("payment").await;
    let mut mesh = crate::mesh(TD, &[("payment", weft_proxy::mesh::Protocol::Http)]);
    let start = |name: &str, app: Option<SocketAddr>, upstreams: Vec<(String, SocketAddr)>| {
        let cfg = weft_proxy::SidecarConfig {
            mesh: mesh.clone(),
            identity: identity(name),
            inbound: any_port(),
            admin: any_port(),
            app,
            upstreams,
            udp_upstreams: Vec::new(),
            limits: Limits::default(),
            tracing: Default::default(),
            capture: Default::default(),
            dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
        };
        async move { Sidecar::start(cfg).await.expect("sidecar starts") }
    };
    let server = start("payment", Some(app.addr), vec![]).await;
    let client = start("customer", None, vec![("payment".into(), any_port())]).await;
    mesh = crate::with_endpoint(mesh, "payment", server.inbound_addr);
    client.set_mesh(mesh.clone());
    server.set_mesh(mesh);
    (client, server, app)
}
