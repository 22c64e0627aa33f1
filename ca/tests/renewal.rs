//! Renewal with the current certificate over real HTTPS on loopback: the
//! client presents its certificate as the TLS client certificate and gets a
//! new one for the same identity; expired, not-yet-valid, foreign and
//! oddly named certificates are refused with a 401 that says why; garbage
//! in the handshake does not stop the CA.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{forge_leaf, uri_sans, LeafSpec, Server, ID, TD};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_ca::{client, Ca, CaError};

#[tokio::test]
async fn a_sidecar_renews_with_its_certificate_and_a_new_key() {
    let srv = Server::start().await;
    let bundle = srv.ca.bundle_pem();
    let first = client::request_certificate(&srv.url(), &bundle, &srv.token())
        .await
        .unwrap();

    let second = client::renew_certificate(
        &srv.url(),
        &first.bundle_pem,
        &first.cert_chain_pem,
        &first.key_pem,
    )
    .await
    .unwrap();
    assert_eq!(uri_sans(&second.cert_chain_pem), vec![ID.to_string()]);
    assert_ne!(second.serial_hex, first.serial_hex);
    assert_ne!(
        second.key_pem, first.key_pem,
        "a new key for every certificate"
    );
    assert_eq!(
        common::leaf_public_key(&second.cert_chain_pem),
        rcgen::KeyPair::from_pem(&second.key_pem)
            .unwrap()
            .public_key_raw()
    );

    // And again with the renewed one: renewals chain indefinitely.
    let third = client::renew_certificate(
        &srv.url(),
        &second.bundle_pem,
        &second.cert_chain_pem,
        &second.key_pem,
    )
    .await
    .unwrap();
    assert_eq!(uri_sans(&third.cert_chain_pem), vec![ID.to_string()]);
}

/// Renew with a forged (chain, key) and return the refusal.
async fn refused(srv: &Server, chain: &str, key: &str) -> (u16, String) {
    match client::renew_certificate(&srv.url(), &srv.ca.bundle_pem(), chain, key).await {
        Err(CaError::Rejected { status, message }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn unusable_certificates_are_refused_with_a_reason() {
    let srv = Server::start().await;
    let dir = srv.tmp.path().join("ca");
    let now = time::OffsetDateTime::now_utc();

    let (chain, key) = forge_leaf(
        &dir,
        LeafSpec {
            not_before: now - time::Duration::hours(2),
            not_after: now - time::Duration::hours(1),
            ..LeafSpec::default()
        },
    );
    let (status, message) = refused(&srv, &chain, &key).await;
    assert_eq!(status, 401);
    assert!(message.contains("expired"), "{message}");

    let (chain, key) = forge_leaf(
        &dir,
        LeafSpec {
            not_before: now + time::Duration::hours(1),
            not_after: now + time::Duration::hours(2),
            ..LeafSpec::default()
        },
    );
    let (status, message) = refused(&srv, &chain, &key).await;
    assert_eq!(status, 401);
    assert!(message.contains("not valid before"), "{message}");

    // Signed by another CA (same trust domain): not in our bundle.
    let other = Ca::init(&srv.tmp.path().join("other"), TD).unwrap();
    let foreign = other.issue(ID, Duration::from_secs(3600)).unwrap();
    let (status, message) = refused(&srv, &foreign.cert_chain_pem, &foreign.key_pem).await;
    assert_eq!(status, 401);
    assert!(message.contains("trust bundle"), "{message}");

    for (uris, why) in [
        (
            &["spiffe://evil.org/ns/default/sa/payment"][..],
            "trust domain",
        ),
        (&[][..], "exactly one URI SAN"),
        (
            &[ID, "spiffe://example.org/ns/default/sa/admin"][..],
            "exactly one URI SAN",
        ),
    ] {
        let (chain, key) = forge_leaf(
            &dir,
            LeafSpec {
                uris,
                ..LeafSpec::default()
            },
        );
        let (status, message) = refused(&srv, &chain, &key).await;
        assert_eq!(status, 401, "{uris:?}");
        assert!(message.contains(why), "{uris:?}: {message}");
    }

    // A server-only certificate is not a client credential.
    let (chain, key) = forge_leaf(
        &dir,
        LeafSpec {
            client_auth: false,
            ..LeafSpec::default()
        },
    );
    let (status, message) = refused(&srv, &chain, &key).await;
    assert_eq!(status, 401);
    assert!(message.contains("clientAuth"), "{message}");

    // The refusals are JSON with an error field (seen raw).
    let answer = srv
        .post_csr(None, Some((&foreign.cert_chain_pem, &foreign.key_pem)))
        .await;
    assert_eq!(answer.status, 401);
    assert!(
        answer.error().contains("cannot be used to renew"),
        "{}",
        answer.body
    );

    // Nothing at all: 401, naming both kinds of credential.
    let answer = srv.post_csr(None, None).await;
    assert_eq!(answer.status, 401);
    assert!(
        answer.error().contains("client certificate"),
        "{}",
        answer.body
    );
    assert!(!srv.task.is_finished());
}

#[tokio::test]
async fn a_renewal_cannot_change_the_identity() {
    // The CSR asks for admin; the certificate says payment; payment it is.
    let srv = Server::start().await;
    let issued = srv.ca.issue(ID, Duration::from_secs(600)).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let answer = common::raw_request(
        srv.addr,
        &srv.ca.bundle_pem(),
        Some((&issued.cert_chain_pem, &issued.key_pem)),
        "POST",
        "/v1/certificate",
        &[],
        csr.as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let chain = answer.json()["cert_chain_pem"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(uri_sans(&chain), vec![ID.to_string()]);
}

#[tokio::test]
async fn the_client_checks_its_own_credentials_first() {
    let srv = Server::start().await;
    let issued = srv.ca.issue(ID, Duration::from_secs(600)).unwrap();
    let other = srv.ca.issue(ID, Duration::from_secs(600)).unwrap();
    let bundle = srv.ca.bundle_pem();
    for (chain, key) in [
        ("garbage", issued.key_pem.as_str()),
        (issued.cert_chain_pem.as_str(), "garbage"),
        // A key that is not the certificate's.
        (issued.cert_chain_pem.as_str(), other.key_pem.as_str()),
    ] {
        let err = client::renew_certificate(&srv.url(), &bundle, chain, key)
            .await
            .unwrap_err();
        assert!(matches!(err, CaError::BadCredentials(_)), "{err}");
    }
}

/// Presents whatever certificate and key it was given.
#[derive(Debug)]
struct Presents(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn garbage_in_the_handshake_does_not_stop_the_ca() {
    let srv = Server::start().await;

    // Plain bytes, then a TLS record header followed by junk.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[
            0x16, 0x03, 0x01, 0x00, 0x10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
        ][..],
        &[0xff; 4096][..],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        let _ = tcp.write_all(junk).await;
        let mut buf = Vec::new();
        let _ = tcp.read_to_end(&mut buf).await;
    }

    // A client certificate that is not a certificate, and someone else's
    // certificate without its key: both handshakes fail.
    let stolen = srv.ca.issue(ID, Duration::from_secs(600)).unwrap();
    let stolen_chain = CertificateDer::pem_slice_iter(stolen.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    for chain in [
        vec![CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])],
        stolen_chain,
    ] {
        let answer = handshake_with(&srv, chain).await;
        assert!(
            answer.as_ref().map_or(true, |b| b.is_empty()),
            "a bad client certificate got an answer: {:?}",
            answer.map(|b| String::from_utf8_lossy(&b).to_string())
        );
    }

    // Still serving, to tokens and certificates alike.
    assert!(!srv.task.is_finished());
    let issued = client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), &srv.token())
        .await
        .unwrap();
    client::renew_certificate(
        &srv.url(),
        &issued.bundle_pem,
        &issued.cert_chain_pem,
        &issued.key_pem,
    )
    .await
    .unwrap();
}

/// Connect presenting `chain` with a fresh key that is not its key, send a
/// request and return what came back.
async fn handshake_with(
    srv: &Server,
    chain: Vec<CertificateDer<'static>>,
) -> Result<Vec<u8>, std::io::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let signing = provider
        .key_provider
        .load_private_key(rustls_pki_types::PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .unwrap();
    let presented = rustls::sign::CertifiedKey::new(chain, signing);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(srv.ca.bundle_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Presents(Arc::new(presented))));
    let tcp = tokio::net::TcpStream::connect(srv.addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    // TLS 1.3: the client learns of the refusal on its first read.
    tls.write_all(
        b"POST /v1/certificate HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await?;
    // Keep whatever arrived, even if the close is unclean.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if buf.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(buf)
}
