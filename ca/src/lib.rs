//! The Weft certificate authority: a root kept in a directory, SPIFFE leaf
//! certificates issued from it (locally or from a CSR), and join tokens that
//! bind a sidecar to one identity.
//!
//! [`Ca`] is the loaded CA; [`server::serve`] signs CSRs over HTTPS and
//! [`client::request_certificate`] is what a sidecar calls to get a
//! certificate without its key ever leaving it.

pub mod client;
mod error;
mod files;
mod leaf;
pub mod server;
mod token;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use weft_transport::spiffe::{validate_trust_domain, SpiffeId};

pub use error::CaError;
pub use leaf::IssuedCert;

/// The root certificate, PEM.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The root private key, PEM (PKCS#8), mode 0600.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// CA settings (the trust domain), JSON.
pub const CA_CONFIG_FILE: &str = "ca.json";
/// 32 random bytes: the HMAC-SHA256 key for join tokens, mode 0600.
pub const TOKEN_KEY_FILE: &str = "token.key";
/// Optional trust bundle holding several roots (for root rotation). When
/// absent the bundle is `ca.pem` alone.
pub const BUNDLE_FILE: &str = "bundle.pem";

/// Root validity: ten years (a root is rotated by adding a new one to the
/// bundle long before this runs out).
const ROOT_VALIDITY: time::Duration = time::Duration::days(3650);

/// The on-disk CA settings.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaConfig {
    trust_domain: String,
}

/// A loaded CA: root certificate and key, trust domain, token secret.
pub struct Ca {
    dir: PathBuf,
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root_not_after: OffsetDateTime,
    bundle_pem: String,
    token_key: [u8; token::KEY_LEN],
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Create a new CA in `dir` (created if missing) for `trust_domain`.
    /// Refuses if `dir` already holds any CA file.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<Ca, CaError> {
        validate_trust_domain(trust_domain).map_err(|source| CaError::InvalidTrustDomain {
            trust_domain: trust_domain.to_string(),
            source,
        })?;
        for name in [CA_CERT_FILE, CA_KEY_FILE, CA_CONFIG_FILE, TOKEN_KEY_FILE] {
            if dir.join(name).exists() {
                return Err(CaError::AlreadyExists(dir.to_path_buf()));
            }
        }
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

        let mut token_key = [0u8; token::KEY_LEN];
        files::fill_random(&mut token_key)?;
        let config = serde_json::to_string_pretty(&CaConfig {
            trust_domain: trust_domain.to_string(),
        })
        .map_err(|e| CaError::Internal(format!("could not encode CA settings: {e}")))?;

        // create_new: a CA written concurrently by someone else is not clobbered.
        files::write_new(&dir.join(CA_KEY_FILE), key.serialize_pem().as_bytes(), true)?;
        files::write_new(&dir.join(TOKEN_KEY_FILE), &token_key, true)?;
        files::write_new(&dir.join(CA_CERT_FILE), cert.pem().as_bytes(), false)?;
        files::write_new(
            &dir.join(CA_CONFIG_FILE),
            format!("{config}\n").as_bytes(),
            false,
        )?;
        Ca::load(dir)
    }

    /// Load the CA kept in `dir` by [`Ca::init`].
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let config_path = dir.join(CA_CONFIG_FILE);
        let config: CaConfig = serde_json::from_str(&files::read_ca_file(dir, CA_CONFIG_FILE)?)
            .map_err(|e| CaError::corrupt(&config_path, e))?;
        validate_trust_domain(&config.trust_domain)
            .map_err(|e| CaError::corrupt(&config_path, e))?;

        let cert_path = dir.join(CA_CERT_FILE);
        let cert_pem = files::read_ca_file(dir, CA_CERT_FILE)?;
        let key_path = dir.join(CA_KEY_FILE);
        let key = KeyPair::from_pem(&files::read_ca_file(dir, CA_KEY_FILE)?)
            .map_err(|e| CaError::corrupt(&key_path, e))?;
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
        let root_not_after = x509.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| CaError::corrupt(&cert_path, e))?;

        let token_path = dir.join(TOKEN_KEY_FILE);
        let raw =
            std::fs::read(&token_path).map_err(|e| files::missing_or_io(dir, TOKEN_KEY_FILE, e))?;
        let token_key: [u8; token::KEY_LEN] = raw.as_slice().try_into().map_err(|_| {
            CaError::corrupt(
                &token_path,
                format!("expected {} bytes, found {}", token::KEY_LEN, raw.len()),
            )
        })?;

        let bundle_path = dir.join(BUNDLE_FILE);
        let bundle_pem = if bundle_path.exists() {
            std::fs::read_to_string(&bundle_path)
                .map_err(|e| CaError::io("read", &bundle_path, e))?
        } else {
            cert_pem
        };
        let bundle_pem =
            normalize_bundle(&bundle_pem).map_err(|e| CaError::corrupt(&bundle_path, e))?;

        Ok(Ca {
            dir: dir.to_path_buf(),
            trust_domain: config.trust_domain,
            issuer,
            root_not_after,
            bundle_pem,
            token_key,
        })
    }

    /// The trust domain this CA issues identities in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle: every root certificate peers should accept, PEM.
    pub fn bundle_pem(&self) -> String {
        self.bundle_pem.clone()
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

    /// Mint a join token bound to `spiffe_id`, valid for `ttl`.
    pub fn token(&self, spiffe_id: &str, ttl: Duration) -> Result<String, CaError> {
        self.token_at(spiffe_id, ttl, SystemTime::now())
    }

    /// Check a join token and return the identity it is bound to.
    pub fn verify_token(&self, token: &str) -> Result<SpiffeId, CaError> {
        self.verify_token_at(token, SystemTime::now())
    }

    /// [`Ca::token`] with an explicit clock (tests mint expired tokens).
    pub fn token_at(
        &self,
        spiffe_id: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, CaError> {
        let id = self.parse_id(spiffe_id)?;
        token::mint(&self.token_key, &id, ttl, now)
    }

    /// [`Ca::verify_token`] with an explicit clock.
    pub fn verify_token_at(&self, token: &str, now: SystemTime) -> Result<SpiffeId, CaError> {
        let sub = token::verify(&self.token_key, token, now)?;
        self.parse_id(&sub)
    }

    /// Parse `id` and require it to name a workload in our trust domain.
    fn parse_id(&self, id: &str) -> Result<SpiffeId, CaError> {
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

/// Check that `pem` holds at least one certificate and return the
/// certificates alone, re-encoded.
fn normalize_bundle(pem: &str) -> Result<String, String> {
    let mut out = String::new();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| e.to_string())?;
        out.push_str(&leaf::der_to_pem(&cert));
    }
    if out.is_empty() {
        return Err("no certificate found".to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
