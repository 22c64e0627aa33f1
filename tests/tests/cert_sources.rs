//! Where a sidecar's certificate comes from, end to end: files in a
//! `--cert-dir` rewritten while traffic flows (a kubelet-style `..data`
//! symlink swap, and per-file renames as `weft-ca issue --out` does);
//! certificates that are not valid yet, from a peer and from files; and a
//! Kubernetes projected service-account token sent to `weft-ca serve
//! --kubernetes`, in process and with the real `weft` binary.
//!
//! The Kubernetes API server here is a stand-in: a small HTTPS server (rustls
//! over a blocking socket, with an rcgen certificate) that answers
//! TokenReviews from a fixed table the way the real one does. It is the one
//! test double allowed, because no Kubernetes API server runs on this
//! machine. Everything else — the CA and its TLS, the sidecars, QUIC, mTLS —
//! is real, over loopback.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use weft_ca::k8s::{KubernetesConfig, TOKEN_REVIEW_PATH};
use weft_ca::server::ServeOptions;
use weft_ca::{Ca, IssuedCert};
use weft_proxy::identity::CERT_DIR_POLL;
use weft_proxy::mesh::Protocol;
use weft_proxy::{CaCredential, IdentitySource, Limits, Sidecar, SidecarConfig};
use weft_tests::fleet::{background, BehavingApp};
use weft_tests::*;

const LIMIT: Duration = Duration::from_secs(60);
const HANDSHAKE_FAILURES: &str = "weft_quic_handshake_failures_total";
/// A `--cert-dir` change must apply within this (polled every 2 s).
const APPLY_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Shared helpers.

/// A sidecar's `/certs`: (identity, serial).
async fn certs(admin: SocketAddr) -> (String, String) {
    let (status, body) = admin_get(admin, "/certs").await;
    assert_eq!(status, 200, "/certs: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/certs is JSON");
    (
        v["identity"].as_str().unwrap_or_default().to_string(),
        v["serial"].as_str().unwrap_or_default().to_string(),
    )
}

async fn serial(admin: SocketAddr) -> String {
    certs(admin).await.1
}

async fn renewals(admin: SocketAddr, result: &str) -> f64 {
    metric_sum(
        &scrape(admin).await,
        "weft_cert_renewals_total",
        &[("result", result)],
    )
}

/// Handshake with the sidecar at `addr`, trusting `roots` and presenting
/// `cert`: the leaf it presented on the wire.
async fn presented_leaf(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    cert: ClientCert,
) -> CertificateDer<'static> {
    let endpoint = quic_client(roots, Some(cert), b"h3");
    let conn = endpoint
        .connect(addr, "weft.mesh")
        .expect("dial")
        .await
        .expect("handshake with the sidecar");
    let leaf = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned())
        .expect("the sidecar presented a certificate");
    conn.close(0u32.into(), b"probe done");
    leaf
}

fn serial_of(leaf: &CertificateDer<'_>) -> String {
    weft_transport::tls::serial_of(leaf).expect("serial")
}

/// Mesh credentials from an issued certificate.
fn creds_of(i: &IssuedCert) -> weft_transport::Credentials {
    weft_transport::Credentials::from_pem(
        i.cert_chain_pem.as_bytes(),
        i.key_pem.as_bytes(),
        i.bundle_pem.as_bytes(),
    )
    .expect("issued credentials parse")
}

/// A leaf signed by `ca`'s root (read from its directory) for `id`, valid
/// from `not_before` to `not_after`: (cert PEM, key PEM). From
/// tests/security.rs, as PEM so it can also be written to a `--cert-dir`.
fn handmade_leaf(
    ca: &TestCa,
    id: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (String, String) {
    let ca_pem = std::fs::read_to_string(ca.dir.path().join("ca.pem")).expect("ca.pem");
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(ca.dir.path().join("ca-key.pem")).expect("ca-key.pem"),
    )
    .expect("CA key");
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.try_into().expect("ASCII URI"))];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

fn client_cert_of(ca: &TestCa, (cert, key): &(String, String)) -> ClientCert {
    let bundle = ca.ca.bundle_pem();
    client_cert(
        &weft_transport::Credentials::from_pem(cert.as_bytes(), key.as_bytes(), bundle.as_bytes())
            .expect("hand-made leaf parses"),
    )
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A server sidecar (payment, in front of `app`) with `identity`, and a
/// client sidecar with `client_creds`.
async fn pair_with(
    client_creds: weft_transport::Credentials,
    identity: IdentitySource,
    app: SocketAddr,
) -> (Sidecar, Sidecar) {
    let m = mesh(TD, &[("payment", Protocol::Http)]);
    let server = Sidecar::start(SidecarConfig {
        mesh: m.clone(),
        identity,
        inbound: any_port(),
        admin: any_port(),
        app: Some(app),
        upstreams: vec![],
        udp_upstreams: Vec::new(),
        limits: Limits::default(),
        tracing: Default::default(),
        capture: Default::default(),
        dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
    })
    .await
    .expect("server sidecar starts");
    let m = with_endpoint(m, "payment", server.inbound_addr);
    server.set_mesh(m.clone());
    let client = sidecar(&m, client_creds, None, &["payment"], Limits::default()).await;
    (client, server)
}

// ---------------------------------------------------------------------------
// --cert-dir

/// A directory laid out the way the kubelet projects a Secret (what
/// cert-manager's certificates reach a pod as): the files are symlinks
/// `name -> ..data/name`, `..data` a symlink to a timestamped directory,
/// and an update writes a new directory and swaps `..data` with one
/// rename, so all files change at once.
struct ProjectedDir {
    dir: PathBuf,
    generation: u32,
}

impl ProjectedDir {
    const FILES: [&'static str; 3] = ["cert.pem", "key.pem", "bundle.pem"];

    fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("create cert dir");
        ProjectedDir { dir, generation: 0 }
    }

    fn publish_issued(&mut self, i: &IssuedCert) {
        self.publish(&i.cert_chain_pem, &i.key_pem, &i.bundle_pem);
    }

    fn publish(&mut self, cert: &str, key: &str, bundle: &str) {
        use std::os::unix::fs::symlink;
        let old = self.generation;
        self.generation += 1;
        let name = format!("..gen_{}", self.generation);
        let data = self.dir.join(&name);
        std::fs::create_dir(&data).expect("create generation");
        for (file, text) in Self::FILES.iter().zip([cert, key, bundle]) {
            std::fs::write(data.join(file), text).expect("write projected file");
        }
        let tmp = self.dir.join("..data_tmp");
        symlink(&name, &tmp).expect("symlink ..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
        for file in Self::FILES {
            let link = self.dir.join(file);
            if link.symlink_metadata().is_err() {
                symlink(format!("..data/{file}"), &link).expect("symlink file");
            }
        }
        if old > 0 {
            // The kubelet removes the previous generation after the swap.
            let _ = std::fs::remove_dir_all(self.dir.join(format!("..gen_{old}")));
        }
    }
}

/// Give a just-started `--cert-dir` watcher time to take its baseline
/// (time-based, not synchronisation: nothing observable says it has). The
/// watcher compares later reads with what it read when its task first ran,
/// not with what start-up loaded, so a change before that is never applied
/// (see [`cert_dir_files_replaced_right_after_start_are_applied`]).
async fn settle_watcher() {
    tokio::time::sleep(CERT_DIR_POLL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_dir_changes_apply_while_traffic_flows_and_bad_files_are_not_applied() {
    tokio::time::timeout(LIMIT, async {
        let ca = TestCa::new(TD);
        let id = ca.id("payment");
        let issue = || ca.ca.issue(&id, Duration::from_secs(3600)).expect("issue");
        let roots = ca.ca.bundle_certs();
        let prober = || client_cert(&ca.creds("prober"));
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut dir = ProjectedDir::new(tmp.path().join("certs"));
        let first = issue();
        dir.publish_issued(&first);

        let app = BehavingApp::start("payment").await;
        let (client, server) = pair_with(
            ca.creds("customer"),
            IdentitySource::CertDir(dir.dir.clone()),
            app.addr,
        )
        .await;
        let admin = server.admin_addr;
        assert_eq!(certs(admin).await, (id.clone(), first.serial_hex.clone()));
        settle_watcher().await;
        let l = background(client.upstream_addrs["payment"], 2);
        let mut ok = l.assert_flows(0, "before any change").await;
        let (success0, failure0) = (
            renewals(admin, "success").await,
            renewals(admin, "failure").await,
        );

        // 1. A new certificate, swapped in the kubelet's way: applied within
        //    a few seconds, counted, and presented on new handshakes.
        let second = issue();
        let t = Instant::now();
        dir.publish_issued(&second);
        let applied = wait_until(APPLY_WITHIN, || async {
            serial(admin).await == second.serial_hex
        })
        .await;
        assert!(
            applied,
            "the swapped certificate was not applied within {APPLY_WITHIN:?}"
        );
        eprintln!("cert-dir: swap applied after {:?}", t.elapsed());
        assert_eq!(renewals(admin, "success").await, success0 + 1.0);
        assert_eq!(
            renewals(admin, "failure").await,
            failure0,
            "an atomic swap is no failure"
        );
        let leaf = presented_leaf(server.inbound_addr, &roots, prober()).await;
        assert_eq!(serial_of(&leaf), second.serial_hex, "new handshakes use it");
        ok = l.assert_flows(ok, "after the swap").await;

        // 2. Garbage: a complete but truncated cert.pem (a cert-manager bug,
        //    a bad hand edit). Nothing to apply; the current certificate
        //    stays, and so does traffic. Waiting two polls is time-based:
        //    the test must give the watcher the chance to (wrongly) act.
        let third = issue();
        let truncated = &third.cert_chain_pem[..third.cert_chain_pem.len() / 2];
        dir.publish(truncated, &third.key_pem, &third.bundle_pem);
        tokio::time::sleep(CERT_DIR_POLL * 2 + Duration::from_millis(500)).await;
        assert_eq!(
            serial(admin).await,
            second.serial_hex,
            "garbage kept the old certificate"
        );
        assert_eq!(renewals(admin, "success").await, success0 + 1.0);
        let (status, _) = admin_get(admin, "/ready").await;
        assert_eq!(status, 200, "still ready on the current certificate");
        let leaf = presented_leaf(server.inbound_addr, &roots, prober()).await;
        assert_eq!(serial_of(&leaf), second.serial_hex);
        ok = l.assert_flows(ok, "after the garbage").await;
        // Content that stays unusable over two polls is reported, once.
        assert_eq!(renewals(admin, "failure").await, failure0 + 1.0);

        // 3. A well-formed certificate for another identity: rejected,
        //    counted as a failure, the current one stays.
        let failures = renewals(admin, "failure").await;
        let intruder = ca
            .ca
            .issue(&ca.id("intruder"), Duration::from_secs(3600))
            .expect("issue");
        dir.publish_issued(&intruder);
        let counted = wait_until(APPLY_WITHIN, || async {
            renewals(admin, "failure").await > failures
        })
        .await;
        assert!(
            counted,
            "a certificate for another identity must count a failure"
        );
        assert_eq!(certs(admin).await, (id.clone(), second.serial_hex.clone()));
        assert_eq!(renewals(admin, "success").await, success0 + 1.0);
        ok = l.assert_flows(ok, "after the foreign identity").await;

        // 4. Good files again, this time replaced file by file with renames
        //    (what `weft-ca issue --out` does; it also replaces the kubelet
        //    symlinks): the watcher is still alive and applies them.
        let fourth = issue();
        fourth.write_to(&dir.dir).expect("write_to");
        let applied = wait_until(APPLY_WITHIN, || async {
            serial(admin).await == fourth.serial_hex
        })
        .await;
        assert!(applied, "good files after bad ones were not applied");
        assert_eq!(renewals(admin, "success").await, success0 + 2.0);
        let leaf = presented_leaf(server.inbound_addr, &roots, prober()).await;
        assert_eq!(serial_of(&leaf), fourth.serial_hex);
        l.assert_flows(ok, "after the per-file rewrite").await;

        l.stop();
        l.assert_no_failure();
        assert!(app.requests() >= l.ok());
    })
    .await
    .expect("test timed out");
}

/// Files renewed on disk right after a sidecar started (cert-manager and
/// a pod start racing) must still be applied. A current-thread runtime makes
/// the window deterministic: the sidecar's tasks first run when the test
/// yields, after the rewrite.
#[tokio::test(flavor = "current_thread")]
async fn cert_dir_files_replaced_right_after_start_are_applied() {
    tokio::time::timeout(LIMIT, async {
        let ca = TestCa::new(TD);
        let id = ca.id("payment");
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        let first = ca.ca.issue(&id, Duration::from_secs(3600)).expect("issue");
        first.write_to(&dir).expect("write_to");
        let next = ca.ca.issue(&id, Duration::from_secs(3600)).expect("issue");
        let sc = Sidecar::start(SidecarConfig {
            mesh: mesh(TD, &[]),
            identity: IdentitySource::CertDir(dir.clone()),
            inbound: any_port(),
            admin: any_port(),
            app: None,
            upstreams: vec![],
            udp_upstreams: Vec::new(),
            limits: Limits::default(),
            tracing: Default::default(),
            capture: Default::default(),
            dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
        })
        .await
        .expect("sidecar starts");
        // Renewed on disk before the sidecar's tasks have run.
        next.write_to(&dir).expect("write_to");
        let applied = wait_until(APPLY_WITHIN, || async {
            serial(sc.admin_addr).await == next.serial_hex
        })
        .await;
        assert!(
            applied,
            "still serving {} although {} is on disk",
            serial(sc.admin_addr).await,
            next.serial_hex
        );
    })
    .await
    .expect("test timed out");
}

// ---------------------------------------------------------------------------
// Not yet valid

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_certificates_are_refused() {
    tokio::time::timeout(LIMIT, async {
        let ca = TestCa::new(TD);
        let roots = ca.ca.bundle_certs();
        let (app, seen) = http_app().await;
        let m = mesh(TD, &[("payment", Protocol::Http)]);
        let server = sidecar(&m, ca.creds("payment"), Some(app), &[], Limits::default()).await;
        server.set_mesh(with_endpoint(m, "payment", server.inbound_addr));
        let hour = time::Duration::hours(1);
        let id = ca.id("customer");

        // Control: the same hand-made leaf, valid now, is admitted.
        let valid = handmade_leaf(&ca, &id, now() - hour, now() + hour);
        let status = h3_attempt(
            server.inbound_addr,
            &roots,
            Some(client_cert_of(&ca, &valid)),
            "payment",
        )
        .await
        .expect("a valid hand-made leaf is admitted");
        assert_eq!(status, 200);
        assert_eq!(seen.requests.load(Ordering::SeqCst), 1);

        // A peer whose certificate starts in an hour is refused in the handshake.
        let failures = metric_sum(&scrape(server.admin_addr).await, HANDSHAKE_FAILURES, &[]);
        let future = handmade_leaf(&ca, &id, now() + hour, now() + hour * 2);
        let err = h3_attempt(
            server.inbound_addr,
            &roots,
            Some(client_cert_of(&ca, &future)),
            "payment",
        )
        .await
        .expect_err("a not-yet-valid client certificate must be refused");
        assert!(is_tls_alert(&err), "refused with a TLS alert, got {err:?}");
        let counted = wait_until(Duration::from_secs(10), || async {
            metric_sum(&scrape(server.admin_addr).await, HANDSHAKE_FAILURES, &[]) > failures
        })
        .await;
        assert!(counted, "the server must count the failed handshake");
        assert_eq!(
            seen.requests.load(Ordering::SeqCst),
            1,
            "nothing reached the app"
        );

        // A sidecar does not start on a not-yet-valid certificate in its
        // --cert-dir (it could only be refused by every peer)...
        let tmp = tempfile::tempdir().expect("tempdir");
        let write_dir = |dir: &Path, (cert, key): &(String, String)| {
            std::fs::create_dir_all(dir).expect("dir");
            std::fs::write(dir.join("key.pem"), key).expect("key");
            std::fs::write(dir.join("cert.pem"), cert).expect("cert");
            std::fs::write(dir.join("bundle.pem"), ca.ca.bundle_pem()).expect("bundle");
        };
        let early = tmp.path().join("early");
        let payment = ca.id("payment");
        write_dir(
            &early,
            &handmade_leaf(&ca, &payment, now() + hour, now() + hour * 2),
        );
        let started = Sidecar::start(SidecarConfig {
            mesh: mesh(TD, &[]),
            identity: IdentitySource::CertDir(early),
            inbound: any_port(),
            admin: any_port(),
            app: None,
            upstreams: vec![],
            udp_upstreams: Vec::new(),
            limits: Limits::default(),
            tracing: Default::default(),
            capture: Default::default(),
            dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
        })
        .await;
        let err = started
            .err()
            .expect("a not-yet-valid certificate must not start a sidecar");
        assert!(err.to_string().contains("NotValidYet"), "{err}");

        // ...and a running one does not switch to one written there.
        let dir = tmp.path().join("running");
        write_dir(
            &dir,
            &handmade_leaf(&ca, &payment, now() - hour, now() + hour),
        );
        let running = Sidecar::start(SidecarConfig {
            mesh: mesh(TD, &[]),
            identity: IdentitySource::CertDir(dir.clone()),
            inbound: any_port(),
            admin: any_port(),
            app: None,
            upstreams: vec![],
            udp_upstreams: Vec::new(),
            limits: Limits::default(),
            tracing: Default::default(),
            capture: Default::default(),
            dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
        })
        .await
        .expect("a sidecar starts on a valid certificate");
        let before = serial(running.admin_addr).await;
        settle_watcher().await;
        let future = handmade_leaf(&ca, &payment, now() + hour, now() + hour * 2);
        let staged = tmp.path().join("staged");
        write_dir(&staged, &future);
        for file in ["key.pem", "cert.pem"] {
            std::fs::rename(staged.join(file), dir.join(file)).expect("rename into place");
        }
        let counted = wait_until(APPLY_WITHIN, || async {
            renewals(running.admin_addr, "failure").await >= 1.0
        })
        .await;
        assert!(
            counted,
            "a rejected not-yet-valid certificate must count a failure"
        );
        assert_eq!(serial(running.admin_addr).await, before);
        assert_eq!(renewals(running.admin_addr, "success").await, 0.0);
        let (status, _) = admin_get(running.admin_addr, "/ready").await;
        assert_eq!(status, 200);
    })
    .await
    .expect("test timed out");
}

// ---------------------------------------------------------------------------
// Kubernetes tokens

/// What the stand-in knows about a token: the user and its audiences.
fn known_token(token: &str) -> Option<(&'static str, &'static [&'static str])> {
    HashMap::from([
        (
            "sa-payment-1",
            ("system:serviceaccount:shop:payment", &["weft-ca"][..]),
        ),
        (
            "sa-payment-for-the-api",
            (
                "system:serviceaccount:shop:payment",
                &["https://kubernetes.default.svc"][..],
            ),
        ),
    ])
    .get(token)
    .copied()
}

/// The CA's own service-account token, which the stand-in requires.
const CA_OWN_TOKEN: &str = "ca-own-token";

/// Every review the stand-in answered: (token, audiences asked for).
type ReviewLog = Arc<Mutex<Vec<(String, Vec<String>)>>>;

/// The stand-in API server (see the module comment) and the files the CA
/// reads to reach it.
struct ApiServer {
    _tmp: tempfile::TempDir,
    addr: SocketAddr,
    ca_file: PathBuf,
    token_file: PathBuf,
    reviews: ReviewLog,
    stop: Arc<AtomicBool>,
}

impl ApiServer {
    fn start() -> ApiServer {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A cluster CA, and the API server's certificate for 127.0.0.1.
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("cluster CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        let cert = params.signed_by(&key, &issuer).expect("API server cert");
        let ca_file = tmp.path().join("ca.crt");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write ca.crt");
        let token_file = tmp.path().join("token");
        std::fs::write(&token_file, format!("{CA_OWN_TOKEN}\n")).expect("write token");

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(
                    vec![CertificateDer::from(cert.der().to_vec())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )
                .expect("server cert"),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind API server");
        let addr = listener.local_addr().expect("addr");
        let reviews: ReviewLog = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopping) = (reviews.clone(), stop.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(tcp) = tcp else { continue };
                let (config, log) = (config.clone(), log.clone());
                std::thread::spawn(move || {
                    let _ = serve_review(tcp, config, &log);
                });
            }
        });
        ApiServer {
            _tmp: tmp,
            addr,
            ca_file,
            token_file,
            reviews,
            stop,
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

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// One HTTP/1.1 request over TLS on a blocking socket, answered and closed.
fn serve_review(
    tcp: std::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    log: &ReviewLog,
) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tls.read(&mut chunk)?;
        if n == 0 || buf.len() > 64 << 10 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let (status, body) =
        review_answer(&request_line, &headers, &buf[head_end..head_end + len], log);
    write!(
        tls,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    tls.write_all(body.as_bytes())?;
    tls.conn.send_close_notify();
    tls.flush()
}

/// Answer a TokenReview like the API server: audiences intersected with the
/// requested ones, `authenticated: false` with an error otherwise.
fn review_answer(
    request_line: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
    log: &ReviewLog,
) -> (&'static str, String) {
    if request_line != format!("POST {TOKEN_REVIEW_PATH} HTTP/1.1") {
        return ("404 Not Found", r#"{"kind":"Status"}"#.to_string());
    }
    if headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {CA_OWN_TOKEN}")) {
        return ("401 Unauthorized", r#"{"kind":"Status"}"#.to_string());
    }
    let Ok(review) = serde_json::from_slice::<serde_json::Value>(body) else {
        return ("400 Bad Request", r#"{"kind":"Status"}"#.to_string());
    };
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    log.lock()
        .expect("lock")
        .push((token.clone(), wanted.clone()));
    let status = match known_token(&token) {
        None => serde_json::json!({"authenticated": false, "error": "invalid bearer token"}),
        Some((username, audiences)) => {
            let both: Vec<&str> = audiences
                .iter()
                .copied()
                .filter(|a| wanted.iter().any(|w| w == a))
                .collect();
            if both.is_empty() {
                serde_json::json!({
                    "authenticated": false,
                    "error": format!("token audiences {audiences:?} are invalid for {wanted:?}"),
                })
            } else {
                serde_json::json!({
                    "authenticated": true,
                    "user": {"username": username, "uid": "u-1", "groups": ["system:authenticated"]},
                    "audiences": both,
                })
            }
        }
    };
    let answer = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"audiences": wanted},
        "status": status,
    });
    ("201 Created", answer.to_string())
}

/// `weft-ca serve --kubernetes` against the stand-in, in process.
struct KubeCa {
    ca: Arc<Ca>,
    _dir: tempfile::TempDir,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl KubeCa {
    async fn start(api: &ApiServer) -> KubeCa {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(Ca::init(dir.path(), TD).expect("init CA"));
        let listener = TcpListener::bind(any_port()).await.expect("bind CA");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let opts = ServeOptions {
            kubernetes: Some(api.config()),
            ..ServeOptions::new(Duration::from_secs(3600))
        };
        let served = ca.clone();
        let task = tokio::spawn(async move {
            let _ = weft_ca::server::serve_with(served, listener, opts).await;
        });
        KubeCa {
            ca,
            _dir: dir,
            url,
            task,
        }
    }
}

impl Drop for KubeCa {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const SHOP_PAYMENT: &str = "spiffe://test.weft.local/ns/shop/sa/payment";

fn k8s_identity(ca: &KubeCa, token_file: &Path) -> IdentitySource {
    IdentitySource::Ca {
        url: ca.url.clone(),
        bundle_pem: ca.ca.bundle_pem(),
        credential: CaCredential::KubernetesTokenFile(token_file.to_path_buf()),
        expect_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_a_kubernetes_token_gets_its_service_accounts_identity() {
    tokio::time::timeout(LIMIT, async {
        let api = ApiServer::start();
        let ca = KubeCa::start(&api).await;
        let tmp = tempfile::tempdir().expect("tempdir");
        let token_file = tmp.path().join("token");
        // As the kubelet writes a projected token: no trailing newline
        // guarantees, so add one.
        std::fs::write(&token_file, "sa-payment-1\n").expect("token");

        let (app, seen) = http_app().await;
        let local = |name: &str| {
            creds_of(
                &ca.ca
                    .issue(
                        &format!("spiffe://{TD}/ns/test/sa/{name}"),
                        Duration::from_secs(3600),
                    )
                    .expect("issue"),
            )
        };
        let (client, server) =
            pair_with(local("customer"), k8s_identity(&ca, &token_file), app).await;

        // The identity is the one the review vouched for, and no other.
        let (identity, _) = certs(server.admin_addr).await;
        assert_eq!(identity, SHOP_PAYMENT);
        assert_eq!(
            api.reviews.lock().expect("lock").as_slice(),
            &[("sa-payment-1".to_string(), vec!["weft-ca".to_string()])],
            "one TokenReview, for our audience"
        );
        // It is what the sidecar presents on the wire.
        let leaf = presented_leaf(
            server.inbound_addr,
            &ca.ca.bundle_certs(),
            client_cert(&local("prober")),
        )
        .await;
        let on_wire = weft_transport::tls::spiffe_id_of(&leaf, TD).expect("SPIFFE ID");
        assert_eq!(on_wire.as_str(), SHOP_PAYMENT);
        // And traffic flows through it, to its app.
        let (status, headers, _) =
            http_get(client.upstream_addrs["payment"], "payment", "/k8s").await;
        assert_eq!(status, 200);
        assert_eq!(
            headers.get("x-seen-peer-id").and_then(|v| v.to_str().ok()),
            Some(format!("spiffe://{TD}/ns/test/sa/customer").as_str())
        );
        assert_eq!(seen.requests.load(Ordering::SeqCst), 1);

        // A token minted for another audience gets no certificate, and the
        // sidecar says why.
        let other = tmp.path().join("other-token");
        std::fs::write(&other, "sa-payment-for-the-api").expect("token");
        let err = Sidecar::start(SidecarConfig {
            mesh: mesh(TD, &[]),
            identity: k8s_identity(&ca, &other),
            inbound: any_port(),
            admin: any_port(),
            app: None,
            upstreams: vec![],
            udp_upstreams: Vec::new(),
            limits: Limits::default(),
            tracing: Default::default(),
            capture: Default::default(),
            dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
        })
        .await
        .err()
        .expect("a token for another audience must not get a certificate");
        let err = err.to_string();
        assert!(err.contains("401") && err.contains("audience"), "{err}");
    })
    .await
    .expect("test timed out");
}

/// The same with the real `weft` binary: `--ca URL --ca-bundle FILE
/// --k8s-token-file FILE` starts, prints its ready line with the service
/// account's identity, and `/certs` agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_sidecar_with_k8s_token_file_starts_with_that_identity() {
    tokio::time::timeout(LIMIT, async {
        let api = ApiServer::start();
        let ca = KubeCa::start(&api).await;
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path();
        std::fs::write(d.join("mesh.toml"), format!("trust_domain = \"{TD}\"\n")).expect("mesh");
        std::fs::write(d.join("ca-bundle.pem"), ca.ca.bundle_pem()).expect("bundle");
        std::fs::write(d.join("token"), "sa-payment-1").expect("token");

        let mut cmd = tokio::process::Command::new(bin("weft"));
        cmd.current_dir(d)
            .env_remove("RUST_LOG")
            .args(["sidecar", "--mesh", "mesh.toml", "--ca", &ca.url])
            .args(["--ca-bundle", "ca-bundle.pem", "--k8s-token-file", "token"])
            .args(["--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
        let mut process = start_weft(cmd).await;
        let field = |name: &str| process.field(name).to_string();
        let line = process.ready.clone();
        assert_eq!(field("identity="), SHOP_PAYMENT, "{line}");
        let admin: SocketAddr = field("admin=").parse().expect("admin address");
        let (identity, _) = certs(admin).await;
        assert_eq!(identity, SHOP_PAYMENT);
        let (status, _) = admin_get(admin, "/ready").await;
        assert_eq!(status, 200);
        assert_eq!(api.reviews.lock().expect("lock").len(), 1);
        process.child.kill().await.expect("stop weft sidecar");
    })
    .await
    .expect("test timed out");
}
