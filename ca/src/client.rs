//! What a sidecar uses to get a certificate: generate a P-256 key locally,
//! send a CSR with a join token to `weft-ca serve`, and return the leaf with
//! the key (the key never leaves this process).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

use crate::server::{CertificateResponse, ErrorResponse, CERTIFICATE_PATH};
use crate::{CaError, IssuedCert};

/// The whole exchange (connect, handshake, request, response) must finish
/// within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the response we are willing to buffer.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Generate a P-256 key locally, build a CSR, POST it to the CA with the
/// token; the key never leaves. `ca_url` like "https://127.0.0.1:8443";
/// `ca_bundle_pem` verifies the CA's serving certificate.
pub async fn request_certificate(
    ca_url: &str,
    ca_bundle_pem: &str,
    token: &str,
) -> Result<IssuedCert, CaError> {
    tokio::time::timeout(REQUEST_TIMEOUT, request(ca_url, ca_bundle_pem, token))
        .await
        .map_err(|_| CaError::Timeout(REQUEST_TIMEOUT))?
}

/// Aborts the spawned connection driver when the request is done or dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn request(ca_url: &str, ca_bundle_pem: &str, token: &str) -> Result<IssuedCert, CaError> {
    let bad_url = |reason: &str| CaError::BadUrl {
        url: ca_url.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = ca_url.parse().map_err(|e| bad_url(&format!("{e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad_url("the CA is only reachable over https://"));
    }
    let host = uri.host().ok_or_else(|| bad_url("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let server_name =
        ServerName::try_from(host.clone()).map_err(|e| bad_url(&format!("bad host: {e}")))?;
    let base = uri.path().trim_end_matches('/');
    let path = format!("{base}{CERTIFICATE_PATH}");

    let connector = TlsConnector::from(Arc::new(client_config(ca_bundle_pem)?));

    // The key and CSR: only the public half goes out.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let connect_err = |reason: String| CaError::Connect {
        url: ca_url.to_string(),
        reason,
    };
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let tls = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| connect_err(format!("TLS handshake failed: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "CA connection ended with an error");
        }
    }));

    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_else(|| host.clone());
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, authority)
        .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
        .header(header::CONTENT_TYPE, "application/pkcs10")
        .body(Full::new(Bytes::from(csr_pem)))
        .map_err(|e| CaError::Internal(format!("could not build the request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| connect_err(format!("request failed: {e}")))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| CaError::BadResponse(format!("could not read the body: {e}")))?
        .to_bytes();

    if status != StatusCode::OK {
        let message = serde_json::from_slice::<ErrorResponse>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(500).collect());
        return Err(CaError::Rejected {
            status: status.as_u16(),
            message,
        });
    }
    let answer: CertificateResponse = serde_json::from_slice(&body)
        .map_err(|e| CaError::BadResponse(format!("not the expected JSON: {e}")))?;
    check_leaf_key(&answer.cert_chain_pem, &key)?;
    Ok(IssuedCert {
        cert_chain_pem: answer.cert_chain_pem,
        key_pem: key.serialize_pem(),
        bundle_pem: answer.bundle_pem,
        not_after: UNIX_EPOCH
            .checked_add(Duration::from_secs(answer.not_after_unix))
            .unwrap_or(SystemTime::UNIX_EPOCH),
        serial_hex: answer.serial,
    })
}

/// TLS 1.3 client trusting only the roots of `bundle_pem`.
fn client_config(bundle_pem: &str) -> Result<rustls::ClientConfig, CaError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        let cert = cert.map_err(|e| CaError::BadBundle(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| CaError::BadBundle(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(CaError::BadBundle(
            "no certificate in it; pass the CA's bundle.pem / ca.pem".to_string(),
        ));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CaError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The CA must have certified our key, not some other one.
fn check_leaf_key(cert_pem: &str, key: &KeyPair) -> Result<(), CaError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| CaError::BadResponse(format!("the certificate is not PEM: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CaError::BadResponse(format!("the certificate does not parse: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::BadResponse(
            "the certificate does not carry our public key".to_string(),
        ));
    }
    Ok(())
}
