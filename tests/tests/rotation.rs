//! Certificates over time, end to end with a real `weft-ca serve` (in
//! process, real HTTPS) and real sidecars that get their certificates by
//! CSR: short-lived leaves rotate under load with no failed request; a CA
//! outage longer than a lifetime fails closed at expiry and recovers, with
//! no restart, when the CA is back.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use weft_proxy::{CaCredential, IdentitySource, Limits};
use weft_tests::fleet::{background, ca_pair, Client};
use weft_tests::*;

/// A CA served over HTTPS on a fixed loopback address, restartable.
struct CaService {
    ca: Arc<weft_ca::Ca>,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    ttl: Duration,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl CaService {
    async fn start(ttl: Duration) -> CaService {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(weft_ca::Ca::init(dir.path(), TD).expect("init CA"));
        let listener = TcpListener::bind(any_port()).await.expect("bind CA");
        let addr = listener.local_addr().expect("addr");
        let mut svc = CaService {
            ca,
            _dir: dir,
            addr,
            ttl,
            task: None,
        };
        svc.serve(listener);
        svc
    }

    fn serve(&mut self, listener: TcpListener) {
        let (ca, ttl) = (self.ca.clone(), self.ttl);
        self.task = Some(tokio::spawn(async move {
            let _ = weft_ca::server::serve(ca, listener, ttl).await;
        }));
    }

    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Serve again on the same address (the sidecars' `--ca` URL).
    async fn restart(&mut self) {
        self.stop();
        let listener = TcpListener::bind(self.addr).await.expect("rebind CA");
        self.serve(listener);
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// What a sidecar for `name` needs to get its certificate from this CA.
    fn identity(&self, name: &str) -> IdentitySource {
        let id = format!("spiffe://{TD}/ns/test/sa/{name}");
        IdentitySource::Ca {
            url: self.url(),
            bundle_pem: self.ca.bundle_pem(),
            credential: CaCredential::JoinToken(
                self.ca
                    .token(&id, Duration::from_secs(3600))
                    .expect("token"),
            ),
            expect_id: Some(id),
        }
    }
}

/// `/certs` of a sidecar: (serial, seconds left).
async fn certs(admin: SocketAddr) -> (String, i64) {
    let (status, body) = admin_get(admin, "/certs").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    (
        v["serial"].as_str().unwrap_or_default().to_string(),
        v["expires_in_seconds"].as_i64().unwrap_or(-1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_leaves_rotate_under_load_without_a_failed_request() {
    let ca = CaService::start(Duration::from_secs(10)).await;
    let (client, server, app) = ca_pair(|name| ca.identity(name)).await;
    let l = background(client.upstream_addrs["payment"], 4);
    let mut serials = [BTreeSet::new(), BTreeSet::new()];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        for (i, sc) in [&client, &server].iter().enumerate() {
            let (serial, left) = certs(sc.admin_addr).await;
            assert!(left > 0, "a certificate expired during rotation");
            serials[i].insert(serial);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    l.stop();
    let (ok, failed) = (l.ok(), l.failed());
    assert_eq!(
        failed,
        0,
        "{failed} failed of {}: {:?}",
        ok + failed,
        l.samples.lock().expect("lock")
    );
    assert!(ok > 1000, "too little traffic to mean anything: {ok}");
    for (side, s) in ["client", "server"].iter().zip(&serials) {
        assert!(s.len() >= 5, "{side} saw only {} serials: {s:?}", s.len());
    }
    let renewals = |admin| async move {
        metric_sum(
            &scrape(admin).await,
            "weft_cert_renewals_total",
            &[("result", "success")],
        )
    };
    assert!(renewals(client.admin_addr).await >= 4.0);
    assert!(renewals(server.admin_addr).await >= 4.0);
    // The expiry gauge tracks the current certificate.
    let expiry = metric_sum(
        &scrape(server.admin_addr).await,
        "weft_cert_expiry_timestamp_seconds",
        &[],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        expiry > now && expiry <= now + 11.0,
        "expiry {expiry}, now {now}"
    );
    assert!(app.requests() >= ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_outage_fails_closed_at_expiry_and_recovers_without_restart() {
    let ttl = Duration::from_secs(6);
    let mut ca = CaService::start(ttl).await;
    let (client, server, _app) = ca_pair(|name| ca.identity(name)).await;
    let l = background(client.upstream_addrs["payment"], 2);
    ca.stop();
    let stopped = Instant::now();
    // Both certificates were issued just before the stop: they expire within a lifetime.
    let expiry = stopped + ttl + Duration::from_secs(1);

    // Until expiry, renewals fail but traffic flows on the current certificates.
    assert!(
        wait_until(ttl * 2, || async {
            metric_sum(
                &scrape(client.admin_addr).await,
                "weft_cert_renewals_total",
                &[("result", "failure")],
            ) > 0.0
        })
        .await,
        "renewal failures are not reported"
    );
    // Then it fails closed: requests fail once a certificate has expired,
    // and /ready says so.
    assert!(
        wait_until(ttl * 2, || async { l.failed() > 0 }).await,
        "traffic kept flowing past certificate expiry"
    );
    let first = l.first_failure.lock().expect("lock").expect("a failure");
    assert!(
        first + Duration::from_secs(1) >= stopped + ttl - Duration::from_secs(2),
        "traffic failed {:?} after the CA stopped, before the certificates expired",
        first - stopped
    );
    let (status, _) = admin_get(server.admin_addr, "/ready").await;
    assert_eq!(status, 503, "an expired sidecar must not report ready");
    let ok_during = l.ok();

    // The CA stays down for two lifetimes in all.
    let back_at = stopped + ttl * 2;
    tokio::time::sleep_until(back_at.into()).await;
    assert!(Instant::now() > expiry);
    ca.restart().await;

    // Recovery without restarting the sidecars: the expired certificate is
    // refused by the CA, so the join token gets a new one.
    let recovered = wait_until(Duration::from_secs(20), || async {
        let before = l.ok();
        tokio::time::sleep(Duration::from_millis(300)).await;
        l.ok() > before
            && l.last_failure
                .lock()
                .expect("lock")
                .is_some_and(|t| t.elapsed() > Duration::from_millis(300))
    })
    .await;
    assert!(recovered, "traffic did not recover after the CA came back");
    let (status, _) = admin_get(server.admin_addr, "/ready").await;
    assert_eq!(status, 200);
    assert!(l.ok() > ok_during);
    l.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_outlives_the_peer_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(Duration::from_secs(60), async {
        let ca = TestCa::new(TD);
        let (app, _seen) = tcp_echo_app().await;
        let mesh = weft_tests::mesh(TD, &[("echo", weft_proxy::mesh::Protocol::Tcp)]);
        // The server's certificate lives 6 s and is never renewed (static):
        // long enough for set-up on a busy machine, short for a test.
        let server = sidecar(
            &mesh,
            ca.creds_for(&ca.id("echo"), Duration::from_secs(6)),
            Some(app),
            &[],
            Limits::default(),
        )
        .await;
        let issued = Instant::now();
        let client = sidecar(
            &mesh,
            ca.creds("customer"),
            None,
            &["echo"],
            Limits::default(),
        )
        .await;
        let mesh = with_endpoint(mesh, "echo", server.inbound_addr);
        client.set_mesh(mesh.clone());
        server.set_mesh(mesh);

        // A long-lived TCP stream over the one QUIC connection.
        let mut s = tokio::net::TcpStream::connect(client.upstream_addrs["echo"])
            .await
            .expect("connect");
        s.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.expect("echo");
        // It ends when the server's certificate expires, not later.
        let mut buf = [0u8; 16];
        let ended = matches!(s.read(&mut buf).await, Ok(0) | Err(_));
        let at = issued.elapsed();
        assert!(ended);
        assert!(
            at >= Duration::from_secs(4) && at < Duration::from_secs(8),
            "the stream ended {at:?} after a 6 s certificate was issued"
        );
        // And no new connection can be made with the expired certificate:
        // the client refuses the server (fails closed).
        // (The sidecar's reset can even beat connect() back to us.)
        let refused = match tokio::net::TcpStream::connect(client.upstream_addrs["echo"]).await {
            Err(_) => true,
            Ok(mut s) => match s.write_all(b"ping").await {
                Err(_) => true,
                Ok(()) => matches!(s.read(&mut buf).await, Ok(0) | Err(_)),
            },
        };
        assert!(refused, "a peer with an expired certificate was used");
        let handshakes = client.pool_handshakes().1;
        assert!(handshakes >= 2, "no new handshake was tried ({handshakes})");
    })
    .await
    .expect("test timed out");
}

/// An HTTP/1.1 app whose response body dribbles out: `chunks` chunks,
/// one every `every`, after an immediate response head.
async fn slow_body_app(chunks: usize, every: Duration) -> SocketAddr {
    use http_body_util::StreamBody;
    let listener = TcpListener::bind(any_port()).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let slow = req.uri().path() == "/slow";
                        let n = if slow { chunks } else { 1 };
                        let frames = futures::stream::unfold(0, move |i| async move {
                            if i == n {
                                return None;
                            }
                            if slow {
                                tokio::time::sleep(every).await;
                            }
                            let frame =
                                hyper::body::Frame::data(bytes::Bytes::from_static(b"0123456789"));
                            Some((Ok::<_, std::convert::Infallible>(frame), i + 1))
                        });
                        Ok::<_, std::convert::Infallible>(http::Response::new(StreamBody::new(
                            frames,
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_streaming_while_its_connection_is_replaced_completes() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let ca = TestCa::new(TD);
        let app = slow_body_app(20, Duration::from_millis(100)).await;
        let mesh = weft_tests::mesh(TD, &[("payment", weft_proxy::mesh::Protocol::Http)]);
        // A static 12 s certificate: the client's pool stops using its
        // connection about a tenth of that before it expires.
        let creds = ca.creds_for(&ca.id("payment"), Duration::from_secs(12));
        let not_after = weft_transport::tls::not_after_of(&creds.chain[0]).expect("not after");
        let server = sidecar(&mesh, creds, Some(app), &[], Limits::default()).await;
        let client = sidecar(
            &mesh,
            ca.creds("customer"),
            None,
            &["payment"],
            Limits::default(),
        )
        .await;
        let mesh = with_endpoint(mesh, "payment", server.inbound_addr);
        client.set_mesh(mesh.clone());
        server.set_mesh(mesh);
        let c = Client::new(client.upstream_addrs["payment"]);
        assert_eq!(c.get("/quick", &[]).await.expect("quick").status, 200);
        assert_eq!(client.pool_handshakes().0, 1);

        // Time is the thing under test: start a 2 s body 2.5 s before the
        // certificate expires, then make the pool replace the connection
        // (a request after its replacement point) while the body streams.
        let at = |before: Duration| {
            let wait = (not_after - before)
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait)
        };
        at(Duration::from_millis(2500)).await;
        let slow = tokio::spawn(c.get("/slow", &[]));
        at(Duration::from_millis(700)).await;
        assert_eq!(c.get("/quick", &[]).await.expect("quick").status, 200);
        assert_eq!(
            client.pool_handshakes().0,
            2,
            "the connection was not replaced"
        );
        let slow = slow.await.expect("task").expect("the slow response");
        assert_eq!(slow.status, 200);
        assert_eq!(
            slow.body.len(),
            200,
            "the body was cut short: {:?}",
            slow.body
        );
    })
    .await
    .expect("test timed out");
}
