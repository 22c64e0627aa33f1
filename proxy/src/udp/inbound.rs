//! The server side of UDP services: a peer's flow stream is authorized
//! once (the caller's SPIFFE ID against the service's policy), then a
//! connected UDP socket to the local app carries the flow's datagrams; the
//! app's replies go back as DATAGRAM frames with the flow's quarter stream
//! ID, so they reach the client address the flow stands for.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use weft_transport::preamble::{self, Status};
use weft_transport::SpiffeId;

use super::{Counters, FlowTable, Outcome, FLOW_QUEUE};
use crate::lifecycle::Phase;
use crate::mesh::Protocol;
use crate::metrics::INBOUND;
use crate::sidecar::Ctx;

/// Read buffer for the app's replies. A QUIC DATAGRAM carries at most
/// about 1.4 KB (quinn's path MTU ceiling is 1452 bytes), so a reply that
/// fills this buffer (and may have been truncated) is too large anyway.
const REPLY_BUFFER: usize = 4096;

/// Serve one flow stream whose preamble `req` has been read.
pub(crate) async fn flow(
    ctx: Arc<Ctx>,
    peer: &SpiffeId,
    conn: quinn::Connection,
    table: Arc<FlowTable>,
    req: preamble::Request,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let state = ctx.state.load_full();
    let svc = match state.service(&req.target) {
        Some(s) if s.protocol == Protocol::Udp => s.clone(),
        _ => {
            ctx.metrics.refuse("unknown_service");
            let msg = format!("{} is not a UDP service of this mesh", req.target);
            crate::inbound::refuse(send, recv, Status::UnknownTarget, msg).await;
            return;
        }
    };
    if let Err(denied) = crate::inbound::authorize(&ctx, peer, &svc.name) {
        let msg = format!("{peer} may not call {}: {denied}", svc.name);
        crate::inbound::refuse(send, recv, Status::Unauthorized, msg).await;
        return;
    }
    // Our own mesh file says where the service listens, not the caller:
    // the service's port on the --app host, or --app itself.
    let target = match (svc.port, ctx.app) {
        (0, Some(app)) => app,
        (0, None) => {
            let msg = "no --app configured and the service has no port".to_string();
            crate::inbound::refuse(send, recv, Status::ConnectFailed, msg).await;
            return;
        }
        (port, Some(app)) => SocketAddr::new(app.ip(), port),
        (port, None) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
    };
    let socket = match app_socket(target).await {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("app {target}: {e}");
            crate::inbound::refuse(send, recv, Status::ConnectFailed, msg).await;
            return;
        }
    };
    let counters = Counters::new(&ctx.metrics, INBOUND, &svc.name);
    let qsid = weft_transport::l4::quarter_stream_id(recv.id());
    let (tx, mut rx) = mpsc::channel::<Bytes>(FLOW_QUEUE);
    // In the table before the answer: the client sends datagrams only
    // after it reads `Ok`, so none can arrive before the flow is known.
    table.insert(qsid, tx, counters.clone());
    let ok = preamble::Response::new(Status::Ok, "").encode();
    if send.write_all(&ok).await.is_err() {
        table.remove(qsid);
        return;
    }
    let _active = counters.open_flow();
    let idle = svc
        .policy
        .idle_timeout
        .unwrap_or(crate::mesh::policy::UDP_IDLE_TIMEOUT);
    run(
        &ctx, &conn, qsid, &socket, &mut rx, &mut recv, &counters, idle,
    )
    .await;
    table.remove(qsid);
    let _ = send.finish();
}

#[allow(clippy::too_many_arguments)]
async fn run(
    ctx: &Ctx,
    conn: &quinn::Connection,
    qsid: u64,
    socket: &UdpSocket,
    rx: &mut mpsc::Receiver<Bytes>,
    recv: &mut quinn::RecvStream,
    counters: &Counters,
    idle: Duration,
) {
    let mut phase = ctx.phase.clone();
    let mut last = Instant::now();
    let mut buf = vec![0u8; REPLY_BUFFER];
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            Some(p) = rx.recv() => {
                match socket.send(&p).await {
                    Ok(_) => counters.sent(p.len()),
                    // ECONNREFUSED: the app's port is closed (an ICMP error
                    // from an earlier datagram). UDP promises nothing: go on.
                    Err(e) => tracing::debug!(error = %e, "UDP datagram to the app failed"),
                }
                last = Instant::now();
            }
            r = socket.recv(&mut buf) => match r {
                Ok(n) => match super::send(conn, qsid, &buf[..n], counters) {
                    Outcome::Delivered => {
                        counters.received(n);
                        last = Instant::now();
                    }
                    Outcome::Dropped => {}
                    Outcome::Lost => break,
                },
                Err(e) => tracing::debug!(error = %e, "UDP receive from the app failed"),
            },
            // The client ends the flow by finishing the stream.
            r = recv.read(&mut scratch) => if !matches!(r, Ok(Some(_))) { break },
            _ = tokio::time::sleep_until(last + idle) => break,
            _ = crate::lifecycle::reached(&mut phase, Phase::Draining) => break,
        }
    }
}

/// A UDP socket connected to the app: it receives only the app's replies.
async fn app_socket(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let any = match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    socket.connect(target).await?;
    Ok(socket)
}
