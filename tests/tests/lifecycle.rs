//! Graceful lifecycle: readiness, drain on shutdown, and peers that react
//! to a draining sidecar without failing requests.
//!
//! - a rolling restart of both endpoints of a service under constant HTTP
//!   load and with no retry policy, each restarted on the same address, or
//!   (as in Kubernetes) replaced by one on a new address that joins the
//!   mesh file before the old one drains and leaves it: no request fails,
//!   and both endpoints serve afterwards;
//! - the same for TCP streams: new streams go to the other endpoint, and a
//!   long-lived stream is ended cleanly at the drain deadline;
//! - `/ready` is 503 while draining and `/live` 200; a request in progress
//!   when the drain starts completes; one still running at the deadline is
//!   cut and counted;
//! - SIGTERM to a real `weft sidecar` process drains and exits 0.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::cli::{Cli, Command};
use weft_proxy::mesh::Protocol;
use weft_proxy::{Limits, Mesh, Sidecar};
use weft_tests::fleet::{background, spec, Client, Fleet, Server, RELOAD_INTERVAL};
use weft_tests::*;

const LIMIT: Duration = Duration::from_secs(120);

/// A sidecar started the way a restarted process starts one: from flags
/// (`weft sidecar --inbound ADDR …`), on an address its predecessor may
/// still be releasing, so binding is retried until the port is free.
async fn start_from_flags(args: &[String]) -> Sidecar {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let cli = Cli::try_parse_from(
            ["weft", "sidecar"]
                .into_iter()
                .map(String::from)
                .chain(args.iter().cloned()),
        )
        .expect("flags parse");
        let Command::Sidecar(a) = cli.command else {
            panic!("not a sidecar command")
        };
        let cfg = a.into_config().expect("sidecar config");
        match Sidecar::start(cfg).await {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                // The old endpoint's socket closes once its last task has
                // ended: wait for the port, not for a fixed time.
                assert!(e.to_string().contains("binding UDP"), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("sidecar did not start on its old address: {e}"),
        }
    }
}

async fn wait_ready(admin: SocketAddr) {
    let ready = wait_until(Duration::from_secs(10), || async {
        admin_get(admin, "/ready").await.0 == 200
    })
    .await;
    assert!(ready, "sidecar at {admin} never became ready");
}

/// A new sidecar for `app` (a restarted pod), started from flags on
/// `inbound`, reading and watching the fleet's mesh file; once ready.
async fn start_for(
    fleet: &Fleet,
    app: &weft_tests::fleet::BehavingApp,
    inbound: SocketAddr,
) -> Sidecar {
    let certs = fleet.dir.path().join(format!("certs-{}", app.name));
    fleet.ca.write_certs(&app.name, &certs);
    let flags: Vec<String> = [
        "--mesh",
        &fleet.mesh_path.display().to_string(),
        "--cert-dir",
        &certs.display().to_string(),
        "--inbound",
        &inbound.to_string(),
        "--admin",
        "127.0.0.1:0",
        "--app",
        &app.addr.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sidecar = start_from_flags(&flags).await;
    sidecar.watch_mesh_file(fleet.mesh_path.clone(), RELOAD_INTERVAL);
    wait_ready(sidecar.admin_addr).await;
    sidecar
}

/// Drain the fleet's server `i`, stop it, and start a new sidecar for the
/// same app on the same inbound address; waits until it is ready.
async fn restart_server(fleet: &mut Fleet, i: usize) {
    let Server {
        service,
        labels,
        app,
        mut sidecar,
    } = fleet.servers.remove(i);
    let inbound = sidecar.inbound_addr;
    let report = sidecar.drain(Duration::from_secs(10)).await;
    assert!(report.clean(), "{} cut work: {report:?}", app.name);
    sidecar.shutdown().await;
    let sidecar = start_for(fleet, &app, inbound).await;
    fleet.servers.insert(
        i,
        Server {
            service,
            labels,
            app,
            sidecar,
        },
    );
}

/// Point the `payment` service at `endpoints` (a mesh-file edit, as a
/// controller would make it) and wait until the client routes by it.
async fn set_endpoints(fleet: &Fleet, endpoints: &[SocketAddr]) {
    let list: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    let text = format!(
        "trust_domain = \"{TD}\"\n[services.payment]\nendpoints = [{}]\nload_balancer = \"round-robin\"\n",
        list.join(", ")
    );
    Mesh::parse(&text, "mesh.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let tmp = fleet.mesh_path.with_extension("toml.new");
    std::fs::write(&tmp, text).expect("write mesh");
    std::fs::rename(&tmp, &fleet.mesh_path).expect("replace mesh");
    let want: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
    let applied = wait_until(Duration::from_secs(10), || async {
        let clusters = fleet.clusters().await;
        let have: Vec<String> = clusters["payment"]["endpoints"]
            .as_array()
            .map(|eps| {
                eps.iter()
                    .filter_map(|e| e["addr"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        have == want
    })
    .await;
    assert!(applied, "the client did not apply endpoints {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_fails_no_request() {
    tokio::time::timeout(LIMIT, async {
        // No retry policy: whatever hides the restarts is the drain
        // handling. Round robin, so both endpoints get traffic after the
        // restarts whatever latency they showed (P2C would shun one for a
        // minute after a single slow answer on a busy machine).
        let mut fleet = Fleet::start(
            &[spec("payment", "a", &[]), spec("payment", "b", &[])],
            "load_balancer = \"round-robin\"\n",
        )
        .await;
        assert_eq!(
            fleet.clusters().await["payment"]["load_balancer"],
            "round-robin"
        );
        let load = background(fleet.upstream("payment"), 4);
        let mut ok = load.assert_flows(0, "before the restarts").await;

        for i in 0..2 {
            restart_server(&mut fleet, i).await;
            ok = load.assert_flows(ok, "after a restart").await;
        }
        // Both restarted endpoints serve again (the client dialled them anew).
        let seen: Vec<u64> = fleet.servers.iter().map(|s| s.app.requests()).collect();
        let both = wait_until(Duration::from_secs(20), || async {
            fleet
                .servers
                .iter()
                .zip(&seen)
                .all(|(s, before)| s.app.requests() > before + 10)
        })
        .await;
        load.stop();
        assert!(
            both,
            "both endpoints must serve after the restart: {:?} -> {:?}\n{:#}",
            seen,
            fleet
                .servers
                .iter()
                .map(|s| s.app.requests())
                .collect::<Vec<_>>(),
            fleet.clusters().await["payment"]
        );
        load.assert_no_failure();
        let drain_retries = fleet
            .client_metric("weft_retries_total", &[("reason", "drain")])
            .await;
        let ejections = fleet
            .client_metric("weft_outlier_ejections_total", &[])
            .await;
        assert_eq!(ejections, 0.0, "a draining endpoint is not an outlier");
        eprintln!(
            "rolling restart: {} requests ok, {drain_retries} transparent drain retries",
            load.ok()
        );
    })
    .await
    .expect("test timed out");
}

/// As Kubernetes does it: each replacement gets a new address; it starts,
/// joins the endpoints, then the old one drains and leaves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_to_new_addresses_fails_no_request() {
    tokio::time::timeout(LIMIT, async {
        let mut fleet = Fleet::start(
            &[spec("payment", "a", &[]), spec("payment", "b", &[])],
            "load_balancer = \"round-robin\"\n",
        )
        .await;
        let load = background(fleet.upstream("payment"), 4);
        let mut ok = load.assert_flows(0, "before the restarts").await;
        for i in 0..2 {
            let old_addr = fleet.servers[i].sidecar.inbound_addr;
            let new = start_for(&fleet, &fleet.servers[i].app, any_port()).await;
            let mut endpoints: Vec<SocketAddr> = fleet
                .servers
                .iter()
                .map(|s| s.sidecar.inbound_addr)
                .collect();
            endpoints.push(new.inbound_addr);
            set_endpoints(&fleet, &endpoints).await;
            // The old pod gets SIGTERM while it is still listed.
            let old = std::mem::replace(&mut fleet.servers[i].sidecar, new);
            let mut old = old;
            let report = old.drain(Duration::from_secs(10)).await;
            assert!(report.clean(), "{report:?}");
            old.shutdown().await;
            endpoints.retain(|a| *a != old_addr);
            set_endpoints(&fleet, &endpoints).await;
            ok = load.assert_flows(ok, "after a restart").await;
        }
        let seen: Vec<u64> = fleet.servers.iter().map(|s| s.app.requests()).collect();
        let both = wait_until(Duration::from_secs(20), || async {
            fleet
                .servers
                .iter()
                .zip(&seen)
                .all(|(s, before)| s.app.requests() > before + 10)
        })
        .await;
        load.stop();
        assert!(both, "both new endpoints serve: {seen:?}");
        load.assert_no_failure();
        let ejections = fleet
            .client_metric("weft_outlier_ejections_total", &[])
            .await;
        assert_eq!(ejections, 0.0, "a draining endpoint is not an outlier");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_while_draining_and_in_flight_requests_complete() {
    tokio::time::timeout(LIMIT, async {
        let mut fleet = Fleet::start(&[spec("payment", "a", &[])], "").await;
        let server = &fleet.servers[0];
        let admin = server.sidecar.admin_addr;
        assert_eq!(admin_get(admin, "/ready").await.0, 200);
        server.app.set(0, Duration::from_millis(1500));
        let client = Client::new(fleet.upstream("payment"));
        let slow = tokio::spawn(client.get("/slow", &[]));
        let arrived = wait_until(Duration::from_secs(10), || async {
            fleet.servers[0].app.requests() >= 1
        })
        .await;
        assert!(arrived, "the slow request reached the app");

        let started = Instant::now();
        let sidecar = &mut fleet.servers[0].sidecar;
        let (report, probes) = tokio::join!(sidecar.drain(Duration::from_secs(15)), async {
            let draining = wait_until(Duration::from_secs(5), || async {
                admin_get(admin, "/ready").await.0 == 503
            })
            .await;
            let (live, _) = admin_get(admin, "/live").await;
            let (_, body) = admin_get(admin, "/ready").await;
            (draining, live, body)
        });
        let (draining, live, ready_body) = probes;
        assert!(draining, "/ready must turn 503 once the drain starts");
        assert_eq!(live, 200, "/live stays 200 while draining");
        assert_eq!(ready_body.trim(), "draining");

        let answer = slow.await.expect("join").expect("slow request");
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.header("x-app"), Some("a"));
        assert!(report.clean(), "{report:?}");
        assert_eq!(report.started_with.inbound_requests, 1, "{report:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the drain ends when the request does, not at the deadline: {report:?}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_running_at_the_drain_deadline_is_cut_and_counted() {
    tokio::time::timeout(LIMIT, async {
        let mut fleet = Fleet::start(&[spec("payment", "a", &[])], "").await;
        fleet.servers[0].app.set(0, Duration::from_secs(60));
        let client = Client::new(fleet.upstream("payment"));
        let stuck = tokio::spawn(client.get("/stuck", &[]));
        let arrived = wait_until(Duration::from_secs(10), || async {
            fleet.servers[0].app.requests() >= 1
        })
        .await;
        assert!(arrived, "the request reached the app");

        let server = &mut fleet.servers[0];
        let admin = server.sidecar.admin_addr;
        let started = Instant::now();
        let report = server.sidecar.drain(Duration::from_millis(500)).await;
        assert!(!report.clean(), "{report:?}");
        assert_eq!(report.cut.inbound_requests, 1, "{report:?}");
        let samples = scrape(admin).await;
        assert_eq!(
            metric_sum(
                &samples,
                "weft_drain_cut_total",
                &[("kind", "inbound_request")]
            ),
            1.0
        );
        // The caller is answered at once (an error: the try may have been
        // processed, so it is not retried behind its back), not left hanging.
        let answer = tokio::time::timeout(Duration::from_secs(10), stuck)
            .await
            .expect("the cut request is answered")
            .expect("join")
            .expect("answer");
        assert_eq!(answer.status, 502, "{}", answer.body);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            fleet
                .client_metric("weft_retries_total", &[("reason", "drain")])
                .await,
            0.0,
            "a cut request was (maybe) processed: no transparent retry"
        );
    })
    .await
    .expect("test timed out");
}

/// Two TCP echo endpoints; the client keeps one long-lived connection on
/// each, then endpoint A drains with a short deadline while new
/// connections keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_streams_move_off_a_draining_endpoint_and_long_ones_end_cleanly() {
    tokio::time::timeout(LIMIT, async {
        let ca = TestCa::new(TD);
        let (echo_a, seen_a) = tcp_echo_app_tracked().await;
        let (echo_b, _seen_b) = tcp_echo_app_tracked().await;
        let m = mesh(TD, &[("echo", Protocol::Tcp)]);
        let mut a = sidecar(&m, ca.creds("a"), Some(echo_a), &[], Limits::default()).await;
        let b = sidecar(&m, ca.creds("b"), Some(echo_b), &[], Limits::default()).await;
        let m = with_endpoint(
            with_endpoint(m, "echo", a.inbound_addr),
            "echo",
            b.inbound_addr,
        );
        a.set_mesh(m.clone());
        b.set_mesh(m.clone());
        let client = sidecar(&m, ca.creds("customer"), None, &["echo"], Limits::default()).await;
        let upstream = client.upstream_addrs["echo"];

        // Long-lived connections until one of them lands on A.
        let mut long = Vec::new();
        for _ in 0..20 {
            let mut c = tokio::net::TcpStream::connect(upstream)
                .await
                .expect("connect");
            echo_round(&mut c, b"hello").await;
            long.push(c);
            if seen_a.connections.load(Ordering::SeqCst) > 0 {
                break;
            }
        }
        assert!(
            seen_a.connections.load(Ordering::SeqCst) > 0,
            "no connection reached A"
        );

        // New connections keep flowing while A drains.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    match short_connection(upstream).await {
                        Ok(()) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
                (ok, failed)
            })
        };
        let report = a.drain(Duration::from_millis(800)).await;
        stop.store(true, Ordering::SeqCst);
        let (ok, failed) = churn.await.expect("join");
        assert!(ok > 0, "no short connection completed");
        assert!(
            failed.is_empty(),
            "{} of {} short connections failed: {failed:?}",
            failed.len(),
            ok as usize + failed.len()
        );
        assert!(
            report.cut.inbound_streams >= 1,
            "the long stream on A is cut: {report:?}"
        );

        // Every long-lived connection through A ended with a clean EOF at
        // the client; those on B still echo.
        let mut ended = 0;
        for c in &mut long {
            let mut buf = [0u8; 16];
            match tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await {
                Ok(Ok(0)) => ended += 1,
                Ok(Ok(n)) => panic!("unexpected {n} bytes"),
                Ok(Err(e)) => panic!("a cut stream must end with EOF, not {e}"),
                Err(_) => echo_round(c, b"still").await,
            }
        }
        assert!(ended >= 1, "the connection on A ended");
        let closed = wait_until(Duration::from_secs(5), || async {
            seen_a.closed_eof.load(Ordering::SeqCst) >= 1
        })
        .await;
        assert!(closed, "the app behind A saw a FIN");
        a.shutdown().await;
    })
    .await
    .expect("test timed out");
}

async fn echo_round(c: &mut tokio::net::TcpStream, msg: &[u8]) {
    c.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; msg.len()];
    c.read_exact(&mut buf).await.expect("echo");
    assert_eq!(buf, msg);
}

/// One short TCP connection through the mesh: write, read the echo, close.
async fn short_connection(upstream: SocketAddr) -> Result<(), String> {
    let mut c = tokio::net::TcpStream::connect(upstream)
        .await
        .map_err(|e| e.to_string())?;
    c.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
        .await
        .map_err(|_| "no echo in 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    if &buf != b"ping" {
        return Err(format!("echoed {buf:?}"));
    }
    c.shutdown().await.map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// A real `weft sidecar` process serving `payment` in front of an app, and
/// an in-process client sidecar that reaches it.
struct Process {
    child: tokio::process::Child,
    admin: SocketAddr,
    app: weft_tests::fleet::BehavingApp,
    client: Client,
    logs: tokio::task::JoinHandle<String>,
    _client_sidecar: Sidecar,
    _dir: tempfile::TempDir,
}

async fn weft_process(drain_timeout: &str) -> Process {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = TestCa::new(TD);
    ca.write_certs("payment", &d.join("certs"));
    let app = weft_tests::fleet::BehavingApp::start("payment").await;
    // The mesh file names the server's port before it runs: take a free
    // one and release it (another process could grab it meanwhile; the
    // sidecar then fails to start and the test says so).
    let inbound = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free UDP port");
    let text =
        format!("trust_domain = \"{TD}\"\n[services.payment]\nendpoints = [\"{inbound}\"]\n");
    std::fs::write(d.join("mesh.toml"), &text).expect("mesh");

    let mut cmd = tokio::process::Command::new(bin("weft"));
    cmd.current_dir(d)
        .env_remove("RUST_LOG")
        .args(["sidecar", "--mesh", "mesh.toml", "--cert-dir", "certs"])
        .args(["--inbound", &inbound.to_string(), "--admin", "127.0.0.1:0"])
        .args(["--app", &app.addr.to_string()])
        .env("WEFT_DRAIN_TIMEOUT", drain_timeout);
    let process = start_weft(cmd).await;
    let admin = process.admin();
    let WeftProcess {
        child,
        stderr: logs,
        ..
    } = process;
    let m = Mesh::parse(&text, "mesh.toml").expect("mesh");
    let client_sidecar = sidecar(
        &m,
        ca.creds("customer"),
        None,
        &["payment"],
        Limits::default(),
    )
    .await;
    let client = Client::new(client_sidecar.upstream_addrs["payment"]);
    assert_eq!(client.get("/warm", &[]).await.expect("warm-up").status, 200);
    Process {
        child,
        admin,
        app,
        client,
        logs,
        _client_sidecar: client_sidecar,
        _dir: dir,
    }
}

impl Process {
    /// Start a request the app answers after `delay`; returns once the app has it.
    async fn request_in_flight(
        &self,
        delay: Duration,
    ) -> tokio::task::JoinHandle<Result<weft_tests::fleet::Answer, String>> {
        self.app.set(0, delay);
        let before = self.app.requests();
        let slow = tokio::spawn(self.client.get("/slow", &[]));
        let arrived = wait_until(Duration::from_secs(10), || async {
            self.app.requests() > before
        })
        .await;
        assert!(arrived, "the slow request reached the app");
        slow
    }

    fn sigterm(&self) {
        let pid = i32::try_from(self.child.id().expect("pid")).expect("pid fits");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    async fn assert_draining(&self) {
        let draining = wait_until(Duration::from_secs(5), || async {
            admin_get(self.admin, "/ready").await.0 == 503
        })
        .await;
        assert!(draining, "/ready is 503 after SIGTERM");
        assert_eq!(admin_get(self.admin, "/live").await.0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_weft_process_and_exits_0() {
    tokio::time::timeout(LIMIT, async {
        let mut p = weft_process("15s").await;
        let slow = p.request_in_flight(Duration::from_millis(1500)).await;
        let signalled = Instant::now();
        p.sigterm();
        p.assert_draining().await;

        let answer = slow.await.expect("join").expect("slow request");
        assert_eq!(
            answer.status, 200,
            "the request in flight completes: {}",
            answer.body
        );
        let status = tokio::time::timeout(Duration::from_secs(15), p.child.wait())
            .await
            .expect("exits within the drain timeout")
            .expect("wait");
        let logs = (&mut p.logs).await.expect("logs");
        assert!(status.success(), "exit status {status:?}\n{logs}");
        assert!(signalled.elapsed() < Duration::from_secs(15));
        assert!(logs.contains("drained"), "{logs}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    tokio::time::timeout(LIMIT, async {
        let mut p = weft_process("60s").await;
        let _stuck = p.request_in_flight(Duration::from_secs(60)).await;
        p.sigterm();
        p.assert_draining().await;
        let again = Instant::now();
        p.sigterm();
        let status = tokio::time::timeout(Duration::from_secs(10), p.child.wait())
            .await
            .expect("exits at once on the second signal")
            .expect("wait");
        let logs = (&mut p.logs).await.expect("logs");
        assert!(!status.success(), "work was cut: not a clean exit\n{logs}");
        assert!(again.elapsed() < Duration::from_secs(10));
        assert!(logs.contains("second signal"), "{logs}");
    })
    .await
    .expect("test timed out");
}
