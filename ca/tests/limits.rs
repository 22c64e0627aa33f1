//! CA hardening over real HTTPS: per-credential rate limits (429 with
//! Retry-After), single-use join tokens, and extra names on the serving
//! certificate.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Server, ID};
use rustls_pki_types::ServerName;
use weft_ca::ratelimit::RateLimit;
use weft_ca::{client, CaError};
use x509_parser::extensions::GeneralName;

/// Burst 2 and a refill so slow that no token comes back during a test.
fn tight(opts: &mut weft_ca::server::ServeOptions) {
    opts.rate_limit = RateLimit {
        burst: 2,
        per_second: 0.01,
    };
}

#[tokio::test]
async fn each_credential_has_its_own_bucket() {
    let srv = Server::start_with(tight).await;
    let token = srv.token();
    for _ in 0..2 {
        let answer = srv.post_csr(Some(&token), None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let answer = srv.post_csr(Some(&token), None).await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    let retry: u64 = answer.header("retry-after").unwrap().parse().unwrap();
    assert!((90..=100).contains(&retry), "Retry-After {retry}");
    assert!(
        answer.error().contains("too many requests"),
        "{}",
        answer.body
    );
    assert!(answer.error().contains(ID), "{}", answer.body);

    // Another token (even for the same identity) is another credential.
    let other = srv.token();
    assert_eq!(srv.post_csr(Some(&other), None).await.status, 200);

    // Renewals are limited per SPIFFE ID, whichever certificate is shown.
    let a = srv.ca.issue(ID, Duration::from_secs(600)).unwrap();
    let b = srv.ca.issue(ID, Duration::from_secs(600)).unwrap();
    let renew = |c: &weft_ca::IssuedCert| {
        let (chain, key) = (c.cert_chain_pem.clone(), c.key_pem.clone());
        let url = srv.url();
        let bundle = srv.ca.bundle_pem();
        async move { client::renew_certificate(&url, &bundle, &chain, &key).await }
    };
    renew(&a).await.unwrap();
    renew(&b).await.unwrap();
    match renew(&a).await {
        Err(CaError::Rejected { status: 429, .. }) => {}
        other => panic!("expected 429, got {other:?}"),
    }
    let admin = srv
        .ca
        .issue(
            "spiffe://example.org/ns/default/sa/admin",
            Duration::from_secs(600),
        )
        .unwrap();
    renew(&admin).await.unwrap();
    assert!(!srv.task.is_finished());
}

#[tokio::test]
async fn a_single_use_token_buys_one_certificate() {
    let srv = Server::start().await;
    let token = srv
        .ca
        .token_with(ID, Duration::from_secs(300), true)
        .unwrap();

    // A bad CSR does not use the token up.
    let answer = common::raw_request(
        srv.addr,
        &srv.ca.bundle_pem(),
        None,
        "POST",
        "/v1/certificate",
        &[("authorization", format!("Bearer {token}"))],
        b"not a csr",
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.body);

    client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), &token)
        .await
        .unwrap();
    let err = client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), &token)
        .await
        .unwrap_err();
    match &err {
        CaError::Rejected { status, message } => {
            assert_eq!(*status, 401);
            assert!(message.contains("already been redeemed"), "{message}");
        }
        other => panic!("unexpected {other}"),
    }

    // A CA loaded again from the directory (a restart) remembers.
    let reloaded = weft_ca::Ca::load(&srv.tmp.path().join("ca")).unwrap();
    assert!(matches!(
        reloaded.verify_token(&token),
        Err(CaError::TokenAlreadyUsed)
    ));

    // Multi-use tokens stay usable.
    let multi = srv.token();
    for _ in 0..3 {
        client::request_certificate(&srv.url(), &srv.ca.bundle_pem(), &multi)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn concurrent_redemptions_of_one_single_use_token_issue_once() {
    let srv = Arc::new(Server::start().await);
    let token = srv
        .ca
        .token_with(ID, Duration::from_secs(300), true)
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let srv = srv.clone();
        let token = token.clone();
        tasks.spawn(async move { srv.post_csr(Some(&token), None).await.status });
    }
    let mut statuses = Vec::new();
    while let Some(status) = tasks.join_next().await {
        statuses.push(status.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 401, 401, 401, 401, 401, 401, 401]);
}

/// The serving certificate's SANs, as strings.
async fn serving_sans(srv: &Server) -> Vec<String> {
    let config = common::client_config(&srv.ca.bundle_pem(), None);
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
    let san = parsed.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => d.to_string(),
            GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
            other => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn extra_names_go_on_the_serving_certificate() {
    let srv = Server::start_with(|o| {
        o.extra_sans = vec![
            "weft-ca.weft-system.svc".to_string(),
            "10.1.2.3".to_string(),
        ];
    })
    .await;
    let sans = serving_sans(&srv).await;
    assert!(
        sans.contains(&"weft-ca.weft-system.svc".to_string()),
        "{sans:?}"
    );
    assert!(sans.contains(&"localhost".to_string()), "{sans:?}");
    assert!(sans.contains(&"ip:[10, 1, 2, 3]".to_string()), "{sans:?}");

    let plain = Server::start().await;
    let sans = serving_sans(&plain).await;
    assert!(!sans.iter().any(|s| s.contains("svc")), "{sans:?}");
}

#[tokio::test]
async fn invalid_options_are_refused_before_serving() {
    for (adjust, want) in [
        (
            Box::new(|o: &mut weft_ca::server::ServeOptions| {
                o.extra_sans = vec!["not a name".to_string()]
            }) as Box<dyn FnOnce(&mut weft_ca::server::ServeOptions)>,
            "invalid serving certificate name",
        ),
        (
            Box::new(|o: &mut weft_ca::server::ServeOptions| o.rate_limit.burst = 0),
            "--rate-limit-burst",
        ),
        (
            Box::new(|o: &mut weft_ca::server::ServeOptions| o.rate_limit.per_second = 0.0),
            "--rate-limit-per-second",
        ),
    ] {
        let srv = Server::start_with(adjust).await;
        let err = srv.task.await.unwrap().unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
}
