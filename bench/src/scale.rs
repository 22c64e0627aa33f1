//! `weft-bench scale`: how much memory a sidecar spends per stream and per
//! peer connection.
//!
//! - **Streams**: a Weft TCP pair (client sidecar → one QUIC connection →
//!   server sidecar → the built-in backend in echo mode). N TCP connections
//!   to the client sidecar become N concurrent streams on that one QUIC
//!   connection; each echoes a ping to prove it is live and then stays
//!   open. Resident memory of both sidecars is read before and with all N
//!   open.
//! - **Peer connections**: P separate QUIC endpoints (own UDP sockets, so P
//!   distinct peers) holding mesh certificates complete a handshake with
//!   the server sidecar and stay connected; its resident memory is read
//!   before and with all P connected.
//!
//! Memory is VmRSS from /proc (what the kernel charges the process), so the
//! per-item figures include allocator slack; the allocator may keep freed
//! memory, which is why each step is measured as growth over its own
//! baseline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::procs::Proc;
use crate::scenarios::{self, ProxySetup};

/// Streams opened at once.
const STREAM_BATCH: usize = 50;

pub struct ScaleOpts {
    pub streams: usize,
    pub peers: usize,
    pub workers: usize,
    pub weft: PathBuf,
    pub work: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct ScaleReport {
    pub streams: usize,
    pub streams_live: usize,
    pub client_rss_kib_before: u64,
    pub client_rss_kib_with_streams: u64,
    pub server_rss_kib_before: u64,
    pub server_rss_kib_with_streams: u64,
    /// Growth per open stream, client sidecar / server sidecar.
    pub client_bytes_per_stream: f64,
    pub server_bytes_per_stream: f64,
    pub peers: usize,
    pub peers_connected: usize,
    pub server_rss_kib_before_peers: u64,
    pub server_rss_kib_with_peers: u64,
    /// Growth of the server sidecar per connected peer.
    pub server_bytes_per_connection: f64,
}

fn per_item(before_kib: u64, after_kib: u64, n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    (after_kib.saturating_sub(before_kib) as f64 * 1024.0) / n as f64
}

/// Resident memory once it has stopped moving (allocations of the step
/// just finished may still be settling); at most ~1 s of polling.
async fn settled_rss(p: &Proc) -> u64 {
    let mut last = p.rss_kib();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = p.rss_kib();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// Open a TCP connection through the pair, echo a ping, keep it open.
async fn open_stream(upstream: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let mut s = tokio::net::TcpStream::connect(upstream).await?;
    s.write_all(crate::backend::ECHO).await?;
    s.write_all(b"ping").await?;
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut back))
        .await
        .context("echo timed out")??;
    if &back != b"ping" {
        bail!("echo returned {back:?}");
    }
    Ok(s)
}

fn peer_tls(cert_dir: &Path) -> anyhow::Result<Arc<weft_transport::tls::MeshTls>> {
    let read = |f: &str| std::fs::read(cert_dir.join(f)).with_context(|| format!("reading {f}"));
    let creds = weft_transport::tls::Credentials::from_pem(
        &read("cert.pem")?,
        &read("key.pem")?,
        &read("bundle.pem")?,
    )?;
    Ok(weft_transport::tls::MeshTls::new(
        scenarios::TRUST_DOMAIN,
        &creds,
    )?)
}

/// Raise the open-file limit to its hard maximum (inherited by the
/// sidecars and the backend): every stream holds descriptors in three
/// processes.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub async fn run(opts: &ScaleOpts, exe: &Path) -> anyhow::Result<ScaleReport> {
    raise_nofile();
    let certs = scenarios::make_certs(&opts.work)?;
    let (_backend, backend) = scenarios::start_backend(exe, 16, 1, &opts.work)?;
    let setup = ProxySetup {
        work: &opts.work,
        certs: &certs,
        backend,
        workers: opts.workers,
    };
    let pair = scenarios::weft_pair(&setup, Some(&opts.weft), true)?;
    if let Some(why) = &pair.skipped {
        bail!("the Weft TCP pair did not start: {why}");
    }
    let upstream = pair.bulk.context("the TCP pair has no upstream")?;
    let (client, server) = match pair.procs.as_slice() {
        [(_, c), (_, s)] => (c, s),
        _ => bail!("expected a client and a server sidecar"),
    };

    // One stream first: the QUIC connection and its buffers exist in the baseline.
    drop(open_stream(upstream).await?);
    let client_before = settled_rss(client).await;
    let server_before = settled_rss(server).await;
    // In batches: a burst of a thousand SYNs overflows the listener's accept
    // queue (a kernel matter, not the sidecar's); the streams stay open
    // across batches, so all of them are open at the end.
    let mut live = Vec::with_capacity(opts.streams);
    let mut left = opts.streams;
    while left > 0 {
        let batch = left.min(STREAM_BATCH);
        for r in futures_join(batch, |_| open_stream(upstream)).await {
            match r {
                Ok(s) => live.push(s),
                Err(e) => tracing_free_note(&e),
            }
        }
        left -= batch;
    }
    if live.len() < opts.streams {
        eprintln!(
            "weft-bench scale: {} of {} streams failed; client sidecar log:\n{}\nserver sidecar log:\n{}",
            opts.streams - live.len(),
            opts.streams,
            client.log_tail(),
            server.log_tail()
        );
    }
    let client_with = settled_rss(client).await;
    let server_with = settled_rss(server).await;
    let streams_live = live.len();
    drop(live);

    // Peers: the server sidecar's inbound address is in the mesh file the
    // pair wrote; ask the pair's setup for it instead of parsing.
    let inbound = server_inbound(&opts.work)?;
    let tls = peer_tls(&certs.client_dir)?;
    let server_before_peers = settled_rss(server).await;
    let mut endpoints = Vec::with_capacity(opts.peers);
    for _ in 0..opts.peers {
        let mut eo =
            weft_transport::endpoint::EndpointOptions::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        eo.udp_buffer_bytes = 256 << 10;
        endpoints.push(weft_transport::endpoint::MeshEndpoint::bind(
            tls.clone(),
            &eo,
        )?);
    }
    let conns = futures_join(opts.peers, |i| {
        let ep = endpoints[i].clone();
        async move {
            ep.connect(inbound, weft_transport::tls::ALPN_L4)
                .await
                .map_err(anyhow::Error::from)
        }
    })
    .await;
    let connected: Vec<_> = conns.into_iter().filter_map(Result::ok).collect();
    let server_with_peers = settled_rss(server).await;
    let peers_connected = connected.len();
    for c in &connected {
        c.close(0u32.into(), b"scale test done");
    }
    Ok(ScaleReport {
        streams: opts.streams,
        streams_live,
        client_rss_kib_before: client_before,
        client_rss_kib_with_streams: client_with,
        server_rss_kib_before: server_before,
        server_rss_kib_with_streams: server_with,
        client_bytes_per_stream: per_item(client_before, client_with, streams_live),
        server_bytes_per_stream: per_item(server_before, server_with, streams_live),
        peers: opts.peers,
        peers_connected,
        server_rss_kib_before_peers: server_before_peers,
        server_rss_kib_with_peers: server_with_peers,
        server_bytes_per_connection: per_item(
            server_before_peers,
            server_with_peers,
            peers_connected,
        ),
    })
}

fn tracing_free_note(e: &anyhow::Error) {
    static SHOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SHOWN.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!("weft-bench scale: a stream failed: {e:#}");
    }
}

/// Run `n` futures made by `make` concurrently (bounded by `n` itself: the
/// point is to have them all open at once).
async fn futures_join<F, Fut, T>(n: usize, make: F) -> Vec<anyhow::Result<T>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(
            h.await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("task: {e}"))),
        );
    }
    out
}

/// The server sidecar's inbound (QUIC) address, from the mesh file the
/// TCP pair wrote (its only endpoint).
fn server_inbound(work: &Path) -> anyhow::Result<SocketAddr> {
    let path = work.join("weft-tcp").join("mesh.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("endpoints = [\""))
        .and_then(|rest| rest.split('"').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no endpoint in {}", path.display()))
}

pub fn markdown(r: &ScaleReport) -> String {
    let mib = |kib: u64| kib as f64 / 1024.0;
    format!(
        "| measure | client sidecar | server sidecar |\n|---|---:|---:|\n\
         | RSS before streams (MiB) | {:.1} | {:.1} |\n\
         | RSS with {} of {} streams open (MiB) | {:.1} | {:.1} |\n\
         | memory per stream (KiB) | {:.1} | {:.1} |\n\
         | RSS before peers (MiB) | – | {:.1} |\n\
         | RSS with {} of {} peer connections (MiB) | – | {:.1} |\n\
         | memory per peer connection (KiB) | – | {:.1} |\n",
        mib(r.client_rss_kib_before),
        mib(r.server_rss_kib_before),
        r.streams_live,
        r.streams,
        mib(r.client_rss_kib_with_streams),
        mib(r.server_rss_kib_with_streams),
        r.client_bytes_per_stream / 1024.0,
        r.server_bytes_per_stream / 1024.0,
        mib(r.server_rss_kib_before_peers),
        r.peers_connected,
        r.peers,
        mib(r.server_rss_kib_with_peers),
        r.server_bytes_per_connection / 1024.0,
    )
}
