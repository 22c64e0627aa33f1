//! Authorization end to end: the server-side sidecar checks the caller's
//! SPIFFE ID (proved in the mTLS handshake) against the service's policy in
//! the mesh file, on every request and stream, and a reload changes it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_proxy::mesh::{Authorization, IdPattern, Protocol};
use weft_tests::fleet::{spec, Client, Fleet};
use weft_tests::*;

const CUSTOMER: &str = "spiffe://test.weft.local/ns/test/sa/customer";

/// Denials the server sidecars counted for `service`.
async fn denied(fleet: &Fleet, service: &str) -> f64 {
    let mut n = 0.0;
    for s in &fleet.servers {
        n += metric_sum(
            &scrape(s.sidecar.admin_addr).await,
            "weft_authz_denied_total",
            &[("service", service)],
        );
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_callers_get_through_others_get_403_and_reload_applies() {
    let allow_customer = format!("[services.payment.authorization]\nallow = [\"{CUSTOMER}\"]\n");
    let fleet = Fleet::start(&[spec("payment", "p1", &[])], &allow_customer).await;
    let client = Client::new(fleet.upstream("payment"));

    let ok = client.get("/pay", &[]).await.expect("answer");
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(denied(&fleet, "payment").await, 0.0);

    // Someone else is allowed now; the customer is not (a reload, no restart).
    fleet
        .set_policy(
            "[services.payment.authorization]\nallow = [\"spiffe://test.weft.local/ns/shop/*\"]\n",
        )
        .await;
    let no = client.get("/pay", &[]).await.expect("answer");
    assert_eq!(no.status, 403, "{no:?}");
    assert_eq!(no.header("x-weft-denied"), Some("not-allowed"));
    assert_eq!(no.header("x-weft-error"), Some("1"));
    assert!(
        no.body.contains(CUSTOMER),
        "the reason names the caller: {}",
        no.body
    );
    let app = &fleet.server("p1").app;
    assert_eq!(app.requests(), 1, "a denied request must not reach the app");

    // The same connection is reused: the check is per request, not per connection.
    let handshakes = fleet.client.pool_handshakes().0;
    assert_eq!(handshakes, 1, "one QUIC connection for all of it");
    assert_eq!(denied(&fleet, "payment").await, 1.0);

    // A deny rule beats an allow rule.
    fleet
        .set_policy(&format!(
            "[services.payment.authorization]\nallow = [\"spiffe://test.weft.local/*\"]\ndeny = [\"{CUSTOMER}\"]\n"
        ))
        .await;
    let no = client.get("/pay", &[]).await.expect("answer");
    assert_eq!(
        (no.status, no.header("x-weft-denied")),
        (403, Some("deny-rule"))
    );

    // Mesh-wide deny by default: a service without a table admits nobody.
    fleet
        .set_mesh_text("default_authorization = \"deny\"\n", "")
        .await;
    let no = client.get("/pay", &[]).await.expect("answer");
    assert_eq!(
        (no.status, no.header("x-weft-denied")),
        (403, Some("default-deny"))
    );
    fleet.set_policy("").await;
    let ok = client.get("/pay", &[]).await.expect("answer");
    assert_eq!(ok.status, 200);
    assert_eq!(app.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_tcp_stream_is_refused_and_never_reaches_the_app() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let (app, seen) = tcp_echo_app().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        let up = pair.upstream("echo");
        let round_trip = || async move {
            let mut s = TcpStream::connect(up).await.ok()?;
            s.write_all(b"ping").await.ok()?;
            let mut back = [0u8; 4];
            s.read_exact(&mut back).await.ok()?;
            Some(back)
        };
        assert_eq!(round_trip().await, Some(*b"ping"));

        let mut mesh = pair.mesh.clone();
        mesh.services.get_mut("echo").expect("echo").authorization = Some(Authorization {
            allow: vec![IdPattern::Exact(
                "spiffe://test.weft.local/ns/test/sa/someone-else".into(),
            )],
            deny: vec![],
        });
        pair.server.set_mesh(mesh);
        assert_eq!(round_trip().await, None, "the stream must be refused");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
        let denied = metric_sum(
            &scrape(pair.server.admin_addr).await,
            "weft_authz_denied_total",
            &[("service", "echo"), ("reason", "not-allowed")],
        );
        assert_eq!(denied, 1.0);
        // A refusal is a policy answer, not a failing endpoint: no retries,
        // no ejection.
        let retries = metric_sum(
            &scrape(pair.client.admin_addr).await,
            "weft_retries_total",
            &[],
        );
        assert_eq!(retries, 0.0);
    })
    .await
    .expect("test timed out");
}
