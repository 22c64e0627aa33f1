//! UDP services end to end: a real DNS server (Debian `dnsmasq`) as the app
//! and a real client (`dig`, Debian `bind9-dnsutils`), through a client
//! sidecar's `--upstream dns=ADDR/udp` socket, QUIC DATAGRAM frames and the
//! server sidecar:
//!
//! ```text
//!  dig ──udp──▶ customer sidecar ══ QUIC weft-l4 (DATAGRAM) ══▶ server sidecar ──udp──▶ dnsmasq
//!                (flow per dig socket)                          (authorizes the flow)
//! ```
//!
//! Everything runs in a network namespace this test creates (and deletes),
//! so the 5 % loss it adds with `iptables -m statistic` on the server
//! sidecar's UDP port touches nothing else. Needs root (CI runs as root),
//! iptables, dnsmasq and dig (`.ci/run` installs them). A second test, on
//! plain loopback with a small UDP echo app, checks the flow mapping itself
//! (replies reach the right client address, idle flows end).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::mesh::Mesh;
use weft_proxy::{IdentitySource, Limits, Sidecar, SidecarConfig};
use weft_tests::netns::Netns;
use weft_tests::*;

/// Distinct names dnsmasq answers, each with its own address.
const NAMES: usize = 50;

/// dnsmasq on `127.0.0.1:port` in the namespace, killed (by PID) on drop.
struct Dnsmasq {
    child: tokio::process::Child,
}

impl Dnsmasq {
    fn start(ns: &Netns, port: u16) -> Dnsmasq {
        let mut cmd = ns.command("dnsmasq");
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--pid-file=",
        ])
        .arg(format!("--port={port}"));
        for i in 0..NAMES {
            cmd.arg(format!("--host-record={},{}", name(i), addr(i)));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn dnsmasq (apt-get install dnsmasq-base)");
        Dnsmasq { child }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        // `ip netns exec` execs dnsmasq, so this PID is dnsmasq's.
        let _ = self.child.start_kill();
    }
}

fn name(i: usize) -> String {
    format!("h{i}.weft.test")
}

fn addr(i: usize) -> String {
    format!("10.77.0.{}", i + 1)
}

/// A UDP port free right now on 127.0.0.1 (of the calling thread's namespace).
fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

/// Run `total` queries (names in turn) through `server`, in `batches`
/// concurrent `dig -f` processes; returns how many were answered with the
/// right address.
///
/// Each process sends from its own fixed source port (`-b`): dig binds its
/// random ports so that two processes can hold the same one at once, and
/// then their replies cross (`;; Warning: ID mismatch`), with or without a
/// mesh: no UDP server can tell two clients with one address apart. Every
/// query is still its own flow (the flow ends with its answer), so this
/// also exercises a flow following one that just ended from the same address.
async fn dig_batches(
    ns: &Netns,
    dir: &std::path::Path,
    server: SocketAddr,
    total: usize,
    batches: usize,
    opts: &[&str],
) -> usize {
    let mut runs = Vec::new();
    for b in 0..batches {
        let file = dir.join(format!("queries-{b}-{total}.txt"));
        let lines: String = (b..total)
            .step_by(batches)
            .map(|i| format!("{} A\n", name(i % NAMES)))
            .collect();
        std::fs::write(&file, lines).expect("write queries");
        let mut cmd = ns.command("dig");
        cmd.arg("-b")
            .arg(format!("127.0.0.1#{}", free_udp_port()))
            .arg(format!("@{}", server.ip()))
            .arg("-p")
            .arg(server.port().to_string())
            .arg("-f")
            .arg(&file)
            .args(["+noall", "+answer"])
            .args(opts)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        runs.push(cmd.output());
    }
    let mut answered = 0;
    for out in futures::future::join_all(runs).await {
        let out = out.expect("run dig (apt-get install bind9-dnsutils)");
        // ";;" lines are dig's notes (a timed-out try); the count tells.
        let stdout = String::from_utf8_lossy(&out.stdout);
        for note in stdout.lines().filter(|l| l.starts_with(";;")) {
            eprintln!("dig: {note}");
        }
        for line in stdout.lines().filter(|l| !l.starts_with(';')) {
            // "h7.weft.test.  0  IN  A  10.77.0.8"
            let f: Vec<&str> = line.split_whitespace().collect();
            let right = match (f.first(), f.last()) {
                (Some(n), Some(a)) => {
                    (0..NAMES).any(|i| n.trim_end_matches('.') == name(i) && *a == addr(i))
                }
                _ => false,
            };
            assert!(right, "unexpected dig answer: {line:?}");
            answered += 1;
        }
    }
    answered
}

fn mesh_text(dns_port: u16, server: SocketAddr, customer: &str) -> String {
    format!(
        r#"trust_domain = "{TD}"
[services.dns]
protocol = "udp"
port = {dns_port}
endpoints = ["{server}"]
idle_timeout = "5s"
replies_per_flow = 1
authorization = {{ allow = ["{customer}"] }}
[services.echo]
protocol = "tcp"
endpoints = ["{server}"]
"#
    )
}

async fn start(
    mesh: &Mesh,
    ca: &TestCa,
    who: &str,
    app: Option<SocketAddr>,
    upstreams: &[&str],
    udp_upstreams: &[&str],
) -> Sidecar {
    let list = |names: &[&str]| names.iter().map(|s| (s.to_string(), any_port())).collect();
    Sidecar::start(SidecarConfig {
        mesh: mesh.clone(),
        identity: IdentitySource::Static(ca.creds(who)),
        inbound: any_port(),
        admin: any_port(),
        app,
        upstreams: list(upstreams),
        udp_upstreams: list(udp_upstreams),
        limits: Limits::default(),
        tracing: Default::default(),
        capture: Default::default(),
        dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
    })
    .await
    .expect("sidecar starts")
}

async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&scrape(admin).await, name, labels)
}

/// Echo `n` bytes through the TCP service; true if they all came back.
async fn echo(upstream: SocketAddr, n: usize) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect(upstream).await else {
        return false;
    };
    let (mut r, mut w) = stream.into_split();
    let sent = pattern(n);
    let writer = tokio::spawn(async move {
        let ok = w.write_all(&sent).await.is_ok();
        let _ = w.shutdown().await;
        ok
    });
    let mut got = Vec::new();
    let read = r.read_to_end(&mut got).await.is_ok();
    writer.await.unwrap_or(false) && read && got == pattern(n)
}

#[test]
fn dns_over_udp_services_with_loss_authorization_and_limits() {
    let ns = Netns::new("udp");
    let inside = ns.handle();
    let result = ns.run(move || async move {
        tokio::time::timeout(Duration::from_secs(240), scenario(&inside)).await
    });
    result.expect("UDP scenario timed out");
}

async fn scenario(ns: &Netns) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dns_port = free_udp_port();
    let _dnsmasq = Dnsmasq::start(ns, dns_port);
    let direct: SocketAddr = format!("127.0.0.1:{dns_port}").parse().expect("addr");
    let up = wait_until(Duration::from_secs(20), || async {
        dig_batches(ns, tmp.path(), direct, 1, 1, &["+tries=1", "+timeout=1"]).await == 1
    })
    .await;
    assert!(up, "dnsmasq did not answer on {direct}");

    let ca = TestCa::new(TD);
    let (echo_app, _) = tcp_echo_app().await;
    let placeholder: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let boot = Mesh::parse(
        &mesh_text(dns_port, placeholder, &ca.id("customer")),
        "mesh",
    )
    .expect("mesh");
    let server = start(&boot, &ca, "server", Some(echo_app), &[], &[]).await;
    let mesh = Mesh::parse(
        &mesh_text(dns_port, server.inbound_addr, &ca.id("customer")),
        "mesh",
    )
    .expect("mesh");
    server.set_mesh(mesh.clone());
    let client = start(&mesh, &ca, "customer", None, &["echo"], &["dns"]).await;
    let intruder = start(&mesh, &ca, "intruder", None, &[], &["dns"]).await;
    let dns = client.udp_upstream_addrs["dns"];

    // 1. 1,000 queries in four concurrent batches, one try each: all answered right.
    let answered = dig_batches(ns, tmp.path(), dns, 1000, 4, &["+tries=1", "+timeout=5"]).await;
    let c = client.admin_addr;
    let s = server.admin_addr;
    if answered != 1000 {
        for (who, admin) in [("client", c), ("server", s)] {
            let (_, text) = admin_get(admin, "/metrics").await;
            for l in text
                .lines()
                .filter(|l| l.starts_with("weft_udp") || l.starts_with("weft_quic_lost"))
            {
                eprintln!("{who}: {l}");
            }
        }
    }
    assert_eq!(answered, 1000, "queries answered through the mesh");
    let outbound = [("direction", "outbound"), ("service", "dns")];
    let inbound = [("direction", "inbound"), ("service", "dns")];
    assert!(metric(c, "weft_udp_sent_datagrams_total", &outbound).await >= 1000.0);
    assert!(metric(c, "weft_udp_received_datagrams_total", &outbound).await >= 1000.0);
    assert!(metric(c, "weft_udp_received_bytes_total", &outbound).await > 1000.0 * 20.0);
    assert!(metric(s, "weft_udp_sent_datagrams_total", &inbound).await >= 1000.0);
    assert!(metric(s, "weft_udp_received_datagrams_total", &inbound).await >= 1000.0);
    // Every query is a flow: each ends with its answer (replies_per_flow = 1).
    assert!(metric(c, "weft_udp_flows_total", &outbound).await >= 1000.0);
    assert!(metric(s, "weft_udp_flows_total", &inbound).await >= 1000.0);
    // replies_per_flow = 1: every answered flow has ended.
    let ended = wait_until(Duration::from_secs(10), || async {
        metric(c, "weft_udp_flows_active", &outbound).await == 0.0
            && metric(s, "weft_udp_flows_active", &inbound).await == 0.0
    })
    .await;
    assert!(ended, "flows still active after their replies");

    // 2. A datagram larger than a QUIC DATAGRAM frame can carry is dropped and counted.
    let app = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    app.send_to(&vec![7u8; 3000], dns).await.expect("send");
    let too_large = [
        ("direction", "outbound"),
        ("service", "dns"),
        ("reason", "too_large"),
    ];
    let dropped = wait_until(Duration::from_secs(10), || async {
        metric(c, "weft_udp_dropped_datagrams_total", &too_large).await >= 1.0
    })
    .await;
    assert!(dropped, "too-large datagram not counted");
    // The flow itself works: a normal query from the same address is answered.
    let query = dns_query(0x1234, &name(3));
    app.send_to(&query, dns).await.expect("send");
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), app.recv_from(&mut buf))
        .await
        .expect("answer in time")
        .expect("recv");
    assert!(
        n > query.len() && buf[..2] == query[..2],
        "an answer to our query"
    );

    // 3. A caller the service does not allow: its flow is refused and counted on both sides.
    let refused_app = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let q = dns_query(0x4321, &name(1));
    refused_app
        .send_to(&q, intruder.udp_upstream_addrs["dns"])
        .await
        .expect("send");
    let unauthorized = [
        ("direction", "outbound"),
        ("service", "dns"),
        ("reason", "unauthorized"),
    ];
    let counted = wait_until(Duration::from_secs(10), || async {
        metric(
            intruder.admin_addr,
            "weft_udp_dropped_datagrams_total",
            &unauthorized,
        )
        .await
            >= 1.0
            && metric(s, "weft_authz_denied_total", &[("service", "dns")]).await >= 1.0
    })
    .await;
    assert!(counted, "refused flow not counted");
    assert_eq!(
        metric(intruder.admin_addr, "weft_udp_flows_active", &outbound).await,
        0.0
    );
    let nothing = tokio::time::timeout(Duration::from_millis(300), refused_app.recv_from(&mut buf));
    assert!(nothing.await.is_err(), "the refused caller got an answer");

    // 4. 5 % random loss on every packet to or from the server sidecar's
    // QUIC port. dig with retries still gets every answer, TCP through the
    // same sidecars still works, and the loss shows in the metrics.
    let port = server.inbound_addr.port().to_string();
    for dir in ["--dport", "--sport"] {
        ns.exec(
            "iptables",
            &[
                "-A",
                "INPUT",
                "-p",
                "udp",
                dir,
                &port,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.05",
                "-j",
                "DROP",
            ],
        );
    }
    let lost_before = metric(c, "weft_quic_lost_packets_total", &[]).await
        + metric(s, "weft_quic_lost_packets_total", &[]).await;
    let sent_before = metric(c, "weft_udp_sent_datagrams_total", &outbound).await;
    let recv_before = metric(c, "weft_udp_received_datagrams_total", &outbound).await;
    let echo_addr = client.upstream_addrs["echo"];
    let (answered, echoed) = tokio::join!(
        dig_batches(ns, tmp.path(), dns, 400, 4, &["+tries=6", "+timeout=1"]),
        async {
            let mut ok = 0;
            for _ in 0..4 {
                ok += usize::from(echo(echo_addr, 256 << 10).await);
            }
            ok
        }
    );
    assert_eq!(
        answered, 400,
        "queries answered with retries under 5 % loss"
    );
    assert_eq!(echoed, 4, "TCP echoes through the same sidecars under loss");
    let drops = ns.exec("iptables", &["-L", "INPUT", "-v", "-n", "-x"]);
    let dropped_packets: u64 = drops
        .lines()
        .filter(|l| l.contains("DROP"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(dropped_packets > 0, "iptables dropped nothing:\n{drops}");
    let lost_after = metric(c, "weft_quic_lost_packets_total", &[]).await
        + metric(s, "weft_quic_lost_packets_total", &[]).await;
    assert!(
        lost_after > lost_before,
        "QUIC lost packets did not grow ({lost_before} -> {lost_after}) though iptables dropped {dropped_packets}"
    );
    let sent = metric(c, "weft_udp_sent_datagrams_total", &outbound).await - sent_before;
    let received = metric(c, "weft_udp_received_datagrams_total", &outbound).await - recv_before;
    assert!(
        sent > received && received >= 400.0,
        "datagrams not answered should show: sent {sent}, received {received}"
    );
    ns.exec("iptables", &["-F", "INPUT"]);

    client.shutdown().await;
    intruder.shutdown().await;
    server.shutdown().await;
}

/// A minimal DNS query (RFC 1035 §4.1) for `name`'s A record.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// A UDP app that answers every datagram with "<who>:" and the datagram.
async fn udp_echo_app(who: &'static str) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = format!("{who}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    addr
}

/// Without root: on loopback, replies go back to the app address that
/// sent each datagram (several flows through one upstream socket at once),
/// an idle flow ends after the service's idle_timeout, and upstream
/// listeners must match their service's protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_keep_their_client_addresses_and_end_when_idle() {
    let ca = TestCa::new(TD);
    let app = udp_echo_app("echo").await;
    let text = |server: SocketAddr| {
        format!(
            "trust_domain = \"{TD}\"\n[services.echo-udp]\nprotocol = \"udp\"\nport = {}\n\
             endpoints = [\"{server}\"]\nidle_timeout = \"1s\"\n\
             [services.web]\nendpoints = [\"{server}\"]\n",
            app.port()
        )
    };
    let placeholder: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let boot = Mesh::parse(&text(placeholder), "mesh").expect("mesh");
    let server = start(&boot, &ca, "server", None, &[], &[]).await;
    let mesh = Mesh::parse(&text(server.inbound_addr), "mesh").expect("mesh");
    server.set_mesh(mesh.clone());
    let client = start(&mesh, &ca, "customer", None, &[], &["echo-udp"]).await;
    let upstream = client.udp_upstream_addrs["echo-udp"];

    let mut apps = Vec::new();
    for _ in 0..8 {
        apps.push(
            tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        );
    }
    // Every socket sends three datagrams, interleaved with the others.
    for round in 0..3 {
        for (i, a) in apps.iter().enumerate() {
            let msg = format!("app{i}-{round}");
            a.send_to(msg.as_bytes(), upstream).await.expect("send");
        }
    }
    for (i, a) in apps.iter().enumerate() {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < 3 {
            let (n, from) = tokio::time::timeout(Duration::from_secs(10), a.recv_from(&mut buf))
                .await
                .expect("reply in time")
                .expect("recv");
            assert_eq!(from, upstream, "replies come from the upstream socket");
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got.sort();
        let want: Vec<String> = (0..3).map(|r| format!("echo:app{i}-{r}")).collect();
        assert_eq!(got, want, "app {i} got only its own replies");
    }
    let outbound = [("direction", "outbound"), ("service", "echo-udp")];
    let inbound = [("direction", "inbound"), ("service", "echo-udp")];
    assert_eq!(
        metric(client.admin_addr, "weft_udp_flows_total", &outbound).await,
        8.0,
        "one flow per app address"
    );
    // Nobody sends any more: both sides end every flow after idle_timeout.
    let idle = wait_until(Duration::from_secs(15), || async {
        metric(client.admin_addr, "weft_udp_flows_active", &outbound).await == 0.0
            && metric(server.admin_addr, "weft_udp_flows_active", &inbound).await == 0.0
    })
    .await;
    assert!(idle, "idle flows did not end");
    // A new datagram from a known address after its flow ended starts a new flow.
    apps[0].send_to(b"again", upstream).await.expect("send");
    let mut buf = [0u8; 256];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), apps[0].recv_from(&mut buf))
        .await
        .expect("reply in time")
        .expect("recv");
    assert_eq!(&buf[..n], b"echo:again");
    assert_eq!(
        metric(client.admin_addr, "weft_udp_flows_total", &outbound).await,
        9.0
    );

    // Upstream listeners must match the service's protocol.
    let wrong = |tcp: &[&str], udp: &[&str]| {
        let list = |n: &[&str]| n.iter().map(|s| (s.to_string(), any_port())).collect();
        SidecarConfig {
            mesh: mesh.clone(),
            identity: IdentitySource::Static(ca.creds("customer")),
            inbound: any_port(),
            admin: any_port(),
            app: None,
            upstreams: list(tcp),
            udp_upstreams: list(udp),
            limits: Limits::default(),
            tracing: Default::default(),
            capture: Default::default(),
            dns_refresh: weft_proxy::resolve::DEFAULT_INTERVAL,
        }
    };
    for (cfg, expect) in [
        (
            wrong(&["echo-udp"], &[]),
            "give its listener as SERVICE=ADDR/udp",
        ),
        (wrong(&[], &["web"]), "only for protocol = \"udp\" services"),
    ] {
        match Sidecar::start(cfg).await {
            Ok(_) => panic!("a mismatched upstream was accepted"),
            Err(e) => assert!(e.to_string().contains(expect), "{e}"),
        }
    }
    client.shutdown().await;
    server.shutdown().await;
}
