//! What a sidecar uses to get and renew its certificate: generate a P-256
//! key locally, send a CSR to `weft-ca serve`, and return the leaf with the
//! key (the key never leaves this process).
//!
//! The first certificate is bought with a bearer credential (a join token,
//! or a Kubernetes service-account token: [`request_certificate`]); later
//! ones with the current certificate, presented as the TLS client
//! certificate ([`renew_certificate`]), so no long-lived token is needed.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, StatusCode};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::https::{self, PostError, Target};
use crate::server::{CertificateResponse, ErrorResponse, CERTIFICATE_PATH};
use crate::{CaError, IssuedCert};

/// The whole exchange (connect, handshake, request, response) must finish
/// within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the response we are willing to buffer.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Get a certificate with a bearer credential: a join token from
/// `weft-ca token`, or a Kubernetes projected service-account token (the CA
/// runs with `--kubernetes`). `ca_url` like "https://127.0.0.1:8443";
/// `ca_bundle_pem` verifies the CA's serving certificate.
pub async fn request_certificate(
    ca_url: &str,
    ca_bundle_pem: &str,
    token: &str,
) -> Result<IssuedCert, CaError> {
    let auth = Auth::Bearer(token.trim());
    tokio::time::timeout(REQUEST_TIMEOUT, request(ca_url, ca_bundle_pem, auth))
        .await
        .map_err(|_| CaError::Timeout(REQUEST_TIMEOUT))?
}

/// Renew: present the current certificate (`cert_chain_pem`, leaf first,
/// with its `key_pem`) as the TLS client certificate and get a new one for
/// the same SPIFFE ID, with a new key generated here. Pass the bundle from
/// the last [`IssuedCert`], so roots added for a rotation are trusted.
/// Refused (401) once the certificate has expired: then a bearer
/// credential is needed again.
pub async fn renew_certificate(
    ca_url: &str,
    ca_bundle_pem: &str,
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<IssuedCert, CaError> {
    let chain = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::BadCredentials(format!("the certificate is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(CaError::BadCredentials(
            "no certificate in cert_chain_pem".to_string(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CaError::BadCredentials(format!("the key is not PEM: {e}")))?;
    let auth = Auth::Certificate { chain, key };
    tokio::time::timeout(REQUEST_TIMEOUT, request(ca_url, ca_bundle_pem, auth))
        .await
        .map_err(|_| CaError::Timeout(REQUEST_TIMEOUT))?
}

/// How the request authenticates.
enum Auth<'a> {
    Bearer(&'a str),
    Certificate {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    },
}

async fn request(ca_url: &str, ca_bundle_pem: &str, auth: Auth<'_>) -> Result<IssuedCert, CaError> {
    let target = Target::parse(ca_url).map_err(|reason| CaError::BadUrl {
        url: ca_url.to_string(),
        reason,
    })?;
    let roots = https::roots_from_pem(ca_bundle_pem).map_err(|e| {
        CaError::BadBundle(format!(
            "{e}; pass the CA's bundle.pem / ca.pem or the bundle of your last certificate"
        ))
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CaError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut headers = vec![(header::CONTENT_TYPE, "application/pkcs10".to_string())];
    let mut renewing = None;
    let mut config = match auth {
        Auth::Bearer(token) => {
            headers.push((header::AUTHORIZATION, format!("Bearer {token}")));
            builder.with_no_client_auth()
        }
        Auth::Certificate { chain, key } => {
            renewing = Some(uri_sans(&chain[0]));
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| CaError::BadCredentials(e.to_string()))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];

    // The key and CSR: only the public half goes out.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let (status, body) = https::post(
        &target,
        Arc::new(config),
        CERTIFICATE_PATH,
        &headers,
        Bytes::from(csr_pem),
        MAX_RESPONSE_BYTES,
    )
    .await
    .map_err(|e| match e {
        PostError::Connect(reason) => CaError::Connect {
            url: ca_url.to_string(),
            reason,
        },
        PostError::Body(reason) => CaError::BadResponse(reason),
    })?;

    if status != StatusCode::OK {
        let message = serde_json::from_slice::<ErrorResponse>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(500).collect());
        return Err(CaError::Rejected {
            status: status.as_u16(),
            message,
        });
    }
    let answer: CertificateResponse = serde_json::from_slice(&body)
        .map_err(|e| CaError::BadResponse(format!("not the expected JSON: {e}")))?;
    let leaf = check_leaf_key(&answer.cert_chain_pem, &key)?;
    if let Some(before) = renewing {
        let after = uri_sans(&leaf);
        if after != before {
            return Err(CaError::BadResponse(format!(
                "renewing {before:?} returned a certificate for {after:?}"
            )));
        }
    }
    Ok(IssuedCert {
        cert_chain_pem: answer.cert_chain_pem,
        key_pem: key.serialize_pem(),
        bundle_pem: answer.bundle_pem,
        not_after: UNIX_EPOCH
            .checked_add(Duration::from_secs(answer.not_after_unix))
            .unwrap_or(SystemTime::UNIX_EPOCH),
        serial_hex: answer.serial,
    })
}

/// The CA must have certified our key, not some other one. Returns the leaf.
fn check_leaf_key(cert_pem: &str, key: &KeyPair) -> Result<CertificateDer<'static>, CaError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| CaError::BadResponse(format!("the certificate is not PEM: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CaError::BadResponse(format!("the certificate does not parse: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::BadResponse(
            "the certificate does not carry our public key".to_string(),
        ));
    }
    Ok(der)
}

/// The URI SANs of a certificate (empty if it does not parse).
fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}
