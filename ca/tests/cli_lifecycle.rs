//! The `weft-ca` binary for the identity lifecycle: single-use tokens that
//! stay used across a restart, an intermediate CA served without the root
//! key, `trust add|remove|list`, the JSON audit trail (with no secret in
//! it), and refusals of unsafe or invalid setups.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use weft_ca::{client, Ca, CaError};

const TD: &str = "example.org";
const ID: &str = "spiffe://example.org/ns/default/sa/payment";

fn weft_ca(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft-ca"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run weft-ca")
}

fn ok(args: &[&str]) -> String {
    let out = weft_ca(args);
    assert!(
        out.status.success(),
        "weft-ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = weft_ca(args);
    assert!(!out.status.success(), "weft-ca {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A running `weft-ca serve`, killed on drop.
struct Serve {
    child: std::process::Child,
    url: String,
}

impl Serve {
    /// Start `weft-ca serve --dir DIR --listen 127.0.0.1:0 EXTRA...` and
    /// wait for its "listening on" line. `RUST_LOG=error`: audit lines
    /// must appear anyway.
    async fn start(dir: &Path, extra: &[&str]) -> Serve {
        let mut args = vec!["serve", "--dir", path(dir), "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_weft-ca"))
            .args(&args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .unwrap()
        .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Serve {
            child,
            url: format!("https://{addr}"),
        }
    }

    /// Stop the server and return everything it wrote to stderr.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_single_use_token_stays_used_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    ok(&["init", "--dir", path(&dir), "--trust-domain", TD]);
    let token = ok(&[
        "token",
        "--dir",
        path(&dir),
        "--spiffe-id",
        ID,
        "--single-use",
    ]);
    let token = token.trim();
    let bundle = std::fs::read_to_string(dir.join("ca.pem")).unwrap();

    let srv = Serve::start(&dir, &[]).await;
    client::request_certificate(&srv.url, &bundle, token)
        .await
        .unwrap();
    drop(srv);
    let mode = std::fs::metadata(dir.join(weft_ca::USED_TOKENS_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let srv = Serve::start(&dir, &[]).await;
    match client::request_certificate(&srv.url, &bundle, token).await {
        Err(CaError::Rejected {
            status: 401,
            message,
        }) => {
            assert!(message.contains("already been redeemed"), "{message}")
        }
        other => panic!("expected 401, got {other:?}"),
    }
}

#[tokio::test]
async fn an_intermediate_serves_without_the_root_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let dir = tmp.path().join("intermediate");
    ok(&["init", "--dir", path(&root), "--trust-domain", TD]);
    let out = ok(&[
        "intermediate",
        "--root-dir",
        path(&root),
        "--dir",
        path(&dir),
        "--ttl",
        "48h",
    ]);
    assert!(out.contains("keep"), "{out}");
    assert_ne!(
        std::fs::read(dir.join("ca-key.pem")).unwrap(),
        std::fs::read(root.join("ca-key.pem")).unwrap(),
        "the intermediate has its own key"
    );
    // Take the root offline: serving needs nothing from it.
    std::fs::rename(&root, tmp.path().join("offline")).unwrap();
    let root_pem = std::fs::read_to_string(tmp.path().join("offline/ca.pem")).unwrap();

    let srv = Serve::start(&dir, &[]).await;
    let token = ok(&["token", "--dir", path(&dir), "--spiffe-id", ID]);
    let issued = client::request_certificate(&srv.url, &root_pem, token.trim())
        .await
        .unwrap();
    assert_eq!(
        rustls_pki_types::CertificateDer::pem_slice_iter(issued.cert_chain_pem.as_bytes()).count(),
        2
    );
    let left = issued
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left <= Duration::from_secs(24 * 3600), "{left:?}");

    // A second intermediate needs the root: refused from an intermediate.
    let err = fails(&[
        "intermediate",
        "--root-dir",
        path(&dir),
        "--dir",
        path(&tmp.path().join("x")),
    ]);
    assert!(err.contains("--root-dir"), "{err}");
}

#[tokio::test]
async fn trust_add_and_remove_apply_to_a_running_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, next) = (tmp.path().join("ca"), tmp.path().join("next"));
    ok(&["init", "--dir", path(&dir), "--trust-domain", TD]);
    ok(&["init", "--dir", path(&next), "--trust-domain", TD]);
    let own = dir.join("ca.pem");
    let next_root = next.join("ca.pem");
    let bundle = std::fs::read_to_string(&own).unwrap();
    let srv = Serve::start(&dir, &[]).await;
    let token = Ca::load(&dir)
        .unwrap()
        .token(ID, Duration::from_secs(60))
        .unwrap();

    let out = ok(&[
        "trust",
        "add",
        "--dir",
        path(&dir),
        "--cert",
        path(&next_root),
    ]);
    assert!(out.contains("added 1"), "{out}");
    let listed = ok(&["trust", "list", "--dir", path(&dir)]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let issued = client::request_certificate(&srv.url, &bundle, &token)
        .await
        .unwrap();
    assert_eq!(
        rustls_pki_types::CertificateDer::pem_slice_iter(issued.bundle_pem.as_bytes()).count(),
        2
    );

    let err = fails(&["trust", "remove", "--dir", path(&dir), "--cert", path(&own)]);
    assert!(err.contains("switch serving to the new CA"), "{err}");
    let out = ok(&[
        "trust",
        "remove",
        "--dir",
        path(&dir),
        "--cert",
        path(&next_root),
    ]);
    assert!(out.contains("removed 1"), "{out}");
    let issued = client::request_certificate(&srv.url, &bundle, &token)
        .await
        .unwrap();
    assert_eq!(
        rustls_pki_types::CertificateDer::pem_slice_iter(issued.bundle_pem.as_bytes()).count(),
        1
    );
}

#[tokio::test]
async fn every_issuance_and_refusal_is_one_json_audit_line_without_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    ok(&["init", "--dir", path(&dir), "--trust-domain", TD]);
    let bundle = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let token = ok(&["token", "--dir", path(&dir), "--spiffe-id", ID]);
    let token = token.trim().to_string();

    let srv = Serve::start(&dir, &["--san", "weft-ca.weft-system.svc"]).await;
    let issued = client::request_certificate(&srv.url, &bundle, &token)
        .await
        .unwrap();
    client::renew_certificate(&srv.url, &bundle, &issued.cert_chain_pem, &issued.key_pem)
        .await
        .unwrap();
    // A refusal: the token with the first character of its MAC changed.
    let (signed, mac) = token.rsplit_once('.').unwrap();
    let flipped = if mac.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{signed}.{flipped}{}", &mac[1..]);
    assert!(client::request_certificate(&srv.url, &bundle, &tampered)
        .await
        .is_err());
    let stderr = srv.stop();

    let audit: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == weft_ca::AUDIT_TARGET)
        .collect();
    assert_eq!(audit.len(), 3, "{stderr}");
    assert_eq!(audit[0]["event"], "issued");
    assert_eq!(audit[0]["credential"], "join-token");
    assert_eq!(audit[0]["identity"], ID);
    assert_eq!(audit[0]["serial"], issued.serial_hex.as_str());
    assert!(audit[0]["not_after"].as_str().unwrap().ends_with('Z'));
    assert!(audit[0]["remote"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(audit[1]["event"], "issued");
    assert_eq!(audit[1]["credential"], "certificate");
    assert_eq!(audit[1]["identity"], ID);
    assert_eq!(audit[2]["event"], "refused");
    assert_eq!(audit[2]["credential"], "join-token");
    assert_eq!(audit[2]["status"], 401);
    assert!(audit[2]["reason"]
        .as_str()
        .unwrap()
        .contains("not issued by this CA"));

    // No token (nor any part of one), no key.
    for part in token
        .split('.')
        .chain(tampered.split('.'))
        .filter(|p| p.len() > 8)
    {
        assert!(
            !stderr.contains(part),
            "a token part is in the log:\n{stderr}"
        );
    }
    let key = std::fs::read_to_string(dir.join("ca-key.pem")).unwrap();
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!stderr.contains(line), "the CA key is in the log");
    }
    let leaf_key = issued.key_pem.lines().nth(1).unwrap();
    assert!(!stderr.contains(leaf_key));
}

#[test]
fn unsafe_or_invalid_setups_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    ok(&["init", "--dir", path(&dir), "--trust-domain", TD]);

    for (flags, want) in [
        (
            &["--san", "not a name"][..],
            "invalid serving certificate name",
        ),
        (&["--rate-limit-burst", "0"][..], "--rate-limit-burst"),
        (
            &["--rate-limit-per-second", "0"][..],
            "--rate-limit-per-second",
        ),
    ] {
        let mut args = vec!["serve", "--dir", path(&dir), "--listen", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        let out = weft_ca(&args);
        assert!(!out.status.success(), "{flags:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{flags:?}"
        );
        assert!(out.stdout.is_empty(), "no 'listening on' for {flags:?}");
    }

    // A CA key others can read is a compromised CA: refuse to use it.
    let key = dir.join("ca-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(&["token", "--dir", path(&dir), "--spiffe-id", ID]);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains("PRIVATE KEY"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    ok(&["token", "--dir", path(&dir), "--spiffe-id", ID]);

    // Adding something that is not a root.
    let leaf_dir = tmp.path().join("leaf");
    ok(&[
        "issue",
        "--dir",
        path(&dir),
        "--spiffe-id",
        ID,
        "--out",
        path(&leaf_dir),
    ]);
    let err = fails(&[
        "trust",
        "add",
        "--dir",
        path(&dir),
        "--cert",
        path(&leaf_dir.join("cert.pem")),
    ]);
    assert!(err.contains("not a CA certificate"), "{err}");
}
