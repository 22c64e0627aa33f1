//! The trust bundle a CA hands out with every certificate: one or more root
//! certificates, so a root can be rotated by trusting old and new side by
//! side. It lives in `bundle.pem` (absent for a root CA that trusts only
//! itself: then the bundle is `ca.pem`).
//!
//! `weft-ca trust add|remove` edit the file; a running `weft-ca serve`
//! notices the change on its next request ([`Ca::refresh_bundle`]) and
//! applies it without a restart. A bad edit is refused and the last good
//! bundle stays in force. The root the CA's own certificate chains to can
//! never be removed: every certificate it issues would stop verifying.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;

use crate::files::{self, FileStamp};
use crate::{leaf, Ca, CaError, CaKind, BUNDLE_FILE, CA_CERT_FILE};

/// A parsed, checked bundle.
#[derive(Debug)]
pub(crate) struct Bundle {
    /// What clients get: the certificates alone, PEM.
    pub(crate) pem: String,
    pub(crate) certs: Vec<CertificateDer<'static>>,
    /// The same certificates as trust anchors, for checking client
    /// certificates presented for renewal.
    pub(crate) roots: Arc<RootCertStore>,
}

/// The bundle in force and the file state it was last compared with.
#[derive(Debug)]
pub(crate) struct BundleState {
    pub(crate) current: Arc<Bundle>,
    /// `bundle.pem` as last seen, applied or refused (so a bad edit is
    /// reported once, not on every request).
    pub(crate) seen: Option<FileStamp>,
}

impl Bundle {
    /// Parse `pem`; it must hold `anchor`, the root our own certificate
    /// chains to.
    pub(crate) fn parse(pem: &str, anchor: &CertificateDer<'_>) -> Result<Bundle, String> {
        let certs = parse_certs(pem)?;
        if !certs.iter().any(|c| c.as_ref() == anchor.as_ref()) {
            return Err(
                "it does not hold the root this CA's certificate chains to; \
                 add that root back (weft-ca trust add)"
                    .to_string(),
            );
        }
        Bundle::from_certs(certs)
    }

    fn from_certs(certs: Vec<CertificateDer<'static>>) -> Result<Bundle, String> {
        let mut roots = RootCertStore::empty();
        let mut pem = String::new();
        for cert in &certs {
            roots
                .add(cert.clone())
                .map_err(|e| format!("a certificate is not usable as a root: {e}"))?;
            pem.push_str(&leaf::der_to_pem(cert));
        }
        Ok(Bundle {
            pem,
            certs,
            roots: Arc::new(roots),
        })
    }
}

/// Every certificate of `pem`, in order, duplicates dropped; at least one.
pub(crate) fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs: Vec<CertificateDer<'static>> = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| e.to_string())?;
        x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| format!("a certificate does not parse: {e}"))?;
        if !certs.contains(&cert) {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        return Err("no certificate found".to_string());
    }
    Ok(certs)
}

/// The index of the certificate in `candidates` that signed `cert`.
pub(crate) fn find_issuer(
    cert: &X509Certificate<'_>,
    candidates: &[CertificateDer<'_>],
) -> Option<usize> {
    candidates.iter().position(|c| {
        x509_parser::parse_x509_certificate(c).is_ok_and(|(_, issuer)| {
            issuer.subject() == cert.issuer()
                && cert.verify_signature(Some(issuer.public_key())).is_ok()
        })
    })
}

/// Describe one bundle certificate for people: subject and expiry.
pub fn describe(cert: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(cert) {
        Ok((_, c)) => format!(
            "{} (serial {}, valid until {})",
            c.subject(),
            c.raw_serial_as_string(),
            c.validity().not_after
        ),
        Err(_) => "an unparsable certificate".to_string(),
    }
}

impl Ca {
    /// The trust bundle: every root certificate peers should accept, PEM.
    pub fn bundle_pem(&self) -> String {
        self.bundle().pem.clone()
    }

    /// The bundle's certificates, in file order.
    pub fn bundle_certs(&self) -> Vec<CertificateDer<'static>> {
        self.bundle().certs.clone()
    }

    pub(crate) fn bundle(&self) -> Arc<Bundle> {
        match self.bundle.read() {
            Ok(state) => state.current.clone(),
            Err(poisoned) => poisoned.into_inner().current.clone(),
        }
    }

    /// Re-read `bundle.pem` if it changed since last looked at. Returns
    /// whether a new bundle is now in force. On error the previous bundle
    /// stays in force (and the same file state is not retried).
    pub fn refresh_bundle(&self) -> Result<bool, CaError> {
        let path = self.dir.join(BUNDLE_FILE);
        let stamp = files::stamp(&path)?;
        // Called on every request: the common case takes the read lock only.
        let unchanged = match self.bundle.read() {
            Ok(state) => state.seen == stamp,
            Err(poisoned) => poisoned.into_inner().seen == stamp,
        };
        if unchanged {
            return Ok(false);
        }
        let mut state = match self.bundle.write() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        if stamp == state.seen {
            return Ok(false);
        }
        state.seen = stamp;
        let bundle = self.read_bundle()?;
        let changed = bundle.certs != state.current.certs;
        state.current = Arc::new(bundle);
        Ok(changed)
    }

    /// Read and check the bundle from disk.
    pub(crate) fn read_bundle(&self) -> Result<Bundle, CaError> {
        let (path, pem) = read_bundle_file(&self.dir, self.kind)?;
        Bundle::parse(&pem, &self.own_root).map_err(|e| CaError::corrupt(&path, e))
    }

    /// Add the certificates of `pem` (CA certificates, not expired) to the
    /// bundle file. Returns how many were new.
    pub fn trust_add(&self, pem: &str) -> Result<usize, CaError> {
        let mut certs = self.read_bundle()?.certs;
        let added = parse_certs(pem).map_err(|e| CaError::Trust(format!("--cert: {e}")))?;
        let now = x509_parser::time::ASN1Time::now();
        let mut new = 0;
        for cert in added {
            let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
                .map_err(|e| CaError::Trust(format!("--cert does not parse: {e}")))?;
            let is_ca = parsed
                .basic_constraints()
                .ok()
                .flatten()
                .is_some_and(|bc| bc.value.ca);
            if !is_ca {
                return Err(CaError::Trust(format!(
                    "{} is not a CA certificate; pass a root's ca.pem",
                    describe(&cert)
                )));
            }
            if parsed.validity().not_after <= now {
                return Err(CaError::Trust(format!(
                    "{} has expired; trusting it would admit nothing",
                    describe(&cert)
                )));
            }
            if !certs.contains(&cert) {
                certs.push(cert);
                new += 1;
            }
        }
        if new > 0 {
            self.write_bundle(certs)?;
        }
        Ok(new)
    }

    /// Remove the certificates of `pem` from the bundle file. Each must be
    /// in it and none may be the root this CA chains to. Returns how many
    /// were removed.
    pub fn trust_remove(&self, pem: &str) -> Result<usize, CaError> {
        let mut certs = self.read_bundle()?.certs;
        let removed = parse_certs(pem).map_err(|e| CaError::Trust(format!("--cert: {e}")))?;
        for cert in &removed {
            if cert.as_ref() == self.own_root.as_ref() {
                return Err(CaError::Trust(format!(
                    "{} is the root this CA's own certificate chains to; \
                     switch serving to the new CA before removing it from the bundle",
                    describe(cert)
                )));
            }
            let Some(i) = certs.iter().position(|c| c == cert) else {
                return Err(CaError::Trust(format!(
                    "{} is not in the bundle (see weft-ca trust list)",
                    describe(cert)
                )));
            };
            certs.remove(i);
        }
        self.write_bundle(certs)?;
        Ok(removed.len())
    }

    fn write_bundle(&self, certs: Vec<CertificateDer<'static>>) -> Result<(), CaError> {
        let bundle = Bundle::from_certs(certs).map_err(CaError::Trust)?;
        // The bundle is public: 0644, replaced atomically so a server
        // re-reading it never sees half a file.
        files::write_replace(&self.dir.join(BUNDLE_FILE), bundle.pem.as_bytes(), false)?;
        self.refresh_bundle()?;
        Ok(())
    }
}

/// The bundle file's path and text: `bundle.pem`, or for a root CA without
/// one, `ca.pem`.
pub(crate) fn read_bundle_file(
    dir: &std::path::Path,
    kind: CaKind,
) -> Result<(std::path::PathBuf, String), CaError> {
    let bundle_path = dir.join(BUNDLE_FILE);
    match std::fs::read_to_string(&bundle_path) {
        Ok(pem) => Ok((bundle_path, pem)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && kind == CaKind::Root => {
            let cert_path = dir.join(CA_CERT_FILE);
            let pem = std::fs::read_to_string(&cert_path)
                .map_err(|e| CaError::io("read", &cert_path, e))?;
            Ok((cert_path, pem))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CaError::corrupt(
            &bundle_path,
            "it is missing; an intermediate CA needs the bundle of roots it chains to",
        )),
        Err(e) => Err(CaError::io("read", &bundle_path, e)),
    }
}
