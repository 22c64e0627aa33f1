//! Helpers shared by the CA's integration tests: a CA serving on
//! 127.0.0.1:0, raw HTTPS requests (optionally with a client certificate),
//! and leaves signed directly with a CA directory's key to make expired,
//! not-yet-valid or oddly named certificates.

// Each test file uses a different subset.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_ca::server::{self, ServeOptions};
use weft_ca::{Ca, CaError};
use x509_parser::extensions::GeneralName;

pub const TD: &str = "example.org";
pub const ID: &str = "spiffe://example.org/ns/default/sa/payment";

pub struct Server {
    pub tmp: tempfile::TempDir,
    pub ca: Arc<Ca>,
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<Result<(), CaError>>,
}

impl Server {
    /// A new root CA serving with default options and 1 h leaves.
    pub async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    /// A new root CA serving with options adjusted by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut ServeOptions)) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::init(&tmp.path().join("ca"), TD).unwrap());
        let mut opts = ServeOptions::new(Duration::from_secs(3600));
        adjust(&mut opts);
        Server::serve(tmp, ca, opts).await
    }

    /// Serve `ca` (kept alive with `tmp`) with `opts`.
    pub async fn serve(tmp: tempfile::TempDir, ca: Arc<Ca>, opts: ServeOptions) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(server::serve_with(ca.clone(), listener, opts));
        Server {
            tmp,
            ca,
            addr,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn token(&self) -> String {
        self.ca.token(ID, Duration::from_secs(300)).unwrap()
    }

    /// POST a fresh CSR to /v1/certificate.
    pub async fn post_csr(&self, bearer: Option<&str>, client: Option<(&str, &str)>) -> Answer {
        let auth = bearer.map(|t| ("authorization", format!("Bearer {t}")));
        raw_request(
            self.addr,
            &self.ca.bundle_pem(),
            client,
            "POST",
            "/v1/certificate",
            auth.as_slice(),
            new_csr().as_bytes(),
        )
        .await
    }
}

/// A parsed HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `error` of a JSON error body.
    pub fn error(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body).expect(&self.body);
        v["error"].as_str().expect(&self.body).to_string()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect(&self.body)
    }
}

/// TLS client config trusting `bundle_pem`, presenting `client` (chain PEM,
/// key PEM) if given.
pub fn client_config(bundle_pem: &str, client: Option<(&str, &str)>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    match client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    }
}

/// Send one raw HTTP/1.1 request over TLS and read the answer.
pub async fn raw_request(
    addr: SocketAddr,
    bundle_pem: &str,
    client: Option<(&str, &str)>,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Answer {
    let config = client_config(bundle_pem, client);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    tls.write_all(head.as_bytes()).await.unwrap();
    // The server may answer before reading the whole body.
    let _ = tls.write_all(body).await;
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp).await;
    let resp = String::from_utf8_lossy(&resp).to_string();
    let (head, body) = resp.split_once("\r\n\r\n").expect(&resp);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect(&resp);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// A PEM CSR for a new P-256 key.
pub fn new_csr() -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

/// What a forged leaf looks like.
pub struct LeafSpec<'a> {
    pub uris: &'a [&'a str],
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
    pub client_auth: bool,
}

impl Default for LeafSpec<'_> {
    fn default() -> Self {
        let now = time::OffsetDateTime::now_utc();
        LeafSpec {
            uris: &[ID],
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::hours(1),
            client_auth: true,
        }
    }
}

/// Sign a leaf with the key in CA directory `dir` (chain PEM, key PEM).
/// The chain includes the CA certificate when it is an intermediate.
pub fn forge_leaf(dir: &Path, spec: LeafSpec<'_>) -> (String, String) {
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca-key.pem")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = spec
        .uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if spec.client_auth {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ServerAuth]
    };
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ca.json")).unwrap()).unwrap();
    let mut chain = cert.pem();
    if config["kind"] == "intermediate" {
        chain.push_str(&ca_pem);
    }
    (chain, key.serialize_pem())
}

/// The URI SANs of the first certificate of `pem`.
pub fn uri_sans(pem: &str) -> Vec<String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
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

/// The number of certificates in `pem`.
pub fn count_certs(pem: &str) -> usize {
    CertificateDer::pem_slice_iter(pem.as_bytes()).count()
}

/// The public key of the first certificate of `pem`.
pub fn leaf_public_key(pem: &str) -> Vec<u8> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.public_key().subject_public_key.data.to_vec()
}
