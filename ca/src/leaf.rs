//! Leaf certificates: the SPIFFE profile (one URI SAN, EKU server+client
//! auth, P-256), CSR public-key extraction and writing credentials to disk.

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use time::OffsetDateTime;
use weft_transport::spiffe::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use crate::{files, Ca, CaError};

/// Leaves start this long in the past so peers with a slow clock accept them.
const CLOCK_SKEW: time::Duration = time::Duration::minutes(5);

/// A certificate issued by the CA, with everything a workload needs.
#[derive(Clone)]
pub struct IssuedCert {
    /// The leaf certificate, PEM, followed by the intermediate when the CA
    /// is one (present this whole chain; the bundle holds only roots).
    pub cert_chain_pem: String,
    /// The leaf's private key, PEM (PKCS#8); empty when signed from a CSR.
    pub key_pem: String,
    /// The trust bundle to verify peers with, PEM.
    pub bundle_pem: String,
    /// When the leaf stops being valid (whole seconds, as in the certificate).
    pub not_after: SystemTime,
    /// The leaf's serial number, lowercase hex.
    pub serial_hex: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("IssuedCert")
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Write `cert.pem`, `key.pem` (mode 0600; skipped when `key_pem` is
    /// empty) and `bundle.pem` into `out_dir`, creating it. Each file is
    /// replaced atomically, the key first so a reader never pairs a new
    /// certificate with an old key.
    pub fn write_to(&self, out_dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(out_dir)
            .map_err(|e| CaError::io("create directory", out_dir, e))?;
        if !self.key_pem.is_empty() {
            files::write_replace(&out_dir.join("key.pem"), self.key_pem.as_bytes(), true)?;
        }
        files::write_replace(
            &out_dir.join("cert.pem"),
            self.cert_chain_pem.as_bytes(),
            false,
        )?;
        files::write_replace(
            &out_dir.join("bundle.pem"),
            self.bundle_pem.as_bytes(),
            false,
        )?;
        Ok(())
    }
}

impl Ca {
    /// Sign a leaf for `id` (already checked to be in our trust domain)
    /// carrying `public_key`.
    pub(crate) fn sign_leaf(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        if ttl.is_zero() {
            return Err(CaError::InvalidTtl(
                "the TTL must be longer than zero".to_string(),
            ));
        }
        let now = OffsetDateTime::now_utc();
        let not_after = time::Duration::try_from(ttl)
            .ok()
            .and_then(|ttl| now.checked_add(ttl))
            .and_then(|t| t.replace_nanosecond(0).ok())
            .ok_or_else(|| CaError::InvalidTtl(format!("{ttl:?} is too long")))?;
        if not_after > self.not_after {
            return Err(CaError::InvalidTtl(format!(
                "a leaf valid for {} would outlive the CA certificate (valid until {}); use a shorter TTL",
                humantime::format_duration(ttl),
                self.not_after
            )));
        }
        let (serial, serial_hex) = random_serial()?;

        let mut params = CertificateParams::default();
        // The identity is the URI SAN alone; the subject stays empty (rcgen
        // then marks the SAN extension critical, as RFC 5280 asks).
        params.distinguished_name = DistinguishedName::new();
        let uri = id
            .as_str()
            .try_into()
            .map_err(|e| CaError::Internal(format!("SPIFFE ID is not ASCII: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(serial);
        params.not_before = now - CLOCK_SKEW;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain = cert.pem();
        for cert in &self.chain_tail {
            chain.push_str(&der_to_pem(cert));
        }

        Ok(IssuedCert {
            cert_chain_pem: chain,
            key_pem: String::new(),
            bundle_pem: self.bundle_pem(),
            not_after: SystemTime::from(not_after),
            serial_hex,
        })
    }
}

/// A random positive 16-byte serial number and its hex form.
pub(crate) fn random_serial() -> Result<(SerialNumber, String), CaError> {
    let mut bytes = [0u8; 16];
    files::fill_random(&mut bytes)?;
    // Top bit clear keeps the INTEGER positive; the next bit set keeps it
    // exactly 16 bytes long (no leading zero byte to strip).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok((SerialNumber::from_slice(&bytes), hex))
}

/// Parse a PEM CSR, check its self-signature and that its key is ECDSA
/// P-256, and return that public key. Everything else in the CSR is ignored.
pub(crate) fn csr_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, CaError> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| {
        CaError::BadCsr(format!(
            "expected a PEM \"CERTIFICATE REQUEST\" block ({e})"
        ))
    })?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CaError::BadCsr(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(CaError::BadCsr(
            "trailing bytes after the request".to_string(),
        ));
    }
    csr.verify_signature().map_err(|e| {
        CaError::BadCsr(format!(
            "its signature does not verify ({e}); sign the CSR with the key it carries"
        ))
    })?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(CaError::BadCsr(
            "the key must be ECDSA P-256 (secp256r1)".to_string(),
        ));
    }
    SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| CaError::BadCsr(format!("unusable public key: {e}")))
}

/// PEM-encode one certificate.
pub(crate) fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
