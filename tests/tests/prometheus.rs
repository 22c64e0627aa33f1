//! Metrics as an operator uses them, with the real tools: a Prometheus
//! started here (Debian's `prometheus` package) scrapes two sidecars carrying
//! traffic and counts what was sent; `promtool check metrics` reads a live
//! `/metrics`; `promtool` checks and unit-tests the alert rules; `amtool`
//! checks the Alertmanager example; and every metric the Grafana dashboard
//! and the alert rules name is one the sidecars export, with samples, after
//! traffic of every kind.
//!
//! The binaries (`prometheus`, `promtool`, `amtool`) must be in PATH:
//! `.ci/run` installs them (`apt-get install prometheus
//! prometheus-alertmanager`). A missing one fails the test; it never skips.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::mesh::Protocol;
use weft_proxy::metrics::{parse_text, sum};
use weft_proxy::{CaCredential, IdentitySource, Limits, Sidecar, SidecarConfig};
use weft_tests::fleet::{spec, Client, Fleet};
use weft_tests::*;

/// No test here takes longer; Prometheus starts in about a second.
const LIMIT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    repo_root()
}

/// A tool from PATH, or a failure saying how to install it.
fn tool(name: &str) -> PathBuf {
    which(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not in PATH. These tests need Debian's Prometheus tools: \
             `apt-get install prometheus prometheus-alertmanager` (.ci/run installs them)"
        )
    })
}

/// Run a tool to completion: (success, stdout + stderr).
fn run(name: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(tool(name));
    cmd.args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("writing to {name}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// ---------------------------------------------------------------------------
// A Prometheus server of our own.

/// A `prometheus` process with its own config, data directory and port.
/// Dropping it kills that process (and only it) and removes the directory.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrape `targets` (sidecar admin addresses) every second as job "weft".
    async fn start(targets: &[SocketAddr]) -> Prometheus {
        let bin = tool("prometheus");
        let mut last_log = String::new();
        // A port picked free can be taken before Prometheus binds it: retry.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
            let config = format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: weft\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            );
            let config_path = dir.path().join("prometheus.yaml");
            std::fs::write(&config_path, config).expect("write config");
            let addr = free_port();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
            let child = Command::new(&bin)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let mut prom = Prometheus { child, addr, dir };
            if prom.wait_ready().await {
                return prom;
            }
            last_log = prom.log();
            // Dropping `prom` kills the process if it is still running.
        }
        panic!("Prometheus did not become ready; its last log:\n{last_log}");
    }

    /// Ready, or false once the process has exited (e.g. port taken).
    async fn wait_ready(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if let Some((200, _)) = http_get_text(self.addr, "/-/ready").await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query: each result's labels and value.
    async fn query(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let Some((200, body)) = http_get_text(self.addr, &path).await else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let empty = Vec::new();
        v["data"]["result"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect()
    }

    /// The single value of a query that aggregates to one series.
    async fn value(&self, promql: &str) -> Option<f64> {
        match self.query(promql).await.as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }

    /// Wait until `promql` evaluates to `want` (scrapes are a second apart);
    /// the last value seen otherwise.
    async fn wait_for(&self, promql: &str, want: f64) -> Result<(), Option<f64>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.value(promql).await;
            if got == Some(want) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(got);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET over plain HTTP/1.1 with an optional Accept header: (status, body),
/// or None if the server did not answer.
async fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Option<(u16, String)> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let req = req.body(Default::default()).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn http_get_text(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_get(addr, path, None).await
}

// ---------------------------------------------------------------------------
// (a) A real Prometheus counts what two sidecars carried.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_two_sidecars_and_counts_what_was_sent() {
    tool("prometheus");
    tokio::time::timeout(LIMIT, async {
        let (app, _seen) = http_app().await;
        let pair = Pair::start(&[("payment", Protocol::Http)], app).await;
        let client = Client::new(pair.upstream("payment"));
        let body = pattern(1000);
        // A first batch before Prometheus starts, a second while it scrapes.
        let send = |posts: usize, bigs: usize| {
            let (client, body) = (&client, &body);
            async move {
                for _ in 0..posts {
                    let a = client.send("POST", "/pay", &[], body).await.expect("post");
                    assert_eq!(a.status, 200, "{a:?}");
                }
                for _ in 0..bigs {
                    let a = client.get("/big?bytes=5000", &[]).await.expect("get");
                    assert_eq!((a.status, a.header("content-length")), (200, Some("5000")));
                }
            }
        };
        send(20, 5).await;
        let prom = Prometheus::start(&[pair.client.admin_addr, pair.server.admin_addr]).await;
        let up = prom.wait_for(r#"count(up{job="weft"} == 1)"#, 2.0).await;
        assert!(up.is_ok(), "both sidecars scraped: {up:?}\n{}", prom.log());
        send(10, 3).await;
        let (posts, bigs) = (30.0, 8.0);

        let server_id = pair.ca.id("server");
        let client_id = pair.ca.id("customer");
        let expect = [
            // Every request, on both sides, with the peer each side saw.
            (
                format!(
                    r#"sum(weft_requests_total{{job="weft",direction="outbound",service="payment",route="default",status="200",peer="{server_id}"}})"#
                ),
                posts + bigs,
            ),
            (
                format!(
                    r#"sum(weft_requests_total{{job="weft",direction="inbound",service="payment",status="200",peer="{client_id}"}})"#
                ),
                posts + bigs,
            ),
            (
                r#"sum(weft_request_duration_seconds_count{job="weft",direction="outbound",service="payment"})"#.into(),
                posts + bigs,
            ),
            (
                r#"sum(weft_request_duration_seconds_count{job="weft",direction="inbound",service="payment"})"#.into(),
                posts + bigs,
            ),
            // Bodies: 1000 bytes up and echoed back per POST, 5000 down per GET.
            (
                r#"sum(weft_request_bytes_total{direction="outbound",service="payment"})"#.into(),
                posts * 1000.0,
            ),
            (
                r#"sum(weft_request_bytes_total{direction="inbound",service="payment"})"#.into(),
                posts * 1000.0,
            ),
            (
                r#"sum(weft_response_bytes_total{direction="outbound",service="payment"})"#.into(),
                posts * 1000.0 + bigs * 5000.0,
            ),
            (
                r#"sum(weft_response_bytes_total{direction="inbound",service="payment"})"#.into(),
                posts * 1000.0 + bigs * 5000.0,
            ),
            // One pooled HTTP/3 connection carried it all.
            (
                format!(
                    r#"sum(weft_quic_peer_connections{{direction="outbound",peer="{server_id}"}})"#
                ),
                1.0,
            ),
            (
                format!(
                    r#"sum(weft_quic_peer_connections{{direction="inbound",peer="{client_id}"}})"#
                ),
                1.0,
            ),
            (r#"sum(weft_build_info{job="weft"})"#.into(), 2.0),
        ];
        for (q, want) in &expect {
            if let Err(got) = prom.wait_for(q, *want).await {
                panic!("{q}: want {want}, Prometheus says {got:?}");
            }
        }
        // Gauges read from quinn at scrape time are there and plausible.
        let rtt = prom
            .value(&format!(
                r#"max(weft_quic_rtt_seconds{{direction="outbound",peer="{server_id}"}})"#
            ))
            .await;
        assert!(rtt.is_some_and(|r| r > 0.0 && r < 1.0), "rtt {rtt:?}");
        let cwnd = prom
            .value(r#"min(weft_quic_congestion_window_bytes{direction="outbound"})"#)
            .await;
        assert!(cwnd.is_some_and(|c| c >= 1200.0), "cwnd {cwnd:?}");
        let sent = prom
            .value(r#"sum(weft_quic_sent_packets_total{direction="outbound"})"#)
            .await;
        assert!(sent.is_some_and(|s| s >= posts + bigs), "sent packets {sent:?}");
        // Prometheus asked for OpenMetrics and parsed what it got.
        let (_, targets) = http_get_text(prom.addr, "/api/v1/targets")
            .await
            .expect("targets");
        assert!(!targets.contains("\"health\":\"down\""), "{targets}");
    })
    .await
    .expect("test timed out");
}

// ---------------------------------------------------------------------------
// (b, d) promtool reads live /metrics; the dashboard and rules name only
// metrics that sidecars export.

/// The services of the traffic fleet and the policy that makes every kind
/// of event happen. Which traffic gives which families samples:
/// - every request: weft_requests_total, weft_request_duration_seconds,
///   weft_request_bytes_total, weft_response_bytes_total, weft_quic_*
///   (connections, per-peer RTT, cwnd, packets, bytes, streams);
/// - `payment` route `chaos` (x-chaos: 1): weft_faults_injected_total;
/// - `payment` route `main`: weft_mirrored_requests_total (copies to `shadow`);
/// - `flaky` (its app fails every request): weft_retries_total, then
///   weft_retry_budget_exhausted_total (ratio 0.5, no floor), and
///   weft_outlier_ejections_total (one 5xx ejects; 100 % may be ejected);
/// - `slow` (its app takes 300 ms; 50 ms timeout; one request at a time, no
///   queue): weft_request_timeouts_total and weft_circuit_breaker_overflows_total;
/// - `vault` (denies the caller): weft_authz_denied_total on its sidecar;
/// - a policy edit: weft_config_reloads_total.
const POLICY: &str = r#"
[[services.payment.routes]]
name = "chaos"
match = { headers = { "x-chaos" = "1" } }
fault = { delay = { percent = 100, duration = "1ms" }, abort = { percent = 100, status = 503 } }

[[services.payment.routes]]
name = "main"
mirror = { service = "shadow", percent = 100 }

[[services.flaky.routes]]
name = "retrying"
retries = { attempts = 2, on = ["5xx"] }

[services.flaky.retry_budget]
ratio = 0.5
min_per_second = 0

[services.flaky.outlier_detection]
consecutive_5xx = 1
max_ejection_percent = 100

[[services.slow.routes]]
name = "deadline"
timeout = "50ms"

[services.slow.circuit_breaker]
max_requests = 1
max_pending = 0

[services.vault.authorization]
deny = ["spiffe://test.weft.local/ns/test/sa/customer"]
"#;

/// A CA served over HTTPS, for a sidecar that gets (and renews) its
/// certificate by CSR: weft_ca_requests_total, weft_cert_renewals_total.
struct CaServer {
    ca: Arc<weft_ca::Ca>,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl CaServer {
    async fn start(ttl: Duration) -> CaServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(weft_ca::Ca::init(dir.path(), TD).expect("init CA"));
        let listener = tokio::net::TcpListener::bind(any_port())
            .await
            .expect("bind CA");
        let addr = listener.local_addr().expect("addr");
        let served = ca.clone();
        let task = tokio::spawn(async move {
            let _ = weft_ca::server::serve(served, listener, ttl).await;
        });
        CaServer {
            ca,
            _dir: dir,
            addr,
            task,
        }
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every metric name with at least one sample in these expositions, plus
/// the family name of each histogram (`_bucket`, `_sum`, `_count` samples).
fn exported(texts: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for text in texts {
        let histograms: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.strip_suffix(" histogram"))
            .collect();
        for s in parse_text(text) {
            for h in &histograms {
                if ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| s.name == format!("{h}{suffix}"))
                {
                    names.insert(h.to_string());
                }
            }
            names.insert(s.name);
        }
    }
    names
}

/// Metric names (`weft_…`) in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("weft_") {
        // Not part of a longer identifier (e.g. a recording rule `x:weft_y`).
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// The PromQL of every panel target and template variable of a dashboard.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The `expr:` of every rule in a rules file (one line, or a `|` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        if let Some(rest) = line.trim_start().strip_prefix("expr:") {
            let rest = rest.trim();
            if rest == "|" || rest == ">" || rest == "|-" || rest == ">-" {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                out.push(block.join(" "));
            } else {
                out.push(rest.to_string());
            }
        }
        i += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_use_is_exported_and_promtool_passes_it() {
    tool("promtool");
    tokio::time::timeout(LIMIT, async {
        // HTTP traffic of every kind through a fleet.
        let fleet = Fleet::start(
            &[
                spec("payment", "payment-1", &[]),
                spec("shadow", "shadow", &[]),
                spec("flaky", "flaky", &[]),
                spec("slow", "slow", &[]),
                spec("vault", "vault", &[]),
            ],
            POLICY,
        )
        .await;
        fleet.server("flaky").app.set(100, Duration::ZERO);
        fleet.server("slow").app.set(0, Duration::from_millis(300));
        let payment = Client::new(fleet.upstream("payment"));
        for _ in 0..5 {
            assert_eq!(payment.get("/", &[]).await.expect("payment").status, 200);
            let a = payment.get("/", &[("x-chaos", "1")]).await.expect("chaos");
            assert_eq!(a.header("x-weft-fault"), Some("abort"));
        }
        let flaky = Client::new(fleet.upstream("flaky"));
        for _ in 0..10 {
            assert_eq!(flaky.get("/", &[]).await.expect("flaky").status, 503);
        }
        let slow = Client::new(fleet.upstream("slow"));
        let answers = futures::future::join_all((0..4).map(|_| slow.get("/", &[]))).await;
        assert!(
            answers.iter().any(|a| a
                .as_ref()
                .is_ok_and(|a| a.header("x-weft-overflow").is_some())),
            "an overflow: {answers:?}"
        );
        let vault = Client::new(fleet.upstream("vault"));
        assert_eq!(vault.get("/", &[]).await.expect("vault").status, 403);
        fleet.set_policy(&format!("{POLICY}\n# edited\n")).await;
        // Mirrored copies are sent after the primary answered: wait for them.
        assert!(
            wait_until(Duration::from_secs(10), || async {
                fleet
                    .client_metric("weft_mirrored_requests_total", &[("result", "sent")])
                    .await
                    >= 1.0
            })
            .await
        );

        // TCP: a stream through, one refused (the server does not know
        // `ghost`: weft_refused_total), and a peer without a certificate
        // (weft_quic_handshake_failures_total).
        let (echo, _) = tcp_echo_app().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp), ("ghost", Protocol::Tcp)], echo).await;
        let mut server_mesh = (*pair.server.mesh()).clone();
        server_mesh.services.remove("ghost");
        pair.server.set_mesh(server_mesh);
        let mut s = tokio::net::TcpStream::connect(pair.upstream("echo"))
            .await
            .expect("connect echo");
        s.write_all(b"hello through the mesh").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"hello through the mesh");
        // The refusal resets the app's connection, sometimes before
        // connect() has returned: only the server's count matters here.
        if let Ok(mut g) = tokio::net::TcpStream::connect(pair.upstream("ghost")).await {
            let _ = g.write_all(b"anyone?").await;
            let _ = g.read_to_end(&mut Vec::new()).await;
        }
        let rogue = quic_client(&pair.ca.creds("anyone").bundle, None, b"h3");
        if let Ok(connecting) = rogue.connect(pair.server.inbound_addr, "weft.mesh") {
            let _ = connecting.await;
        }
        assert!(
            wait_until(Duration::from_secs(10), || async {
                let s = scrape(pair.server.admin_addr).await;
                sum(&s, "weft_quic_handshake_failures_total", &[]) >= 1.0
                    && sum(&s, "weft_refused_total", &[("reason", "unknown_service")]) >= 1.0
            })
            .await,
            "handshake failure and refusal counted"
        );

        // A sidecar whose certificate comes from weft-ca with a 4 s life:
        // issued at start-up, renewed about 2 s later.
        let ca = CaServer::start(Duration::from_secs(4)).await;
        let id = format!("spiffe://{TD}/ns/test/sa/issued");
        let issued = Sidecar::start(SidecarConfig {
            mesh: pair.mesh.clone(),
            identity: IdentitySource::Ca {
                url: format!("https://{}", ca.addr),
                bundle_pem: ca.ca.bundle_pem(),
                credential: CaCredential::JoinToken(
                    ca.ca.token(&id, Duration::from_secs(3600)).expect("token"),
                ),
                expect_id: Some(id),
            },
            inbound: any_port(),
            admin: any_port(),
            app: None,
            upstreams: Vec::new(),
            udp_upstreams: Vec::new(),
            limits: Limits::default(),
            tracing: Default::default(),
            capture: Default::default(),
            dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
        })
        .await
        .expect("sidecar with a CA certificate");
        assert!(
            wait_until(Duration::from_secs(15), || async {
                let s = scrape(issued.admin_addr).await;
                sum(&s, "weft_cert_renewals_total", &[("result", "success")]) >= 1.0
                    && sum(&s, "weft_ca_requests_total", &[("result", "issued")]) >= 2.0
            })
            .await,
            "a renewal and two issued certificates counted"
        );

        let admins: Vec<SocketAddr> = std::iter::once(fleet.client.admin_addr)
            .chain(fleet.servers.iter().map(|s| s.sidecar.admin_addr))
            .chain([
                pair.client.admin_addr,
                pair.server.admin_addr,
                issued.admin_addr,
            ])
            .collect();
        let mut texts = Vec::new();
        for admin in &admins {
            let (status, text) = http_get(*admin, "/metrics", None).await.expect("/metrics");
            assert_eq!(status, 200);
            // (b) promtool's linter finds nothing to say.
            let (ok, out) = run("promtool", &["check", "metrics"], Some(&text));
            assert!(
                ok && out.trim().is_empty(),
                "promtool check metrics on {admin}:\n{out}"
            );
            // OpenMetrics, for scrapers that ask: the same samples.
            let (_, om) = http_get(*admin, "/metrics", Some("application/openmetrics-text"))
                .await
                .expect("/metrics openmetrics");
            assert!(om.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
            let names = |t: &str| {
                parse_text(t)
                    .into_iter()
                    .map(|s| s.name)
                    .collect::<BTreeSet<_>>()
            };
            assert_eq!(names(&om), names(&text));
            texts.push(text);
        }

        // docs/metrics.md documents every family a sidecar registers
        // (with or without samples), so a new metric cannot go unexplained.
        let docs = std::fs::read_to_string(repo().join("docs/metrics.md")).expect("read docs");
        let undocumented: BTreeSet<&str> = texts
            .iter()
            .flat_map(|t| t.lines())
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .filter(|name| !docs.contains(name))
            .collect();
        assert!(
            undocumented.is_empty(),
            "not in docs/metrics.md: {undocumented:?}"
        );

        // (d) Every metric named by the dashboard and the alert rules.
        let exported = exported(&texts);
        let dashboard_path = repo().join("deploy/grafana/weft-mesh.json");
        let dashboard: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&dashboard_path).expect("read dashboard"),
        )
        .expect("dashboard is JSON");
        let mut exprs = Vec::new();
        dashboard_exprs(&dashboard, &mut exprs);
        let rules = std::fs::read_to_string(repo().join("deploy/prometheus/weft-alerts.yaml"))
            .expect("read rules");
        let rule_exprs = rule_exprs(&rules);
        assert!(rule_exprs.len() >= 10, "rules parsed: {rule_exprs:?}");
        let mut missing = BTreeMap::new();
        let mut used = BTreeSet::new();
        for (file, exprs) in [
            ("weft-mesh.json", &exprs),
            ("weft-alerts.yaml", &rule_exprs),
        ] {
            for e in exprs.iter() {
                for name in metric_names(e) {
                    if !exported.contains(&name) {
                        missing
                            .entry(name.clone())
                            .or_insert_with(Vec::new)
                            .push(format!("{file}: {e}"));
                    }
                    used.insert(name);
                }
            }
        }
        assert!(
            missing.is_empty(),
            "named but not exported (with samples): {missing:#?}\nexported: {exported:?}"
        );
        assert!(
            used.len() >= 30,
            "the dashboard covers the metrics: {used:?}"
        );
        drop(issued);
    })
    .await
    .expect("test timed out");
}

// ---------------------------------------------------------------------------
// (c) The rules, their unit tests, the scrape config and the Alertmanager
// example pass the tools.

#[test]
fn alert_rules_are_valid_and_their_unit_tests_pass() {
    let (ok, out) = run(
        "promtool",
        &["check", "rules", "deploy/prometheus/weft-alerts.yaml"],
        None,
    );
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = run(
        "promtool",
        &["test", "rules", "deploy/prometheus/weft-alerts.test.yaml"],
        None,
    );
    assert!(ok, "promtool test rules:\n{out}");
    let (ok, out) = run(
        "promtool",
        &["check", "config", "deploy/prometheus/prometheus.yaml"],
        None,
    );
    assert!(ok, "promtool check config:\n{out}");

    // Every alert has a test where it fires and one where it does not.
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/weft-alerts.yaml"))
        .expect("read rules");
    let tests = std::fs::read_to_string(repo().join("deploy/prometheus/weft-alerts.test.yaml"))
        .expect("read tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "alerts: {alerts:?}");
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for alert in &alerts {
        let cases: Vec<&str> = lines
            .windows(2)
            .filter(|w| w[0] == format!("alertname: {alert}"))
            .map(|w| w[1])
            .collect();
        assert!(
            cases.contains(&"exp_alerts: []"),
            "{alert}: no test where it does not fire"
        );
        assert!(
            cases.contains(&"exp_alerts:"),
            "{alert}: no test where it fires"
        );
    }
}

#[test]
fn alertmanager_example_is_valid_and_pages_only_for_critical_alerts() {
    let config = "deploy/prometheus/alertmanager.yaml";
    let (ok, out) = run("amtool", &["check-config", config], None);
    assert!(ok, "amtool check-config:\n{out}");
    let route = |labels: &[&str]| {
        let mut args = vec!["config", "routes", "test", "--config.file", config];
        args.extend_from_slice(labels);
        let (ok, out) = run("amtool", &args, None);
        assert!(ok, "amtool config routes test {labels:?}:\n{out}");
        // Warnings about --alertmanager.url go to stderr; the receiver is a line of its own.
        out.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("Warning"))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        route(&["alertname=WeftHighErrorRate", "severity=critical"]),
        "pagerduty"
    );
    assert_eq!(
        route(&["alertname=WeftHighLatencyP99", "severity=warning"]),
        "default"
    );
}

#[test]
fn dashboard_is_importable_grafana_json() {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/weft-mesh.json"))
        .expect("read dashboard");
    let d: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert!(d["title"].is_string() && d["uid"].is_string());
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("datasource").expect("a datasource variable");
    assert_eq!(
        (ds["type"].as_str(), ds["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    assert!(var("service").is_some(), "a service variable");
    let mut ids = BTreeSet::new();
    let mut targets = 0;
    for p in d["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "unique panel ids"
        );
        assert!(
            p["gridPos"]["w"].is_u64() && p["gridPos"]["h"].is_u64(),
            "{p}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "${datasource}");
            assert!(t["refId"].is_string() && t["expr"].is_string());
            targets += 1;
        }
    }
    assert!(targets >= 30, "{targets} queries");
}
