//! The `weft-ca` binary end to end: init, issue, token and serve.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const TD: &str = "example.org";
const ID: &str = "spiffe://example.org/ns/default/sa/payment";

fn weft_ca(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft-ca"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run weft-ca")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn init(dir: &Path) {
    let out = weft_ca(&["init", "--dir", path(dir), "--trust-domain", TD]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn init_creates_the_ca_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    for name in ["ca.pem", "ca-key.pem", "ca.json", "token.key"] {
        assert!(dir.join(name).is_file(), "{name} missing");
    }
    let mode = std::fs::metadata(dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn init_twice_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    let out = weft_ca(&["init", "--dir", path(&dir), "--trust-domain", TD]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("a CA already exists in"), "{stderr}");
    assert!(stderr.contains("refusing to overwrite it"), "{stderr}");
}

#[test]
fn issue_writes_cert_key_and_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out_dir = tmp.path().join("out");
    init(&dir);
    let out = weft_ca(&[
        "issue",
        "--dir",
        path(&dir),
        "--spiffe-id",
        ID,
        "--out",
        path(&out_dir),
        "--ttl",
        "2h",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("cert.pem") && stdout.contains("key.pem"),
        "{stdout}"
    );
    for name in ["cert.pem", "key.pem", "bundle.pem"] {
        assert!(out_dir.join(name).is_file(), "{name} missing");
    }
    let mode = std::fs::metadata(out_dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read(out_dir.join("bundle.pem")).unwrap(),
        std::fs::read(dir.join("ca.pem")).unwrap()
    );

    let out = weft_ca(&[
        "issue",
        "--dir",
        path(&dir),
        "--spiffe-id",
        "spiffe://evil.org/ns/a/sa/b",
        "--out",
        path(&out_dir),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside this CA's trust domain"));
}

#[test]
fn token_prints_only_a_token_that_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_weft-ca"))
        .args(["token", "--ttl", "5m"])
        .env("WEFT_CA_DIR", &dir)
        .env("WEFT_CA_SPIFFE_ID", ID)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.trim_end();
    assert_eq!(stdout.lines().count(), 1);
    assert!(token.starts_with("weft1."), "{token}");
    let ca = weft_ca::Ca::load(&dir).unwrap();
    assert_eq!(ca.verify_token(token).unwrap().as_str(), ID);
}

#[test]
fn missing_ca_dir_says_how_to_create_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = weft_ca(&["token", "--dir", path(tmp.path()), "--spiffe-id", ID]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("weft-ca init"));
}

/// Kills the child on drop so a failing test leaves no server behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serve_prints_its_address_and_issues_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_weft-ca"))
            .args([
                "serve",
                "--dir",
                path(&dir),
                "--listen",
                "127.0.0.1:0",
                "--ttl",
                "1h",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
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
        .expect(&line)
        .to_string();

    let ca = weft_ca::Ca::load(&dir).unwrap();
    let token = ca.token(ID, std::time::Duration::from_secs(60)).unwrap();
    let issued =
        weft_ca::client::request_certificate(&format!("https://{addr}"), &ca.bundle_pem(), &token)
            .await
            .unwrap();
    assert!(!issued.key_pem.is_empty());
    let left = issued
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left.as_secs() > 3500 && left.as_secs() <= 3600, "{left:?}");
}
