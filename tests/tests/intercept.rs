//! Transparent interception end to end, with real iptables rules in network
//! namespaces this test creates (and removes):
//!
//! ```text
//!  ns "a" (client pod)                ns "b" (server pod)             ns "c" (outsider)
//!  app ──TCP 10.201.1.2:8080──┐       ┌── sidecar ──lo──▶ app :8080
//!        (iptables REDIRECT)  ▼       │
//!  sidecar :15001 ══ QUIC/UDP ═ veth ═▶ :15008        ◀── veth ── plain TCP to :8080 (refused)
//! ```
//!
//! The apps know nothing of the mesh: the client dials the server pod's IP
//! and app port. Sidecars run as real `weft sidecar` processes under UID/GID
//! 1337, the identity the rules exclude from capture; `weft iptables
//! install` runs as root like an init container. Needs root (CI runs as
//! root) and iptables (`.ci/run` installs it).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_tests::netns::{run, Netns};
use weft_tests::*;

const LIMIT: Duration = Duration::from_secs(120);
const PROXY_UID: u32 = 1337;

/// Join `a` and `b` with a veth pair and give each end its addresses.
fn link(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", ifname, "nodad"]);
            } else {
                ns.ip(&["addr", "add", addr, "dev", ifname]);
            }
        }
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

/// Start a `weft sidecar` process in a namespace, as UID/GID 1337.
async fn sidecar_in(ns: &Netns, args: &[&str]) -> WeftProcess {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "setpriv"])
        .arg(format!("--reuid={PROXY_UID}"))
        .arg(format!("--regid={PROXY_UID}"))
        .args(["--clear-groups", "--"])
        .arg(bin("weft"))
        .arg("sidecar")
        .args(args);
    start_weft(cmd).await
}

/// Certificates for `name` in a directory the sidecar's UID can read.
fn cert_dir(ca: &TestCa, root: &Path, name: &str) -> String {
    let dir = root.join(name);
    ca.write_certs(name, &dir);
    dir.to_string_lossy().into_owned()
}

/// Packets counted by a rule of `iptables -t raw -L PREROUTING` matching `needle`.
fn raw_count(ns: &Netns, tool: &str, needle: &str) -> u64 {
    let listing = ns.exec(tool, &["-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x"]);
    listing
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// An HTTP/1.1 app on [::]:8080 (dual stack) that answers with the caller
/// identity header the server sidecar adds.
async fn identity_app() {
    let listener = tokio::net::TcpListener::bind("[::]:8080")
        .await
        .expect("bind app");
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let who = req
                        .headers()
                        .get("x-weft-peer-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("none")
                        .to_string();
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(who)),
                    ))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A plain TCP server that writes "plain" and closes.
async fn plain_server(addr: &str) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    while let Ok((mut s, _)) = listener.accept().await {
        let _ = s.write_all(b"plain").await;
    }
}

/// Connect to `addr` and read until the server closes; `None` on any error.
async fn read_all(addr: SocketAddr) -> Option<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    Some(buf)
}

/// GET `url` the way an app that knows nothing of the mesh would.
async fn get(addr: SocketAddr) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/hello"))
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_that_know_nothing_of_the_mesh_are_captured_and_strict_mode_refuses_outsiders() {
    tokio::time::timeout(LIMIT, scenario())
        .await
        .expect("test timed out");
}

async fn scenario() {
    let a = Netns::new("a");
    let b = Netns::new("b");
    let c = Netns::new("c");
    link(
        &a,
        "va",
        &["10.201.1.1/24", "fd01::1/64"],
        &b,
        "vb",
        &["10.201.1.2/24", "fd01::2/64"],
    );
    link(&c, "vc", &["10.201.2.1/24"], &b, "vb2", &["10.201.2.2/24"]);

    // Count what crosses from the client pod into the server pod, before
    // any Weft rule: TCP of any kind, and UDP to the sidecar's QUIC port.
    for tool in ["iptables", "ip6tables"] {
        b.exec(
            tool,
            &["-t", "raw", "-A", "PREROUTING", "-i", "vb", "-p", "tcp"],
        );
        b.exec(
            tool,
            &[
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-i",
                "vb",
                "-p",
                "udp",
                "--dport",
                "15008",
            ],
        );
    }

    // The apps: the server's on every address of its pod, plus a non-mesh
    // server in pod b on port 9000.
    let b_path = format!("/var/run/netns/{}", b.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&b_path).expect("open netns");
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                tokio::join!(identity_app(), plain_server("0.0.0.0:9000"));
            })
    });

    // Before any rule, the outsider reaches the app port directly.
    let app_v4: SocketAddr = "10.201.2.2:8080".parse().expect("addr");
    let reached = c.run(move || async move {
        weft_tests::wait_until(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(app_v4).await.is_ok()
        })
        .await
    });
    assert!(reached, "control: the app port is reachable before capture");

    // Certificates, mesh file: readable by the sidecars' UID.
    let ca = TestCa::new(TD);
    let files = tempfile::tempdir().expect("tempdir");
    let a_certs = cert_dir(&ca, files.path(), "customer");
    let b_certs = cert_dir(&ca, files.path(), "payment");
    let mesh = files.path().join("mesh.toml");
    std::fs::write(
        &mesh,
        format!(
            "trust_domain = \"{TD}\"\n\
             [services.payment]\n\
             endpoints = [\"10.201.1.2:15008\"]\n\
             addresses = [\"10.201.1.2:8080\", \"[fd01::2]:8080\"]\n"
        ),
    )
    .expect("write mesh");
    run(
        "chown",
        &[
            "-R",
            &format!("{PROXY_UID}:{PROXY_UID}"),
            &files.path().to_string_lossy(),
        ],
    );
    let mesh = mesh.to_string_lossy().into_owned();

    // The init containers' job.
    let weft = bin("weft").to_string_lossy().into_owned();
    for ns in [&a, &b] {
        ns.exec(
            &weft,
            &[
                "iptables",
                "install",
                "--proxy-uid",
                "1337",
                "--proxy-gid",
                "1337",
                "--inbound-mode",
                "strict",
                "--exclude-inbound-ports",
                "15000,9000",
            ],
        );
    }
    // Installing twice leaves one set of rules.
    a.exec(&weft, &["iptables", "install"]);
    let nat = a.exec("iptables", &["-t", "nat", "-S", "OUTPUT"]);
    assert_eq!(nat.matches("WEFT_OUTPUT").count(), 1, "{nat}");

    let _server = sidecar_in(
        &b,
        &[
            "--mesh",
            &mesh,
            "--cert-dir",
            &b_certs,
            "--inbound",
            "0.0.0.0:15008",
            "--app",
            "127.0.0.1:8080",
        ],
    )
    .await;
    let _client = sidecar_in(
        &a,
        &[
            "--mesh",
            &mesh,
            "--cert-dir",
            &a_certs,
            "--inbound",
            "0.0.0.0:15008",
            "--capture-outbound",
            "127.0.0.1:15001,[::1]:15001",
        ],
    )
    .await;

    // The client app dials the server pod's IP and app port, IPv4 and IPv6.
    let customer = ca.id("customer");
    for target in ["10.201.1.2:8080", "[fd01::2]:8080"] {
        let target: SocketAddr = target.parse().expect("addr");
        let got = a.run(move || async move { get(target).await });
        let (status, who) = got.unwrap_or_else(|e| panic!("GET {target}: {e}"));
        assert_eq!(status, 200, "GET {target}");
        assert_eq!(who, customer, "the server app sees the client's SPIFFE ID");
    }
    // A burst of connections, all through the mesh.
    let target: SocketAddr = "10.201.1.2:8080".parse().expect("addr");
    let ok = a.run(move || async move {
        let mut ok = 0;
        for _ in 0..50 {
            if matches!(get(target).await, Ok((200, _))) {
                ok += 1;
            }
        }
        ok
    });
    assert_eq!(ok, 50);

    // Only QUIC crossed from pod a into pod b: no TCP at all.
    let tcp = raw_count(&b, "iptables", "tcp") + raw_count(&b, "ip6tables", "tcp");
    let quic =
        raw_count(&b, "iptables", "udp dpt:15008") + raw_count(&b, "ip6tables", "udp dpt:15008");
    assert_eq!(tcp, 0, "TCP packets crossed the veth");
    assert!(quic > 0, "no QUIC packets crossed the veth");

    // Strict mode: the outsider's plain TCP to the app port is refused…
    let refused = c.run(move || async move { tokio::net::TcpStream::connect(app_v4).await });
    let err = refused.expect_err("plain TCP to the app port must be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // …while an excluded port still answers.
    let excluded: SocketAddr = "10.201.2.2:9000".parse().expect("addr");
    let plain = c.run(move || read_all(excluded));
    assert_eq!(plain.as_deref(), Some(&b"plain"[..]));

    // A destination outside the mesh passes through the client sidecar
    // (outbound policy allow), which dials it itself without being captured
    // again (its UID is excluded).
    let outside: SocketAddr = "10.201.1.2:9000".parse().expect("addr");
    let passed = a.run(move || read_all(outside));
    assert_eq!(passed.as_deref(), Some(&b"plain"[..]));
    let metrics = a.run(|| async {
        let addr: SocketAddr = "127.0.0.1:15000".parse().expect("addr");
        scrape(addr).await
    });
    let mesh_http = metric_sum(
        &metrics,
        "weft_intercepted_connections_total",
        &[("result", "mesh"), ("protocol", "http1")],
    );
    let passthrough = metric_sum(
        &metrics,
        "weft_intercepted_connections_total",
        &[("result", "passthrough")],
    );
    assert_eq!(mesh_http, 52.0);
    assert_eq!(passthrough, 1.0);

    // Uninstall removes every rule.
    a.exec(&weft, &["iptables", "uninstall"]);
    let nat = a.exec("iptables", &["-t", "nat", "-S"]);
    assert!(!nat.contains("WEFT"), "{nat}");
}
