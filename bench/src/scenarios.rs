//! The scenarios `weft-bench compare` sets up on loopback, all in front of
//! the same backend: direct, a Weft HTTP pair (h3), a Weft TCP pair
//! (weft-l4), and HAProxy pairs (HTTP/1, HTTP/2 between the halves, TCP)
//! with TLS 1.3 mTLS between the two halves, using certificates from our CA.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::load::HttpTarget;
use crate::procs::{free_tcp_port, free_udp_port, wait_listening, Proc};

pub const TRUST_DOMAIN: &str = "bench.weft.local";
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// One way of getting from the load generator to the backend.
pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    /// Where HTTP requests go.
    pub http: Option<HttpTarget>,
    /// Where bulk TCP streams go (scenarios that carry raw TCP).
    pub bulk: Option<SocketAddr>,
    /// The proxies, client side first.
    pub procs: Vec<(&'static str, Proc)>,
    /// Why the scenario is not measured, if it is not.
    pub skipped: Option<String>,
}

impl Scenario {
    fn skipped(name: &'static str, description: &'static str, why: String) -> Scenario {
        Scenario {
            name,
            description,
            http: None,
            bulk: None,
            procs: Vec::new(),
            skipped: Some(why),
        }
    }
}

/// Certificates for both halves from a fresh CA, written as a Weft
/// `--cert-dir` each and as HAProxy `crt` files (certificate chain + key).
pub struct Certs {
    pub client_dir: PathBuf,
    pub server_dir: PathBuf,
    pub client_pem: PathBuf,
    pub server_pem: PathBuf,
    pub bundle: PathBuf,
}

pub fn make_certs(dir: &Path) -> anyhow::Result<Certs> {
    let ca = weft_ca::Ca::init(&dir.join("ca"), TRUST_DOMAIN).context("creating the bench CA")?;
    let ttl = Duration::from_secs(24 * 3600);
    let mut paths = Vec::new();
    for side in ["client", "server"] {
        let issued = ca
            .issue(&format!("spiffe://{TRUST_DOMAIN}/ns/bench/sa/{side}"), ttl)
            .with_context(|| format!("issuing the {side} certificate"))?;
        let cert_dir = dir.join(side);
        issued.write_to(&cert_dir)?;
        let pem = dir.join(format!("{side}.haproxy.pem"));
        std::fs::write(&pem, format!("{}{}", issued.cert_chain_pem, issued.key_pem))?;
        std::fs::write(dir.join("bundle.pem"), &issued.bundle_pem)?;
        paths.push((cert_dir, pem));
    }
    let (server_dir, server_pem) = paths.pop().context("server cert")?;
    let (client_dir, client_pem) = paths.pop().context("client cert")?;
    Ok(Certs {
        client_dir,
        server_dir,
        client_pem,
        server_pem,
        bundle: dir.join("bundle.pem"),
    })
}

/// Start the backend (`weft-bench backend`) as its own process.
pub fn start_backend(
    exe: &Path,
    body_size: usize,
    threads: usize,
    logs: &Path,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let mut p = Proc::spawn(
        "backend",
        Command::new(exe).args([
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--body-size",
            &body_size.to_string(),
            "--threads",
            &threads.to_string(),
        ]),
        &logs.join("backend.log"),
    )?;
    let line = p.wait_line(crate::backend::READY, START_TIMEOUT)?;
    let addr = field(&line, "listen=")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no listen= address in {line:?}"))?;
    Ok((p, addr))
}

/// Start nginx as the HTTP backend instead: one process (no master, so the
/// PID measured and killed is the one serving), a `body_size`-byte file
/// for every path, no logs. It has no `SINK` mode, so it serves the HTTP
/// tests only.
pub fn start_nginx(
    nginx: &Path,
    body_size: usize,
    work: &Path,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let dir = work.join("nginx");
    let www = dir.join("www");
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("body"), vec![b'w'; body_size])?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    server {{
        listen {addr} backlog=4096;
        root {www};
        location / {{ try_files /body =404; }}
    }}
}}
"#,
        www = www.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let args = |cmd: &mut Command| {
        cmd.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&path);
    };
    let mut check = Command::new(nginx);
    args(&mut check);
    let out = check
        .arg("-t")
        .arg("-q")
        .output()
        .with_context(|| format!("running {}", nginx.display()))?;
    if !out.status.success() {
        bail!(
            "nginx rejects {}:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut cmd = Command::new(nginx);
    args(&mut cmd);
    let mut p = Proc::spawn("backend (nginx)", &mut cmd, &dir.join("stderr.log"))?;
    if !wait_listening(addr, START_TIMEOUT, || p.alive()) {
        bail!(
            "nginx is not listening on {addr}; {}:\n{}",
            dir.join("error.log").display(),
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
    }
    Ok((p, addr))
}

/// `key=value` from a space-separated line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))
}

pub fn direct(backend: SocketAddr) -> Scenario {
    Scenario {
        name: "direct",
        description: "client → backend (the physical limit)",
        http: Some(HttpTarget::for_addr(backend)),
        bulk: Some(backend),
        procs: Vec::new(),
        skipped: None,
    }
}

/// Settings shared by the proxy scenarios.
pub struct ProxySetup<'a> {
    pub work: &'a Path,
    pub certs: &'a Certs,
    pub backend: SocketAddr,
    pub workers: usize,
}

/// A Weft pair: client sidecar (upstream listener) → QUIC → server sidecar → backend.
pub fn weft_pair(setup: &ProxySetup, weft: Option<&Path>, tcp: bool) -> anyhow::Result<Scenario> {
    weft_pair_as(setup, weft, tcp, None, "")
}

/// The traffic policies of `weft-http-policy`: every one that a request
/// passes through, none that fires on the benchmark's requests. Route
/// matching falls through a header route to a path-and-method route with
/// a timeout, a retry policy (and the service's retry budget) and a fault
/// rule for marked requests; every request takes a circuit-breaker slot
/// and reports its result to outlier detection.
pub const POLICIES: &str = r#"
[services.bench.circuit_breaker]
max_requests = 1024
max_pending = 1024

[services.bench.outlier_detection]
consecutive_5xx = 5

[services.bench.retry_budget]
ratio = 0.2

[[services.bench.routes]]
name = "canary"
match = { headers = { "x-canary" = "1" } }
fault = { abort = { percent = 100, status = 503 } }

[[services.bench.routes]]
name = "api"
match = { path_prefix = "/", methods = ["GET", "HEAD"] }
timeout = "10s"
retries = { attempts = 2, per_try_timeout = "5s", on = ["5xx", "connect-failure", "reset"] }
fault = { delay = { percent = 100, duration = "1s" }, headers = { "x-chaos" = "1" } }
"#;

/// weft-http with [`POLICIES`].
pub fn weft_policy_pair(setup: &ProxySetup, weft: Option<&Path>) -> anyhow::Result<Scenario> {
    let rename = Some((
        "weft-http-policy",
        "weft-http with routes, timeout, retries and budget, circuit breaker, outlier detection, fault rule",
    ));
    weft_pair_as(setup, weft, false, rename, POLICIES)
}

/// [`weft_pair`] under another name (`weft-http-baseline`: the same pair
/// with another weft binary, to compare two builds side by side).
pub fn weft_pair_as(
    setup: &ProxySetup,
    weft: Option<&Path>,
    tcp: bool,
    rename: Option<(&'static str, &'static str)>,
    mesh_extra: &str,
) -> anyhow::Result<Scenario> {
    let (name, description) = if let Some(r) = rename {
        r
    } else if tcp {
        (
            "weft-tcp",
            "client → weft → QUIC weft-l4 stream (mTLS) → weft → backend",
        )
    } else {
        (
            "weft-http",
            "client → weft → HTTP/3 over QUIC (mTLS) → weft → backend",
        )
    };
    let Some(weft) = weft else {
        return Ok(Scenario::skipped(
            name,
            description,
            "no weft binary: build it (cargo build --release -p weft-proxy) or pass --weft PATH"
                .into(),
        ));
    };
    let dir = setup.work.join(name);
    std::fs::create_dir_all(&dir)?;
    let inbound = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let mesh = dir.join("mesh.toml");
    std::fs::write(
        &mesh,
        format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\n\n[services.bench]\nprotocol = \"{}\"\nendpoints = [\"{inbound}\"]\n{mesh_extra}",
            if tcp { "tcp" } else { "http" }
        ),
    )?;
    let common = |cert_dir: &Path| {
        format!(
            "--mesh {}\n--cert-dir {}\n--admin 127.0.0.1:0\n--workers {}\n",
            mesh.display(),
            cert_dir.display(),
            setup.workers
        )
    };
    let server_flags = dir.join("server.flags");
    std::fs::write(
        &server_flags,
        format!(
            "{}--inbound {inbound}\n--app {}\n",
            common(&setup.certs.server_dir),
            setup.backend
        ),
    )?;
    let client_flags = dir.join("client.flags");
    std::fs::write(
        &client_flags,
        format!(
            "{}--inbound 127.0.0.1:0\n--upstream bench=127.0.0.1:0\n",
            common(&setup.certs.client_dir)
        ),
    )?;
    let start = |side: &str, flags: &Path| -> anyhow::Result<(Proc, String)> {
        let mut cmd = Command::new(weft);
        cmd.arg("sidecar")
            .arg(format!("@{}", flags.display()))
            // Warnings only: the HAProxy pairs log nothing either
            // (WEFT_BENCH_SIDECAR_LOG=debug to find out what went wrong).
            .env(
                "RUST_LOG",
                std::env::var("WEFT_BENCH_SIDECAR_LOG").unwrap_or_else(|_| "warn".into()),
            );
        let mut p = Proc::spawn(
            &format!("{name} {side} sidecar"),
            &mut cmd,
            &dir.join(format!("{side}.log")),
        )?;
        let line = p.wait_line("weft sidecar ready:", START_TIMEOUT)?;
        Ok((p, line))
    };
    let (server, _) = start("server", &server_flags)?;
    let (client, line) = start("client", &client_flags)?;
    let upstream: SocketAddr = line
        .split("upstreams=[")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .and_then(|s| s.split(',').find_map(|u| u.strip_prefix("bench=")))
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no bench= upstream in {line:?}"))?;
    Ok(Scenario {
        name,
        description,
        http: Some(HttpTarget::for_addr(upstream)),
        bulk: tcp.then_some(upstream),
        procs: vec![("client proxy", client), ("server proxy", server)],
        skipped: None,
    })
}

/// What the two HAProxy halves speak to each other (always over TLS 1.3 mTLS).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum HaproxyMode {
    Http1,
    Http2,
    Tcp,
}

impl HaproxyMode {
    fn name(self) -> &'static str {
        match self {
            HaproxyMode::Http1 => "haproxy-h1",
            HaproxyMode::Http2 => "haproxy-h2",
            HaproxyMode::Tcp => "haproxy-tcp",
        }
    }
    fn description(self) -> &'static str {
        match self {
            HaproxyMode::Http1 => {
                "client → haproxy → HTTP/1.1 over TLS 1.3 mTLS → haproxy → backend"
            }
            HaproxyMode::Http2 => {
                "client → haproxy → HTTP/2 (multiplexed) over TLS 1.3 mTLS → haproxy → backend"
            }
            HaproxyMode::Tcp => "client → haproxy → TCP over TLS 1.3 mTLS → haproxy → backend",
        }
    }
}

/// The two HAProxy configurations (client half, server half).
pub fn haproxy_configs(
    mode: HaproxyMode,
    setup: &ProxySetup,
    front: u16,
    link: u16,
) -> (String, String) {
    let proto = if mode == HaproxyMode::Tcp {
        "tcp"
    } else {
        "http"
    };
    let head = |role: &str| {
        let mut s = String::new();
        let _ = writeln!(s, "# weft-bench compare: {} {role} half", mode.name());
        let _ = writeln!(
            s,
            "global\n    nbthread {}\n    maxconn 4096",
            setup.workers
        );
        let _ = writeln!(
            s,
            "defaults\n    mode {proto}\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s"
        );
        s
    };
    let tls = |crt: &Path| {
        format!(
            "ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
            crt.display(),
            setup.certs.bundle.display()
        )
    };
    let (bind_alpn, server_alpn) = match mode {
        HaproxyMode::Http1 => (" alpn http/1.1", " alpn http/1.1"),
        HaproxyMode::Http2 => (" alpn h2,http/1.1", " alpn h2 proto h2"),
        HaproxyMode::Tcp => ("", ""),
    };
    let mut client = head("client");
    let _ = writeln!(
        client,
        "frontend front\n    bind 127.0.0.1:{front}\n    default_backend link\nbackend link"
    );
    if mode == HaproxyMode::Http2 {
        // Let every request share the multiplexed connections to the other half.
        let _ = writeln!(client, "    http-reuse always");
    }
    let _ = writeln!(
        client,
        "    server link 127.0.0.1:{link} {}{server_alpn}",
        tls(&setup.certs.client_pem)
    );
    let mut server = head("server");
    let _ = writeln!(
        server,
        "frontend link\n    bind 127.0.0.1:{link} {}{bind_alpn}\n    default_backend app\nbackend app\n    server app {}",
        tls(&setup.certs.server_pem),
        setup.backend
    );
    (client, server)
}

pub fn haproxy_pair(
    setup: &ProxySetup,
    haproxy: Option<&Path>,
    mode: HaproxyMode,
) -> anyhow::Result<Scenario> {
    let Some(haproxy) = haproxy else {
        return Ok(Scenario::skipped(
            mode.name(),
            mode.description(),
            "haproxy not found on PATH (Debian: apt-get install haproxy)".into(),
        ));
    };
    let dir = setup.work.join(mode.name());
    std::fs::create_dir_all(&dir)?;
    let front = free_tcp_port()?;
    let link = free_tcp_port()?;
    let (client_cfg, server_cfg) = haproxy_configs(mode, setup, front, link);
    let mut procs = Vec::new();
    for (role, side, cfg, port) in [
        ("server proxy", "server", server_cfg, link),
        ("client proxy", "client", client_cfg, front),
    ] {
        let path = dir.join(format!("{side}.cfg"));
        std::fs::write(&path, cfg)?;
        let check = Command::new(haproxy)
            .arg("-c")
            .arg("-q")
            .arg("-f")
            .arg(&path)
            .output()
            .with_context(|| format!("running {}", haproxy.display()))?;
        if !check.status.success() {
            bail!(
                "{}: haproxy rejects {}:\n{}{}",
                mode.name(),
                path.display(),
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let mut cmd = Command::new(haproxy);
        // -db: foreground, one process (its PID is the one doing the work).
        cmd.arg("-db").arg("-f").arg(&path);
        let mut p = Proc::spawn(
            &format!("{} {side}", mode.name()),
            &mut cmd,
            &dir.join(format!("{side}.log")),
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if !wait_listening(addr, START_TIMEOUT, || p.alive()) {
            bail!(
                "{} {side} is not listening on {addr}; its log:\n{}",
                mode.name(),
                p.log_tail()
            );
        }
        procs.push((role, p));
    }
    procs.reverse();
    let front_addr = SocketAddr::from(([127, 0, 0, 1], front));
    Ok(Scenario {
        name: mode.name(),
        description: mode.description(),
        http: Some(HttpTarget::for_addr(front_addr)),
        bulk: (mode == HaproxyMode::Tcp).then_some(front_addr),
        procs,
        skipped: None,
    })
}
