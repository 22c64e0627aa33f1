//! Intermediate CAs, so the root key can stay offline: the root signs an
//! intermediate (path length 0: it can sign leaves, not further CAs) into a
//! directory of its own, and `weft-ca serve` runs from that directory with
//! the intermediate's key only. Leaves are sent as leaf + intermediate; the
//! bundle holds roots only.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use crate::{leaf, refuse_existing, write_ca_dir, Ca, CaError, CaKind};

/// `weft-ca intermediate --ttl` default: a year. Long enough that renewing
/// the intermediate (bringing the root key out) is a yearly chore, short
/// enough that a stolen intermediate key is not useful for a decade.
pub const DEFAULT_INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

impl Ca {
    /// Create an intermediate CA in `dir`, signed by this root, valid for
    /// `ttl`. `dir` gets the intermediate's certificate and key, a new
    /// token secret, and this root's bundle (roots only); not the root key.
    pub fn create_intermediate(&self, dir: &Path, ttl: Duration) -> Result<Ca, CaError> {
        if self.kind != CaKind::Root {
            return Err(CaError::InvalidOption(format!(
                "{} holds an intermediate CA, which may not sign another CA; pass the root's directory as --root-dir",
                self.dir.display()
            )));
        }
        refuse_existing(dir)?;
        if ttl.is_zero() {
            return Err(CaError::InvalidTtl(
                "the intermediate's TTL must be longer than zero".to_string(),
            ));
        }
        let now = OffsetDateTime::now_utc();
        let not_after = time::Duration::try_from(ttl)
            .ok()
            .and_then(|ttl| now.checked_add(ttl))
            .ok_or_else(|| CaError::InvalidTtl(format!("{ttl:?} is too long")))?;
        if not_after > self.not_after {
            return Err(CaError::InvalidTtl(format!(
                "an intermediate valid for {} would outlive the root (valid until {}); use a shorter --ttl",
                humantime::format_duration(ttl),
                self.not_after
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| CaError::io("create directory", dir, e))?;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("Weft intermediate CA {}", self.trust_domain),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            // The serving certificate and leaves are signed, never TLS with
            // this key; DigitalSignature is not needed.
        ];
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = not_after;
        params.serial_number = Some(leaf::random_serial()?.0);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;

        // The whole distributed bundle, not only our own root: roots the
        // operator already trusts (a rotation in progress) stay trusted.
        write_ca_dir(
            dir,
            &self.trust_domain,
            CaKind::Intermediate,
            &key,
            &cert.pem(),
            Some(&self.bundle_pem()),
        )?;
        Ca::load(dir)
    }
}
