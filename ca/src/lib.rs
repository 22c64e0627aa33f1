//! The Weft certificate authority: a root (or an intermediate signed by an
//! offline root) kept in a directory, SPIFFE leaf certificates issued from
//! it (locally or from a CSR), join tokens that bind a sidecar to one
//! identity, and the trust bundle handed out with every certificate.
//!
//! [`Ca`] is the loaded CA; [`server::serve`] signs CSRs over HTTPS (join
//! tokens, Kubernetes service-account tokens, or the current certificate
//! for renewal) and [`client::request_certificate`] /
//! [`client::renew_certificate`] are what a sidecar calls to get and renew a
//! certificate without its key ever leaving it.

mod audit;
mod bundle;
pub mod client;
mod error;
mod files;
mod https;
mod intermediate;
pub mod k8s;
mod leaf;
mod peer;
pub mod ratelimit;
pub mod server;
mod token;
mod used;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use weft_transport::spiffe::{validate_trust_domain, SpiffeId};

pub use audit::AUDIT_TARGET;
pub use bundle::describe as describe_certificate;
pub use error::CaError;
pub use intermediate::DEFAULT_INTERMEDIATE_TTL;
pub use leaf::IssuedCert;
pub use used::USED_TOKENS_FILE;

use bundle::{Bundle, BundleState};
use used::UsedTokens;

/// The CA's own certificate, PEM: the root, or for an intermediate CA the
/// intermediate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key, PEM (PKCS#8), mode 0600.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// CA settings (the trust domain, root or intermediate), JSON.
pub const CA_CONFIG_FILE: &str = "ca.json";
/// 32 random bytes: the HMAC-SHA256 key for join tokens, mode 0600.
pub const TOKEN_KEY_FILE: &str = "token.key";
/// The trust bundle, holding one or more roots (several during a root
/// rotation). Optional for a root CA (then the bundle is `ca.pem` alone),
/// required for an intermediate (which is not a root itself).
pub const BUNDLE_FILE: &str = "bundle.pem";

/// Root validity: ten years (a root is rotated by adding a new one to the
/// bundle long before this runs out).
const ROOT_VALIDITY: time::Duration = time::Duration::days(3650);

/// Whether a CA directory holds a self-signed root or an intermediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaKind {
    /// Directories written before intermediates existed say nothing: roots.
    #[default]
    Root,
    Intermediate,
}

/// The on-disk CA settings.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaConfig {
    trust_domain: String,
    #[serde(default)]
    kind: CaKind,
}

/// A loaded CA: signing certificate and key, trust domain, token secret,
/// trust bundle and the single-use tokens already redeemed.
pub struct Ca {
    dir: PathBuf,
    trust_domain: String,
    kind: CaKind,
    issuer: Issuer<'static, KeyPair>,
    /// Sent after every leaf: nothing for a root, the intermediate's
    /// certificate for an intermediate (peers hold only roots).
    chain_tail: Vec<CertificateDer<'static>>,
    /// The signing certificate's expiry: no leaf may outlive it.
    not_after: OffsetDateTime,
    /// The bundle root our signing certificate chains to (itself for a root).
    own_root: CertificateDer<'static>,
    bundle: RwLock<BundleState>,
    token_key: [u8; token::KEY_LEN],
    used_tokens: Mutex<UsedTokens>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A join token that verified.
#[derive(Debug, Clone)]
pub(crate) struct JoinToken {
    pub(crate) id: SpiffeId,
    pub(crate) nonce: String,
    pub(crate) exp: u64,
    pub(crate) single_use: bool,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Ca {
    /// Create a new root CA in `dir` (created if missing) for `trust_domain`.
    /// Refuses if `dir` already holds any CA file.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        validate_trust_domain(trust_domain).map_err(|source| CaError::InvalidTrustDomain {
            trust_domain: trust_domain.to_string(),
            source,
        })?;
        refuse_existing(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| CaError::io("create directory", dir, e))?;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Weft root CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + ROOT_VALIDITY;
        params.serial_number = Some(leaf::random_serial()?.0);
        let cert = params.self_signed(&key)?;
        write_ca_dir(dir, trust_domain, CaKind::Root, &key, &cert.pem(), None)?;
        Ca::load(dir)
    }

    /// Load the CA kept in `dir` by [`Ca::init`] or
    /// [`Ca::create_intermediate`].
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let config_path = dir.join(CA_CONFIG_FILE);
        let config: CaConfig = serde_json::from_str(&files::read_ca_file(dir, CA_CONFIG_FILE)?)
            .map_err(|e| CaError::corrupt(&config_path, e))?;
        validate_trust_domain(&config.trust_domain)
            .map_err(|e| CaError::corrupt(&config_path, e))?;

        let cert_path = dir.join(CA_CERT_FILE);
        let cert_pem = files::read_ca_file(dir, CA_CERT_FILE)?;
        let key_path = dir.join(CA_KEY_FILE);
        let key_pem = files::read_ca_file(dir, CA_KEY_FILE)?;
        files::check_private(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::corrupt(&key_path, e))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::corrupt(&cert_path, e))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CaError::corrupt(&cert_path, e))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::corrupt(
                &key_path,
                "the key does not belong to the certificate in ca.pem",
            ));
        }
        let not_after = x509.validity().not_after.to_datetime();

        let token_path = dir.join(TOKEN_KEY_FILE);
        let raw =
            std::fs::read(&token_path).map_err(|e| files::missing_or_io(dir, TOKEN_KEY_FILE, e))?;
        files::check_private(&token_path)?;
        let token_key: [u8; token::KEY_LEN] = raw.as_slice().try_into().map_err(|_| {
            CaError::corrupt(
                &token_path,
                format!("expected {} bytes, found {}", token::KEY_LEN, raw.len()),
            )
        })?;

        // The stamp first: a change after it is seen by the next refresh.
        let seen = files::stamp(&dir.join(BUNDLE_FILE))?;
        let (bundle_path, bundle_pem) = bundle::read_bundle_file(dir, config.kind)?;
        let own_root = match config.kind {
            CaKind::Root => {
                if x509.subject() != x509.issuer() || x509.verify_signature(None).is_err() {
                    return Err(CaError::corrupt(
                        &cert_path,
                        "ca.json says root, but ca.pem is not self-signed",
                    ));
                }
                cert_der.clone().into_owned()
            }
            CaKind::Intermediate => {
                let roots = bundle::parse_certs(&bundle_pem)
                    .map_err(|e| CaError::corrupt(&bundle_path, e))?;
                let i = bundle::find_issuer(&x509, &roots).ok_or_else(|| {
                    CaError::corrupt(
                        &bundle_path,
                        "no root in it signed the intermediate in ca.pem; add that root with `weft-ca trust add`",
                    )
                })?;
                roots[i].clone()
            }
        };
        let chain_tail = match config.kind {
            CaKind::Root => Vec::new(),
            CaKind::Intermediate => vec![cert_der.clone().into_owned()],
        };
        let current =
            Bundle::parse(&bundle_pem, &own_root).map_err(|e| CaError::corrupt(&bundle_path, e))?;

        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| CaError::corrupt(&cert_path, e))?;
        let used_tokens = UsedTokens::load(dir, unix_secs(SystemTime::now()))?;

        Ok(Ca {
            dir: dir.to_path_buf(),
            trust_domain: config.trust_domain,
            kind: config.kind,
            issuer,
            chain_tail,
            not_after,
            own_root,
            bundle: RwLock::new(BundleState {
                current: std::sync::Arc::new(current),
                seen,
            }),
            token_key,
            used_tokens: Mutex::new(used_tokens),
        })
    }

    /// Root or intermediate.
    pub fn kind(&self) -> CaKind {
        self.kind
    }

    /// The directory this CA was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trust domain this CA issues identities in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Issue a leaf for `spiffe_id` with a key generated here.
    pub fn issue(&self, spiffe_id: &str, ttl: Duration) -> Result<IssuedCert, CaError> {
        let id = self.parse_id(spiffe_id)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut issued = self.sign_leaf(&id, &key, ttl)?;
        issued.key_pem = key.serialize_pem();
        Ok(issued)
    }

    /// Issue a leaf for `spiffe_id` carrying the public key of `csr_pem`.
    /// Whatever names the CSR asks for are ignored; its self-signature is
    /// checked. The returned `key_pem` is empty.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        spiffe_id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        let id = self.parse_id(spiffe_id.as_str())?;
        let public_key = leaf::csr_public_key(csr_pem)?;
        self.sign_leaf(&id, &public_key, ttl)
    }

    /// Mint a multi-use join token bound to `spiffe_id`, valid for `ttl`.
    pub fn token(&self, spiffe_id: &str, ttl: Duration) -> Result<String, CaError> {
        self.token_with(spiffe_id, ttl, false)
    }

    /// Mint a join token bound to `spiffe_id`, valid for `ttl`; a
    /// `single_use` token is refused once it has been redeemed.
    pub fn token_with(
        &self,
        spiffe_id: &str,
        ttl: Duration,
        single_use: bool,
    ) -> Result<String, CaError> {
        self.token_with_at(spiffe_id, ttl, single_use, SystemTime::now())
    }

    /// [`Ca::token`] with an explicit clock (tests mint expired tokens).
    pub fn token_at(
        &self,
        spiffe_id: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, CaError> {
        self.token_with_at(spiffe_id, ttl, false, now)
    }

    /// [`Ca::token_with`] with an explicit clock.
    pub fn token_with_at(
        &self,
        spiffe_id: &str,
        ttl: Duration,
        single_use: bool,
        now: SystemTime,
    ) -> Result<String, CaError> {
        let id = self.parse_id(spiffe_id)?;
        token::mint(&self.token_key, &id, ttl, single_use, now)
    }

    /// Check a join token (signature, expiry, not yet redeemed if
    /// single-use) and return the identity it is bound to. Redeems nothing.
    pub fn verify_token(&self, token: &str) -> Result<SpiffeId, CaError> {
        self.verify_token_at(token, SystemTime::now())
    }

    /// [`Ca::verify_token`] with an explicit clock.
    pub fn verify_token_at(&self, token: &str, now: SystemTime) -> Result<SpiffeId, CaError> {
        Ok(self.check_join_token(token, now)?.id)
    }

    /// Check a join token and, if it is single-use, record it as redeemed
    /// (on disk, before returning). What the server does before it signs.
    pub fn redeem_token(&self, token: &str) -> Result<SpiffeId, CaError> {
        self.redeem_token_at(token, SystemTime::now())
    }

    /// [`Ca::redeem_token`] with an explicit clock.
    pub fn redeem_token_at(&self, token: &str, now: SystemTime) -> Result<SpiffeId, CaError> {
        let token = self.check_join_token(token, now)?;
        self.redeem(&token, now)?;
        Ok(token.id)
    }

    pub(crate) fn check_join_token(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<JoinToken, CaError> {
        let claims = token::verify(&self.token_key, token, now)?;
        let id = self.parse_id(&claims.sub)?;
        if claims.single_use && self.used_tokens().contains(&claims.nonce) {
            return Err(CaError::TokenAlreadyUsed);
        }
        Ok(JoinToken {
            id,
            nonce: claims.nonce,
            exp: claims.exp,
            single_use: claims.single_use,
        })
    }

    /// Record a single-use token as redeemed; a no-op for multi-use ones.
    /// Fails if it was redeemed meanwhile (two requests racing).
    pub(crate) fn redeem(&self, token: &JoinToken, now: SystemTime) -> Result<(), CaError> {
        if !token.single_use {
            return Ok(());
        }
        self.used_tokens()
            .redeem(&token.nonce, token.exp, unix_secs(now))
    }

    fn used_tokens(&self) -> std::sync::MutexGuard<'_, UsedTokens> {
        // A panic while holding the lock cannot leave the list half-edited
        // (entries are replaced only after the file was written).
        match self.used_tokens.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Parse `id` and require it to name a workload in our trust domain.
    pub(crate) fn parse_id(&self, id: &str) -> Result<SpiffeId, CaError> {
        let parsed = SpiffeId::parse(id).map_err(|source| CaError::InvalidSpiffeId {
            id: id.to_string(),
            source,
        })?;
        if parsed.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignIdentity {
                id: id.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        SpiffeId::parse_in(id, &self.trust_domain).map_err(|source| CaError::InvalidSpiffeId {
            id: id.to_string(),
            source,
        })
    }
}

/// Refuse to create a CA where one (or part of one) already is.
fn refuse_existing(dir: &Path) -> Result<(), CaError> {
    for name in [
        CA_CERT_FILE,
        CA_KEY_FILE,
        CA_CONFIG_FILE,
        TOKEN_KEY_FILE,
        BUNDLE_FILE,
        USED_TOKENS_FILE,
    ] {
        if dir.join(name).exists() {
            return Err(CaError::AlreadyExists(dir.to_path_buf()));
        }
    }
    Ok(())
}

/// Write a new CA directory: key and token secret (0600), certificate,
/// settings and, for an intermediate, the bundle of roots.
fn write_ca_dir(
    dir: &Path,
    trust_domain: &str,
    kind: CaKind,
    key: &KeyPair,
    cert_pem: &str,
    bundle_pem: Option<&str>,
) -> Result<(), CaError> {
    let mut token_key = [0u8; token::KEY_LEN];
    files::fill_random(&mut token_key)?;
    let config = serde_json::to_string_pretty(&CaConfig {
        trust_domain: trust_domain.to_string(),
        kind,
    })
    .map_err(|e| CaError::Internal(format!("could not encode CA settings: {e}")))?;
    // create_new: a CA written concurrently by someone else is not clobbered.
    files::write_new(&dir.join(CA_KEY_FILE), key.serialize_pem().as_bytes(), true)?;
    files::write_new(&dir.join(TOKEN_KEY_FILE), &token_key, true)?;
    files::write_new(&dir.join(CA_CERT_FILE), cert_pem.as_bytes(), false)?;
    if let Some(bundle) = bundle_pem {
        files::write_new(&dir.join(BUNDLE_FILE), bundle.as_bytes(), false)?;
    }
    files::write_new(
        &dir.join(CA_CONFIG_FILE),
        format!("{config}\n").as_bytes(),
        false,
    )
}

#[cfg(test)]
mod tests;
