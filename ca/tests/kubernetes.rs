//! `weft-ca serve --kubernetes`: projected service-account tokens checked
//! with the TokenReview API.
//!
//! The API server here is a stand-in: a small hyper HTTPS server with an
//! rcgen certificate that answers TokenReviews from a fixed table, the way
//! the real one does (audiences intersected with the requested ones,
//! `authenticated: false` with an error otherwise). It is the one test
//! double in the CA's tests, because no Kubernetes API server runs on this
//! machine. Everything else — the CA, its TLS, the client — is real, over
//! loopback.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{uri_sans, Server, ID};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use weft_ca::k8s::{KubernetesConfig, TOKEN_REVIEW_PATH};
use weft_ca::ratelimit::RateLimit;
use weft_ca::{client, CaError};

const PAYMENT: &str = "spiffe://example.org/ns/shop/sa/payment";

/// What the stand-in knows about a token: the user and its audiences.
struct Known {
    username: &'static str,
    audiences: &'static [&'static str],
}

fn known_tokens() -> HashMap<&'static str, Known> {
    HashMap::from([
        (
            "sa-payment-1",
            Known {
                username: "system:serviceaccount:shop:payment",
                audiences: &["weft-ca"],
            },
        ),
        (
            "sa-payment-2",
            Known {
                username: "system:serviceaccount:shop:payment",
                audiences: &["weft-ca"],
            },
        ),
        (
            "sa-payment-for-the-api",
            Known {
                username: "system:serviceaccount:shop:payment",
                audiences: &["https://kubernetes.default.svc"],
            },
        ),
        (
            "user-alice",
            Known {
                username: "alice",
                audiences: &["weft-ca"],
            },
        ),
    ])
}

/// Every review the stand-in received: (token reviewed, audiences asked for).
type ReviewLog = Mutex<Vec<(String, Vec<String>)>>;

/// The stand-in API server and the files the CA reads.
struct ApiServer {
    _tmp: tempfile::TempDir,
    addr: SocketAddr,
    ca_file: PathBuf,
    token_file: PathBuf,
    /// The bearer the stand-in requires from the CA (its own SA token).
    expected_bearer: Arc<Mutex<String>>,
    reviews: Arc<ReviewLog>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    async fn start() -> ApiServer {
        let tmp = tempfile::tempdir().unwrap();
        // A cluster CA and the API server's certificate for 127.0.0.1.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.signed_by(&key, &issuer).unwrap();

        let ca_file = tmp.path().join("ca.crt");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let token_file = tmp.path().join("token");
        std::fs::write(&token_file, "ca-own-token-1\n").unwrap();

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let expected_bearer = Arc::new(Mutex::new("ca-own-token-1".to_string()));
        let reviews = Arc::new(Mutex::new(Vec::new()));
        let (bearer, log) = (expected_bearer.clone(), reviews.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, bearer, log) = (acceptor.clone(), bearer.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let (bearer, log) = (bearer.clone(), log.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(answer(req, &bearer, &log).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        ApiServer {
            _tmp: tmp,
            addr,
            ca_file,
            token_file,
            expected_bearer,
            reviews,
            task,
        }
    }

    fn config(&self) -> KubernetesConfig {
        KubernetesConfig {
            api_url: format!("https://{}", self.addr),
            ca_file: self.ca_file.clone(),
            token_file: self.token_file.clone(),
            audience: "weft-ca".to_string(),
        }
    }
}

/// Answer one TokenReview like the API server would.
async fn answer(
    req: Request<Incoming>,
    bearer: &Mutex<String>,
    log: &ReviewLog,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: serde_json::Value| {
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        resp
    };
    if req.uri().path() != TOKEN_REVIEW_PATH || req.method() != http::Method::POST {
        return reply(StatusCode::NOT_FOUND, serde_json::json!({"kind": "Status"}));
    }
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {}", bearer.lock().unwrap()).as_str());
    if !authorized {
        return reply(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"kind": "Status"}),
        );
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(review["kind"], "TokenReview");
    let token = review["spec"]["token"].as_str().unwrap().to_string();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    log.lock().unwrap().push((token.clone(), wanted.clone()));

    let status = match known_tokens().get(token.as_str()) {
        None => serde_json::json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(known) => {
            let both: Vec<&str> = known
                .audiences
                .iter()
                .copied()
                .filter(|a| wanted.iter().any(|w| w == a))
                .collect();
            if both.is_empty() {
                serde_json::json!({
                    "authenticated": false,
                    "error": format!("token audiences {:?} is invalid for the target audiences {wanted:?}", known.audiences),
                })
            } else {
                serde_json::json!({
                    "authenticated": true,
                    "user": {"username": known.username, "uid": "u-1", "groups": ["system:authenticated"]},
                    "audiences": both,
                })
            }
        }
    };
    reply(
        StatusCode::CREATED,
        serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"audiences": wanted},
            "status": status,
        }),
    )
}

async fn ca_with(api: &ApiServer) -> Server {
    let config = api.config();
    Server::start_with(move |o| o.kubernetes = Some(config)).await
}

async fn refusal(srv: &Server, token: &str) -> (u16, String) {
    match client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), token).await {
        Err(CaError::Rejected { status, message }) => (status, message),
        other => panic!("expected a refusal for {token}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_service_account_token_gets_exactly_that_accounts_identity() {
    let api = ApiServer::start().await;
    let srv = ca_with(&api).await;
    let issued = client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), "sa-payment-1")
        .await
        .unwrap();
    assert_eq!(uri_sans(&issued.cert_chain_pem), vec![PAYMENT.to_string()]);
    assert_eq!(
        api.reviews.lock().unwrap().as_slice(),
        &[("sa-payment-1".to_string(), vec!["weft-ca".to_string()])]
    );

    // The CA re-reads its own token: the kubelet rotated it.
    std::fs::write(&api.token_file, "ca-own-token-2").unwrap();
    *api.expected_bearer.lock().unwrap() = "ca-own-token-2".to_string();
    client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), "sa-payment-1")
        .await
        .unwrap();

    // Join tokens still work next to Kubernetes tokens, and never reach
    // the API server.
    let before = api.reviews.lock().unwrap().len();
    let issued = client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), &srv.token())
        .await
        .unwrap();
    assert_eq!(uri_sans(&issued.cert_chain_pem), vec![ID.to_string()]);
    assert_eq!(api.reviews.lock().unwrap().len(), before);
}

#[tokio::test]
async fn unauthenticated_wrong_audience_and_non_service_account_tokens_are_refused() {
    let api = ApiServer::start().await;
    let srv = ca_with(&api).await;

    let (status, message) = refusal(&srv, "stolen-or-expired").await;
    assert_eq!(status, 401);
    assert!(message.contains("invalid bearer token"), "{message}");

    // A real service-account token, but minted for the API server.
    let (status, message) = refusal(&srv, "sa-payment-for-the-api").await;
    assert_eq!(status, 401);
    assert!(message.contains("audience"), "{message}");

    let (status, message) = refusal(&srv, "user-alice").await;
    assert_eq!(status, 403);
    assert!(message.contains("not a service account"), "{message}");
    assert!(!srv.task.is_finished());
}

#[tokio::test]
async fn an_unreachable_or_unhappy_api_server_is_a_503_and_the_ca_keeps_serving() {
    let api = ApiServer::start().await;

    // Nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let mut config = api.config();
    config.api_url = format!("https://{closed_addr}");
    let srv = Server::start_with(move |o| o.kubernetes = Some(config)).await;
    let (status, message) = refusal(&srv, "sa-payment-1").await;
    assert_eq!(status, 503, "{message}");
    assert!(message.contains("can be retried"), "{message}");
    // Still serving.
    client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), &srv.token())
        .await
        .unwrap();

    // The API server refuses the CA's own token.
    let srv = ca_with(&api).await;
    std::fs::write(&api.token_file, "not-what-the-api-expects").unwrap();
    let (status, message) = refusal(&srv, "sa-payment-1").await;
    assert_eq!(status, 503, "{message}");
    assert!(message.contains("--k8s-token-file"), "{message}");

    // The API server's certificate is not from --k8s-ca-file.
    let other_ca = Server::start().await;
    let wrong_ca = other_ca.tmp.path().join("ca/ca.pem");
    let mut config = api.config();
    config.ca_file = wrong_ca;
    std::fs::write(&api.token_file, "ca-own-token-1").unwrap();
    let srv = Server::start_with(move |o| o.kubernetes = Some(config)).await;
    let (status, message) = refusal(&srv, "sa-payment-1").await;
    assert_eq!(status, 503, "{message}");
    assert!(message.contains("TLS handshake failed"), "{message}");
    assert!(!srv.task.is_finished());
    api.task.abort();
}

#[tokio::test]
async fn service_accounts_are_rate_limited_whichever_token_they_show() {
    let api = ApiServer::start().await;
    let config = api.config();
    let srv = Server::start_with(move |o| {
        o.kubernetes = Some(config);
        o.rate_limit = RateLimit {
            burst: 2,
            per_second: 0.01,
        };
    })
    .await;
    for token in ["sa-payment-1", "sa-payment-2"] {
        client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), token)
            .await
            .unwrap();
    }
    let (status, message) = refusal(&srv, "sa-payment-1").await;
    assert_eq!(status, 429, "{message}");
    assert!(message.contains(PAYMENT), "{message}");
}

#[tokio::test]
async fn without_kubernetes_a_non_join_token_is_refused_with_a_hint() {
    let srv = Server::start().await;
    let (status, message) = refusal(&srv, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln").await;
    assert_eq!(status, 401);
    assert!(message.contains("--kubernetes"), "{message}");
    assert!(
        !message.contains("eyJ"),
        "the token is not echoed: {message}"
    );
}
