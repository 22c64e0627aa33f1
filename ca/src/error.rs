//! The one error type of the CA library: every message says what was wrong
//! and, where the user can fix it, what to do.

use std::path::{Path, PathBuf};

use weft_transport::spiffe::SpiffeError;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("a CA already exists in {0}; refusing to overwrite it (use another --dir, or load the existing CA)")]
    AlreadyExists(PathBuf),
    #[error("no CA in {dir}: {file} is missing; create one with `weft-ca init --dir {dir} --trust-domain <TD>`", dir = .dir.display())]
    NotACa { dir: PathBuf, file: &'static str },
    #[error("could not {action} {path}: {source}", path = .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {reason}; restore it from a backup or create a new CA", path = .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("invalid trust domain {trust_domain:?}: {source}")]
    InvalidTrustDomain {
        trust_domain: String,
        #[source]
        source: SpiffeError,
    },
    #[error("invalid SPIFFE ID {id:?}: {source} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<account>)")]
    InvalidSpiffeId {
        id: String,
        #[source]
        source: SpiffeError,
    },
    #[error("{id} is outside this CA's trust domain {trust_domain}; use an ID of the form spiffe://{trust_domain}/...")]
    ForeignIdentity { id: String, trust_domain: String },
    #[error("invalid TTL: {0}")]
    InvalidTtl(String),
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    #[error("malformed join token: {0}; pass the token exactly as `weft-ca token` printed it")]
    MalformedToken(String),
    #[error("token was not issued by this CA; mint one with `weft-ca token` against this CA's directory")]
    ForgedToken,
    #[error("token expired at {at}; mint a new one with `weft-ca token`")]
    ExpiredToken { at: String },
    #[error("missing `authorization: Bearer <token>` header; mint a token with `weft-ca token`")]
    MissingToken,
    #[error("no credential: send `authorization: Bearer <join token or Kubernetes service-account token>`, or renew by presenting your current certificate as the TLS client certificate")]
    MissingCredential,
    #[error("this single-use join token has already been redeemed; mint a new one with `weft-ca token --single-use`")]
    TokenAlreadyUsed,
    #[error("the client certificate cannot be used to renew: {0}; get a new certificate with a join token or service-account token")]
    BadClientCert(String),
    #[error("your current certificate or key cannot be presented: {0}; pass the cert_chain_pem and key_pem of your last IssuedCert")]
    BadCredentials(String),
    #[error("too many requests for {credential}; retry in {retry_after_secs} s")]
    RateLimited {
        credential: String,
        retry_after_secs: u64,
    },
    #[error("the Kubernetes service-account token was not accepted: {0}")]
    KubernetesUnauthenticated(String),
    #[error("{0}")]
    KubernetesForbidden(String),
    #[error("cannot check the service-account token with the Kubernetes API server: {0}; the request can be retried")]
    KubernetesUnavailable(String),
    #[error("{path} may be read by group or others (mode {mode:o}); run `chmod 600 {path}` (in Kubernetes, mount the Secret with defaultMode: 0440 and set the pod's fsGroup to the container's runAsGroup, or 0400 for a root container)", path = .path.display())]
    InsecureFile { path: PathBuf, mode: u32 },
    #[error("invalid trust bundle change: {0}")]
    Trust(String),
    #[error("invalid serving certificate name {name:?}: {reason}; pass a DNS name (weft-ca.weft-system.svc) or an IP address")]
    InvalidSan { name: String, reason: String },
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("invalid CA URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid CA trust bundle: {0}")]
    BadBundle(String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("could not reach the CA at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the CA refused the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("the CA sent a response we cannot use: {0}")]
    BadResponse(String),
    #[error(
        "the CA did not answer within {0:?}; check that weft-ca serve is running and reachable"
    )]
    Timeout(std::time::Duration),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CaError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        CaError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, reason: impl std::fmt::Display) -> Self {
        CaError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }

    /// The HTTP status the CA server answers with for this error.
    pub(crate) fn http_status(&self) -> u16 {
        match self {
            CaError::BadCsr(_) => 400,
            CaError::MalformedToken(_)
            | CaError::ForgedToken
            | CaError::ExpiredToken { .. }
            | CaError::MissingToken
            | CaError::MissingCredential
            | CaError::TokenAlreadyUsed
            | CaError::BadClientCert(_)
            | CaError::KubernetesUnauthenticated(_)
            | CaError::InvalidSpiffeId { .. } => 401,
            CaError::ForeignIdentity { .. } | CaError::KubernetesForbidden(_) => 403,
            CaError::RateLimited { .. } => 429,
            CaError::KubernetesUnavailable(_) => 503,
            CaError::Rejected { status, .. } => *status,
            _ => 500,
        }
    }
}
