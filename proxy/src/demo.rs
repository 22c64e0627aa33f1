//! `weft demo`: the embedded default. A CA, a `customer` app calling a
//! `payment` HTTP service (a stable v1 and a canary v2 that fails one
//! request in twenty) and an `echo` TCP service, each app instance with its
//! own sidecar, all on loopback with ephemeral ports. Sidecars get their
//! certificates by CSR from the CA with join tokens, exactly as in a real
//! deployment. The mesh file sends 10 % of payment traffic to the canary and
//! retries its failures, so the customer sees none. Prints a line per second
//! and a summary a person can read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::mesh::{Mesh, Protocol, Service};
use crate::metrics::{parse_text, Sample};
use crate::sidecar::{CaCredential, IdentitySource, Limits, Sidecar, SidecarConfig};

const TRUST_DOMAIN: &str = "demo.weft.local";
/// Concurrent HTTP callers in the customer app.
const HTTP_WORKERS: usize = 4;

#[derive(Default)]
struct Stats {
    http_ok: AtomicU64,
    http_failed: AtomicU64,
    tcp_ok: AtomicU64,
    tcp_failed: AtomicU64,
    latency_us: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

impl Stats {
    fn record(&self, d: Duration) {
        let mut h = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = h.as_mut() {
            let _ = h.record(d.as_micros().max(1) as u64);
        }
    }
    fn quantile_ms(&self, q: f64) -> f64 {
        let h = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        h.as_ref()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
            .unwrap_or(0.0)
    }
}

/// Run the demo. `Ok(true)` when every request and stream succeeded.
pub async fn run(duration: Option<Duration>) -> anyhow::Result<bool> {
    let dir = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = run_in(&dir, duration).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &std::path::Path, duration: Option<Duration>) -> anyhow::Result<bool> {
    println!("weft demo: starting a CA, 3 services (4 instances) and their sidecars on loopback");
    // 1. The CA, serving CSRs over HTTPS.
    let ca = Arc::new(weft_ca::Ca::init(dir, TRUST_DOMAIN).context("creating the demo CA")?);
    let ca_listener = TcpListener::bind("127.0.0.1:0").await?;
    let ca_url = format!("https://{}", ca_listener.local_addr()?);
    let ca_task = tokio::spawn(weft_ca::server::serve(
        ca.clone(),
        ca_listener,
        Duration::from_secs(3600),
    ));

    // 2. The apps: payment v1, payment v2 (the canary, failing 1 in 20), echo.
    let payment_v1 = start_payment_app("v1", None).await?;
    let payment_v2 = start_payment_app("v2", Some(CANARY_FAILS_ONE_IN)).await?;
    let echo_app = start_echo_app().await?;

    // 3. Sidecars start with the services and no endpoints; the mesh file
    //    with endpoints and routes is applied once their ports are known.
    let mut mesh = Mesh::new(TRUST_DOMAIN);
    for (name, protocol) in [("payment", Protocol::Http), ("echo", Protocol::Tcp)] {
        mesh.services
            .insert(name.into(), Service::new(name, protocol));
    }
    let sidecar = |name: &str, app: Option<SocketAddr>, upstreams: Vec<(String, SocketAddr)>| {
        let id = format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/{name}");
        let token = ca.token(&id, Duration::from_secs(600));
        let mesh = mesh.clone();
        let ca_url = ca_url.clone();
        let bundle = ca.bundle_pem();
        async move {
            let cfg = SidecarConfig {
                mesh,
                identity: IdentitySource::Ca {
                    url: ca_url,
                    bundle_pem: bundle,
                    credential: CaCredential::JoinToken(token?),
                    expect_id: Some(id),
                },
                inbound: "127.0.0.1:0".parse()?,
                admin: "127.0.0.1:0".parse()?,
                app,
                upstreams,
                udp_upstreams: Vec::new(),
                limits: Limits::default(),
                tracing: Default::default(),
                capture: Default::default(),
                dns_refresh: crate::resolve::DEFAULT_INTERVAL,
            };
            anyhow::Ok(Sidecar::start(cfg).await?)
        }
    };
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let customer = sidecar(
        "customer",
        None,
        vec![("payment".into(), any), ("echo".into(), any)],
    )
    .await
    .context("starting the customer sidecar")?;
    let payment1 = sidecar("payment", Some(payment_v1), vec![])
        .await
        .context("starting the payment v1 sidecar")?;
    let payment2 = sidecar("payment", Some(payment_v2), vec![])
        .await
        .context("starting the payment v2 sidecar")?;
    let echo = sidecar("echo", Some(echo_app), vec![])
        .await
        .context("starting the echo sidecar")?;
    let text = mesh_file(
        payment1.inbound_addr,
        payment2.inbound_addr,
        echo.inbound_addr,
    );
    let mesh = Mesh::parse(&text, "demo mesh file").map_err(|e| anyhow::anyhow!("{e}"))?;
    for sc in [&customer, &payment1, &payment2, &echo] {
        sc.set_mesh(mesh.clone());
    }
    let sidecars = [
        ("customer", &customer),
        ("payment-v1", &payment1),
        ("payment-v2", &payment2),
        ("echo", &echo),
    ];
    for (name, sc) in sidecars {
        println!(
            "  {name:<10} sidecar  identity {}  QUIC udp/{}  admin http://{}/",
            sc.identity(),
            sc.inbound_addr,
            sc.admin_addr
        );
    }
    println!("  the mesh file's policy for payment:");
    for line in text
        .lines()
        .skip_while(|l| !l.starts_with("[[services.payment.routes]]"))
    {
        println!("    {line}");
    }

    // 4. The customer app sends traffic through its sidecar.
    let stats = Arc::new(Stats {
        latency_us: Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).ok()),
        ..Stats::default()
    });
    let payment_url = format!("http://{}/charge", customer.upstream_addrs["payment"]);
    let echo_addr = customer.upstream_addrs["echo"];
    let mut workers = Vec::new();
    for w in 0..HTTP_WORKERS {
        workers.push(tokio::spawn(http_worker(
            payment_url.clone(),
            w,
            stats.clone(),
        )));
    }
    workers.push(tokio::spawn(tcp_worker(echo_addr, stats.clone())));

    match duration {
        Some(d) => println!("sending traffic for {} s ...", d.as_secs()),
        None => println!("sending traffic; press Ctrl-C to stop ..."),
    }
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let stop = crate::cli::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let ok = stats.http_ok.load(Ordering::Relaxed);
                let failed = stats.http_failed.load(Ordering::Relaxed);
                println!(
                    "  t={:>3}s  http {ok} ok / {failed} failed  p50 {:.2} ms  p99 {:.2} ms  tcp {} ok / {} failed",
                    start.elapsed().as_secs(),
                    stats.quantile_ms(0.5),
                    stats.quantile_ms(0.99),
                    stats.tcp_ok.load(Ordering::Relaxed),
                    stats.tcp_failed.load(Ordering::Relaxed),
                );
                if duration.is_some_and(|d| start.elapsed() >= d) {
                    break;
                }
            }
            _ = &mut stop => break,
        }
    }
    for w in &workers {
        w.abort();
    }
    let elapsed = start.elapsed();

    // 5. The summary, read from what the sidecars export on /metrics.
    let http_ok = stats.http_ok.load(Ordering::Relaxed);
    let http_failed = stats.http_failed.load(Ordering::Relaxed);
    let tcp_ok = stats.tcp_ok.load(Ordering::Relaxed);
    let tcp_failed = stats.tcp_failed.load(Ordering::Relaxed);
    let total = http_ok + http_failed;
    let customer_m = parse_text(&customer.metrics().encode());
    let quic_out = crate::metrics::sum(
        &customer_m,
        "weft_quic_connections_total",
        &[("direction", "outbound")],
    );
    println!();
    println!("Summary ({:.1} s)", elapsed.as_secs_f64());
    println!(
        "  HTTP customer -> payment: {total} requests, {:.2}% succeeded, {:.0} req/s, latency p50 {:.2} ms, p99 {:.2} ms",
        if total > 0 { 100.0 * http_ok as f64 / total as f64 } else { 0.0 },
        total as f64 / elapsed.as_secs_f64().max(0.001),
        stats.quantile_ms(0.5),
        stats.quantile_ms(0.99),
    );
    println!(
        "  TCP  customer -> echo:    {} connections, {tcp_failed} failed",
        tcp_ok + tcp_failed
    );
    println!(
        "  QUIC connections dialed by the customer sidecar: {quic_out} (one per peer and protocol, shared by all requests)"
    );
    let answered = |sc: &Sidecar| {
        let m = parse_text(&sc.metrics().encode());
        let all = crate::metrics::sum(&m, "weft_requests_total", &[("direction", "inbound")]);
        let failed: f64 = m
            .iter()
            .filter(|s| s.name == "weft_requests_total" && s.label("direction") == Some("inbound"))
            .filter(|s| s.label("status").is_some_and(|c| c.starts_with('5')))
            .fold(0.0, |n, s| n + s.value);
        (all, failed)
    };
    let (v1, v1_failed) = answered(&payment1);
    let (v2, v2_failed) = answered(&payment2);
    let retries = crate::metrics::sum(&customer_m, "weft_retries_total", &[]);
    let share = |n: f64| 100.0 * n / (v1 + v2).max(1.0);
    println!(
        "  Canary split: payment v1 answered {v1:.0} requests ({:.1}%), v2 {v2:.0} ({:.1}%; the route asks for 90/10)",
        share(v1),
        share(v2)
    );
    println!(
        "  Retries: v2 failed {v2_failed:.0} requests (503), v1 {v1_failed:.0}; the customer sidecar retried {retries:.0}, so the customer app saw {http_failed} failures"
    );
    println!("  Who talked to whom (mTLS identities, from the servers' sidecars):");
    for (svc, sc) in [
        ("payment v1", &payment1),
        ("payment v2", &payment2),
        ("echo", &echo),
    ] {
        let samples = parse_text(&sc.metrics().encode());
        for (peer, n, what) in talkers(&samples) {
            println!("    {peer} -> {svc} ({n:.0} {what})");
        }
    }
    println!("  Admin endpoints (try /metrics, /config, /certs, /clusters):");
    for (name, sc) in sidecars {
        println!("    {name:<10} http://{}/", sc.admin_addr);
    }
    ca_task.abort();
    let success = total > 0 && http_failed == 0 && tcp_ok > 0 && tcp_failed == 0;
    if success {
        println!("All traffic succeeded.");
    } else {
        println!("Some traffic failed (see above); run with RUST_LOG=debug for details.");
    }
    Ok(success)
}

/// The canary fails one request in this many, with a 503.
const CANARY_FAILS_ONE_IN: u64 = 20;

/// The demo's mesh file: endpoints, a 90/10 canary split for payment with
/// retries of its failures, and the echo TCP service.
fn mesh_file(v1: SocketAddr, v2: SocketAddr, echo: SocketAddr) -> String {
    format!(
        r#"trust_domain = "{TRUST_DOMAIN}"
[services.payment]
endpoints = [{{ addr = "{v1}", labels = {{ version = "v1" }} }}, {{ addr = "{v2}", labels = {{ version = "v2" }} }}]
[services.echo]
protocol = "tcp"
endpoints = ["{echo}"]
[[services.payment.routes]]
name = "canary"
backends = [{{ subset = {{ version = "v1" }}, weight = 90 }}, {{ subset = {{ version = "v2" }}, weight = 10 }}]
timeout = "2s"
# Charges carry an order id, so payment may see one twice: POSTs are retried.
retries = {{ attempts = 2, on = ["gateway-error"], non_idempotent = true }}
"#
    )
}

/// (peer identity, count, unit) from a server sidecar's inbound metrics.
fn talkers(samples: &[Sample]) -> Vec<(String, f64, &'static str)> {
    let mut by_peer: BTreeMap<(String, &'static str), f64> = BTreeMap::new();
    for s in samples {
        let unit = match s.name.as_str() {
            "weft_requests_total" => "requests",
            "weft_tcp_connections_total" => "TCP connections",
            _ => continue,
        };
        if s.label("direction") == Some("inbound") {
            if let Some(peer) = s.label("peer") {
                *by_peer.entry((peer.to_string(), unit)).or_default() += s.value;
            }
        }
    }
    by_peer
        .into_iter()
        .map(|((peer, unit), n)| (peer, n, unit))
        .collect()
}

async fn http_worker(url: String, worker: usize, stats: Arc<Stats>) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut n = 0u64;
    loop {
        n += 1;
        let body = format!("{{\"order\": {n}, \"worker\": {worker}, \"amount_cents\": 1299}}");
        let req = http::Request::post(&url)
            .header("content-type", "application/json")
            .header(ORDER_ID, format!("{worker}-{n}"))
            .body(Full::new(Bytes::from(body)));
        let Ok(req) = req else { return };
        let t = Instant::now();
        let ok = match client.request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                status.is_success()
                    && matches!(body, Ok(b) if b.starts_with(b"{\"status\":\"charged\""))
            }
            Err(_) => false,
        };
        if ok {
            stats.record(t.elapsed());
            stats.http_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.http_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn tcp_worker(addr: SocketAddr, stats: Arc<Stats>) {
    let mut n = 0u64;
    loop {
        n += 1;
        let ok = echo_once(addr, n).await.is_ok();
        let counter = if ok { &stats.tcp_ok } else { &stats.tcp_failed };
        counter.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One TCP connection through the mesh: send, half-close, read the echo.
async fn echo_once(addr: SocketAddr, n: u64) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let msg = format!("ping {n} ").repeat(512);
    s.write_all(msg.as_bytes()).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await?;
    if back != msg.as_bytes() {
        bail!("echo mismatch");
    }
    Ok(())
}

/// The order a demo request charges, so the canary can tell a retry.
const ORDER_ID: &str = "x-order-id";

/// Orders the canary failed, newest last (bounded: a retry follows its
/// failure within milliseconds).
#[derive(Default)]
struct Failed {
    order: std::collections::VecDeque<String>,
    set: std::collections::HashSet<String>,
}

impl Failed {
    /// Record a failure of `id`; false if it already failed once (then it
    /// must succeed: the canary is flaky, not broken).
    fn first_failure(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() >= 4096 {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(id.to_string());
        self.set.insert(id.to_string());
        true
    }
}

/// The payment app, `version` in its answers; with `fail_one_in`, every
/// n-th request gets a 503 (a flaky canary) unless it is the retry of an
/// order that already failed once. Counting arrivals alone was not enough:
/// at several thousand requests per second a retry can itself arrive as
/// the next n-th, and the customer saw one failure in ~8,000 canary calls.
async fn start_payment_app(
    version: &'static str,
    fail_one_in: Option<u64>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Failed::default()));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            let failed = failed.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                        let fail = fail_one_in.is_some_and(|k| n.is_multiple_of(k)) && {
                            let id = req
                                .headers()
                                .get(ORDER_ID)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default();
                            failed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .first_failure(id)
                        };
                        async move {
                            let caller = req
                                .headers()
                                .get(crate::headers::PEER_ID)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("unknown")
                                .to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().len())
                                .unwrap_or(0);
                            if fail {
                                let mut resp = http::Response::new(Full::new(Bytes::from_static(
                                    b"{\"status\":\"unavailable\"}",
                                )));
                                *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                                return Ok::<_, std::convert::Infallible>(resp);
                            }
                            let reply = format!(
                            "{{\"status\":\"charged\",\"version\":\"{version}\",\"caller\":\"{caller}\",\"bytes\":{body}}}"
                        );
                            Ok(http::Response::new(Full::new(Bytes::from(reply))))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn start_echo_app() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::Failed;

    #[test]
    fn an_order_fails_at_most_once_and_the_memory_is_bounded() {
        let mut f = Failed::default();
        assert!(f.first_failure("1-7"));
        assert!(!f.first_failure("1-7"), "its retry must succeed");
        assert!(f.first_failure("2-7"));
        for i in 0..5000 {
            f.first_failure(&format!("x-{i}"));
        }
        assert!(f.set.len() <= 4096 && f.order.len() == f.set.len());
        // Long forgotten: it may fail again (retries come within ms).
        assert!(f.first_failure("1-7"));
    }
}
