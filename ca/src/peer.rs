//! Renewal with the current certificate, as SPIRE agents do: a sidecar
//! presents the certificate it holds as its TLS client certificate and gets
//! a new one for the same SPIFFE ID, with no second token.
//!
//! Two steps. The TLS handshake ([`OptionalClientCert`]) only makes the
//! client prove it holds the certificate's key; a client certificate is
//! optional, since first-time requests carry a token instead. Whether the
//! certificate is acceptable is decided per request
//! ([`verify_renewal_chain`]): so a refusal is an HTTP 401 with a reason
//! rather than a bare TLS alert, and a trust-bundle change applies to the
//! next request.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use weft_transport::spiffe::SpiffeId;

use crate::CaError;

/// Accepts any client certificate whose key the client proves it holds;
/// accepts no certificate at all.
#[derive(Debug)]
pub(crate) struct OptionalClientCert {
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Trust is decided per request; here only refuse what cannot be a
        // certificate at all.
        webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The server speaks TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Proof of possession of the certificate's key.
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Check a client certificate chain (leaf first, then intermediates) at
/// `now`: it chains to a root of `roots`, is valid now, is meant for client
/// authentication, and carries exactly one SPIFFE ID of `trust_domain`.
/// Returns that ID.
pub(crate) fn verify_renewal_chain(
    provider: &CryptoProvider,
    chain: &[CertificateDer<'static>],
    roots: &RootCertStore,
    trust_domain: &str,
    now: UnixTime,
) -> Result<SpiffeId, CaError> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| CaError::BadClientCert("no certificate was presented".to_string()))?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|_| CaError::BadClientCert("it does not parse".to_string()))?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &roots.roots,
        intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| CaError::BadClientCert(explain(&e)))?;
    weft_transport::tls::spiffe_id_of(leaf, trust_domain)
        .map_err(|e| CaError::BadClientCert(format!("{e} (trust domain {trust_domain})")))
}

fn explain(e: &webpki::Error) -> String {
    use webpki::Error as E;
    let at = |t: &UnixTime| {
        std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::from_secs(t.as_secs()))
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_else(|| format!("Unix time {}", t.as_secs()))
    };
    match e {
        E::CertExpired { not_after, .. } => format!("it expired at {}", at(not_after)),
        E::CertNotValidYet { not_before, .. } => {
            format!("it is not valid before {}", at(not_before))
        }
        E::UnknownIssuer => {
            "it was not issued by a CA whose root is in this CA's trust bundle".to_string()
        }
        // Two roots may share a name (two CAs of one trust domain): then
        // the name matches and the signature does not.
        E::InvalidSignatureForPublicKey => {
            "its signature does not verify against this CA's trust bundle (was it issued by another CA?)"
                .to_string()
        }
        E::RequiredEkuNotFoundContext(_) => {
            "it is not a client certificate (no clientAuth extended key usage)".to_string()
        }
        E::CaUsedAsEndEntity => "it is a CA certificate, not a workload's".to_string(),
        other => format!("it does not verify ({other:?})"),
    }
}
