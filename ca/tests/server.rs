//! The HTTPS CSR endpoint in process: `server::serve` on 127.0.0.1:0 and
//! `client::request_certificate`, plus raw requests for the error paths.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_ca::{client, server, Ca, CaError};
use x509_parser::extensions::GeneralName;

const TD: &str = "example.org";
const ID: &str = "spiffe://example.org/ns/default/sa/payment";

struct Server {
    _tmp: tempfile::TempDir,
    ca: Arc<Ca>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<(), CaError>>,
}

impl Server {
    async fn start() -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::init(&tmp.path().join("ca"), TD).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(server::serve(
            ca.clone(),
            listener,
            Duration::from_secs(3600),
        ));
        Server {
            _tmp: tmp,
            ca,
            addr,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn token(&self) -> String {
        self.ca.token(ID, Duration::from_secs(300)).unwrap()
    }

    /// Send raw HTTP/1.1 over TLS; return (status, body).
    async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> (u16, String) {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca.bundle_pem().as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        // The server may answer (413) before reading the whole body.
        let _ = tls.write_all(body).await;
        let mut resp = Vec::new();
        let _ = tls.read_to_end(&mut resp).await;
        let resp = String::from_utf8_lossy(&resp).to_string();
        let status = resp
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect(&resp);
        let body = resp
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        (status, body)
    }
}

fn csr_asking_for(san: &str) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(san.try_into().unwrap()));
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri_sans(cert_pem: &str) -> Vec<String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => format!("non-URI {other:?}"),
        })
        .collect()
}

fn error_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).expect(body);
    v["error"].as_str().expect(body).to_string()
}

#[tokio::test]
async fn client_gets_a_certificate_for_the_token_identity() {
    let srv = Server::start().await;
    let issued = client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), &srv.token())
        .await
        .unwrap();
    assert_eq!(uri_sans(&issued.cert_chain_pem), vec![ID.to_string()]);
    assert_eq!(issued.bundle_pem, srv.ca.bundle_pem());
    assert_eq!(issued.serial_hex.len(), 32);
    assert!(issued.not_after > SystemTime::now() + Duration::from_secs(3500));
    let key = KeyPair::from_pem(&issued.key_pem).unwrap();
    let der = CertificateDer::from_pem_slice(issued.cert_chain_pem.as_bytes()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert!(!srv.task.is_finished());
}

#[tokio::test]
async fn the_ca_ignores_the_names_a_csr_asks_for() {
    let srv = Server::start().await;
    let csr = csr_asking_for("spiffe://example.org/ns/kube-system/sa/admin");
    let (status, body) = srv
        .raw(
            "POST",
            "/v1/certificate",
            Some(&srv.token()),
            csr.as_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        uri_sans(v["cert_chain_pem"].as_str().unwrap()),
        vec![ID.to_string()]
    );
    assert!(v["not_after_unix"].as_u64().unwrap() > 0);
    assert_eq!(v["serial"].as_str().unwrap().len(), 32);
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_ca_keeps_serving() {
    let srv = Server::start().await;
    let good_csr = csr_asking_for(ID);
    let path = "/v1/certificate";

    let (status, body) = srv
        .raw("POST", path, Some(&srv.token()), b"not a csr")
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error_of(&body).contains("certificate signing request"),
        "{body}"
    );

    let (status, body) = srv.raw("POST", path, None, good_csr.as_bytes()).await;
    assert_eq!(status, 401, "{body}");
    assert!(error_of(&body).contains("authorization"), "{body}");

    let other = Ca::init(&srv._tmp.path().join("other"), TD).unwrap();
    let forged = other.token(ID, Duration::from_secs(300)).unwrap();
    let (status, body) = srv
        .raw("POST", path, Some(&forged), good_csr.as_bytes())
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(error_of(&body).contains("not issued by this CA"), "{body}");

    // An expired token: minted by the same CA an hour ago for one minute.
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let expired = srv
        .ca
        .token_at(ID, Duration::from_secs(60), an_hour_ago)
        .unwrap();
    let (status, body) = srv
        .raw("POST", path, Some(&expired), good_csr.as_bytes())
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(error_of(&body).contains("expired"), "{body}");

    let (status, _) = srv
        .raw("POST", path, Some("garbage"), good_csr.as_bytes())
        .await;
    assert_eq!(status, 401);

    let (status, body) = srv.raw("GET", path, Some(&srv.token()), b"").await;
    assert_eq!(status, 405, "{body}");
    let (status, body) = srv.raw("POST", "/v2/other", Some(&srv.token()), b"").await;
    assert_eq!(status, 404, "{body}");
    let big = vec![b'a'; 100 * 1024];
    let (status, body) = srv.raw("POST", path, Some(&srv.token()), &big).await;
    assert_eq!(status, 413, "{body}");

    // Still serving.
    assert!(!srv.task.is_finished());
    let (status, body) = srv
        .raw("POST", path, Some(&srv.token()), good_csr.as_bytes())
        .await;
    assert_eq!(status, 200, "{body}");
    let issued = client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), &srv.token())
        .await
        .unwrap();
    assert_eq!(uri_sans(&issued.cert_chain_pem), vec![ID.to_string()]);
}

#[tokio::test]
async fn client_errors_carry_the_server_message() {
    let srv = Server::start().await;
    let other = Ca::init(&srv._tmp.path().join("other"), TD).unwrap();
    let forged = other.token(ID, Duration::from_secs(300)).unwrap();
    let err = client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), &forged)
        .await
        .unwrap_err();
    match &err {
        CaError::Rejected { status, message } => {
            assert_eq!(*status, 401);
            assert!(message.contains("not issued by this CA"), "{message}");
        }
        other => panic!("unexpected error {other}"),
    }

    // A client that trusts another root refuses the CA's serving certificate.
    let err = client::request_certificate(&srv.url(), &other.bundle_pem(), &srv.token())
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Connect { .. }), "{err}");

    let err =
        client::request_certificate(&format!("http://{}", srv.addr), &srv.ca.bundle_pem(), "t")
            .await
            .unwrap_err();
    assert!(matches!(err, CaError::BadUrl { .. }), "{err}");

    // "localhost" is one of the serving certificate's names too.
    let url = format!("https://localhost:{}", srv.addr.port());
    client::request_certificate(&url, &srv.ca.bundle_pem(), &srv.token())
        .await
        .unwrap();
}
