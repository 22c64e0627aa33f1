//! The root rotation procedure of `ca/README.md` ("Rotating the root"),
//! end to end under continuous load: two sidecars renew 6 s leaves from a
//! real `weft-ca serve` (in process, real HTTPS) while the CA directories
//! are edited the way `weft-ca init` / `trust add` / `trust remove` do
//! (the library calls behind those commands, on a separately loaded `Ca`,
//! so the serving CA learns of each edit from `bundle.pem` as it would from
//! another process), and serving switches from OLD to NEW at the same
//! address. Not one request may fail, and traffic must flow in every phase.
//!
//! Which CA issued a sidecar's current leaf is read from the wire, not from
//! `/certs`: a probe QUIC client that trusts only NEW's root handshakes with
//! the sidecar's inbound port. The handshake succeeds only if the leaf the
//! sidecar presents chains to NEW (the probe's verifier is a plain chain
//! check against the roots it is given), and the probe first shows that it
//! fails while the sidecars still hold OLD leaves.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use weft_ca::Ca;
use weft_proxy::{CaCredential, IdentitySource, Sidecar};
use weft_tests::fleet::{background, ca_pair};
use weft_tests::*;

/// Whole-test bound.
const LIMIT: Duration = Duration::from_secs(60);
/// Leaf lifetime: renewals every ~3 s, so every phase sees several.
const TTL: Duration = Duration::from_secs(6);
/// How long a phase may take to show its effect on both sidecars: a
/// renewal comes at most 0.6 × TTL after the previous one, plus retries.
const PHASE: Duration = Duration::from_secs(10);

/// `weft-ca serve` for one CA directory, on a listener the test binds.
fn serve(ca: Arc<Ca>, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = weft_ca::server::serve(ca, listener, TTL).await;
    })
}

/// What a sidecar for `name` needs to get its first certificate from OLD.
fn identity(ca: &Ca, url: &str, name: &str) -> IdentitySource {
    let id = format!("spiffe://{TD}/ns/test/sa/{name}");
    IdentitySource::Ca {
        url: url.to_string(),
        bundle_pem: ca.bundle_pem(),
        credential: CaCredential::JoinToken(
            ca.token(&id, Duration::from_secs(3600)).expect("token"),
        ),
        expect_id: Some(id),
    }
}

/// A sidecar's `/certs`.
#[derive(Debug, Clone)]
struct Certs {
    serial: String,
    expires_in: i64,
    roots: u64,
}

async fn certs(admin: SocketAddr) -> Certs {
    let (status, body) = admin_get(admin, "/certs").await;
    assert_eq!(status, 200, "/certs: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/certs is JSON");
    Certs {
        serial: v["serial"].as_str().unwrap_or_default().to_string(),
        expires_in: v["expires_in_seconds"].as_i64().unwrap_or(-1),
        roots: v["trust_bundle_roots"].as_u64().unwrap_or(0),
    }
}

/// Both sidecars' `/certs`, checking that neither certificate has expired.
async fn both_certs(a: &Sidecar, b: &Sidecar) -> [Certs; 2] {
    let both = [certs(a.admin_addr).await, certs(b.admin_addr).await];
    for c in &both {
        assert!(c.expires_in > 0, "a certificate expired: {both:?}");
    }
    both
}

async fn renewals(admin: SocketAddr) -> f64 {
    metric_sum(
        &scrape(admin).await,
        "weft_cert_renewals_total",
        &[("result", "success")],
    )
}

/// Handshake with the sidecar at `addr` trusting only `roots`, presenting
/// `cert`: the serial of the leaf it presented, or why the handshake failed.
async fn presented_serial(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
    cert: ClientCert,
) -> Result<String, String> {
    let endpoint = quic_client(roots, Some(cert), b"h3");
    let conn = endpoint
        .connect(addr, "weft.mesh")
        .expect("dial")
        .await
        .map_err(|e| e.to_string())?;
    let serial = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(weft_transport::tls::serial_of))
        .ok_or("no peer certificate")?;
    conn.close(0u32.into(), b"probe done");
    Ok(serial)
}

/// Mesh credentials for `name`, issued locally by `ca` (as `weft-ca issue`).
fn issued(ca: &Ca, name: &str) -> ClientCert {
    let i = ca
        .issue(&format!("spiffe://{TD}/ns/test/sa/{name}"), TTL * 10)
        .expect("issue");
    let creds = weft_transport::Credentials::from_pem(
        i.cert_chain_pem.as_bytes(),
        i.key_pem.as_bytes(),
        i.bundle_pem.as_bytes(),
    )
    .expect("issued credentials parse");
    client_cert(&creds)
}

/// The root certificate of the CA in `dir` (its `ca.pem`).
fn root_of(dir: &Path) -> (String, CertificateDer<'static>) {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem");
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("ca.pem is a certificate");
    (pem, der)
}

/// `weft-ca trust add|remove` as a separate process would run it: load the
/// CA directory afresh, edit its bundle file.
fn trust_add(dir: &Path, root_pem: &str) {
    let added = Ca::load(dir)
        .expect("load CA")
        .trust_add(root_pem)
        .expect("trust add");
    assert_eq!(added, 1, "trust add must add the root");
}

fn trust_remove(dir: &Path, root_pem: &str) {
    let removed = Ca::load(dir)
        .expect("load CA")
        .trust_remove(root_pem)
        .expect("trust remove");
    assert_eq!(removed, 1, "trust remove must remove the root");
}

/// Wait until `f` holds for both sidecars' `/certs`, sampling expiry too.
async fn wait_certs(
    what: &str,
    a: &Sidecar,
    b: &Sidecar,
    f: impl Fn(&[Certs; 2]) -> bool,
) -> [Certs; 2] {
    let last = RefCell::new(None);
    let ok = wait_until(PHASE, || async {
        let c = both_certs(a, b).await;
        let done = f(&c);
        *last.borrow_mut() = Some(c);
        done
    })
    .await;
    let last = last.into_inner().expect("sampled at least once");
    assert!(
        ok,
        "{what}: not reached within {PHASE:?}; last /certs {last:?}"
    );
    last
}

/// Traffic flowed since `before`; returns the new count.
fn assert_flowed(l: &weft_tests::fleet::Background, before: u64, phase: &str) -> u64 {
    let now = l.ok();
    assert!(
        now > before,
        "no successful request during {phase} ({before} before and after)"
    );
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_procedure_under_load_fails_no_request() {
    tokio::time::timeout(LIMIT, async {
        let started = Instant::now();
        let tmp = tempfile::tempdir().expect("tempdir");
        let (old_dir, new_dir) = (tmp.path().join("old"), tmp.path().join("new"));

        // (a) OLD serves; the sidecars get OLD leaves; load starts.
        let old = Arc::new(Ca::init(&old_dir, TD).expect("init OLD"));
        let listener = TcpListener::bind(any_port()).await.expect("bind CA");
        let ca_addr = listener.local_addr().expect("CA address");
        let url = format!("https://{ca_addr}");
        let old_task = serve(old.clone(), listener);
        let (client, server, app) = ca_pair(|name| identity(&old, &url, name)).await;
        let l = background(client.upstream_addrs["payment"], 4);
        assert!(
            wait_until(PHASE, || async { l.ok() >= 50 }).await,
            "no traffic through the mesh before the rotation"
        );
        let initial = both_certs(&client, &server).await;
        assert!(
            initial.iter().all(|c| c.roots == 1),
            "one root before the rotation: {initial:?}"
        );
        let mut ok = l.ok();

        // (b) NEW, same trust domain; each CA trusts both roots.
        let new_admin = Ca::init(&new_dir, TD).expect("init NEW");
        let (old_root_pem, old_root) = root_of(&old_dir);
        let (new_root_pem, new_root) = root_of(&new_dir);
        trust_add(&old_dir, &new_root_pem);
        trust_add(&new_dir, &old_root_pem);

        // (c) Both sidecars renew and hold the two-root bundle.
        let c = wait_certs("both sidecars trust two roots", &client, &server, |c| {
            c.iter().all(|c| c.roots == 2)
        })
        .await;
        ok = assert_flowed(&l, ok, "adding NEW's root");
        // The running OLD CA picked up its edited bundle without a restart.
        assert_eq!(old.bundle_certs().len(), 2);
        // Still OLD leaves: a probe trusting only NEW is refused by its own
        // verifier, and one trusting only OLD gets through (the probe can
        // tell the two apart).
        for sc in [&client, &server] {
            let err = presented_serial(
                sc.inbound_addr,
                std::slice::from_ref(&new_root),
                issued(&new_admin, "prober"),
            )
            .await
            .expect_err("before the switch, leaves chain to OLD, not NEW");
            // Both roots carry the same subject name, so webpki tries NEW's
            // key on an OLD signature: BadSignature rather than UnknownIssuer.
            assert!(err.contains("invalid peer certificate"), "{err}");
            presented_serial(
                sc.inbound_addr,
                std::slice::from_ref(&old_root),
                issued(&old, "prober"),
            )
            .await
            .expect("before the switch, leaves chain to OLD");
        }
        let before_switch = [c[0].serial.clone(), c[1].serial.clone()];

        // (d) Switch serving to NEW at the same address.
        old_task.abort();
        let _ = old_task.await; // the listener is closed once the task is gone
        let served_new = Arc::new(Ca::load(&new_dir).expect("load NEW"));
        let listener = TcpListener::bind(ca_addr).await.expect("rebind CA address");
        let new_task = serve(served_new, listener);
        let switched_at = Instant::now();

        // (e) Both sidecars renew with their OLD certificates and get NEW
        // leaves: the leaf each presents on the wire chains to NEW.
        let on_new = RefCell::new([None, None]);
        let all_new = wait_until(PHASE, || async {
            both_certs(&client, &server).await;
            for (i, sc) in [&client, &server].iter().enumerate() {
                if on_new.borrow()[i].is_none() {
                    let serial = presented_serial(
                        sc.inbound_addr,
                        std::slice::from_ref(&new_root),
                        issued(&new_admin, "prober"),
                    )
                    .await
                    .ok();
                    on_new.borrow_mut()[i] = serial;
                }
            }
            on_new.borrow().iter().all(Option::is_some)
        })
        .await;
        assert!(
            all_new,
            "both sidecars must hold NEW leaves after the switch; on NEW: {on_new:?}"
        );
        let c = both_certs(&client, &server).await;
        for (i, side) in ["client", "server"].iter().enumerate() {
            assert_ne!(
                c[i].serial, before_switch[i],
                "{side}: /certs still shows the pre-switch serial"
            );
            assert_eq!(c[i].roots, 2, "{side}: NEW hands out both roots: {c:?}");
        }
        ok = assert_flowed(&l, ok, "the switch to NEW");
        // Both roots are still trusted: a peer with an OLD certificate is
        // admitted (the control for the refusal after step f).
        let status = h3_attempt(
            server.inbound_addr,
            std::slice::from_ref(&new_root),
            Some(issued(&old, "old-peer")),
            "payment",
        )
        .await
        .expect("before removal, an OLD-root peer is admitted");
        assert_eq!(status, 200);

        // Step 5 of the procedure: wait one leaf TTL after the switch, so
        // every OLD leaf has expired (time-based, not synchronisation).
        tokio::time::sleep_until((switched_at + TTL + Duration::from_millis(500)).into()).await;
        ok = assert_flowed(&l, ok, "the leaf TTL after the switch");

        // (f) Remove OLD's root from NEW; the sidecars get the one-root bundle.
        trust_remove(&new_dir, &old_root_pem);
        wait_certs("both sidecars trust one root", &client, &server, |c| {
            c.iter().all(|c| c.roots == 1)
        })
        .await;
        ok = assert_flowed(&l, ok, "removing OLD's root");
        // An OLD-root peer is now refused by the server sidecar, in the TLS
        // handshake; a NEW-root peer still gets through.
        let err = h3_attempt(
            server.inbound_addr,
            std::slice::from_ref(&new_root),
            Some(issued(&old, "old-peer")),
            "payment",
        )
        .await
        .expect_err("after removal, an OLD-root peer must be refused");
        assert!(is_tls_alert(&err), "refused in the handshake, got {err:?}");
        let status = h3_attempt(
            server.inbound_addr,
            std::slice::from_ref(&new_root),
            Some(issued(&new_admin, "new-peer")),
            "payment",
        )
        .await
        .expect("a NEW-root peer is admitted");
        assert_eq!(status, 200);

        // (g) Two more renewals on each side, still under load.
        let base = [
            renewals(client.admin_addr).await,
            renewals(server.admin_addr).await,
        ];
        let renewed_twice = wait_until(PHASE * 2, || async {
            both_certs(&client, &server).await;
            renewals(client.admin_addr).await >= base[0] + 2.0
                && renewals(server.admin_addr).await >= base[1] + 2.0
        })
        .await;
        assert!(renewed_twice, "two more renewals after the rotation");
        let end = both_certs(&client, &server).await;
        assert!(end.iter().all(|c| c.roots == 1), "{end:?}");
        for sc in [&client, &server] {
            presented_serial(
                sc.inbound_addr,
                std::slice::from_ref(&new_root),
                issued(&new_admin, "prober"),
            )
            .await
            .expect("leaves still chain to NEW");
        }
        assert_flowed(&l, ok, "the renewals after the rotation");

        l.stop();
        let (ok, failed) = (l.ok(), l.failed());
        assert_eq!(
            failed,
            0,
            "{failed} failed of {} during the rotation: {:?}",
            ok + failed,
            l.samples.lock().expect("lock")
        );
        assert!(app.requests() >= ok);
        new_task.abort();
        eprintln!(
            "root rotation: {ok} requests, none failed, in {:?}",
            started.elapsed()
        );
    })
    .await
    .expect("test timed out");
}
