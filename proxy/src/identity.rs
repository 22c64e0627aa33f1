//! Getting the sidecar's certificate: from files, or by CSR from
//! `weft-ca serve` (the private key is generated here and never sent).

use std::path::Path;

use weft_transport::Credentials;

use crate::sidecar::{IdentitySource, SidecarError};

pub(crate) async fn obtain(src: &IdentitySource) -> Result<Credentials, SidecarError> {
    match src {
        IdentitySource::Static(c) => Ok(c.clone()),
        IdentitySource::CertDir(dir) => from_dir(dir),
        IdentitySource::Ca {
            url,
            bundle_pem,
            token,
            expect_id,
        } => {
            let issued = weft_ca::client::request_certificate(url, bundle_pem, token.trim())
                .await
                .map_err(|e| {
                    SidecarError::Identity(format!("getting a certificate from {url}: {e}"))
                })?;
            let creds = Credentials::from_pem(
                issued.cert_chain_pem.as_bytes(),
                issued.key_pem.as_bytes(),
                issued.bundle_pem.as_bytes(),
            )?;
            if let Some(want) = expect_id {
                let got = creds
                    .chain
                    .first()
                    .and_then(|c| weft_transport::tls::spiffe_id_of(c, trust_domain_of(want)).ok());
                if got.as_ref().map(|g| g.as_str()) != Some(want.as_str()) {
                    return Err(SidecarError::Identity(format!(
                        "the CA issued {}, but --spiffe-id asks for {want}; the join token is for another identity",
                        got.map(|g| g.to_string()).unwrap_or_else(|| "an unreadable identity".into())
                    )));
                }
            }
            Ok(creds)
        }
    }
}

fn trust_domain_of(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
        .unwrap_or("")
}

fn from_dir(dir: &Path) -> Result<Credentials, SidecarError> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| {
            SidecarError::Identity(format!(
                "reading {}: {e} (expected cert.pem, key.pem and bundle.pem, as written by `weft-ca issue`)",
                dir.join(name).display()
            ))
        })
    };
    Ok(Credentials::from_pem(
        &read("cert.pem")?,
        &read("key.pem")?,
        &read("bundle.pem")?,
    )?)
}
