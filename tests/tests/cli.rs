//! The binaries as a user runs them: `weft check`, `weft sidecar` (flags,
//! flag files, env vars), `weft demo`, and the README's two-sidecar
//! walkthrough with `weft-ca`. Real processes, killed when the test ends.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use weft_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

const GOOD_MESH: &str = r#"trust_domain = "example.org"
[services.payment]
protocol = "http"
endpoints = ["127.0.0.1:15108", { addr = "127.0.0.1:15208", labels = { version = "v2" } }]
[services.echo]
protocol = "tcp"
endpoints = ["[::1]:15308"]
"#;

/// Four independent mistakes: (offending token, part of its message).
const BAD_MESH: &str = r#"trust_domain = "Example.ORG"
[services.payment]
protocol = "smtp"
endpoints = ["127.0.0.1:notaport"]
[services.echo]
protocol = "tcp"
endpoints = ["127.0.0.1:0"]
"#;
const BAD_MESH_ERRORS: [(&str, &str); 4] = [
    (r#""Example.ORG""#, "trust_domain"),
    (r#""smtp""#, "unknown protocol"),
    (r#""127.0.0.1:notaport""#, "not an ip:port address"),
    (r#""127.0.0.1:0""#, "port 0"),
];

/// `file:line:col: ` of the first occurrence of `token` in `text` (1-based).
fn position(file: &str, text: &str, token: &str) -> String {
    let at = text.find(token).expect("token in text");
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    format!("{file}:{line}:{col}: ")
}

fn assert_lists_every_error(stderr: &str) {
    for (token, message) in BAD_MESH_ERRORS {
        let prefix = position("bad.toml", BAD_MESH, token);
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&prefix) && l.contains(message)),
            "stderr must report {message:?} at {prefix:?}; got:\n{stderr}"
        );
    }
}

fn weft(dir: &Path) -> Command {
    let mut cmd = Command::new(bin("weft"));
    cmd.current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_a_good_file_and_lists_every_error_of_a_bad_one() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("good.toml"), GOOD_MESH).expect("write");
        std::fs::write(dir.path().join("bad.toml"), BAD_MESH).expect("write");

        let out = weft(dir.path())
            .args(["check", "--mesh", "good.toml"])
            .output()
            .await
            .expect("run weft check");
        assert!(
            out.status.success(),
            "good file: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("2 services"));

        let out = weft(dir.path())
            .args(["check", "--mesh", "bad.toml"])
            .output()
            .await
            .expect("run weft check");
        assert!(!out.status.success(), "a bad file must fail the check");
        assert_lists_every_error(&String::from_utf8_lossy(&out.stderr));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_refuses_to_start_on_a_bad_mesh_file() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("bad.toml"), BAD_MESH).expect("write");
        let out = weft(dir.path())
            .args(["sidecar", "--mesh", "bad.toml", "--cert-dir", "X"])
            .args(["--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .output()
            .await
            .expect("run weft sidecar");
        assert!(
            !out.status.success(),
            "a sidecar must not start on a bad mesh file"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("ready"),
            "it must not report ready"
        );
        assert_lists_every_error(&String::from_utf8_lossy(&out.stderr));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_refuses_a_keep_alive_not_below_the_idle_timeout() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mesh.toml"), GOOD_MESH).expect("write");
        let out = weft(dir.path())
            .args(["sidecar", "--mesh", "mesh.toml", "--cert-dir", "X"])
            .args(["--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("WEFT_QUIC_IDLE_TIMEOUT", "2s")
            .args(["--quic-keep-alive", "2s"])
            .output()
            .await
            .expect("run weft sidecar");
        assert!(!out.status.success(), "keep-alive = idle timeout accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(
                "--quic-keep-alive (2s) must be above zero and below --quic-idle-timeout (2s)"
            ),
            "{stderr}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_all_traffic_succeeds() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = weft(dir.path())
            .args(["demo", "--duration", "3"])
            .output()
            .await
            .expect("run weft demo");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "weft demo failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("All traffic succeeded"),
            "stdout:\n{stdout}"
        );
        // The canary fails 1 in 20; the route's retries hide every failure.
        let retries_line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with("Retries:"))
            .unwrap_or_else(|| panic!("no Retries line:\n{stdout}"));
        let retried: u64 = retries_line
            .split("retried ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no retry count in {retries_line:?}"));
        assert!(retried > 0, "{retries_line}");
        assert!(retries_line.ends_with("saw 0 failures"), "{retries_line}");
        assert!(
            stdout.contains("Canary split: payment v1 answered"),
            "{stdout}"
        );
    })
    .await
    .expect("test timed out");
}

/// A running `weft sidecar` and what its ready line said.
struct Running {
    _process: WeftProcess,
    admin: SocketAddr,
    upstreams: Vec<(String, SocketAddr)>,
}

/// Start `cmd` and wait for its "weft sidecar ready:" line.
async fn start_sidecar(cmd: Command) -> Running {
    let process = start_weft(cmd).await;
    let admin = process.admin();
    let upstreams = process
        .field("upstreams=")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (svc, addr) = s.split_once('=').expect("SERVICE=ADDR");
            (svc.to_string(), addr.parse().expect("upstream address"))
        })
        .collect();
    Running {
        _process: process,
        admin,
        upstreams,
    }
}

/// POST to an admin server: (status, body).
async fn admin_post(admin: SocketAddr, path: &str) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let req = http::Request::post(format!("http://{admin}{path}"))
        .body(Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.expect("admin POST");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn weft_ca(dir: &Path, args: &[&str]) {
    let out = Command::new(bin("weft-ca"))
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run weft-ca");
    assert!(
        out.status.success(),
        "weft-ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The README's "two sidecars by hand", on ephemeral ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_with_flag_files() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let td = "example.org";
        let payment_id = format!("spiffe://{td}/ns/default/sa/payment");
        let customer_id = format!("spiffe://{td}/ns/default/sa/customer");

        weft_ca(d, &["init", "--dir", "ca", "--trust-domain", td]).await;
        weft_ca(d, &["issue", "--dir", "ca", "--spiffe-id", &payment_id, "--out", "certs/payment"]).await;
        weft_ca(d, &["issue", "--dir", "ca", "--spiffe-id", &customer_id, "--out", "certs/customer"]).await;

        // The mesh file must name the server's inbound port before the server
        // runs, so pick a free UDP port and release it. Small race: another
        // process could take it before the sidecar binds it (then the sidecar
        // fails to start and the test reports that).
        let inbound = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("probe UDP port");
            s.local_addr().expect("addr")
        };
        std::fs::write(
            d.join("mesh.toml"),
            format!("trust_domain = \"{td}\"\n[services.payment]\nprotocol = \"http\"\nendpoints = [\"{inbound}\"]\n"),
        )
        .expect("mesh");

        let (app, seen) = http_app().await;
        std::fs::write(
            d.join("payment.flags"),
            format!(
                "# the payment sidecar\n--mesh mesh.toml\n--cert-dir certs/payment\n--inbound {inbound}\n--app {app}\n"
            ),
        )
        .expect("payment flags");
        std::fs::write(
            d.join("customer.flags"),
            "--mesh mesh.toml\n--cert-dir certs/customer\n--inbound 127.0.0.1:0\n\
             --admin 127.0.0.1:0\n--upstream payment=127.0.0.1:0\n",
        )
        .expect("customer flags");

        let mut cmd = weft(d);
        // The payment sidecar's admin address comes from the environment only.
        cmd.args(["sidecar", "@payment.flags"]).env("WEFT_ADMIN", "127.0.0.1:0");
        let payment = start_sidecar(cmd).await;
        let mut cmd = weft(d);
        cmd.args(["sidecar", "@customer.flags"]).env_remove("WEFT_ADMIN");
        let customer = start_sidecar(cmd).await;

        // WEFT_ADMIN was honoured: not the default 127.0.0.1:15000.
        assert_ne!(payment.admin.port(), 15000);
        let (status, _) = admin_get(payment.admin, "/ready").await;
        assert_eq!(status, 200);
        let (status, body) = admin_get(payment.admin, "/config").await;
        assert_eq!(status, 200);
        let config: serde_json::Value = serde_json::from_str(&body).expect("/config is JSON");
        assert_eq!(config["sidecar"]["identity"], payment_id.as_str(), "{config}");
        let (status, _) = admin_get(customer.admin, "/ready").await;
        assert_eq!(status, 200);

        // The log filter changes at run time (admin /logging), without a restart.
        let (status, before) = admin_get(customer.admin, "/logging").await;
        assert_eq!(status, 200, "{before}");
        let (status, body) = admin_post(customer.admin, "/logging?level=debug").await;
        assert_eq!((status, body.trim()), (200, "debug"));
        assert_eq!(admin_get(customer.admin, "/logging").await.1.trim(), "debug");
        let (status, body) = admin_post(customer.admin, "/logging?level=loud%3D%3D").await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("not a log filter"), "{body}");
        assert_eq!(admin_get(customer.admin, "/logging").await.1.trim(), "debug");

        let upstream = customer
            .upstreams
            .iter()
            .find(|(s, _)| s == "payment")
            .map(|(_, a)| *a)
            .expect("payment upstream in the ready line");
        let (status, headers, _) = http_get(upstream, "payment", "/walkthrough").await;
        assert_eq!(status, 200);
        assert_eq!(
            headers.get("x-seen-peer-id").and_then(|v| v.to_str().ok()),
            Some(customer_id.as_str()),
            "the app sees the caller's SPIFFE ID"
        );
        assert_eq!(headers.get("x-seen-path").and_then(|v| v.to_str().ok()), Some("/walkthrough"));
        assert_eq!(seen.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    })
    .await
    .expect("test timed out");
}
