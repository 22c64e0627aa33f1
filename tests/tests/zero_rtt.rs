//! 0-RTT reconnects to known peers (docs/quic.md), between real sidecars
//! through the impairment relay (`weft_tests::impair`): the relay cuts the
//! client's connection (blackhole until the idle timeout closes it), then
//! adds 100 ms each way, so a request sent as early data reaches the peer
//! while its handshake still has a round trip to go, and the peer marks it
//! `early-data: 1` (RFC 8470).
//!
//! - Safe requests (GET) go early; a POST waits for the handshake.
//! - A peer that restarted (it lost its session cache) rejects the early
//!   data; the GET is sent again after the handshake and succeeds, with no
//!   retry policy.
//! - A TCP service marked `early_data` sends its stream preamble early.
//! - A resumed session does not outlive the client's certificate: once it
//!   has expired, the peer refuses the resumption although no verifier ran.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::mesh::Mesh;
use weft_proxy::{Limits, Sidecar};
use weft_tests::impair::{Impairment, Relay, RelayConfig};
use weft_tests::*;
use weft_transport::Credentials;

/// The client's failure detection: short, so a cut connection closes quickly.
const KEEP_ALIVE: Duration = Duration::from_millis(300);
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// One way, on reconnects: the early-data window at the peer is two of these.
const DELAY: Duration = Duration::from_millis(100);

fn client_limits() -> Limits {
    Limits {
        quic_keep_alive: KEEP_ALIVE,
        quic_idle_timeout: IDLE_TIMEOUT,
        ..Limits::default()
    }
}

/// `payment` (HTTP) and `echo` (TCP, `early_data`), both served by the
/// sidecar behind `relay`.
fn mesh_via(relay: SocketAddr) -> Mesh {
    let text = format!(
        "trust_domain = \"{TD}\"\n\
         [services.payment]\nendpoints = [\"{relay}\"]\n\
         [services.echo]\nprotocol = \"tcp\"\nendpoints = [\"{relay}\"]\nearly_data = true\n"
    );
    Mesh::parse(&text, "mesh.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&scrape(admin).await, name, labels)
}

/// Cut the client's connections to the peer behind `relay` (nothing gets
/// through until the idle timeout has closed them), then let traffic pass
/// again with [`DELAY`] each way.
async fn cut(relay: &Relay, client: &Sidecar) {
    relay.set_both(Impairment::blackhole());
    let closed = wait_until(Duration::from_secs(10), || async {
        let s = scrape(client.admin_addr).await;
        metric_sum(
            &s,
            "weft_quic_connections_active",
            &[("direction", "outbound")],
        ) == 0.0
    })
    .await;
    assert!(closed, "the client's connections should idle out");
    relay.set_both(Impairment {
        delay: DELAY,
        ..Impairment::none()
    });
}

/// A server sidecar (from `server`, its mesh replaced) behind the relay,
/// and a client sidecar with an upstream for `service` whose mesh points
/// at the relay.
struct Setup {
    server: Sidecar,
    /// The server's configuration, with the mesh that points at the relay.
    server_cfg: weft_proxy::SidecarConfig,
    relay: Relay,
    client: Sidecar,
    upstream: SocketAddr,
}

impl Setup {
    async fn start(
        mut server: weft_proxy::SidecarConfig,
        client: Credentials,
        service: &str,
    ) -> Setup {
        let sidecar_server = Sidecar::start(server.clone()).await.expect("server starts");
        let relay = Relay::start(RelayConfig::new(sidecar_server.inbound_addr))
            .await
            .expect("relay");
        let m = mesh_via(relay.addr);
        sidecar_server.set_mesh(m.clone());
        server.mesh = m.clone();
        server.inbound = sidecar_server.inbound_addr;
        let client = sidecar(&m, client, None, &[service], client_limits()).await;
        let upstream = client.upstream_addrs[service];
        Setup {
            server: sidecar_server,
            server_cfg: server,
            relay,
            client,
            upstream,
        }
    }
}

/// The configuration of a server sidecar for `app`, named `name`.
fn server_cfg(ca: &TestCa, name: &str, app: SocketAddr) -> weft_proxy::SidecarConfig {
    let placeholder = mesh_via("127.0.0.1:9".parse().expect("addr"));
    sidecar_config(
        &placeholder,
        ca.creds(name),
        Some(app),
        &[],
        Limits::default(),
    )
}

/// One request with `method` through the client's `payment` listener:
/// (status, the header fields the app saw).
async fn call(upstream: SocketAddr, method: http::Method) -> (u16, Vec<(String, String)>) {
    let stream = tokio::net::TcpStream::connect(upstream)
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri("/order")
        .header(http::header::HOST, "payment")
        .body(Full::new(Bytes::from_static(b"x")))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, parse_description(&body).1)
}

fn early_marked(fields: &[(String, String)]) -> bool {
    fields.iter().any(|(k, v)| k == "early-data" && v == "1")
}

async fn zero_rtt(admin: SocketAddr, alpn: &str, result: &str) -> f64 {
    metric(
        admin,
        "weft_quic_zero_rtt_total",
        &[("alpn", alpn), ("result", result)],
    )
    .await
}

async fn early_data(admin: SocketAddr, direction: &str, alpn: &str) -> f64 {
    metric(
        admin,
        "weft_early_data_total",
        &[("direction", direction), ("alpn", alpn)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_requests_to_a_known_peer_go_as_early_data_and_others_wait() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let ca = TestCa::new(TD);
        let (app, seen) = http_describe_app().await;
        let Setup {
            server,
            relay,
            client,
            upstream,
            ..
        } = Setup::start(
            server_cfg(&ca, "payment", app),
            ca.creds("customer"),
            "payment",
        )
        .await;

        // First contact: a full handshake, which leaves session tickets.
        let (status, fields) = call(upstream, http::Method::GET).await;
        assert_eq!(status, 200);
        assert!(!early_marked(&fields), "no ticket yet: {fields:?}");
        assert_eq!(zero_rtt(client.admin_addr, "h3", "accepted").await, 0.0);

        // Reconnect: the GET goes with the first flight.
        cut(&relay, &client).await;
        let (status, fields) = call(upstream, http::Method::GET).await;
        assert_eq!(status, 200);
        assert!(
            early_marked(&fields),
            "the app should see early-data: 1: {fields:?}"
        );
        assert_eq!(zero_rtt(client.admin_addr, "h3", "accepted").await, 1.0);
        assert_eq!(early_data(client.admin_addr, "outbound", "h3").await, 1.0);
        assert_eq!(early_data(server.admin_addr, "inbound", "h3").await, 1.0);

        // Reconnect again: a POST is not safe to replay, so it waits for
        // the handshake (which resumes the session, without early data).
        cut(&relay, &client).await;
        let (status, fields) = call(upstream, http::Method::POST).await;
        assert_eq!(status, 200);
        assert!(
            !early_marked(&fields),
            "a POST must not go early: {fields:?}"
        );
        assert_eq!(early_data(client.admin_addr, "outbound", "h3").await, 1.0);
        assert_eq!(early_data(server.admin_addr, "inbound", "h3").await, 1.0);
        assert_eq!(seen.requests.load(std::sync::atomic::Ordering::SeqCst), 3);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_rejects_early_data_and_the_request_is_sent_again() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let ca = TestCa::new(TD);
        let (app, seen) = http_describe_app().await;
        let Setup {
            server,
            server_cfg,
            relay,
            client,
            upstream,
        } = Setup::start(
            server_cfg(&ca, "payment", app),
            ca.creds("customer"),
            "payment",
        )
        .await;
        assert_eq!(call(upstream, http::Method::GET).await.0, 200);

        // The peer restarts: same address and identity, empty session cache.
        cut(&relay, &client).await;
        drop(server);
        let server = restart_on(server_cfg.clone(), server_cfg.inbound).await;

        // The mesh file gives `payment` no retry policy: only the early-data
        // resend makes this succeed.
        let (status, fields) = call(upstream, http::Method::GET).await;
        assert_eq!(status, 200);
        assert!(
            !early_marked(&fields),
            "sent again after the handshake: {fields:?}"
        );
        assert_eq!(zero_rtt(client.admin_addr, "h3", "rejected").await, 1.0);
        assert_eq!(
            metric(
                client.admin_addr,
                "weft_retries_total",
                &[("service", "payment"), ("reason", "early-data")]
            )
            .await,
            1.0
        );
        assert_eq!(early_data(server.admin_addr, "inbound", "h3").await, 0.0);
        assert_eq!(
            seen.requests.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "the rejected early request never reached the app"
        );

        // The full handshake left new tickets: the next reconnect is 0-RTT again.
        cut(&relay, &client).await;
        let (status, fields) = call(upstream, http::Method::GET).await;
        assert_eq!(status, 200);
        assert!(early_marked(&fields), "{fields:?}");
        assert_eq!(zero_rtt(client.admin_addr, "h3", "accepted").await, 1.0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_service_marked_early_data_opens_its_stream_with_the_first_flight() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let ca = TestCa::new(TD);
        let (app, _seen) = tcp_echo_app().await;
        let Setup {
            server,
            relay,
            client,
            upstream,
            ..
        } = Setup::start(server_cfg(&ca, "echo", app), ca.creds("customer"), "echo").await;
        let echo = |n: usize| async move {
            let mut s = tokio::net::TcpStream::connect(upstream)
                .await
                .expect("connect");
            let sent = pattern(n);
            s.write_all(&sent).await.expect("write");
            s.shutdown().await.expect("shutdown");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            got == sent
        };
        assert!(echo(10_000).await, "first stream echoes");
        cut(&relay, &client).await;
        assert!(
            echo(10_000).await,
            "stream over the 0-RTT connection echoes"
        );
        assert_eq!(
            zero_rtt(client.admin_addr, "weft-l4", "accepted").await,
            1.0
        );
        assert_eq!(
            early_data(client.admin_addr, "outbound", "weft-l4").await,
            1.0
        );
        assert_eq!(
            early_data(server.admin_addr, "inbound", "weft-l4").await,
            1.0
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_does_not_outlive_the_client_certificate() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let ca = TestCa::new(TD);
        let (app, seen) = http_describe_app().await;
        // A certificate that expires in a few seconds, and no CA to renew it.
        let creds = ca.creds_for(&ca.id("customer"), Duration::from_secs(4));
        let not_after = weft_transport::tls::not_after_of(&creds.chain[0]).expect("not after");
        let Setup {
            server,
            relay,
            client,
            upstream,
            ..
        } = Setup::start(server_cfg(&ca, "payment", app), creds, "payment").await;
        assert_eq!(call(upstream, http::Method::GET).await.0, 200);

        cut(&relay, &client).await;
        let expired = wait_until(Duration::from_secs(15), || async {
            SystemTime::now() > not_after + Duration::from_secs(1)
        })
        .await;
        assert!(expired, "the client certificate should have expired");
        let refused_before = metric(
            server.admin_addr,
            "weft_quic_handshake_failures_total",
            &[("direction", "inbound")],
        )
        .await;
        let tried_before = metric(client.admin_addr, "weft_quic_zero_rtt_total", &[]).await;

        // The client still holds a ticket and resumes with it (0-RTT): TLS
        // takes the ticket without running a verifier, and the peer's own
        // check of the ticket's certificate finds it expired and closes.
        let (status, _) = call(upstream, http::Method::GET).await;
        assert!(
            status >= 500,
            "an expired identity must not get through: {status}"
        );
        assert_eq!(
            seen.requests.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "nothing reached the app"
        );
        let tried = metric(client.admin_addr, "weft_quic_zero_rtt_total", &[]).await;
        assert!(tried > tried_before, "the client resumed with its ticket");
        let refused = wait_until(Duration::from_secs(5), || async {
            metric(
                server.admin_addr,
                "weft_quic_handshake_failures_total",
                &[("direction", "inbound")],
            )
            .await
                > refused_before
        })
        .await;
        assert!(refused, "the peer should count the refused resumption");
    })
    .await
    .expect("test timed out");
}
