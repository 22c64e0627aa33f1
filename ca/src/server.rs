//! The CA's HTTPS endpoint: `POST /v1/certificate` with a join token as
//! bearer credential and a PEM CSR as body; answers with a leaf for the
//! token's identity. TLS 1.3 only, served with a certificate issued by the
//! root at start and renewed while serving.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::{leaf, Ca, CaError};

/// The only endpoint.
pub const CERTIFICATE_PATH: &str = "/v1/certificate";
/// A P-256 CSR is well under 1 KiB; anything this large is not one.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// TLS handshake plus the whole request must finish within this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The serving certificate lives this long and is renewed at half-life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The 200 answer to `POST /v1/certificate`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct CertificateResponse {
    pub cert_chain_pem: String,
    pub bundle_pem: String,
    pub not_after_unix: u64,
    pub serial: String,
}

/// The body of every non-200 answer.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

/// Serve CSR signing over HTTPS on an already-bound listener until the task
/// is dropped/aborted. Leaves are valid for `leaf_ttl`.
pub async fn serve(ca: Arc<Ca>, listener: TcpListener, leaf_ttl: Duration) -> Result<(), CaError> {
    let local = listener
        .local_addr()
        .map_err(|e| CaError::Internal(format!("listener has no local address: {e}")))?;
    let resolver = Arc::new(ServingCert {
        current: RwLock::new(serving_cert(&ca, local.ip())?),
    });
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CaError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));

    // Dropping this future drops the set, which aborts every connection task.
    let mut connections = JoinSet::new();
    let mut renew = tokio::time::interval(SERVING_CERT_TTL / 2);
    renew.tick().await; // the first tick is immediate
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let acceptor = acceptor.clone();
                    let ca = ca.clone();
                    connections.spawn(async move {
                        let conn = serve_connection(ca, acceptor, tcp, peer, leaf_ttl);
                        if tokio::time::timeout(CONNECTION_TIMEOUT, conn).await.is_err() {
                            tracing::debug!(%peer, "connection timed out");
                        }
                    });
                }
                Err(e) => {
                    // Usually out of file descriptors: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = renew.tick() => match serving_cert(&ca, local.ip()) {
                Ok(cert) => {
                    if let Ok(mut current) = resolver.current.write() {
                        *current = cert;
                    }
                    tracing::info!("renewed the CA's serving certificate");
                }
                Err(e) => tracing::error!(error = %e, "could not renew the serving certificate"),
            },
        }
    }
}

async fn serve_connection(
    ca: Arc<Ca>,
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    leaf_ttl: Duration,
) {
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| {
        let ca = ca.clone();
        async move { Ok::<_, Infallible>(handle(&ca, req, peer, leaf_ttl).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Answer one request; never fails (errors become JSON responses).
async fn handle(
    ca: &Ca,
    req: Request<Incoming>,
    peer: SocketAddr,
    leaf_ttl: Duration,
) -> Response<Full<Bytes>> {
    match issue_for_request(ca, req, leaf_ttl).await {
        Ok((body, id)) => {
            tracing::info!(%peer, spiffe_id = %id, serial = %body.serial, "issued certificate");
            json_response(StatusCode::OK, &body)
        }
        Err((status, message)) => {
            tracing::info!(%peer, status = status.as_u16(), error = %message, "refused request");
            let mut resp = json_response(status, &ErrorResponse { error: message });
            if status == StatusCode::METHOD_NOT_ALLOWED {
                resp.headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            }
            resp
        }
    }
}

type Refusal = (StatusCode, String);

fn refuse(e: CaError) -> Refusal {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, e.to_string())
}

async fn issue_for_request(
    ca: &Ca,
    req: Request<Incoming>,
    leaf_ttl: Duration,
) -> Result<(CertificateResponse, String), Refusal> {
    if req.uri().path() != CERTIFICATE_PATH {
        return Err((
            StatusCode::NOT_FOUND,
            format!(
                "no such endpoint {}; POST a CSR to {CERTIFICATE_PATH}",
                req.uri().path()
            ),
        ));
    }
    if req.method() != Method::POST {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{CERTIFICATE_PATH} only accepts POST"),
        ));
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or_else(|| refuse(CaError::MissingToken))?;
    let id = ca.verify_token(token).map_err(refuse)?;

    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than {MAX_BODY_BYTES} bytes; send just the PEM CSR"
            ),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("could not read the request body: {e}"),
            ))
        }
    };
    let csr = std::str::from_utf8(&body).map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "the body must be a PEM CSR (text)".to_string(),
        )
    })?;
    let issued = ca.sign_csr(csr, &id, leaf_ttl).map_err(refuse)?;
    let not_after_unix = issued
        .not_after
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok((
        CertificateResponse {
            cert_chain_pem: issued.cert_chain_pem,
            bundle_pem: issued.bundle_pem,
            not_after_unix,
            serial: issued.serial_hex,
        },
        id.to_string(),
    ))
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let json =
        serde_json::to_vec(body).unwrap_or_else(|_| b"{\"error\":\"internal error\"}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(json)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Hands rustls the current serving certificate; swapped on renewal.
#[derive(Debug)]
struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

/// Issue the CA's own TLS certificate: names localhost, the loopback
/// addresses and the address we listen on.
fn serving_cert(ca: &Ca, listen_ip: IpAddr) -> Result<Arc<CertifiedKey>, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let now = time::OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "weft-ca");
    params.distinguished_name = dn;
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    if !listen_ip.is_unspecified() && !ips.contains(&listen_ip) {
        ips.push(listen_ip);
    }
    params.subject_alt_names = vec![SanType::DnsName(
        "localhost"
            .try_into()
            .map_err(|e| CaError::Internal(format!("{e}")))?,
    )];
    params
        .subject_alt_names
        .extend(ips.into_iter().map(SanType::IpAddress));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.serial_number = Some(leaf::random_serial()?.0);
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = (now + SERVING_CERT_TTL).min(ca.root_not_after);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer)?;

    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    CertifiedKey::from_der(chain, key_der, &provider)
        .map(Arc::new)
        .map_err(|e| CaError::Tls(e.to_string()))
}
