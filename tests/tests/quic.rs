//! What the mesh gets from QUIC, tested through the impairment relay
//! (`weft_tests::impair`) between real sidecars: a dead peer is detected
//! within the idle timeout and avoided, then used again once back; a
//! client whose UDP socket changes keeps its connections and streams
//! (connection migration); and one lost packet stalls one stream, not the
//! others (no head-of-line blocking across requests under 2 % loss).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use weft_proxy::mesh::{Mesh, Protocol};
use weft_proxy::{Limits, Sidecar};
use weft_tests::fleet::{background, load_unordered, quantile, BehavingApp, Client};
use weft_tests::impair::{Direction, Impairment, Relay, RelayConfig};
use weft_tests::*;

/// Failure-detection settings of the client in these tests: short, so the
/// test is quick, in the default 1:3 ratio.
const KEEP_ALIVE: Duration = Duration::from_millis(500);
const IDLE_TIMEOUT: Duration = Duration::from_millis(1500);

fn parse(text: &str) -> Mesh {
    Mesh::parse(text, "mesh.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The client's `/clusters` entry for `addr` in `service`.
async fn endpoint(client: &Sidecar, service: &str, addr: SocketAddr) -> serde_json::Value {
    let (status, body) = admin_get(client.admin_addr, "/clusters").await;
    assert_eq!(status, 200);
    let clusters: serde_json::Value = serde_json::from_str(&body).expect("clusters json");
    let want = addr.to_string();
    clusters[service]["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["addr"] == want.as_str()).cloned())
        .unwrap_or_else(|| panic!("{addr} not in /clusters {service}: {clusters}"))
}

/// Two `payment` endpoints, `a` behind the relay and `b` direct, balanced
/// round robin (so "used again" depends on the endpoint's availability,
/// not on how fast a latency estimate decays); the client retries GETs once
/// on `reset` and `connect-failure`. The requests in flight
/// on a connection that dies were sent and may have been processed: for
/// idempotent GETs a retry elsewhere is what a caller wants (and what
/// Linkerd and Envoy do); without it each would fail once, at most one per
/// concurrent caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peer_is_detected_within_the_idle_timeout_and_used_again_when_back() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let ca = TestCa::new(TD);
        let placeholder = mesh(TD, &[("payment", Protocol::Http)]);
        let app_a = BehavingApp::start("a").await;
        let app_b = BehavingApp::start("b").await;
        let server_a = sidecar(
            &placeholder,
            ca.creds("a"),
            Some(app_a.addr),
            &[],
            Limits::default(),
        )
        .await;
        let server_b = sidecar(
            &placeholder,
            ca.creds("b"),
            Some(app_b.addr),
            &[],
            Limits::default(),
        )
        .await;
        let relay = Relay::start(RelayConfig::new(server_a.inbound_addr))
            .await
            .expect("relay");
        let m = parse(&format!(
            "trust_domain = \"{TD}\"\n[services.payment]\nendpoints = [\"{}\", \"{}\"]\n\
             load_balancer = \"round-robin\"\n\
             [[services.payment.routes]]\nname = \"all\"\n\
             retries = {{ attempts = 1, on = [\"reset\", \"connect-failure\"] }}\n",
            relay.addr, server_b.inbound_addr
        ));
        server_a.set_mesh(m.clone());
        server_b.set_mesh(m.clone());
        let limits = Limits {
            quic_keep_alive: KEEP_ALIVE,
            quic_idle_timeout: IDLE_TIMEOUT,
            ..Limits::default()
        };
        let client = sidecar(&m, ca.creds("customer"), None, &["payment"], limits).await;
        let upstream = client.upstream_addrs["payment"];

        const WORKERS: usize = 4;
        let bg = background(upstream, WORKERS);
        let both = wait_until(Duration::from_secs(20), || async {
            app_a.requests() > 20 && app_b.requests() > 20
        })
        .await;
        assert!(
            both,
            "both endpoints should serve: a {} b {}",
            app_a.requests(),
            app_b.requests()
        );

        // Peer a goes silent: nothing it sends arrives, nothing reaches it
        // (what a killed process or a lost node looks like: no close frame).
        relay.set_both(Impairment::blackhole());
        let silenced = Instant::now();
        let failed_before = bg.failed();
        let detected = wait_until(IDLE_TIMEOUT * 10, || async {
            endpoint(&client, "payment", relay.addr).await["unreachable"] == true
        })
        .await;
        let detection = silenced.elapsed();
        assert!(detected, "a silent peer was never marked unreachable");
        // The connection dies at the idle timeout after the last packet
        // heard (at most a keep-alive interval or an RTT before the
        // blackhole); the bound adds a full second for a loaded machine.
        let bound = IDLE_TIMEOUT + KEEP_ALIVE + Duration::from_secs(1);
        println!("detection: {detection:?} (idle timeout {IDLE_TIMEOUT:?}, bound {bound:?})");
        assert!(
            detection <= bound,
            "detection took {detection:?}, bound {bound:?}"
        );

        // From now on requests go to b and fail fast rather than hang.
        let fresh = Client::new(upstream);
        let a_now = app_a.requests();
        all_served_by_b_fast(&fresh, 30).await;
        assert_eq!(app_a.requests(), a_now, "the dead endpoint got requests");
        let ok = bg.assert_flows(bg.ok(), "after detection").await;
        // Requests stuck on the dead connection were retried on b when it
        // closed; a worker can lose at most one request to bad timing.
        let failed = bg.failed() - failed_before;
        println!("failed requests across the failure: {failed} (ok so far {ok})");
        assert!(
            failed <= WORKERS as u64,
            "{failed} requests failed: {:?}",
            bg.samples.lock().expect("lock")
        );

        // The peer's process is replaced by a new one on the same address
        // (still unreachable), then the network heals: it serves again.
        let a_addr = server_a.inbound_addr;
        drop(server_a);
        let cfg = sidecar_config(&m, ca.creds("a"), Some(app_a.addr), &[], Limits::default());
        let _restarted = restart_on(cfg, a_addr).await;
        relay.set_both(Impairment::none());
        let healed = Instant::now();
        let a_before = app_a.requests();
        let back = wait_until(Duration::from_secs(20), || async {
            app_a.requests() > a_before + 5
        })
        .await;
        println!("back in use after {:?}", healed.elapsed());
        assert!(back, "the restarted peer was never used again");
        assert_eq!(
            endpoint(&client, "payment", relay.addr).await["unreachable"],
            false
        );
        bg.stop();
        let failed = bg.failed() - failed_before;
        assert!(
            failed <= WORKERS as u64,
            "{failed} failed: {:?}",
            bg.samples.lock().expect("lock")
        );
        println!(
            "total: ok {}, failed {failed}; relay up {:?}",
            bg.ok(),
            relay.counts(Direction::Up)
        );
    })
    .await
    .expect("test timed out");
}

/// A `weft sidecar` process in `dir` (mesh.toml, certs/) on `inbound`, in
/// front of `app`; returns once it says it is ready.
async fn weft_process(dir: &std::path::Path, inbound: SocketAddr, app: SocketAddr) -> Child {
    let mut cmd = Command::new(bin("weft"));
    cmd.current_dir(dir)
        .env_remove("RUST_LOG")
        .args(["sidecar", "--mesh", "mesh.toml", "--cert-dir", "certs"])
        .args(["--inbound", &inbound.to_string(), "--admin", "127.0.0.1:0"])
        .args(["--app", &app.to_string()]);
    start_weft(cmd).await.child
}

/// A peer sidecar process SIGKILLed (no close frame, no drain: the client
/// hears nothing more), no relay involved: detected within the idle
/// timeout, requests go to the survivor, and a new process on the same
/// address is used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_peer_process_is_detected_within_the_idle_timeout_and_its_restart_used() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let ca = TestCa::new(TD);
        let dir = tempfile::tempdir().expect("tempdir");
        ca.write_certs("a", &dir.path().join("certs"));
        let placeholder = mesh(TD, &[("payment", Protocol::Http)]);
        let app_a = BehavingApp::start("a").await;
        let app_b = BehavingApp::start("b").await;
        let server_b = sidecar(
            &placeholder,
            ca.creds("b"),
            Some(app_b.addr),
            &[],
            Limits::default(),
        )
        .await;
        // The mesh file names a's port before it runs: take a free one and
        // release it (if another process grabs it, a fails to start and the
        // test says so).
        let a_addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free UDP port");
        let text = format!(
            "trust_domain = \"{TD}\"\n[services.payment]\nendpoints = [\"{a_addr}\", \"{}\"]\n\
             load_balancer = \"round-robin\"\n\
             [[services.payment.routes]]\nname = \"all\"\n\
             retries = {{ attempts = 1, on = [\"reset\", \"connect-failure\"] }}\n",
            server_b.inbound_addr
        );
        std::fs::write(dir.path().join("mesh.toml"), &text).expect("mesh");
        let m = parse(&text);
        server_b.set_mesh(m.clone());
        let mut a = weft_process(dir.path(), a_addr, app_a.addr).await;
        let limits = Limits {
            quic_keep_alive: KEEP_ALIVE,
            quic_idle_timeout: IDLE_TIMEOUT,
            ..Limits::default()
        };
        let client = sidecar(&m, ca.creds("customer"), None, &["payment"], limits).await;
        const WORKERS: usize = 4;
        let bg = background(client.upstream_addrs["payment"], WORKERS);
        let both = wait_until(Duration::from_secs(20), || async {
            app_a.requests() > 20 && app_b.requests() > 20
        })
        .await;
        assert!(both, "both endpoints should serve");

        let failed_before = bg.failed();
        a.start_kill().expect("SIGKILL");
        let killed = Instant::now();
        a.wait().await.expect("a exits");
        let detected = wait_until(IDLE_TIMEOUT * 10, || async {
            endpoint(&client, "payment", a_addr).await["unreachable"] == true
        })
        .await;
        let detection = killed.elapsed();
        assert!(detected, "a killed peer was never marked unreachable");
        // As for the blackhole: the idle timeout after the last packet heard.
        let bound = IDLE_TIMEOUT + KEEP_ALIVE + Duration::from_secs(1);
        println!("killed peer marked unreachable after {detection:?} (bound {bound:?})");
        assert!(detection <= bound, "took {detection:?}, bound {bound:?}");
        let fresh = Client::new(client.upstream_addrs["payment"]);
        all_served_by_b_fast(&fresh, 20).await;

        let _restarted = weft_process(dir.path(), a_addr, app_a.addr).await;
        let started = Instant::now();
        let a_before = app_a.requests();
        let back = wait_until(Duration::from_secs(15), || async {
            app_a.requests() > a_before + 5
        })
        .await;
        println!("restarted process in use after {:?}", started.elapsed());
        assert!(back, "the restarted peer was never used");
        bg.stop();
        let failed = bg.failed() - failed_before;
        println!("failed requests: {failed} of {}", bg.ok() + failed);
        assert!(
            failed <= WORKERS as u64,
            "{failed} failed: {:?}",
            bg.samples.lock().expect("lock")
        );
    })
    .await
    .expect("test timed out");
}

/// Echo `n` bytes of [`pattern`] through `addr`; `progress` counts the bytes
/// read back. Returns (length, checksum) of the echo.
async fn echo(addr: SocketAddr, n: usize, progress: Arc<AtomicU64>) -> (u64, String) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        for chunk in pattern_chunks(n, 64 << 10) {
            w.write_all(&chunk).await.expect("write");
        }
        w.shutdown().await.expect("half-close");
    });
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let k = r.read(&mut buf).await.expect("read echo");
        if k == 0 {
            break;
        }
        sum.update(&buf[..k]);
        progress.fetch_add(k as u64, Ordering::Relaxed);
    }
    writer.await.expect("writer");
    (sum.len(), sum.hex())
}

/// The client sidecar moves to a new UDP port while a 64 MiB TCP stream and
/// a series of HTTP requests run: both carry on, and the servers see the
/// client's new address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_the_client_socket_keeps_streams_and_requests() {
    tokio::time::timeout(Duration::from_secs(120), async {
        const N: usize = 64 << 20;
        let ca = TestCa::new(TD);
        let placeholder = mesh(TD, &[("echo", Protocol::Tcp), ("payment", Protocol::Http)]);
        let (echo_app, _) = tcp_echo_app().await;
        let http = BehavingApp::start("payment").await;
        let echo_server = sidecar(
            &placeholder,
            ca.creds("echo"),
            Some(echo_app),
            &[],
            Limits::default(),
        )
        .await;
        let http_server = sidecar(
            &placeholder,
            ca.creds("payment"),
            Some(http.addr),
            &[],
            Limits::default(),
        )
        .await;
        let m = parse(&format!(
            "trust_domain = \"{TD}\"\n\
             [services.echo]\nprotocol = \"tcp\"\nendpoints = [\"{}\"]\n\
             [services.payment]\nendpoints = [\"{}\"]\n\
             [[services.payment.routes]]\nname = \"all\"\nretries = {{ attempts = 0 }}\n",
            echo_server.inbound_addr, http_server.inbound_addr
        ));
        echo_server.set_mesh(m.clone());
        http_server.set_mesh(m.clone());
        let mut client = sidecar(
            &m,
            ca.creds("customer"),
            None,
            &["echo", "payment"],
            Limits::default(),
        )
        .await;
        let old = client.inbound_addr;

        // HTTP requests one after another until told to stop.
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let series = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let c = Client::new(client.upstream_addrs["payment"]);
            tokio::spawn(async move {
                let mut errors = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match c.get("/pay", &[]).await {
                        Ok(a) if a.status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                        other => {
                            errors.push(format!("{other:?}"));
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
                errors
            })
        };
        let progress = Arc::new(AtomicU64::new(0));
        let transfer = tokio::spawn(echo(client.upstream_addrs["echo"], N, progress.clone()));

        // Mid-transfer, with requests flowing: a new local port.
        let midway = wait_until(Duration::from_secs(60), || async {
            progress.load(Ordering::Relaxed) >= (N / 4) as u64 && ok.load(Ordering::SeqCst) >= 5
        })
        .await;
        assert!(midway, "the transfer never got a quarter of the way");
        let at = progress.load(Ordering::Relaxed);
        let new = client.rebind(any_port()).expect("rebind");
        let ok_at_rebind = ok.load(Ordering::SeqCst);
        println!("rebound {old} -> {new} after {at} bytes echoed");
        assert_ne!(new, old);

        let (len, sum) = transfer.await.expect("transfer task");
        let (want_len, want_sum) = Checksum::of_pattern(N);
        assert_eq!((len, sum), (want_len, want_sum), "the echo changed");
        // Requests after the move, too.
        let more = wait_until(Duration::from_secs(10), || async {
            ok.load(Ordering::SeqCst) >= ok_at_rebind + 20
        })
        .await;
        stop.store(true, Ordering::SeqCst);
        let errors = series.await.expect("series task");
        assert!(more, "requests stopped after the rebind");
        assert_eq!(
            failed.load(Ordering::SeqCst),
            0,
            "failed requests: {errors:?}"
        );
        println!(
            "HTTP series: {} ok ({} after the rebind), 0 failed",
            ok.load(Ordering::SeqCst),
            ok.load(Ordering::SeqCst) - ok_at_rebind
        );

        // Both servers kept their connection and now see the new port.
        for (name, server) in [("echo", &echo_server), ("payment", &http_server)] {
            let peers = server.inbound_peer_addrs();
            assert!(
                peers.contains(&new),
                "{name} server sees {peers:?}, not {new}"
            );
            assert!(
                !peers.contains(&old),
                "{name} server still sees {old}: {peers:?}"
            );
        }
        assert_eq!(
            client.pool_handshakes(),
            (1, 1),
            "a connection was replaced"
        );
    })
    .await
    .expect("test timed out");
}

/// 2 % random loss each way between the sidecars, 64 requests at a time on
/// the one QUIC connection, no retries: every request succeeds. A lost
/// packet delays the streams whose data it carried; the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_percent_loss_64_concurrent_streams_all_succeed_without_retries() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let ca = TestCa::new(TD);
        let placeholder = mesh(TD, &[("payment", Protocol::Http)]);
        let (app, seen) = http_app().await;
        let server = sidecar(
            &placeholder,
            ca.creds("payment"),
            Some(app),
            &[],
            Limits::default(),
        )
        .await;
        let relay = Relay::start(
            RelayConfig::new(server.inbound_addr)
                .both(Impairment::loss(2.0))
                .seed(2026),
        )
        .await
        .expect("relay");
        let m = parse(&format!(
            "trust_domain = \"{TD}\"\n[services.payment]\nendpoints = [\"{}\"]\n\
             [[services.payment.routes]]\nname = \"all\"\nretries = {{ attempts = 0 }}\n",
            relay.addr
        ));
        server.set_mesh(m.clone());
        let client = sidecar(
            &m,
            ca.creds("customer"),
            None,
            &["payment"],
            Limits::default(),
        )
        .await;
        let c = Client::new(client.upstream_addrs["payment"]);

        const N: usize = 1280;
        const CONCURRENCY: usize = 64;
        // 16 KiB answers: about a dozen packets each, so most requests see
        // no loss and some see a loss or two.
        // (`Answer::body` is text: compare with the same lossy decoding.)
        let expected = String::from_utf8_lossy(&pattern(16384)).into_owned();
        let answers = load_unordered(N, CONCURRENCY, |_| c.get("/big?bytes=16384", &[])).await;
        let bad: Vec<String> = answers
            .iter()
            .filter_map(|a| match a {
                Ok(a) if a.status == 200 && a.body == expected => None,
                Ok(a) => Some(format!("{} {}", a.status, a.body.len())),
                Err(e) => Some(e.clone()),
            })
            .collect();
        let (up, down) = (relay.counts(Direction::Up), relay.counts(Direction::Down));
        println!(
            "{N} requests, {CONCURRENCY} concurrent: {} failed; p50 {:?} p99 {:?} max {:?}; \
             dropped {} of {} up, {} of {} down",
            bad.len(),
            quantile(&answers, 0.5),
            quantile(&answers, 0.99),
            quantile(&answers, 1.0),
            up.dropped,
            up.received,
            down.dropped,
            down.received
        );
        assert!(
            bad.is_empty(),
            "{} requests failed: {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
        assert_eq!(seen.requests.load(Ordering::SeqCst), N as u64);
        assert!(
            up.dropped > 0 && down.dropped > 0,
            "no loss happened: {up:?} {down:?}"
        );
        assert_eq!(
            client.pool_handshakes().0,
            1,
            "requests used more than one connection"
        );
    })
    .await
    .expect("test timed out");
}

/// `n` requests in a row, each answered by endpoint b within a second: the
/// dead endpoint is no longer chosen and nothing waits for it.
async fn all_served_by_b_fast(client: &Client, n: usize) {
    for _ in 0..n {
        let ans = client.get("/pay", &[]).await.expect("sidecar answers");
        assert_eq!(
            (ans.status, ans.header("x-app")),
            (200, Some("b")),
            "{}",
            ans.body
        );
        assert!(
            ans.elapsed < Duration::from_secs(1),
            "a request took {:?}",
            ans.elapsed
        );
    }
}
