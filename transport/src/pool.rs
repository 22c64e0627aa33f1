//! The connection pool: one QUIC connection per (peer address, ALPN) — one
//! [`Pool`] per ALPN — shared by every stream to that peer.
//!
//! Concurrent callers for a peer with no live connection wait for a single
//! handshake (deduplication); if that handshake fails, everyone who was
//! waiting for it gets its error instead of starting a handshake each. The
//! handshake runs in its own task, so a caller that gives up (its own,
//! shorter connect timeout) does not cancel it for the others: a dead peer
//! costs one handshake at a time, not one per queued request. A closed
//! connection (idle timeout, peer gone, error) is replaced on the next
//! request. Each connection carries a `T` built once when it is established
//! (for HTTP/3: the h3 request sender whose driver runs beside it).
//!
//! No connection outlives a certificate it was made with: shortly before
//! the peer's certificate — or the one we presented — expires
//! ([`replace_margin`]) the pool stops handing the connection out and dials
//! a fresh one (certificates are renewed at half-life, so the new handshake
//! uses new ones), while streams already on the old connection finish; at
//! the peer's expiry the old connection is closed with [`CERT_EXPIRED`] (and
//! the peer closes it at ours).
//!
//! A draining peer closes its connections with [`DRAINING`] once nothing it
//! accepted is still running (or with [`DRAIN_TIMEOUT`] when its drain
//! deadline cut streams short); [`drained`] reads which. A connection the
//! owner [`Pool::evict`]s (its peer said it drains) is never handed out
//! again: the next caller dials a new one.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::endpoint::{ConnectError, MeshEndpoint};

type SetupFuture<T> = Pin<Box<dyn Future<Output = Result<T, ConnectError>> + Send>>;
type Setup<T> = Arc<dyn Fn(quinn::Connection) -> SetupFuture<T> + Send + Sync>;

/// Pool of connections with one ALPN.
pub struct Pool<T> {
    endpoint: MeshEndpoint,
    alpn: &'static [u8],
    setup: Setup<T>,
    slots: Mutex<HashMap<SocketAddr, Arc<Slot<T>>>>,
    handshakes: AtomicU64,
}

struct Slot<T> {
    state: Mutex<SlotState<T>>,
}

type Dialed<T> = Result<(quinn::Connection, T), Arc<ConnectError>>;
type Dial<T> = futures::future::Shared<futures::future::BoxFuture<'static, Dialed<T>>>;

/// QUIC application close code for a connection whose peer certificate expired.
pub const CERT_EXPIRED: u32 = 0x57_01;

/// QUIC application close code of a sidecar that is draining (shutting down
/// gracefully): every stream it accepted on this connection had finished,
/// so a request still waiting for an answer on it was never processed and
/// may be sent elsewhere.
pub const DRAINING: u32 = 0x57_02;

/// QUIC application close code of a sidecar whose drain deadline passed
/// with streams still running on this connection: those were cut short
/// (and may have been processed in part).
pub const DRAIN_TIMEOUT: u32 = 0x57_03;

/// How a peer's drain ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Closed with [`DRAINING`]: nothing accepted was cut.
    Graceful,
    /// Closed with [`DRAIN_TIMEOUT`]: streams were cut at the deadline.
    Deadline,
}

/// Whether the peer closed `conn` because it drains, and how.
pub fn drained(conn: &quinn::Connection) -> Option<Drained> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) => {
            if c.error_code == quinn::VarInt::from_u32(DRAINING) {
                Some(Drained::Graceful)
            } else if c.error_code == quinn::VarInt::from_u32(DRAIN_TIMEOUT) {
                Some(Drained::Deadline)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Whether `conn` ended because its peer is gone rather than by anyone's
/// choice: the idle timeout passed with nothing heard (process killed, host
/// down, packets blackholed — keep-alives make this the detection time), a
/// stateless reset (the peer restarted and lost the connection), or the
/// peer's endpoint closing everything at once (code 0: a sidecar stopped
/// without draining). A drain ([`drained`]) and our own closes are not.
pub fn lost(conn: &quinn::Connection) -> bool {
    match conn.close_reason() {
        Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset) => true,
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            c.error_code == quinn::VarInt::from_u32(0)
        }
        _ => false,
    }
}

/// How long before a certificate's expiry a connection made with it stops
/// taking new streams: a tenth of the validity left when the connection was
/// made, at least 1 s (time for requests already on it to finish, even on a
/// busy machine), at most 30 s, and never more than half of what is left.
/// Small against the half-life at which certificates are renewed, so a
/// connection is replaced once per certificate, not per request. (Measured
/// from the connection, not the certificate's not-before: CAs backdate
/// not-before for clock skew — weft-ca by 5 minutes — which would make
/// short-lived certificates look long-lived.)
pub fn replace_margin(left_at_connect: Duration) -> Duration {
    (left_at_connect / 10)
        .max(Duration::from_secs(1))
        .min(Duration::from_secs(30))
        .min(left_at_connect / 2)
}

struct Live<T> {
    conn: quinn::Connection,
    t: T,
    /// From here on, new streams go to a new connection.
    replace_at: Option<SystemTime>,
}

struct SlotState<T> {
    live: Option<Live<T>>,
    /// The handshake in progress, shared by everyone waiting for it.
    dialing: Option<Dial<T>>,
}

impl Pool<()> {
    /// A pool whose connections need no extra state.
    pub fn new(endpoint: MeshEndpoint, alpn: &'static [u8]) -> Self {
        Pool::with_setup(endpoint, alpn, |_conn| Box::pin(async { Ok(()) }))
    }
}

impl<T: Clone + Send + Sync + 'static> Pool<T> {
    /// A pool that runs `setup` once on each new connection.
    pub fn with_setup(
        endpoint: MeshEndpoint,
        alpn: &'static [u8],
        setup: impl Fn(quinn::Connection) -> SetupFuture<T> + Send + Sync + 'static,
    ) -> Self {
        Pool {
            endpoint,
            alpn,
            setup: Arc::new(setup),
            slots: Mutex::new(HashMap::new()),
            handshakes: AtomicU64::new(0),
        }
    }

    /// Stop handing out `conn` (the live connection to `addr`, if it still
    /// is): its peer is going away. Streams already on it go on.
    pub fn evict(&self, addr: SocketAddr, conn: &quinn::Connection) {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .cloned();
        if let Some(slot) = slot {
            let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(&state.live, Some(l) if l.conn.stable_id() == conn.stable_id()) {
                state.live = None;
            }
        }
    }

    /// A live connection to `addr`, dialing if there is none.
    pub async fn get(&self, addr: SocketAddr) -> Dialed<T> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry(addr)
                .or_insert_with(|| {
                    Arc::new(Slot {
                        state: Mutex::new(SlotState {
                            live: None,
                            dialing: None,
                        }),
                    })
                })
                .clone()
        };
        let dial = {
            let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(live) = &state.live {
                let fresh = live.replace_at.is_none_or(|at| SystemTime::now() < at);
                if live.conn.close_reason().is_none() && fresh {
                    return Ok((live.conn.clone(), live.t.clone()));
                }
                // Closed, or a certificate it was made with is about to
                // expire: streams on it finish (until the expiry closer),
                // new ones get a new connection.
                state.live = None;
            }
            match &state.dialing {
                Some(dial) => dial.clone(),
                None => {
                    let dial = self.dial(addr, slot.clone());
                    state.dialing = Some(dial.clone());
                    dial
                }
            }
        };
        dial.await
    }

    /// Start a handshake in its own task; it stores its result in the slot.
    fn dial(&self, addr: SocketAddr, slot: Arc<Slot<T>>) -> Dial<T> {
        use futures::FutureExt;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let endpoint = self.endpoint.clone();
        let setup = self.setup.clone();
        let alpn = self.alpn;
        let task = tokio::spawn(async move {
            // Read before dialing: the certificate we present is this one or
            // a newer one, so its expiry is no earlier than this.
            let ours = endpoint.tls().not_after();
            let result = match endpoint.connect(addr, alpn).await {
                Ok(conn) => setup(conn.clone()).await.map(|t| (conn, t)),
                Err(e) => Err(e),
            };
            let result = result.map_err(Arc::new);
            let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
            state.dialing = None;
            if let Ok((conn, t)) = &result {
                let replace_at = earlier(close_at_peer_expiry(conn), own_replace_at(ours));
                state.live = Some(Live {
                    conn: conn.clone(),
                    t: t.clone(),
                    replace_at,
                });
            }
            result
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(Arc::new(ConnectError::Setup {
                    addr,
                    reason: format!("the handshake task ended: {e}"),
                }))
            })
        }
        .boxed()
        .shared()
    }

    /// Handshakes started by this pool since it was created.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Live pooled connections right now.
    pub fn live_connections(&self) -> usize {
        let slots: Vec<_> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        slots
            .iter()
            .filter(|s| {
                let st = s.state.lock().unwrap_or_else(|p| p.into_inner());
                matches!(&st.live, Some(l) if l.conn.close_reason().is_none())
            })
            .count()
    }
}

/// The peer closes the connection when *our* certificate expires (it runs
/// [`close_at_peer_expiry`] too), so stop using it a margin before that.
fn own_replace_at(ours: Option<SystemTime>) -> Option<SystemTime> {
    replace_at(ours?)
}

/// When to stop giving new streams to a connection made now with a
/// certificate expiring at `not_after`; `None` if that is already past
/// (a fresh dial would not help: the certificate has not been renewed).
fn replace_at(not_after: SystemTime) -> Option<SystemTime> {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    not_after
        .checked_sub(replace_margin(left))
        .filter(|at| *at > SystemTime::now())
}

fn earlier(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Close `conn` when its peer's certificate expires; returns when to stop
/// giving it new streams. A peer without readable validity (cannot happen
/// after our verifier admitted it) is replaced at once.
pub fn close_at_peer_expiry(conn: &quinn::Connection) -> Option<SystemTime> {
    let Some((_, not_after)) = crate::tls::peer_validity(conn) else {
        conn.close(CERT_EXPIRED.into(), b"peer certificate unreadable");
        return Some(SystemTime::UNIX_EPOCH);
    };
    let until = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let c = conn.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(until) => {
                c.close(CERT_EXPIRED.into(), b"peer certificate expired");
            }
            _ = c.closed() => {}
        }
    });
    replace_at(not_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_margin_is_a_tenth_bounded_by_1_s_30_s_and_half() {
        let s = Duration::from_secs;
        assert_eq!(replace_margin(s(100)), s(10));
        assert_eq!(replace_margin(s(86_400)), s(30));
        assert_eq!(replace_margin(s(6)), s(1));
        assert_eq!(replace_margin(s(1)), Duration::from_millis(500));
        assert_eq!(replace_margin(Duration::ZERO), Duration::ZERO);
    }
}
