//! Kubernetes credentials: a pod's projected service-account token,
//! checked with the API server's TokenReview, buys a certificate for
//! `spiffe://<td>/ns/<namespace>/sa/<account>` — exactly that account.
//!
//! The CA authenticates to the API server with its own service-account
//! token, re-read on every review because the kubelet rotates projected
//! tokens; its service account needs the `system:auth-delegator` ClusterRole
//! (or `create` on `tokenreviews`). The API server's certificate is checked
//! against `--k8s-ca-file`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use serde::{Deserialize, Serialize};

use crate::https::{self, PostError, Target};
use crate::CaError;

/// Where pods reach the API server.
pub const DEFAULT_API_URL: &str = "https://kubernetes.default.svc";
/// The cluster CA the kubelet mounts into every pod.
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The CA's own service-account token, mounted by the kubelet.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The audience sidecars' projected tokens must be minted for. A dedicated
/// audience means a token meant for the API server (or anything else)
/// cannot be replayed to the CA, nor ours to them.
pub const DEFAULT_AUDIENCE: &str = "weft-ca";
/// The TokenReview endpoint.
pub const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// A review must finish within this; the API server answers in
/// milliseconds when healthy, and the sidecar's own request times out at
/// 10 s, so a slower answer is as good as none.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// TokenReview answers are small; anything bigger is not one.
const MAX_REVIEW_BYTES: usize = 64 * 1024;
const SA_PREFIX: &str = "system:serviceaccount:";

/// How to reach and authenticate to the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    pub api_url: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
    pub audience: String,
}

impl Default for KubernetesConfig {
    /// What a CA running in a pod finds without configuration.
    fn default() -> Self {
        KubernetesConfig {
            api_url: DEFAULT_API_URL.to_string(),
            ca_file: PathBuf::from(DEFAULT_CA_FILE),
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            audience: DEFAULT_AUDIENCE.to_string(),
        }
    }
}

/// A service account the API server vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Review<'a> {
    api_version: &'static str,
    kind: &'static str,
    spec: ReviewSpec<'a>,
}

#[derive(Serialize)]
struct ReviewSpec<'a> {
    token: &'a str,
    audiences: [&'a str; 1],
}

#[derive(Debug, Deserialize)]
struct ReviewAnswer {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(Debug, Default, Deserialize)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: ReviewUser,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    error: String,
}

#[derive(Debug, Default, Deserialize)]
struct ReviewUser {
    #[serde(default)]
    username: String,
}

/// Ask the API server who `token` belongs to. Errors: 401 (not
/// authenticated, wrong audience), 403 (not a service account), 503 (the
/// API server could not be asked).
pub async fn review(config: &KubernetesConfig, token: &str) -> Result<ServiceAccount, CaError> {
    tokio::time::timeout(REVIEW_TIMEOUT, review_inner(config, token))
        .await
        .map_err(|_| {
            CaError::KubernetesUnavailable(format!(
                "{} did not answer within {REVIEW_TIMEOUT:?}",
                config.api_url
            ))
        })?
}

async fn review_inner(config: &KubernetesConfig, token: &str) -> Result<ServiceAccount, CaError> {
    let unavailable = CaError::KubernetesUnavailable;
    let target = Target::parse(&config.api_url)
        .map_err(|e| unavailable(format!("--k8s-api-url {}: {e}", config.api_url)))?;
    let ca_pem = std::fs::read_to_string(&config.ca_file).map_err(|e| {
        unavailable(format!(
            "could not read --k8s-ca-file {}: {e}",
            config.ca_file.display()
        ))
    })?;
    let roots = https::roots_from_pem(&ca_pem)
        .map_err(|e| unavailable(format!("--k8s-ca-file {}: {e}", config.ca_file.display())))?;
    // Re-read every time: the kubelet rotates projected tokens in place.
    let own_token = std::fs::read_to_string(&config.token_file).map_err(|e| {
        unavailable(format!(
            "could not read --k8s-token-file {}: {e}",
            config.token_file.display()
        ))
    })?;
    let own_token = own_token.trim();
    if own_token.is_empty() {
        return Err(unavailable(format!(
            "--k8s-token-file {} is empty",
            config.token_file.display()
        )));
    }

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CaError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];

    let body = serde_json::to_vec(&Review {
        api_version: "authentication.k8s.io/v1",
        kind: "TokenReview",
        spec: ReviewSpec {
            token,
            audiences: [&config.audience],
        },
    })
    .map_err(|e| CaError::Internal(format!("could not encode the TokenReview: {e}")))?;
    let headers = [
        (header::AUTHORIZATION, format!("Bearer {own_token}")),
        (header::CONTENT_TYPE, "application/json".to_string()),
        (header::ACCEPT, "application/json".to_string()),
    ];
    let (status, answer) = https::post(
        &target,
        Arc::new(tls),
        TOKEN_REVIEW_PATH,
        &headers,
        Bytes::from(body),
        MAX_REVIEW_BYTES,
    )
    .await
    .map_err(|e| match e {
        PostError::Connect(reason) | PostError::Body(reason) => {
            unavailable(format!("{}: {reason}", config.api_url))
        }
    })?;
    match status.as_u16() {
        200 | 201 => account_from_review(&answer, &config.audience),
        401 => Err(unavailable(format!(
            "the API server refused the CA's own token ({}); check --k8s-token-file",
            config.token_file.display()
        ))),
        403 => Err(unavailable(
            "the CA's service account may not create TokenReviews; bind it to the ClusterRole system:auth-delegator"
                .to_string(),
        )),
        other => Err(unavailable(format!(
            "the TokenReview failed with HTTP {other}"
        ))),
    }
}

/// Decide from a TokenReview answer. Pure, so every refusal is testable.
fn account_from_review(body: &[u8], audience: &str) -> Result<ServiceAccount, CaError> {
    let answer: ReviewAnswer = serde_json::from_slice(body).map_err(|e| {
        CaError::KubernetesUnavailable(format!("the API server's answer is not a TokenReview: {e}"))
    })?;
    let status = answer.status;
    if !status.authenticated {
        let why = if status.error.is_empty() {
            "the API server did not authenticate it".to_string()
        } else {
            format!("the API server says: {}", status.error)
        };
        return Err(CaError::KubernetesUnauthenticated(format!(
            "{why}; mount a projected service-account token with audience {audience:?}"
        )));
    }
    // A compliant API server lists the requested audiences the token holds;
    // one that does not check audiences lists none, and is not trusted.
    if !status.audiences.iter().any(|a| a == audience) {
        return Err(CaError::KubernetesUnauthenticated(format!(
            "the token is not for audience {audience:?} (it is for {:?}); \
             project it with `audience: {audience}`",
            status.audiences
        )));
    }
    let username = status.user.username;
    let account = username
        .strip_prefix(SA_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| valid_name(ns) && valid_name(sa));
    match account {
        Some((namespace, name)) => Ok(ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }),
        None => Err(CaError::KubernetesForbidden(format!(
            "{username:?} is not a service account; only a pod's service-account token gets a workload certificate"
        ))),
    }
}

/// Kubernetes namespace and service-account names: DNS labels/subdomains
/// (lowercase letters, digits, '-', '.'), at most 253 bytes.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s != "."
        && s != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(authenticated: bool, username: &str, audiences: &[&str], error: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "status": {
                "authenticated": authenticated,
                "user": {"username": username, "uid": "1", "groups": ["system:serviceaccounts"]},
                "audiences": audiences,
                "error": error,
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_service_account_with_our_audience_is_accepted() {
        let sa = account_from_review(
            &answer(true, "system:serviceaccount:shop:payment", &["weft-ca"], ""),
            "weft-ca",
        )
        .unwrap();
        assert_eq!(
            sa,
            ServiceAccount {
                namespace: "shop".into(),
                name: "payment".into()
            }
        );
    }

    #[test]
    fn everything_else_is_refused_with_a_reason() {
        let err =
            account_from_review(&answer(false, "", &[], "token expired"), "weft-ca").unwrap_err();
        assert!(
            matches!(err, CaError::KubernetesUnauthenticated(_)),
            "{err}"
        );
        assert!(err.to_string().contains("token expired"), "{err}");

        // Authenticated, but for another audience, or audiences unchecked.
        for auds in [&["api"][..], &[][..]] {
            let err = account_from_review(
                &answer(true, "system:serviceaccount:shop:payment", auds, ""),
                "weft-ca",
            )
            .unwrap_err();
            assert!(
                matches!(err, CaError::KubernetesUnauthenticated(_)),
                "{err}"
            );
            assert!(err.to_string().contains("audience"), "{err}");
        }

        for user in [
            "alice",
            "system:node:worker-1",
            "system:serviceaccount:shop",
            "system:serviceaccount:shop:pay:ment",
            "system:serviceaccount::payment",
            "system:serviceaccount:Shop:payment",
            "system:serviceaccount:shop:pay/ment",
        ] {
            let err =
                account_from_review(&answer(true, user, &["weft-ca"], ""), "weft-ca").unwrap_err();
            assert!(
                matches!(err, CaError::KubernetesForbidden(_)),
                "{user}: {err}"
            );
            assert_eq!(err.http_status(), 403);
        }

        let err = account_from_review(b"<html>", "weft-ca").unwrap_err();
        assert_eq!(err.http_status(), 503, "{err}");
    }
}
