//! Peers that drain. A peer sidecar that shuts down gracefully tells us so:
//! an HTTP/3 GOAWAY, a `weft-l4` stream reset with `DRAINING`, a
//! connection closed with `DRAINING`/`DRAIN_TIMEOUT`, or a handshake
//! refused with CONNECTION_REFUSED. Its pooled connection is then no longer
//! used, and the load balancer avoids the address (temporarily
//! unavailable; not an outlier failure, so no ejection) until a background
//! prober completes a new handshake with whatever listens there now (a
//! restarted sidecar on the same address).
//!
//! A peer that stops answering is handled the same way, as *unreachable*
//! (failure detection, docs/quic.md): its pooled connection ended by idle
//! timeout (keep-alives went unanswered for `--quic-idle-timeout`), by a
//! stateless reset or by its endpoint closing everything (a sidecar killed
//! or stopped without a drain), or a handshake with it got no answer within
//! the connect timeout. Unlike draining, the requests it failed count as
//! failures (outlier detection, retry policy).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weft_transport::pool::{Early, EarlyOutcome};

use bytes::Bytes;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::balance::EndpointState;
use crate::cluster::State;
use crate::sidecar::Ctx;

/// The first pause before dialing a draining peer again; it doubles up to
/// [`PROBE_MAX`]. Short: a restarted sidecar is usually back within a second.
const PROBE_FIRST: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(2);

/// Which pool the peer was seen draining on (and the prober dials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alpn {
    H3,
    L4,
}

/// Why a peer is avoided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    Draining,
    Unreachable,
}

/// "The peer at this address is draining (or gone)", from a pooled connection.
pub(crate) type PeerEvent = (SocketAddr, Alpn, Why);

/// Draining peers being probed, with a generation per address so a drain
/// seen while a probe succeeds is not forgotten.
#[derive(Default)]
pub(crate) struct Peers {
    probing: Mutex<HashMap<SocketAddr, u64>>,
}

impl Peers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, u64>> {
        self.probing.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a closed pooled connection says about its peer, if anything.
fn why_closed(conn: &quinn::Connection) -> Option<Why> {
    if weft_transport::pool::drained(conn).is_some() {
        Some(Why::Draining)
    } else if weft_transport::pool::lost(conn) {
        Some(Why::Unreachable)
    } else {
        None
    }
}

/// Drive an HTTP/3 client connection; report the peer if it closes the
/// connection because it drains, or the connection is lost. (A GOAWAY is seen by the next request
/// on the connection: h3 0.0.8 shows it to the driver only behind its
/// unstable-API feature.)
pub(crate) async fn drive_h3(
    mut driver: h3::client::Connection<h3_quinn::Connection, Bytes>,
    conn: quinn::Connection,
    events: UnboundedSender<PeerEvent>,
) {
    let _ = futures::future::poll_fn(|cx| driver.poll_close(cx)).await;
    // The h3 driver may finish before quinn records why the connection ended.
    conn.closed().await;
    if let Some(why) = why_closed(&conn) {
        let _ = events.send((conn.remote_address(), Alpn::H3, why));
    }
}

/// Report the peer of a `weft-l4` connection if it closes it because it
/// drains, or the connection is lost.
pub(crate) fn watch_l4(conn: quinn::Connection, events: UnboundedSender<PeerEvent>) {
    tokio::spawn(async move {
        conn.closed().await;
        if let Some(why) = why_closed(&conn) {
            let _ = events.send((conn.remote_address(), Alpn::L4, why));
        }
    });
}

/// Why something sent on a connection still in its 0-RTT handshake failed,
/// when that handshake is the reason.
pub(crate) enum EarlyFailure {
    /// The peer rejected the early data: none of it was processed.
    Rejected,
    /// A draining peer refused the handshake (marked draining here).
    Draining(String),
    /// The handshake failed otherwise (an unanswered peer is marked
    /// unreachable here).
    Failed(String),
}

/// Classify a failure on a connection dialed with 0-RTT (`early`, from
/// [`weft_transport::pool::Pooled`]): `None` if its handshake was accepted
/// or it had none. Waits for the handshake's outcome, which the failure
/// itself means is near.
pub(crate) async fn early_failure(
    ctx: &Arc<Ctx>,
    addr: SocketAddr,
    alpn: Alpn,
    early: Option<&Early>,
) -> Option<EarlyFailure> {
    match early?.outcome().await {
        EarlyOutcome::Accepted => None,
        EarlyOutcome::Rejected => Some(EarlyFailure::Rejected),
        EarlyOutcome::Failed(e) if e.is_refused() => {
            peer_draining(ctx, addr, alpn);
            Some(EarlyFailure::Draining(e.to_string()))
        }
        EarlyOutcome::Failed(e) => {
            if e.is_unanswered() {
                peer_unreachable(ctx, addr, alpn);
            }
            Some(EarlyFailure::Failed(e.to_string()))
        }
    }
}

/// Handle the reports of the pools' connections.
pub(crate) async fn peer_events(ctx: Arc<Ctx>, mut events: UnboundedReceiver<PeerEvent>) {
    while let Some((addr, alpn, why)) = events.recv().await {
        peer_unavailable(&ctx, addr, alpn, why);
    }
}

/// The endpoint states of every service at `addr`.
fn endpoints_at(state: &State, addr: SocketAddr) -> Vec<Arc<EndpointState>> {
    state
        .mesh()
        .services
        .keys()
        .filter_map(|name| state.cluster(name))
        .flat_map(|c| c.states.iter().filter(|s| s.addr() == addr).cloned())
        .collect()
}

/// The peer at `addr` drains: avoid it until a new handshake succeeds.
pub(crate) fn peer_draining(ctx: &Arc<Ctx>, addr: SocketAddr, alpn: Alpn) {
    peer_unavailable(ctx, addr, alpn, Why::Draining)
}

/// The peer at `addr` does not answer: avoid it until a new handshake succeeds.
pub(crate) fn peer_unreachable(ctx: &Arc<Ctx>, addr: SocketAddr, alpn: Alpn) {
    peer_unavailable(ctx, addr, alpn, Why::Unreachable)
}

/// Avoid the peer at `addr` (draining or unreachable) until a background
/// prober completes a new handshake with it.
pub(crate) fn peer_unavailable(ctx: &Arc<Ctx>, addr: SocketAddr, alpn: Alpn, why: Why) {
    let first = {
        let mut probing = ctx.peers.lock();
        for ep in endpoints_at(&ctx.state.load(), addr) {
            match why {
                Why::Draining => ep.set_draining(true),
                Why::Unreachable => ep.set_unreachable(true),
            };
        }
        let first = !probing.contains_key(&addr);
        *probing.entry(addr).or_insert(0) += 1;
        first
    };
    if !first {
        return;
    }
    match why {
        Why::Draining => {
            tracing::info!(peer = %addr, "peer is draining: new requests go elsewhere until it accepts a new connection")
        }
        Why::Unreachable => {
            tracing::warn!(peer = %addr, "peer does not answer: new requests go elsewhere until it accepts a new connection")
        }
    }
    let ctx2 = ctx.clone();
    ctx.spawn(async move {
        let mut pause = PROBE_FIRST;
        loop {
            // A pause between dials of a peer that refuses them (backoff).
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PROBE_MAX);
            let generation = ctx2.peers.lock().get(&addr).copied();
            let gone = endpoints_at(&ctx2.state.load(), addr).is_empty();
            // A 0-RTT dial where we hold a ticket: requests that arrive
            // meanwhile can go with its first flight instead of waiting.
            let early = match alpn {
                Alpn::H3 => ctx2.h3_pool.get_early(addr).await.map(|p| p.early),
                Alpn::L4 => ctx2.l4_pool.get_early(addr).await.map(|p| p.early),
            };
            let back = !gone
                && match early {
                    Ok(Some(e)) => e.outcome().await.accepted(),
                    Ok(None) => true,
                    Err(_) => false,
                };
            if !(gone || back) {
                continue;
            }
            let mut probing = ctx2.peers.lock();
            if probing.get(&addr).copied() != generation {
                // It was seen draining again meanwhile: probe on.
                continue;
            }
            probing.remove(&addr);
            let now = tokio::time::Instant::now();
            for ep in endpoints_at(&ctx2.state.load(), addr) {
                ep.set_draining(false);
                ep.set_unreachable(false);
                if back {
                    ep.reset_latency(now);
                }
            }
            if back {
                tracing::info!(peer = %addr, "peer accepts connections again");
            }
            return;
        }
    });
}
