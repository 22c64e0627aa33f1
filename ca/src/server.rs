//! The CA's HTTPS endpoint: `POST /v1/certificate` with a PEM CSR as body
//! and one credential — a join token or (with Kubernetes enabled) a
//! projected service-account token as bearer, or the current certificate as
//! TLS client certificate to renew — answered with a leaf for the
//! credential's identity. TLS 1.3 only, served with a certificate issued by
//! the CA at start and renewed while serving.
//!
//! Each request: refresh the trust bundle if its file changed →
//! authenticate → rate-limit per credential → read and check the CSR →
//! redeem a single-use token → sign → one audit line (issued or refused).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use weft_transport::spiffe::SpiffeId;

use crate::audit::{self, Credential};
use crate::k8s::{self, KubernetesConfig};
use crate::peer::{self, OptionalClientCert};
use crate::ratelimit::{retry_after_secs, RateLimit, RateLimiter};
use crate::{leaf, token, Ca, CaError};

/// The only endpoint.
pub const CERTIFICATE_PATH: &str = "/v1/certificate";
/// A P-256 CSR is well under 1 KiB; anything this large is not one.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// TLS handshake plus the whole request must finish within this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The serving certificate lives this long and is renewed at half-life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// TokenReviews in flight at once. Each costs the API server work and
/// anyone can send a bearer; beyond this, requests wait (and time out)
/// rather than pile onto the API server.
const MAX_CONCURRENT_REVIEWS: usize = 16;

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

/// How `weft-ca serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Validity of the leaves issued.
    pub leaf_ttl: Duration,
    /// Extra names on the serving certificate (DNS names or IP addresses),
    /// besides localhost, the loopback addresses and the listen address.
    pub extra_sans: Vec<String>,
    /// Per-credential request limit.
    pub rate_limit: RateLimit,
    /// Accept Kubernetes service-account tokens, checked with TokenReview.
    pub kubernetes: Option<KubernetesConfig>,
}

impl ServeOptions {
    /// Defaults: no extra names, the default rate limit, no Kubernetes.
    pub fn new(leaf_ttl: Duration) -> Self {
        ServeOptions {
            leaf_ttl,
            extra_sans: Vec::new(),
            rate_limit: RateLimit::default(),
            kubernetes: None,
        }
    }

    /// Check the options without serving.
    pub fn validate(&self) -> Result<(), CaError> {
        if self.leaf_ttl.is_zero() {
            return Err(CaError::InvalidTtl(
                "--ttl must be longer than zero".to_string(),
            ));
        }
        self.rate_limit.validate().map_err(CaError::InvalidOption)?;
        parse_sans(&self.extra_sans)?;
        Ok(())
    }
}

/// Serve with [`ServeOptions::new`]`(leaf_ttl)`.
pub async fn serve(ca: Arc<Ca>, listener: TcpListener, leaf_ttl: Duration) -> Result<(), CaError> {
    serve_with(ca, listener, ServeOptions::new(leaf_ttl)).await
}

/// Everything a request handler needs.
struct Shared {
    ca: Arc<Ca>,
    opts: ServeOptions,
    provider: Arc<CryptoProvider>,
    limiter: Mutex<RateLimiter>,
    reviews: Semaphore,
}

/// Serve CSR signing over HTTPS on an already-bound listener until the task
/// is dropped/aborted. Fails at once on invalid options.
pub async fn serve_with(
    ca: Arc<Ca>,
    listener: TcpListener,
    opts: ServeOptions,
) -> Result<(), CaError> {
    opts.validate()?;
    let extra_sans = parse_sans(&opts.extra_sans)?;
    let local = listener
        .local_addr()
        .map_err(|e| CaError::Internal(format!("listener has no local address: {e}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let resolver = Arc::new(ServingCert {
        current: RwLock::new(serving_cert(&ca, &provider, local.ip(), &extra_sans)?),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CaError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(OptionalClientCert {
            provider: provider.clone(),
        }))
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every renewal is a full handshake: the key behind a client
    // certificate is proven each time.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let shared = Arc::new(Shared {
        limiter: Mutex::new(RateLimiter::new(opts.rate_limit)),
        reviews: Semaphore::new(MAX_CONCURRENT_REVIEWS),
        ca,
        opts,
        provider,
    });

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
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let conn = serve_connection(shared, acceptor, tcp, peer);
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
            _ = renew.tick() => match serving_cert(&shared.ca, &shared.provider, local.ip(), &extra_sans) {
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

/// The client certificate chain of a connection, if one was presented.
type ClientChain = Option<Arc<Vec<CertificateDer<'static>>>>;

async fn serve_connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    let chain: ClientChain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| Arc::new(certs.iter().map(|c| c.clone().into_owned()).collect()));
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let chain = chain.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req, peer, chain).await) }
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

/// Why a request was refused.
struct Refusal {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: StatusCode, message: String) -> Self {
        Refusal {
            status,
            message,
            retry_after: None,
        }
    }
}

impl From<CaError> for Refusal {
    fn from(e: CaError) -> Self {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = match &e {
            CaError::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        Refusal {
            status,
            message: e.to_string(),
            retry_after,
        }
    }
}

/// What the audit line says about a request, filled in as it progresses.
struct Context {
    credential: Credential,
    identity: Option<SpiffeId>,
}

/// An issued certificate and what the audit line needs.
struct Issued {
    body: CertificateResponse,
    not_after: SystemTime,
}

/// Answer one request; never fails (errors become JSON responses).
async fn handle(
    shared: &Shared,
    req: Request<Incoming>,
    peer: SocketAddr,
    chain: ClientChain,
) -> Response<Full<Bytes>> {
    if let Err(e) = shared.ca.refresh_bundle() {
        tracing::error!(error = %e, "the trust bundle changed but cannot be used; keeping the previous one");
    }
    let mut ctx = Context {
        credential: Credential::None,
        identity: None,
    };
    match issue_for_request(shared, req, chain, &mut ctx).await {
        Ok(issued) => {
            let identity = ctx.identity.as_ref().map(|i| i.as_str()).unwrap_or("");
            audit::issued(
                ctx.credential,
                identity,
                &issued.body.serial,
                issued.not_after,
                peer,
            );
            json_response(StatusCode::OK, &issued.body)
        }
        Err(refusal) => {
            audit::refused(
                ctx.credential,
                ctx.identity.as_ref().map(|i| i.as_str()),
                refusal.status.as_u16(),
                &refusal.message,
                peer,
            );
            let mut resp = json_response(
                refusal.status,
                &ErrorResponse {
                    error: refusal.message,
                },
            );
            if refusal.status == StatusCode::METHOD_NOT_ALLOWED {
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            if let Some(secs) = refusal.retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            resp
        }
    }
}

async fn issue_for_request(
    shared: &Shared,
    req: Request<Incoming>,
    chain: ClientChain,
    ctx: &mut Context,
) -> Result<Issued, Refusal> {
    if req.uri().path() != CERTIFICATE_PATH {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!(
                "no such endpoint {}; POST a CSR to {CERTIFICATE_PATH}",
                req.uri().path()
            ),
        ));
    }
    if req.method() != Method::POST {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{CERTIFICATE_PATH} only accepts POST"),
        ));
    }
    let ca = &shared.ca;

    // Authenticate: a bearer wins over a client certificate (it is the
    // explicit choice of the client).
    let bearer = bearer_of(&req);
    let mut join_token = None;
    let rate_key = match (bearer, &shared.opts.kubernetes, chain) {
        (Some(bearer), Some(k8s), _) if !token::is_join_token(bearer) => {
            ctx.credential = Credential::Kubernetes;
            let account = {
                let _permit = shared.reviews.acquire().await.map_err(|_| {
                    CaError::KubernetesUnavailable("the CA is shutting down".to_string())
                })?;
                k8s::review(k8s, bearer).await?
            };
            let id = ca.parse_id(&format!(
                "spiffe://{}/ns/{}/sa/{}",
                ca.trust_domain(),
                account.namespace,
                account.name
            ))?;
            ctx.identity = Some(id);
            format!("kubernetes:{}/{}", account.namespace, account.name)
        }
        (Some(bearer), _, _) => {
            ctx.credential = Credential::JoinToken;
            let token = ca.check_join_token(bearer, SystemTime::now())?;
            ctx.identity = Some(token.id.clone());
            let key = format!("join-token:{}", token.nonce);
            join_token = Some(token);
            key
        }
        (None, _, Some(chain)) => {
            ctx.credential = Credential::Certificate;
            let id = peer::verify_renewal_chain(
                &shared.provider,
                &chain,
                &ca.bundle().roots,
                ca.trust_domain(),
                UnixTime::now(),
            )?;
            let key = format!("certificate:{id}");
            ctx.identity = Some(id);
            key
        }
        (None, _, None) => return Err(CaError::MissingCredential.into()),
    };
    let Some(id) = ctx.identity.clone() else {
        return Err(CaError::Internal("no identity after authentication".to_string()).into());
    };

    let allowed = match shared.limiter.lock() {
        Ok(mut limiter) => limiter.check(&rate_key),
        Err(poisoned) => poisoned.into_inner().check(&rate_key),
    };
    if let Err(wait) = allowed {
        return Err(CaError::RateLimited {
            credential: format!("{} {id}", ctx.credential.as_str()),
            retry_after_secs: retry_after_secs(wait),
        }
        .into());
    }

    let csr = read_body(req).await?;
    let public_key = leaf::csr_public_key(&csr)?;
    if let Some(token) = &join_token {
        ca.redeem(token, SystemTime::now())?;
    }
    let issued = ca.sign_leaf(&id, &public_key, shared.opts.leaf_ttl)?;
    let not_after_unix = issued
        .not_after
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Issued {
        not_after: issued.not_after,
        body: CertificateResponse {
            cert_chain_pem: issued.cert_chain_pem,
            bundle_pem: issued.bundle_pem,
            not_after_unix,
            serial: issued.serial_hex,
        },
    })
}

/// The bearer credential of `Authorization`, if any.
fn bearer_of(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The body as text, at most [`MAX_BODY_BYTES`].
async fn read_body(req: Request<Incoming>) -> Result<String, Refusal> {
    let too_large = || {
        Refusal::new(
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
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("could not read the request body: {e}"),
            ))
        }
    };
    String::from_utf8(body.to_vec()).map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "the body must be a PEM CSR (text)".to_string(),
        )
    })
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let json =
        serde_json::to_vec(body).unwrap_or_else(|_| b"{\"error\":\"internal error\"}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(json)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
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

/// Parse `--san` values: an IP address, else a DNS name.
fn parse_sans(names: &[String]) -> Result<Vec<SanType>, CaError> {
    names
        .iter()
        .map(|name| {
            let bad = |reason: String| CaError::InvalidSan {
                name: name.clone(),
                reason,
            };
            if let Ok(ip) = name.parse::<IpAddr>() {
                return Ok(SanType::IpAddress(ip));
            }
            rustls_pki_types::DnsName::try_from(name.as_str()).map_err(|e| bad(e.to_string()))?;
            let ia5 = name
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| bad(e.to_string()))?;
            Ok(SanType::DnsName(ia5))
        })
        .collect()
}

/// Issue the CA's own TLS certificate: names localhost, the loopback
/// addresses, the address we listen on and `extra` (`--san`). Sent with
/// the intermediate when the CA is one.
fn serving_cert(
    ca: &Ca,
    provider: &CryptoProvider,
    listen_ip: IpAddr,
    extra: &[SanType],
) -> Result<Arc<CertifiedKey>, CaError> {
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
    for san in extra {
        if !params.subject_alt_names.contains(san) {
            params.subject_alt_names.push(san.clone());
        }
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.serial_number = Some(leaf::random_serial()?.0);
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = (now + SERVING_CERT_TTL).min(ca.not_after);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer)?;

    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut chain = vec![CertificateDer::from(cert.der().to_vec())];
    chain.extend(ca.chain_tail.iter().cloned());
    CertifiedKey::from_der(chain, key_der, provider)
        .map(Arc::new)
        .map_err(|e| CaError::Tls(e.to_string()))
}
