//! Peers that drain. A peer sidecar that shuts down gracefully tells us so:
//! an HTTP/3 GOAWAY, a `weft-l4` stream reset with `DRAINING`, a
//! connection closed with `DRAINING`/`DRAIN_TIMEOUT`, or a handshake
//! refused with CONNECTION_REFUSED. Its pooled connection is then no longer
//! used, and the load balancer avoids the address (temporarily
//! unavailable; not an outlier failure, so no ejection) until a background
//! prober completes a new handshake with whatever listens there now (a
//! restarted sidecar on the same address).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// "The peer at this address is draining", from a pooled connection.
pub(crate) type PeerEvent = (SocketAddr, Alpn);

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

/// Drive an HTTP/3 client connection; report the peer if it closes the
/// connection because it drains. (A GOAWAY is seen by the next request
/// on the connection: h3 0.0.8 shows it to the driver only behind its
/// unstable-API feature.)
pub(crate) async fn drive_h3(
    mut driver: h3::client::Connection<h3_quinn::Connection, Bytes>,
    conn: quinn::Connection,
    events: UnboundedSender<PeerEvent>,
) {
    let _ = futures::future::poll_fn(|cx| driver.poll_close(cx)).await;
    if weft_transport::pool::drained(&conn).is_some() {
        let _ = events.send((conn.remote_address(), Alpn::H3));
    }
}

/// Report the peer of a `weft-l4` connection if it closes it because it drains.
pub(crate) fn watch_l4(conn: quinn::Connection, events: UnboundedSender<PeerEvent>) {
    tokio::spawn(async move {
        conn.closed().await;
        if weft_transport::pool::drained(&conn).is_some() {
            let _ = events.send((conn.remote_address(), Alpn::L4));
        }
    });
}

/// Handle the reports of the pools' connections.
pub(crate) async fn peer_events(ctx: Arc<Ctx>, mut events: UnboundedReceiver<PeerEvent>) {
    while let Some((addr, alpn)) = events.recv().await {
        peer_draining(&ctx, addr, alpn);
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
    let first = {
        let mut probing = ctx.peers.lock();
        for ep in endpoints_at(&ctx.state.load(), addr) {
            ep.set_draining(true);
        }
        let first = !probing.contains_key(&addr);
        *probing.entry(addr).or_insert(0) += 1;
        first
    };
    if !first {
        return;
    }
    tracing::info!(peer = %addr, "peer is draining: new requests go elsewhere until it accepts a new connection");
    let ctx2 = ctx.clone();
    ctx.spawn(async move {
        let mut pause = PROBE_FIRST;
        loop {
            // A pause between dials of a peer that refuses them (backoff).
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PROBE_MAX);
            let generation = ctx2.peers.lock().get(&addr).copied();
            let gone = endpoints_at(&ctx2.state.load(), addr).is_empty();
            let back = !gone
                && match alpn {
                    Alpn::H3 => ctx2.h3_pool.get(addr).await.is_ok(),
                    Alpn::L4 => ctx2.l4_pool.get(addr).await.is_ok(),
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
            for ep in endpoints_at(&ctx2.state.load(), addr) {
                ep.set_draining(false);
            }
            if back {
                tracing::info!(peer = %addr, "peer accepts connections again");
            }
            return;
        }
    });
}
