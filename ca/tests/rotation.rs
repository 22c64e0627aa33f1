//! An intermediate CA and a root rotation through a multi-root bundle,
//! checked the way the mesh checks peers: real TLS 1.3 handshakes between
//! two `weft_transport::MeshTls` identities built from what the CA issued
//! (over TCP on loopback; the verifiers are the ones QUIC uses).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{count_certs, forge_leaf, LeafSpec, ID, TD};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use weft_ca::server::ServeOptions;
use weft_ca::{client, Ca, CaError, CaKind, IssuedCert};
use weft_transport::{Credentials, MeshTls};

const OTHER_ID: &str = "spiffe://example.org/ns/shop/sa/customer";

fn mesh_tls(issued: &IssuedCert) -> Arc<MeshTls> {
    let creds = Credentials::from_pem(
        issued.cert_chain_pem.as_bytes(),
        issued.key_pem.as_bytes(),
        issued.bundle_pem.as_bytes(),
    )
    .unwrap();
    MeshTls::new(TD, &creds).unwrap()
}

/// One TLS handshake, `client` to `server`; returns the SPIFFE IDs each
/// side verified (client's view of the server, server's view of the client).
async fn handshake(
    server: &Arc<MeshTls>,
    client: &Arc<MeshTls>,
) -> Result<(String, String), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor =
        tokio_rustls::TlsAcceptor::from(Arc::new(server.server_config(&[b"t"]).unwrap()));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client.client_config(b"t").unwrap()));
    let accept = async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .ok_or("no client cert")?[0]
            .clone();
        weft_transport::tls::spiffe_id_of(&peer, TD)
            .map(|id| id.to_string())
            .map_err(|e| e.to_string())
    };
    let connect = async move {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(ServerName::try_from("peer").unwrap(), tcp)
            .await
            .map_err(|e| format!("client: {e}"))?;
        // Finish the server's side of the handshake (it reads our Finished).
        tokio::io::AsyncWriteExt::write_all(&mut tls, b"x")
            .await
            .map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .ok_or("no server cert")?[0]
            .clone();
        let id = weft_transport::tls::spiffe_id_of(&peer, TD)
            .map(|id| id.to_string())
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((id, tls))
    };
    let (server_saw, client_side) = tokio::join!(accept, connect);
    let (client_saw, _tls) = client_side?;
    Ok((client_saw, server_saw?))
}

async fn serve(
    dir: &Path,
) -> (
    Arc<Ca>,
    String,
    tokio::task::JoinHandle<Result<(), CaError>>,
) {
    let ca = Arc::new(Ca::load(dir).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(weft_ca::server::serve_with(
        ca.clone(),
        listener,
        ServeOptions::new(Duration::from_secs(3600)),
    ));
    (ca, url, task)
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn an_intermediate_signs_while_the_root_stays_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let root_dir = tmp.path().join("root");
    let dir = tmp.path().join("intermediate");
    let root = Ca::init(&root_dir, TD).unwrap();
    let intermediate = root
        .create_intermediate(&dir, weft_ca::DEFAULT_INTERMEDIATE_TTL)
        .unwrap();
    assert_eq!(intermediate.kind(), CaKind::Intermediate);
    assert_eq!(intermediate.trust_domain(), TD);

    // The root key is nowhere in DIR; the bundle is the root alone.
    let root_key = std::fs::read_to_string(root_dir.join("ca-key.pem")).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains(root_key.trim()));
    }
    let root_pem = std::fs::read_to_string(root_dir.join("ca.pem")).unwrap();
    assert_eq!(certs(&intermediate.bundle_pem()), certs(&root_pem));

    // Path length 0, signed by the root, valid for about a year.
    let inter_der = certs(&std::fs::read_to_string(dir.join("ca.pem")).unwrap()).remove(0);
    let (_, inter) = x509_parser::parse_x509_certificate(&inter_der).unwrap();
    let bc = inter.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let root_der = certs(&root_pem).remove(0);
    let (_, root_x509) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    inter
        .verify_signature(Some(root_x509.public_key()))
        .unwrap();
    let days = (inter.validity().not_after - inter.validity().not_before)
        .unwrap()
        .whole_days();
    assert!((365..=366).contains(&days), "{days}");

    // Serve from DIR as `weft-ca serve --dir DIR` would; clients trust the
    // root only, so the serving chain must carry the intermediate too.
    let (ca, url, task) = serve(&dir).await;
    let token = ca.token(ID, Duration::from_secs(60)).unwrap();
    let a = client::request_certificate(&url, &root_pem, &token)
        .await
        .unwrap();
    assert_eq!(count_certs(&a.cert_chain_pem), 2, "leaf + intermediate");
    assert_eq!(certs(&a.cert_chain_pem)[1], inter_der);
    let other = ca.token(OTHER_ID, Duration::from_secs(60)).unwrap();
    let b = client::request_certificate(&url, &root_pem, &other)
        .await
        .unwrap();
    // Renewal with a leaf + intermediate chain works too.
    let b = client::renew_certificate(&url, &b.bundle_pem, &b.cert_chain_pem, &b.key_pem)
        .await
        .unwrap();

    let (ta, tb) = (mesh_tls(&a), mesh_tls(&b));
    assert_eq!(
        handshake(&ta, &tb).await.unwrap(),
        (ID.to_string(), OTHER_ID.to_string())
    );
    assert_eq!(
        handshake(&tb, &ta).await.unwrap(),
        (OTHER_ID.to_string(), ID.to_string())
    );

    // Without the intermediate a leaf does not verify against the root.
    let leaf_only = certs(&a.cert_chain_pem).remove(0);
    let err = tb
        .verify_peer(
            &leaf_only,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap_err();
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");

    // The intermediate may not sign another CA, nor drop its root.
    let err = intermediate
        .create_intermediate(&tmp.path().join("deeper"), Duration::from_secs(3600))
        .unwrap_err();
    assert!(err.to_string().contains("--root-dir"), "{err}");
    let err = intermediate.trust_remove(&root_pem).unwrap_err();
    assert!(err.to_string().contains("chains to"), "{err}");
    // Nor outlive its root.
    let err = root
        .create_intermediate(
            &tmp.path().join("long"),
            Duration::from_secs(20 * 365 * 86400),
        )
        .unwrap_err();
    assert!(err.to_string().contains("outlive the root"), "{err}");
    assert!(!task.is_finished());
}

#[tokio::test]
async fn root_rotation_through_a_multi_root_bundle_keeps_peers_talking() {
    let tmp = tempfile::tempdir().unwrap();
    let (old_dir, new_dir) = (tmp.path().join("old"), tmp.path().join("new"));
    Ca::init(&old_dir, TD).unwrap();
    Ca::init(&new_dir, TD).unwrap();
    let old_root = std::fs::read_to_string(old_dir.join("ca.pem")).unwrap();
    let new_root = std::fs::read_to_string(new_dir.join("ca.pem")).unwrap();

    // Before: everyone holds old-root certificates and bundles.
    let (old_ca, old_url, old_task) = serve(&old_dir).await;
    let mut x = client::request_certificate(
        &old_url,
        &old_root,
        &old_ca.token(ID, Duration::from_secs(60)).unwrap(),
    )
    .await
    .unwrap();
    let mut y = client::request_certificate(
        &old_url,
        &old_root,
        &old_ca.token(OTHER_ID, Duration::from_secs(60)).unwrap(),
    )
    .await
    .unwrap();
    handshake(&mesh_tls(&x), &mesh_tls(&y)).await.unwrap();

    // 1. Both CAs trust both roots (the CLI edits the directories; the
    //    running old CA applies it without a restart). Sidecars renew and
    //    receive the two-root bundle.
    assert_eq!(Ca::load(&old_dir).unwrap().trust_add(&new_root).unwrap(), 1);
    assert_eq!(Ca::load(&old_dir).unwrap().trust_add(&new_root).unwrap(), 0);
    assert_eq!(Ca::load(&new_dir).unwrap().trust_add(&old_root).unwrap(), 1);
    for c in [&mut x, &mut y] {
        *c = client::renew_certificate(&old_url, &c.bundle_pem, &c.cert_chain_pem, &c.key_pem)
            .await
            .unwrap();
        assert_eq!(count_certs(&c.bundle_pem), 2);
    }

    // 2. Serving switches to the new CA. It renews old-root certificates
    //    (their root is in its bundle) with new-root ones; old and new
    //    peers verify each other both ways.
    old_task.abort();
    let (new_ca, new_url, new_task) = serve(&new_dir).await;
    x = client::renew_certificate(&new_url, &x.bundle_pem, &x.cert_chain_pem, &x.key_pem)
        .await
        .unwrap();
    assert!(
        signed_by(&x.cert_chain_pem, &new_root),
        "x now holds a new-root certificate"
    );
    assert!(signed_by(&y.cert_chain_pem, &old_root));
    handshake(&mesh_tls(&x), &mesh_tls(&y)).await.unwrap();
    handshake(&mesh_tls(&y), &mesh_tls(&x)).await.unwrap();
    y = client::renew_certificate(&new_url, &y.bundle_pem, &y.cert_chain_pem, &y.key_pem)
        .await
        .unwrap();

    // 3. Every certificate is new-root: drop the old root from the new
    //    CA's bundle, again without a restart. The next renewal hands out
    //    the one-root bundle; a peer still on the two-root bundle and one
    //    on the new bundle talk; old-root certificates are refused.
    let err = Ca::load(&new_dir)
        .unwrap()
        .trust_remove(&new_root)
        .unwrap_err();
    assert!(err.to_string().contains("chains to"), "{err}");
    assert_eq!(
        Ca::load(&new_dir).unwrap().trust_remove(&old_root).unwrap(),
        1
    );
    x = client::renew_certificate(&new_url, &x.bundle_pem, &x.cert_chain_pem, &x.key_pem)
        .await
        .unwrap();
    assert_eq!(certs(&x.bundle_pem), certs(&new_root));
    handshake(&mesh_tls(&x), &mesh_tls(&y)).await.unwrap();
    handshake(&mesh_tls(&y), &mesh_tls(&x)).await.unwrap();

    let (stale_chain, stale_key) = forge_leaf(&old_dir, LeafSpec::default());
    match client::renew_certificate(&new_url, &x.bundle_pem, &stale_chain, &stale_key).await {
        Err(CaError::Rejected {
            status: 401,
            message,
        }) => {
            assert!(message.contains("trust bundle"), "{message}")
        }
        other => panic!("expected 401, got {other:?}"),
    }
    // And a peer holding only the new root refuses an old-root peer.
    let stale = IssuedCert::clone(&x);
    let stale = IssuedCert {
        cert_chain_pem: stale_chain,
        key_pem: stale_key,
        bundle_pem: old_root.clone(),
        ..stale
    };
    assert!(handshake(&mesh_tls(&x), &mesh_tls(&stale)).await.is_err());
    assert!(!new_task.is_finished());
    drop(new_ca);
}

#[tokio::test]
async fn a_bad_bundle_edit_is_refused_and_the_last_good_one_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    Ca::init(&dir, TD).unwrap();
    let other = Ca::init(&tmp.path().join("other"), TD).unwrap();
    let (ca, url, task) = serve(&dir).await;
    let own = ca.bundle_pem();

    // Hand edits (not through `weft-ca trust`) are picked up too.
    std::fs::write(
        dir.join("bundle.pem"),
        format!("{own}{}", other.bundle_pem()),
    )
    .unwrap();
    let token = ca.token(ID, Duration::from_secs(60)).unwrap();
    let issued = client::request_certificate(&url, &own, &token)
        .await
        .unwrap();
    assert_eq!(count_certs(&issued.bundle_pem), 2);

    // Garbage, or a bundle without our own root: refused, last good kept.
    for bad in ["garbage".to_string(), other.bundle_pem()] {
        std::fs::write(dir.join("bundle.pem"), &bad).unwrap();
        let issued = client::request_certificate(&url, &own, &token)
            .await
            .unwrap();
        assert_eq!(count_certs(&issued.bundle_pem), 2, "{bad}");
        assert!(Ca::load(&dir).is_err(), "a restart would refuse it too");
    }
    // Fixed: applies again.
    std::fs::write(dir.join("bundle.pem"), &own).unwrap();
    let issued = client::request_certificate(&url, &own, &token)
        .await
        .unwrap();
    assert_eq!(count_certs(&issued.bundle_pem), 1);

    // `trust add` takes CA certificates only, not expired ones.
    let leaf = ca.issue(ID, Duration::from_secs(60)).unwrap();
    let err = ca.trust_add(&leaf.cert_chain_pem).unwrap_err();
    assert!(err.to_string().contains("not a CA certificate"), "{err}");
    let err = ca.trust_remove(&other.bundle_pem()).unwrap_err();
    assert!(err.to_string().contains("not in the bundle"), "{err}");
    assert!(!task.is_finished());
}

/// Whether the leaf of `chain_pem` is signed by the root in `root_pem`.
fn signed_by(chain_pem: &str, root_pem: &str) -> bool {
    let leaf = certs(chain_pem).remove(0);
    let root = certs(root_pem).remove(0);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(&root).unwrap();
    leaf.verify_signature(Some(root.public_key())).is_ok()
}
