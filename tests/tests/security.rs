//! Who may talk to a sidecar. Every refused case is driven from the client
//! side of the handshake with our own quinn client, and checks four things:
//! the attempt fails with a TLS alert, nothing reaches the apps, the server
//! counts a failed handshake, and a valid peer still gets through afterwards.
//!
//! A sidecar forwards to one `--app`, so "the server" is two sidecars built
//! from the same CA: one in front of `http_app()` (service "payment", HTTP)
//! and one in front of `tcp_echo_app()` (service "echo", TCP).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::mesh::Protocol;
use weft_proxy::{Limits, Sidecar};
use weft_tests::*;
use weft_transport::preamble;

const LIMIT: Duration = Duration::from_secs(60);
const HANDSHAKE_FAILURES: &str = "weft_quic_handshake_failures_total";

/// Two server sidecars (payment over HTTP, echo over TCP) and a valid client sidecar.
struct Env {
    ca: TestCa,
    http_server: Sidecar,
    http_seen: Arc<AppSeen>,
    echo_server: Sidecar,
    echo_seen: Arc<EchoSeen>,
    client: Sidecar,
}

impl Env {
    async fn start() -> Env {
        let ca = TestCa::new(TD);
        let (http_app, http_seen) = http_app().await;
        let (echo_app, echo_seen) = tcp_echo_app().await;
        let m = mesh(TD, &[("payment", Protocol::Http), ("echo", Protocol::Tcp)]);
        let http_server = sidecar(
            &m,
            ca.creds("payment"),
            Some(http_app),
            &[],
            Limits::default(),
        )
        .await;
        let echo_server =
            sidecar(&m, ca.creds("echo"), Some(echo_app), &[], Limits::default()).await;
        let m = with_endpoint(m, "payment", http_server.inbound_addr);
        let m = with_endpoint(m, "echo", echo_server.inbound_addr);
        http_server.set_mesh(m.clone());
        echo_server.set_mesh(m.clone());
        let client = sidecar(
            &m,
            ca.creds("customer"),
            None,
            &["payment", "echo"],
            Limits::default(),
        )
        .await;
        Env {
            ca,
            http_server,
            http_seen,
            echo_server,
            echo_seen,
            client,
        }
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        roots_of(&self.ca)
    }

    async fn failures(&self) -> (f64, f64) {
        (
            metric_sum(
                &scrape(self.http_server.admin_addr).await,
                HANDSHAKE_FAILURES,
                &[],
            ),
            metric_sum(
                &scrape(self.echo_server.admin_addr).await,
                HANDSHAKE_FAILURES,
                &[],
            ),
        )
    }

    /// The valid client sidecar gets through both servers.
    async fn assert_valid_peer_works(&self) {
        let (status, headers, _) =
            http_get(self.client.upstream_addrs["payment"], "payment", "/after").await;
        assert_eq!(status, 200, "a valid peer must still reach payment");
        assert_eq!(
            headers.get("x-seen-peer-id").and_then(|v| v.to_str().ok()),
            Some(self.ca.id("customer").as_str())
        );
        let mut tcp = tokio::net::TcpStream::connect(self.client.upstream_addrs["echo"])
            .await
            .expect("connect echo upstream");
        tcp.write_all(b"still-echoing").await.expect("write");
        tcp.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        tcp.read_to_end(&mut back).await.expect("read echo");
        assert_eq!(back, b"still-echoing", "a valid peer must still reach echo");
    }

    /// Drive one refused identity (`cert`, or none) at both servers.
    async fn assert_refused(&self, cert: impl Fn() -> Option<ClientCert>) {
        let before = self.failures().await;

        let err = h3_attempt(
            self.http_server.inbound_addr,
            &self.roots(),
            cert(),
            "payment",
        )
        .await
        .expect_err("HTTP/3 request with a refused identity must fail");
        assert!(
            is_tls_alert(&err),
            "HTTP/3 attempt must end in a TLS alert, got {err:?}"
        );
        let err = l4_attempt(self.echo_server.inbound_addr, &self.roots(), cert())
            .await
            .expect_err("L4 stream with a refused identity must fail");
        assert!(
            is_tls_alert(&err),
            "L4 attempt must end in a TLS alert, got {err:?}"
        );

        let counted = wait_until(Duration::from_secs(10), || async {
            let now = self.failures().await;
            now.0 > before.0 && now.1 > before.1
        })
        .await;
        assert!(
            counted,
            "both servers must count the failed handshake (before {before:?})"
        );
        assert_eq!(
            self.http_seen.requests.load(Ordering::SeqCst),
            0,
            "no request may reach the app"
        );
        assert_eq!(
            self.http_seen.connections.load(Ordering::SeqCst),
            0,
            "no connection to the app"
        );
        assert_eq!(
            self.echo_seen.connections.load(Ordering::SeqCst),
            0,
            "no connection to echo"
        );
        assert_eq!(
            self.echo_seen.bytes.load(Ordering::SeqCst),
            0,
            "no byte to echo"
        );

        self.assert_valid_peer_works().await;
    }
}

fn roots_of(ca: &TestCa) -> Vec<CertificateDer<'static>> {
    ca.creds("anyone").bundle
}

/// A stream for "echo" with a payload. Ok is whatever came back; Err is how
/// the connection ended.
async fn l4_attempt(
    addr: std::net::SocketAddr,
    roots: &[CertificateDer<'static>],
    cert: Option<ClientCert>,
) -> Result<Vec<u8>, quinn::ConnectionError> {
    let endpoint = quic_client(roots, cert, b"weft-l4");
    let conn = endpoint.connect(addr, "weft.mesh").expect("dial").await?;
    let result = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let req = preamble::Request {
            target: "echo".into(),
            port: 0,
            deadline_ms: 0,
        };
        send.write_all(&req.encode().expect("encode"))
            .await
            .map_err(|e| e.to_string())?;
        send.write_all(b"secret bytes")
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1 << 16).await.map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(bytes) => Ok(bytes),
        Err(_) => Err(conn.closed().await),
    }
}

/// A leaf signed by the test CA's own root (read from its directory), with
/// the given URI SANs and validity.
fn leaf_signed_by_our_root(
    ca: &TestCa,
    uris: &[&str],
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> ClientCert {
    let ca_pem = std::fs::read_to_string(ca.dir.path().join("ca.pem")).expect("ca.pem");
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(ca.dir.path().join("ca-key.pem")).expect("ca-key.pem"),
    )
    .expect("CA key");
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("ASCII URI")))
        .collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer).expect("sign leaf");
    let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key DER");
    (vec![cert.der().clone()], key_der)
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_peer_gets_through() {
    tokio::time::timeout(LIMIT, async {
        let env = Env::start().await;
        env.assert_valid_peer_works().await;
        // Sanity for the refused cases: our own client, with a valid mesh
        // certificate, is admitted on both ALPNs.
        let creds = env.ca.creds("prober");
        let status = h3_attempt(
            env.http_server.inbound_addr,
            &env.roots(),
            Some(client_cert(&creds)),
            "payment",
        )
        .await
        .expect("valid HTTP/3 client is admitted");
        assert_eq!(status, 200);
        let back = l4_attempt(
            env.echo_server.inbound_addr,
            &env.roots(),
            Some(client_cert(&creds)),
        )
        .await
        .expect("valid L4 client is admitted");
        let (resp, used) = preamble::Response::decode(&back).expect("preamble response");
        assert_eq!(resp.status, preamble::Status::Ok);
        assert_eq!(&back[used..], b"secret bytes");
        // Control for the hand-made leaves below: built the same way, but
        // valid, in our trust domain and with one URI SAN, one is admitted.
        let hour = time::Duration::hours(1);
        let id = env.ca.id("handmade");
        let cert = leaf_signed_by_our_root(&env.ca, &[&id], now() - hour, now() + hour);
        let status = h3_attempt(
            env.http_server.inbound_addr,
            &env.roots(),
            Some(cert),
            "payment",
        )
        .await
        .expect("a well-formed hand-made leaf is admitted");
        assert_eq!(status, 200);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_is_refused() {
    tokio::time::timeout(LIMIT, async {
        let env = Env::start().await;
        env.assert_refused(|| None).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_a_foreign_ca_is_refused() {
    tokio::time::timeout(LIMIT, async {
        let env = Env::start().await;
        // Same trust domain, same path: only the root differs.
        let foreign = TestCa::new(TD);
        let creds = foreign.creds("customer");
        env.assert_refused(|| Some(client_cert(&creds))).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_trust_domain_signed_by_our_root_is_refused() {
    tokio::time::timeout(LIMIT, async {
        let env = Env::start().await;
        let hour = time::Duration::hours(1);
        let cert = leaf_signed_by_our_root(
            &env.ca,
            &["spiffe://other.org/x"],
            now() - hour,
            now() + hour,
        );
        env.assert_refused(|| Some((cert.0.clone(), cert.1.clone_key())))
            .await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_refused() {
    tokio::time::timeout(LIMIT, async {
        let env = Env::start().await;
        let day = time::Duration::days(1);
        let id = env.ca.id("customer");
        let cert = leaf_signed_by_our_root(&env.ca, &[&id], now() - day * 2, now() - day);
        env.assert_refused(|| Some((cert.0.clone(), cert.1.clone_key())))
            .await;
    })
    .await
    .expect("test timed out");
}

/// Connections close at the peer's not-after (pool and inbound), so the
/// verifier must refuse the certificate from that second on; webpki alone
/// accepts it until the second is over, which let a client reconnect to a
/// server whose last connection had just died of the same expiry.
#[test]
fn a_certificate_is_refused_from_its_not_after_second() {
    use rustls_pki_types::UnixTime;
    let ca = TestCa::new(TD);
    let id = ca.id("customer");
    let hour = time::Duration::hours(1);
    let end = now().replace_nanosecond(0).expect("whole second") + hour;
    let (chain, _) = leaf_signed_by_our_root(&ca, &[&id], now() - hour, end);
    let tls = weft_transport::tls::MeshTls::new(TD, &ca.creds("server")).expect("tls");
    let at = |t: time::OffsetDateTime| {
        UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(t.unix_timestamp()).expect("after 1970"),
        ))
    };
    let usage = || webpki::KeyUsage::client_auth();
    let before = tls.verify_peer(
        &chain[0],
        &[],
        at(end - time::Duration::seconds(1)),
        usage(),
    );
    assert_eq!(before.expect("valid one second before").to_string(), id);
    let err = tls
        .verify_peer(&chain[0], &[], at(end), usage())
        .expect_err("refused in its not-after second");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_with_two_uri_sans_is_refused() {
    tokio::time::timeout(LIMIT, async {
        let env = Env::start().await;
        let hour = time::Duration::hours(1);
        let (a, b) = (env.ca.id("customer"), env.ca.id("admin"));
        let cert = leaf_signed_by_our_root(&env.ca, &[&a, &b], now() - hour, now() + hour);
        env.assert_refused(|| Some((cert.0.clone(), cert.1.clone_key())))
            .await;
    })
    .await
    .expect("test timed out");
}

/// The client side checks the server too: a sidecar that dials a server
/// presenting a foreign-CA certificate answers 503 and sends it nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_from_a_foreign_ca() {
    tokio::time::timeout(LIMIT, async {
        let ca = TestCa::new(TD);
        let foreign = TestCa::new(TD);
        let (app, seen) = http_app().await;
        let m = mesh(TD, &[("payment", Protocol::Http)]);
        let impostor = sidecar(
            &m,
            foreign.creds("payment"),
            Some(app),
            &[],
            Limits::default(),
        )
        .await;
        let m = with_endpoint(m, "payment", impostor.inbound_addr);
        impostor.set_mesh(m.clone());
        let client = sidecar(
            &m,
            ca.creds("customer"),
            None,
            &["payment"],
            Limits::default(),
        )
        .await;

        let (status, _, body) =
            http_get(client.upstream_addrs["payment"], "payment", "/secret").await;
        assert_eq!(status, 503, "body: {}", String::from_utf8_lossy(&body));
        // The impostor saw the handshake fail (the client's alert), and its app nothing.
        let counted = wait_until(Duration::from_secs(10), || async {
            metric_sum(&scrape(impostor.admin_addr).await, HANDSHAKE_FAILURES, &[]) >= 1.0
        })
        .await;
        assert!(counted, "the impostor must see a failed handshake");
        assert_eq!(seen.requests.load(Ordering::SeqCst), 0);
        assert_eq!(seen.connections.load(Ordering::SeqCst), 0);
    })
    .await
    .expect("test timed out");
}

/// A standard HTTP/3 client with a valid mesh certificate is served like a
/// sidecar: `:authority` names the service, the app learns the caller's ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_http3_client_with_a_mesh_certificate() {
    tokio::time::timeout(LIMIT, async {
        let env = Env::start().await;
        let creds = env.ca.creds("h3client");
        let endpoint = quic_client(&env.roots(), Some(client_cert(&creds)), b"h3");
        let conn = endpoint
            .connect(env.http_server.inbound_addr, "payment")
            .expect("dial")
            .await
            .expect("handshake");
        let (mut driver, sender) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .expect("h3 client");
        tokio::spawn(async move { futures::future::poll_fn(|cx| driver.poll_close(cx)).await });

        let get = |authority: &'static str| {
            let mut sender = sender.clone();
            async move {
                let req = http::Request::get(format!("https://{authority}/hello?x=1"))
                    .body(())
                    .expect("request");
                let mut stream = sender.send_request(req).await.expect("send request");
                // A server may answer before reading the whole request and
                // stop our sending (RFC 9114 §4.1): finishing can then fail,
                // and the response is what counts.
                let _ = stream.finish().await;
                let resp = stream.recv_response().await.expect("response");
                let mut body = Vec::new();
                while let Some(mut chunk) = stream.recv_data().await.expect("body") {
                    body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
                }
                (resp, Bytes::from(body))
            }
        };
        let (resp, _) = get("payment").await;
        assert_eq!(resp.status(), 200);
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(
            header("x-seen-peer-id").as_deref(),
            Some(env.ca.id("h3client").as_str())
        );
        assert_eq!(header("x-seen-path").as_deref(), Some("/hello"));
        assert_eq!(header("x-seen-host").as_deref(), Some("payment"));
        assert_eq!(env.http_seen.requests.load(Ordering::SeqCst), 1);

        let (resp, body) = get("nope").await;
        assert_eq!(
            resp.status(),
            421,
            "body: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            env.http_seen.requests.load(Ordering::SeqCst),
            1,
            "421 must not reach the app"
        );
    })
    .await
    .expect("test timed out");
}
