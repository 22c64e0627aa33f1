//! Traffic policy on TCP streams, end to end: idle timeout, injected resets,
//! the circuit breaker's stream limit, and connect retries to another
//! endpoint.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_proxy::mesh::{Fault, FaultAbort, Mesh, Protocol};
use weft_tests::*;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Apply `edit` to the pair's mesh and give it to both sidecars.
fn edit_mesh(pair: &Pair, edit: impl FnOnce(&mut Mesh)) {
    let mut mesh = pair.mesh.clone();
    edit(&mut mesh);
    pair.client.set_mesh(mesh.clone());
    pair.server.set_mesh(mesh);
}

/// Send `msg` and read the same number of bytes back.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await?;
    assert_eq!(back, msg);
    Ok(())
}

/// Whether the sidecar ended the connection: EOF or an error on read.
async fn ended(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf).await, Ok(0) | Err(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_closed_and_busy_ones_are_not() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, seen) = tcp_echo_app_tracked().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        let idle = Duration::from_millis(300);
        edit_mesh(&pair, |m| {
            m.services
                .get_mut("echo")
                .expect("echo")
                .policy
                .idle_timeout = Some(idle);
        });
        let up = pair.upstream("echo");

        // A busy stream outlives the idle timeout several times over.
        let mut busy = TcpStream::connect(up).await.expect("connect");
        let started = Instant::now();
        while started.elapsed() < idle * 4 {
            round_trip(&mut busy, b"still here")
                .await
                .expect("busy stream works");
            tokio::time::sleep(idle / 4).await;
        }

        // A silent one is cut after about the idle timeout.
        let mut quiet = TcpStream::connect(up).await.expect("connect");
        round_trip(&mut quiet, b"hello").await.expect("echo");
        let t = Instant::now();
        assert!(ended(&mut quiet).await, "the idle stream was not closed");
        let waited = t.elapsed();
        assert!(
            waited >= idle - Duration::from_millis(20) && waited < idle + Duration::from_secs(2),
            "closed after {waited:?}, idle timeout {idle:?}"
        );
        // The app's side was closed too (by the server sidecar's timeout).
        assert!(
            wait_until(Duration::from_secs(5), || async { seen.closed() >= 1 }).await,
            "the app's connection stayed open"
        );
        drop(busy);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_resets_hit_their_share_and_never_reach_the_app() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, seen) = tcp_echo_app().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        edit_mesh(&pair, |m| {
            let echo = m.services.get_mut("echo").expect("echo");
            echo.routes[0].fault = Some(Fault {
                delay: None,
                abort: Some(FaultAbort {
                    percent: 30.0,
                    status: 0,
                }),
                headers: vec![],
            });
        });
        let up = pair.upstream("echo");
        const N: usize = 300;
        let mut reset = 0;
        for i in 0..N {
            // A reset can even beat connect() back to us.
            let ok = match TcpStream::connect(up).await {
                Ok(mut s) => round_trip(&mut s, format!("conn {i}").as_bytes())
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            if !ok {
                reset += 1;
            }
        }
        // 30 % of 300: mean 90, sd ~7.9; ±4.5 sd.
        assert!((55..=125).contains(&reset), "{reset} of {N} reset");
        assert_eq!(
            seen.connections.load(Ordering::SeqCst),
            (N - reset) as u64,
            "reset streams must not reach the app"
        );
        let faults = metric_sum(
            &scrape(pair.client.admin_addr).await,
            "weft_faults_injected_total",
            &[("service", "echo"), ("reason", "reset")],
        );
        assert_eq!(faults, reset as f64);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limit_resets_the_overflow_at_once() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, _seen) = tcp_echo_app().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        edit_mesh(&pair, |m| {
            let cb = &mut m
                .services
                .get_mut("echo")
                .expect("echo")
                .policy
                .circuit_breaker;
            cb.max_requests = 2;
            cb.max_pending = 0;
        });
        let up = pair.upstream("echo");
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(up).await.expect("connect");
            round_trip(&mut s, b"open").await.expect("within the limit");
            held.push(s);
        }
        let t = Instant::now();
        // The reset can even beat connect() back to us.
        let cut = match TcpStream::connect(up).await {
            Ok(mut third) => ended(&mut third).await,
            Err(_) => true,
        };
        assert!(cut, "the third stream was let through");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "overflow took {:?}",
            t.elapsed()
        );
        let overflows = metric_sum(
            &scrape(pair.client.admin_addr).await,
            "weft_circuit_breaker_overflows_total",
            &[("service", "echo"), ("reason", "streams")],
        );
        assert_eq!(overflows, 1.0);
        // Closing one frees its slot.
        drop(held.pop());
        let admitted = wait_until(Duration::from_secs(5), || async {
            let Ok(mut s) = TcpStream::connect(up).await else {
                return false;
            };
            round_trip(&mut s, b"again").await.is_ok()
        })
        .await;
        assert!(admitted, "a freed slot was never reused");
        round_trip(&mut held[0], b"held")
            .await
            .expect("held stream unaffected");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_on_another_endpoint() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, seen) = tcp_echo_app().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        // Nothing answers QUIC on the discard port.
        let dead: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        edit_mesh(&pair, |m| {
            let echo = m.services.get_mut("echo").expect("echo");
            echo.endpoints.insert(
                0,
                weft_proxy::mesh::Endpoint {
                    addr: dead,
                    labels: Default::default(),
                },
            );
            echo.policy.connect_timeout = Duration::from_millis(300);
            echo.policy.load_balancer = weft_proxy::balance::LbPolicy::RoundRobin;
        });
        let up = pair.upstream("echo");
        for i in 0..6 {
            let mut s = TcpStream::connect(up).await.expect("connect");
            round_trip(&mut s, format!("try {i}").as_bytes())
                .await
                .expect("a dead endpoint is skipped by a retry");
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 6);
        let retries = metric_sum(
            &scrape(pair.client.admin_addr).await,
            "weft_retries_total",
            &[("service", "echo"), ("reason", "connect-failure")],
        );
        assert!(
            retries >= 1.0,
            "round robin must have hit the dead endpoint"
        );
    })
    .await
    .expect("test timed out");
}
