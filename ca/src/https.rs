//! One HTTPS POST over a fresh connection, shared by the sidecar's client
//! (to the CA) and the CA's TokenReview calls (to the Kubernetes API
//! server). No pooling: both are rare (once per renewal).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// Where to connect, from an `https://host[:port][/prefix]` URL.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    authority: String,
    /// The URL's path without a trailing '/', prepended to request paths.
    prefix: String,
}

impl Target {
    /// Parse `url`; only `https://` is accepted.
    pub(crate) fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err("only https:// URLs are accepted".to_string());
        }
        let host = uri.host().ok_or("no host")?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| format!("bad host: {e}"))?;
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| host.clone());
        Ok(Target {
            host,
            port,
            server_name,
            authority,
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// Why a POST failed.
#[derive(Debug)]
pub(crate) enum PostError {
    /// No connection, no TLS session, or no response.
    Connect(String),
    /// A response arrived but its body could not be read.
    Body(String),
}

/// Aborts the spawned connection driver when the request is done or dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// POST `body` to `path` (after the target's prefix) over TLS with
/// `config`; return the status and at most `max_response` bytes of body.
/// The caller bounds the whole exchange with a timeout.
pub(crate) async fn post(
    target: &Target,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(header::HeaderName, String)],
    body: Bytes,
    max_response: usize,
) -> Result<(StatusCode, Bytes), PostError> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| PostError::Connect(e.to_string()))?;
    let tls = TlsConnector::from(config)
        .connect(target.server_name.clone(), tcp)
        .await
        .map_err(|e| PostError::Connect(format!("TLS handshake failed: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| PostError::Connect(e.to_string()))?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HTTPS connection ended with an error");
        }
    }));

    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("{}{path}", target.prefix))
        .header(header::HOST, target.authority.as_str())
        .body(Full::new(body))
        .map_err(|e| PostError::Connect(format!("could not build the request: {e}")))?;
    for (name, value) in headers {
        let value = HeaderValue::from_str(value)
            .map_err(|_| PostError::Connect(format!("the {name} header is not valid text")))?;
        req.headers_mut().insert(name.clone(), value);
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| PostError::Connect(format!("request failed: {e}")))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), max_response)
        .collect()
        .await
        .map_err(|e| PostError::Body(format!("could not read the body: {e}")))?
        .to_bytes();
    Ok((status, body))
}

/// The certificates of `pem` as trust anchors; at least one.
pub(crate) fn roots_from_pem(pem: &str) -> Result<rustls::RootCertStore, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| e.to_string())?;
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate in it".to_string());
    }
    Ok(roots)
}
