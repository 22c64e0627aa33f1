//! Hot reload of the mesh file: a valid edit applies to new requests, an
//! invalid edit is rejected (counted, last good config kept), and open
//! connections survive both.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::mesh::Mesh;
use weft_proxy::Limits;
use weft_tests::*;

fn mesh_text(payment: SocketAddr, echo: SocketAddr) -> String {
    format!(
        "trust_domain = \"{TD}\"\n\
         [services.payment]\nendpoints = [\"{payment}\"]\n\
         [services.echo]\nprotocol = \"tcp\"\nendpoints = [\"{echo}\"]\n"
    )
}

async fn get(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    addr: SocketAddr,
) -> u16 {
    let resp = client
        .get(format!("http://{addr}/x").parse().expect("uri"))
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

async fn reloads(admin: SocketAddr, result: &str) -> f64 {
    metric_sum(
        &scrape(admin).await,
        "weft_config_reloads_total",
        &[("result", result)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_edits_apply_invalid_edits_are_rejected_and_connections_survive() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let ca = TestCa::new(TD);
        let (app1, seen1) = http_app().await;
        let (app2, seen2) = http_app().await;
        let (echo_app, _) = tcp_echo_app().await;
        let placeholder = mesh(
            TD,
            &[
                ("payment", weft_proxy::mesh::Protocol::Http),
                ("echo", weft_proxy::mesh::Protocol::Tcp),
            ],
        );
        let server1 = sidecar(
            &placeholder,
            ca.creds("payment-v1"),
            Some(app1),
            &[],
            Limits::default(),
        )
        .await;
        let server2 = sidecar(
            &placeholder,
            ca.creds("payment-v2"),
            Some(app2),
            &[],
            Limits::default(),
        )
        .await;
        let echo = sidecar(
            &placeholder,
            ca.creds("echo"),
            Some(echo_app),
            &[],
            Limits::default(),
        )
        .await;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.toml");
        let v1 = mesh_text(server1.inbound_addr, echo.inbound_addr);
        std::fs::write(&path, &v1).expect("write mesh");
        let m = Mesh::parse(&v1, "mesh.toml").expect("valid mesh");
        for s in [&server1, &server2, &echo] {
            s.set_mesh(m.clone());
        }
        let mut client = sidecar(
            &m,
            ca.creds("customer"),
            None,
            &["payment", "echo"],
            Limits::default(),
        )
        .await;
        client.watch_mesh_file(path.clone(), Duration::from_millis(50));
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let payment = client.upstream_addrs["payment"];

        // A TCP stream that stays open across every reload below.
        let mut tcp = tokio::net::TcpStream::connect(client.upstream_addrs["echo"])
            .await
            .expect("connect echo");
        let mut buf = [0u8; 5];
        tcp.write_all(b"one..").await.expect("write");
        tcp.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"one..");

        assert_eq!(get(&http, payment).await, 200);
        assert_eq!(seen1.requests.load(Ordering::SeqCst), 1);

        // An invalid edit: rejected, counted, and the old endpoint keeps serving.
        std::fs::write(
            &path,
            "trust_domain = \"test.weft.local\"\n[services.payment]\nendpoints = [\"nope\"]\n",
        )
        .expect("write");
        assert!(
            wait_until(Duration::from_secs(10), || async {
                reloads(client.admin_addr, "failure").await >= 1.0
            })
            .await,
            "invalid edit was not counted"
        );
        assert_eq!(reloads(client.admin_addr, "success").await, 0.0);
        assert_eq!(get(&http, payment).await, 200);
        assert_eq!(seen1.requests.load(Ordering::SeqCst), 2);
        assert_eq!(seen2.requests.load(Ordering::SeqCst), 0);

        // A trust-domain change is rejected too: it would need new certificates.
        std::fs::write(&path, v1.replace(TD, "other.org")).expect("write");
        assert!(
            wait_until(Duration::from_secs(10), || async {
                reloads(client.admin_addr, "failure").await >= 2.0
            })
            .await
        );

        // A valid edit: payment moves to server2 for new requests.
        std::fs::write(&path, mesh_text(server2.inbound_addr, echo.inbound_addr)).expect("write");
        assert!(
            wait_until(Duration::from_secs(10), || async {
                reloads(client.admin_addr, "success").await >= 1.0
            })
            .await,
            "valid edit was not applied"
        );
        assert_eq!(get(&http, payment).await, 200);
        assert_eq!(seen2.requests.load(Ordering::SeqCst), 1);
        assert_eq!(seen1.requests.load(Ordering::SeqCst), 2);

        // The TCP stream opened before all of this still works.
        tcp.write_all(b"two..").await.expect("write after reloads");
        tcp.read_exact(&mut buf).await.expect("read after reloads");
        assert_eq!(&buf, b"two..");
        assert_eq!(
            client
                .mesh()
                .service("payment")
                .map(|s| s.endpoints[0].addr),
            Some(server2.inbound_addr)
        );
    })
    .await
    .expect("test timed out");
}
