//! Opaque TCP through a pair of sidecars: each app connection becomes one raw
//! QUIC stream on the pooled `weft-l4` connection, with half-close preserved
//! and aborts propagated as aborts.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_proxy::mesh::Protocol;
use weft_tests::*;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Write `n` bytes of [`pattern`] then half-close, while reading the echo to
/// EOF; returns (length, checksum) of what came back.
async fn echo_pattern(addr: SocketAddr, n: usize) -> (u64, String) {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the sidecar");
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
    }
    writer.await.expect("writer task");
    (sum.len(), sum.hex())
}

async fn tcp_metric(admin: SocketAddr, name: &str) -> f64 {
    metric_sum(
        &scrape(admin).await,
        name,
        &[("direction", "outbound"), ("service", "echo")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_64_mib_with_half_close() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        const N: usize = 64 << 20;
        let (app, seen) = tcp_echo_app().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        let (want_len, want_sum) = Checksum::of_pattern(N);

        let (len, sum) = echo_pattern(pair.upstream("echo"), N).await;
        assert_eq!(len, want_len, "echoed length");
        assert_eq!(sum, want_sum, "echoed content");
        assert_eq!(
            seen.bytes.load(Ordering::SeqCst),
            N as u64,
            "bytes the app received"
        );
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);

        // The client sidecar counts bytes when its copy ends, just after our EOF.
        let admin = pair.client.admin_addr;
        let counted = wait_until(Duration::from_secs(10), || async {
            tcp_metric(admin, "weft_tcp_sent_bytes_total").await >= N as f64
                && tcp_metric(admin, "weft_tcp_received_bytes_total").await >= N as f64
        })
        .await;
        assert!(counted, "TCP byte counters never reached {N}");
        assert_eq!(
            tcp_metric(admin, "weft_tcp_sent_bytes_total").await,
            N as f64
        );
        assert_eq!(
            tcp_metric(admin, "weft_tcp_received_bytes_total").await,
            N as f64
        );
        assert_eq!(tcp_metric(admin, "weft_tcp_connections_total").await, 1.0);
    })
    .await
    .expect("test timed out");
}

/// An app that reads its request to EOF and only then answers `reply` and
/// closes; it records what it read.
async fn read_all_then_reply_app(reply: &'static [u8]) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind(any_port()).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let got = Arc::new(Mutex::new(Vec::new()));
    let got2 = got.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let got = got2.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                if stream.read_to_end(&mut request).await.is_err() {
                    return;
                }
                got.lock().expect("lock").push(request);
                let _ = stream.write_all(reply).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_crosses_the_mesh_in_order() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, got) = read_all_then_reply_app(b"bye").await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        let mut s = TcpStream::connect(pair.upstream("echo"))
            .await
            .expect("connect");
        s.write_all(b"hello").await.expect("write");
        // The app answers only after it sees EOF: without half-close crossing
        // the mesh, this test would hang (and time out).
        s.shutdown().await.expect("half-close");
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.expect("read reply to EOF");
        assert_eq!(reply, b"bye");
        assert_eq!(
            *got.lock().expect("lock"),
            vec![b"hello".to_vec()],
            "the app read exactly hello then EOF"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_share_one_quic_connection() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        const N: usize = 50;
        const EACH: usize = 64 << 10;
        let (app, seen) = tcp_echo_app().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        let up = pair.upstream("echo");
        let (want_len, want_sum) = Checksum::of_pattern(EACH);
        let tasks: Vec<_> = (0..N)
            .map(|_| tokio::spawn(echo_pattern(up, EACH)))
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let (len, sum) = t.await.expect("echo task");
            assert_eq!(len, want_len, "connection {i}: length");
            assert_eq!(sum, want_sum, "connection {i}: content");
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), N as u64);
        assert_eq!(seen.bytes.load(Ordering::SeqCst), (N * EACH) as u64);

        let client = scrape(pair.client.admin_addr).await;
        let server = scrape(pair.server.admin_addr).await;
        assert_eq!(quic_connections(&client, "outbound", "weft-l4"), 1.0);
        assert_eq!(quic_connections(&server, "inbound", "weft-l4"), 1.0);
        assert_eq!(
            pair.client.pool_handshakes().1,
            1,
            "one handshake for {N} connections"
        );
        assert_eq!(
            pair.client.pool_handshakes().0,
            0,
            "no HTTP/3 connection for TCP traffic"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_transfer_aborts_the_app_connection() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        const SENT: usize = 1 << 20;
        let (app, seen) = tcp_echo_app_tracked().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        let up = pair.upstream("echo");

        let mut s = TcpStream::connect(up).await.expect("connect");
        for chunk in pattern_chunks(SENT, 64 << 10) {
            s.write_all(&chunk).await.expect("write");
        }
        // Mid-transfer: the app has the bytes, its echo is unread, the
        // connection is open both ways.
        assert!(
            wait_until(Duration::from_secs(10), || async {
                seen.bytes.load(Ordering::SeqCst) == SENT as u64
            })
            .await,
            "the app never received the 1 MiB (got {})",
            seen.bytes.load(Ordering::SeqCst)
        );
        assert_eq!(seen.closed(), 0);
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
        drop(s); // RST

        assert!(
            wait_until(Duration::from_secs(10), || async { seen.closed() == 1 }).await,
            "the app's connection stayed open after the caller reset"
        );
        assert_eq!(
            seen.closed_error.load(Ordering::SeqCst),
            1,
            "the abort reached the app as a clean EOF, not a reset"
        );

        // The sidecars and the pooled QUIC connection still carry new streams.
        let (want_len, want_sum) = Checksum::of_pattern(4096);
        let (len, sum) = echo_pattern(up, 4096).await;
        assert_eq!((len, sum), (want_len, want_sum));
        assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
        assert_eq!(
            pair.client.pool_handshakes().1,
            1,
            "the reset did not cost the QUIC connection"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_and_closes() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Like an SMTP or MySQL greeting: the app writes before reading anything.
        let listener = TcpListener::bind(any_port()).await.expect("bind app");
        let app = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(b"220 weft greeting\r\n").await;
                    let _ = s.shutdown().await;
                });
            }
        });
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        let mut s = TcpStream::connect(pair.upstream("echo"))
            .await
            .expect("connect");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read greeting to EOF");
        assert_eq!(got, b"220 weft greeting\r\n");
        // Our direction is still open after the server's half-close.
        s.write_all(b"QUIT\r\n")
            .await
            .expect("write after the server's FIN");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_to_a_service_without_endpoints_is_refused_promptly() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, seen) = tcp_echo_app().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        let mut mesh = pair.mesh.clone();
        mesh.services
            .get_mut("echo")
            .expect("echo")
            .endpoints
            .clear();
        pair.client.set_mesh(mesh);

        let up = pair.upstream("echo");
        // The reset may already be there when connect() checks SO_ERROR.
        let r = async {
            let mut s = TcpStream::connect(up).await?;
            let _ = s.write_all(b"anyone?").await;
            let mut buf = [0u8; 16];
            s.read(&mut buf).await
        }
        .await;
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "expected a reset, got {r:?}"
        );
        assert_eq!(seen.connections.load(Ordering::SeqCst), 0);
        let samples = scrape(pair.client.admin_addr).await;
        assert_eq!(
            metric_sum(
                &samples,
                "weft_tcp_connections_total",
                &[("direction", "outbound"), ("service", "echo")]
            ),
            1.0
        );
    })
    .await
    .expect("test timed out");
}
