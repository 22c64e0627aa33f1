//! Side-by-side measurement of the QUIC tuning constants in
//! transport/src/endpoint.rs: single-stream bulk throughput between two Weft
//! endpoints on loopback (real mTLS, real UDP), for Weft's settings and for
//! each setting reverted to the library/kernel default. Configurations run
//! interleaved, several rounds, and the report gives medians and ratios to
//! Weft's settings, because absolute numbers on a shared machine are noise.
//!
//! Each configuration is measured twice: on plain loopback, and through a
//! small UDP relay that delays every datagram (one-way `RTT/2`), because
//! window sizes only matter once bandwidth × RTT exceeds them.
//!
//! Run: `cargo run --release -p weft-bench --bin quic_tuning [-- MiB rounds rtt_ms]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use weft_transport::endpoint::EndpointOptions;
use weft_transport::{Credentials, MeshEndpoint, MeshTls, ALPN_L4};

struct Config {
    name: &'static str,
    apply: fn(&mut EndpointOptions),
}

const CONFIGS: &[Config] = &[
    Config {
        name: "weft settings",
        apply: |_| {},
    },
    Config {
        // quinn's defaults: 1.25 MB stream window, unbounded connection window, 10 MB send window.
        name: "quinn default windows",
        apply: |o| {
            o.stream_receive_window = 1_250_000;
            o.connection_receive_window = u32::MAX >> 2;
            o.send_window = 10_000_000;
        },
    },
    Config {
        // What the kernel gives a socket that does not ask (net.core.rmem_default).
        name: "kernel default UDP buffers",
        apply: |o| o.udp_buffer_bytes = 212_992,
    },
    Config {
        name: "GSO off",
        apply: |o| o.gso = false,
    },
    Config {
        // Jumbo frames (cloud networks commonly allow 9001).
        name: "MTU discovery up to 8973",
        apply: |o| o.mtu_upper_bound = 8973,
    },
    Config {
        // The largest UDP payload: what loopback allows.
        name: "MTU discovery up to 65527",
        apply: |o| o.mtu_upper_bound = 65527,
    },
    Config {
        name: "ACK frequency on",
        apply: |o| o.ack_frequency = true,
    },
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let rtt_ms: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        run(mib, rounds, None).await?;
        if rtt_ms > 0 {
            run(mib, rounds, Some(Duration::from_millis(rtt_ms))).await?;
        }
        Ok(())
    })
}

async fn run(mib: usize, rounds: usize, rtt: Option<Duration>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = weft_ca::Ca::init(dir.path(), "bench.weft.local")?;
    let creds = |name: &str| -> anyhow::Result<Credentials> {
        let c = ca.issue(
            &format!("spiffe://bench.weft.local/sa/{name}"),
            Duration::from_secs(3600),
        )?;
        Ok(Credentials::from_pem(
            c.cert_chain_pem.as_bytes(),
            c.key_pem.as_bytes(),
            c.bundle_pem.as_bytes(),
        )?)
    };
    let server_tls = MeshTls::new("bench.weft.local", &creds("server")?)?;
    let client_tls = MeshTls::new("bench.weft.local", &creds("client")?)?;
    let bytes = mib << 20;
    match rtt {
        None => println!("\nsingle-stream transfer of {mib} MiB over loopback, {rounds} rounds, interleaved"),
        Some(r) => println!(
            "\nsingle-stream transfer of {mib} MiB through a UDP relay adding {} ms RTT, {rounds} rounds, interleaved",
            r.as_millis()
        ),
    }
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    for _ in 0..rounds {
        for (i, cfg) in CONFIGS.iter().enumerate() {
            let mut opts = EndpointOptions::new("127.0.0.1:0".parse()?);
            (cfg.apply)(&mut opts);
            let server = MeshEndpoint::bind(server_tls.clone(), &opts)?;
            let client = MeshEndpoint::bind(client_tls.clone(), &opts)?;
            let mut addr = server.local_addr()?;
            let sink = tokio::spawn(serve_sink(server.clone()));
            let relay = match rtt {
                Some(rtt) => {
                    let (relay_addr, task) = delay_relay(addr, rtt / 2).await?;
                    addr = relay_addr;
                    Some(task)
                }
                None => None,
            };
            let rate = transfer(&client, addr, bytes).await.context(cfg.name)?;
            sink.abort();
            if let Some(r) = relay {
                r.abort();
            }
            results[i].push(rate);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let medians: Vec<f64> = results.iter_mut().map(med).collect();
    println!(
        "{:<28} {:>12} {:>10}",
        "configuration", "MiB/s (med)", "vs weft"
    );
    for (cfg, m) in CONFIGS.iter().zip(&medians) {
        println!("{:<28} {:>12.0} {:>9.2}x", cfg.name, m, m / medians[0]);
    }
    Ok(())
}

/// Accept connections; read each stream to its end, answer with the byte count.
async fn serve_sink(ep: MeshEndpoint) {
    while let Some(incoming) = ep.quinn().accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while let Ok(Some(chunk)) = recv.read_chunk(1 << 20, false).await {
                        n += chunk.bytes.len() as u64;
                    }
                    let _ = send.write_all(&n.to_be_bytes()).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
}

async fn transfer(client: &MeshEndpoint, addr: SocketAddr, bytes: usize) -> anyhow::Result<f64> {
    let conn = client.connect(addr, ALPN_L4).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let chunk = bytes::Bytes::from(vec![0x5a; 64 << 10]);
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        send.write_chunk(chunk.clone()).await?;
        sent += chunk.len();
    }
    send.finish()?;
    let mut got = [0u8; 8];
    recv.read_exact(&mut got).await?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        u64::from_be_bytes(got) == sent as u64,
        "receiver counted {} of {sent}",
        u64::from_be_bytes(got)
    );
    if std::env::var_os("WEFT_TUNING_MTU").is_some() {
        let stats = conn.stats();
        eprintln!(
            "  mtu {} after {:.2} s, {} datagrams sent",
            stats.path.current_mtu, secs, stats.udp_tx.datagrams
        );
    }
    conn.close(0u32.into(), b"done");
    Ok(sent as f64 / (1 << 20) as f64 / secs)
}

/// A UDP relay on loopback that forwards every datagram between one client
/// and `server` after `delay`, in order (a fixed one-way delay, no loss).
async fn delay_relay(
    server: SocketAddr,
    delay: Duration,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let std_sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let sock2 = socket2::SockRef::from(&std_sock);
    // Large buffers: the relay holds a full window in flight.
    let _ = sock2.set_recv_buffer_size(weft_transport::endpoint::UDP_BUFFER_BYTES);
    let _ = sock2.set_send_buffer_size(weft_transport::endpoint::UDP_BUFFER_BYTES);
    std_sock.set_nonblocking(true)?;
    let sock = std::sync::Arc::new(tokio::net::UdpSocket::from_std(std_sock)?);
    let addr = sock.local_addr()?;
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>, SocketAddr)>();
    let recv_sock = sock.clone();
    let task = tokio::spawn(async move {
        let receiver = async move {
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = recv_sock.recv_from(&mut buf).await {
                let dest = if from == server {
                    match client {
                        Some(c) => c,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    server
                };
                let at = tokio::time::Instant::now() + delay;
                if tx.send((at, buf[..n].to_vec(), dest)).is_err() {
                    return;
                }
            }
        };
        let sender = async move {
            while let Some((at, data, dest)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                let _ = sock.send_to(&data, dest).await;
            }
        };
        tokio::join!(receiver, sender);
    });
    Ok((addr, task))
}
