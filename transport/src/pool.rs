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

use crate::endpoint::{ConnectError, Dialed as Handshake, MeshEndpoint};
use crate::spiffe::SpiffeId;

type SetupFuture<T> = Pin<Box<dyn Future<Output = Result<T, ConnectError>> + Send>>;
type Setup<T> = Arc<dyn Fn(quinn::Connection, Option<SpiffeId>) -> SetupFuture<T> + Send + Sync>;

/// Pool of connections with one ALPN.
pub struct Pool<T> {
    endpoint: MeshEndpoint,
    alpn: &'static [u8],
    setup: Setup<T>,
    slots: Mutex<HashMap<SocketAddr, Arc<Slot<T>>>>,
    handshakes: AtomicU64,
    zero_rtt: bool,
    observer: Observer,
}

type Observer = Option<Arc<dyn Fn(&EarlyOutcome) + Send + Sync>>;

struct Slot<T> {
    state: Mutex<SlotState<T>>,
}

type Dialed<T> = Result<(quinn::Connection, T), Arc<ConnectError>>;
type DialedEarly<T> = Result<Pooled<T>, Arc<ConnectError>>;
type Dial<T> = futures::future::Shared<futures::future::BoxFuture<'static, DialedEarly<T>>>;

/// A pooled connection, possibly still in its handshake with 0-RTT data
/// ([`Pool::get_early`]).
#[derive(Clone)]
pub struct Pooled<T> {
    pub conn: quinn::Connection,
    pub t: T,
    /// `Some` while the handshake of a 0-RTT connection may still be going
    /// on: what is sent now is early data.
    pub early: Option<Early>,
}

/// The handshake of a connection that sent 0-RTT data. Its outcome is
/// settled once, by the pool, which has updated the connection's slot by
/// the time anyone sees it.
#[derive(Clone)]
pub struct Early(futures::future::Shared<futures::future::BoxFuture<'static, EarlyOutcome>>);

impl Early {
    /// Wait for the handshake: how the early data fared.
    pub async fn outcome(&self) -> EarlyOutcome {
        self.0.clone().await
    }

    /// Whether the handshake is still going on (what is sent now is early data).
    pub fn pending(&self) -> bool {
        self.0.peek().is_none()
    }
}

/// How a 0-RTT handshake ended.
#[derive(Debug, Clone)]
pub enum EarlyOutcome {
    /// The peer took the early data; the connection is established and verified.
    Accepted,
    /// The peer did not take it (it no longer knows the session ticket, e.g.
    /// after a restart): streams opened early failed *unprocessed*. The
    /// connection is closed; the next caller gets a full handshake.
    Rejected,
    /// The handshake failed (refused by a draining peer, unanswered, …),
    /// or the peer did not verify. What was sent early may have been
    /// processed (it was safe to replay).
    Failed(Arc<ConnectError>),
}

impl EarlyOutcome {
    pub fn accepted(&self) -> bool {
        matches!(self, EarlyOutcome::Accepted)
    }
    pub fn rejected(&self) -> bool {
        matches!(self, EarlyOutcome::Rejected)
    }
}

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
    /// While a 0-RTT handshake is going on.
    early: Option<Early>,
}

struct SlotState<T> {
    live: Option<Live<T>>,
    /// The handshake in progress, shared by everyone waiting for it.
    dialing: Option<Dial<T>>,
    /// The identity of the peer at this address on its last verified
    /// connection: a 0-RTT handshake resumes that connection's session, so
    /// it is the identity early data goes to (checked when the handshake ends).
    last_peer: Option<SpiffeId>,
    /// The last 0-RTT attempt here was rejected: the next dial is a full
    /// handshake (the peer lost its session cache; our other tickets from
    /// it are as useless).
    rejected: bool,
}

impl Pool<()> {
    /// A pool whose connections need no extra state.
    pub fn new(endpoint: MeshEndpoint, alpn: &'static [u8]) -> Self {
        Pool::with_setup(endpoint, alpn, |_conn, _peer| Box::pin(async { Ok(()) }))
    }
}

impl<T: Clone + Send + Sync + 'static> Pool<T> {
    /// A pool that runs `setup` once on each new connection. `setup` gets the
    /// peer's identity: the verified one, or for a connection still in its
    /// 0-RTT handshake the one its session was made with (the pool closes
    /// the connection if the handshake ends with another).
    pub fn with_setup(
        endpoint: MeshEndpoint,
        alpn: &'static [u8],
        setup: impl Fn(quinn::Connection, Option<SpiffeId>) -> SetupFuture<T> + Send + Sync + 'static,
    ) -> Self {
        Pool {
            endpoint,
            alpn,
            setup: Arc::new(setup),
            slots: Mutex::new(HashMap::new()),
            handshakes: AtomicU64::new(0),
            zero_rtt: true,
            observer: None,
        }
    }

    /// Whether [`Pool::get_early`] may dial with 0-RTT (default: yes).
    pub fn zero_rtt(mut self, on: bool) -> Self {
        self.zero_rtt = on;
        self
    }

    /// Call `f` with the outcome of every 0-RTT handshake (for metrics).
    pub fn on_early_outcome(mut self, f: impl Fn(&EarlyOutcome) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(f));
        self
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

    /// A live, established connection to `addr`, dialing if there is none.
    pub async fn get(&self, addr: SocketAddr) -> Dialed<T> {
        self.get_with(addr, false).await.map(|p| (p.conn, p.t))
    }

    /// A live connection to `addr` that may still be in a 0-RTT handshake
    /// (then [`Pooled::early`] is `Some`): for data that is safe to replay
    /// only. Dials with 0-RTT when we hold a session ticket from the peer.
    pub async fn get_early(&self, addr: SocketAddr) -> DialedEarly<T> {
        self.get_with(addr, self.zero_rtt).await
    }

    /// [`Pool::get_early`] if `early_ok` (the data is safe to replay), else
    /// [`Pool::get`]: for callers that decide per use.
    pub async fn get_pooled(&self, addr: SocketAddr, early_ok: bool) -> DialedEarly<T> {
        self.get_with(addr, early_ok && self.zero_rtt).await
    }

    async fn get_with(&self, addr: SocketAddr, early_ok: bool) -> DialedEarly<T> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry(addr)
                .or_insert_with(|| {
                    Arc::new(Slot {
                        state: Mutex::new(SlotState {
                            live: None,
                            dialing: None,
                            last_peer: None,
                            rejected: false,
                        }),
                    })
                })
                .clone()
        };
        // Each turn either returns or waits for a handshake to end; a
        // handshake that ends has updated the slot, so the next turn sees
        // an established connection, or none and dials a full handshake.
        loop {
            let wait = {
                let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                let mut wait = None;
                if let Some(live) = &state.live {
                    let fresh = live.replace_at.is_none_or(|at| SystemTime::now() < at);
                    if live.conn.close_reason().is_none() && fresh {
                        let pooled = Pooled {
                            conn: live.conn.clone(),
                            t: live.t.clone(),
                            early: live.early.clone(),
                        };
                        match &live.early {
                            Some(e) if !early_ok => wait = Some(Wait::Handshake(e.clone())),
                            _ => return Ok(pooled),
                        }
                    } else {
                        // Closed, or a certificate it was made with is about
                        // to expire: streams on it finish (until the expiry
                        // closer), new ones get a new connection.
                        state.live = None;
                    }
                }
                match wait {
                    Some(w) => w,
                    None => match &state.dialing {
                        Some(dial) => Wait::Dial(dial.clone()),
                        None => {
                            let early = self.zero_rtt && early_ok && !state.rejected;
                            let dial =
                                self.dial(addr, slot.clone(), early, state.last_peer.clone());
                            state.dialing = Some(dial.clone());
                            Wait::Dial(dial)
                        }
                    },
                }
            };
            match wait {
                Wait::Handshake(e) => {
                    e.outcome().await;
                }
                Wait::Dial(dial) => {
                    let pooled = dial.await?;
                    match &pooled.early {
                        Some(e) if !early_ok => {
                            e.outcome().await;
                        }
                        _ => return Ok(pooled),
                    }
                }
            }
        }
    }

    /// Start a handshake in its own task; it stores its result in the slot.
    fn dial(
        &self,
        addr: SocketAddr,
        slot: Arc<Slot<T>>,
        early: bool,
        last_peer: Option<SpiffeId>,
    ) -> Dial<T> {
        use futures::FutureExt;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let endpoint = self.endpoint.clone();
        let setup = self.setup.clone();
        let alpn = self.alpn;
        let observer = self.observer.clone();
        let task = tokio::spawn(async move {
            // Read before dialing: the certificate we present is this one or
            // a newer one, so its expiry is no earlier than this.
            let ours = endpoint.tls().not_after();
            // 0-RTT needs a ticket and the identity of the session it resumes.
            let handshake = match &last_peer {
                Some(_) if early => endpoint.connect_early(addr, alpn).await,
                _ => endpoint
                    .connect(addr, alpn)
                    .await
                    .map(Handshake::Established),
            };
            let result = match (handshake, last_peer) {
                (Ok(Handshake::Established(conn)), _) => {
                    let peer = crate::tls::peer_id(&conn, endpoint.tls().trust_domain());
                    match setup(conn.clone(), peer.clone()).await {
                        Ok(t) => {
                            let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                            state.dialing = None;
                            state.last_peer = peer;
                            state.rejected = false;
                            state.live = Some(Live {
                                conn: conn.clone(),
                                t: t.clone(),
                                replace_at: earlier(
                                    close_at_peer_expiry(&conn),
                                    own_replace_at(ours),
                                ),
                                early: None,
                            });
                            return Ok(Pooled {
                                conn,
                                t,
                                early: None,
                            });
                        }
                        Err(e) => Err(e),
                    }
                }
                (Ok(Handshake::Early(conn, accepted)), Some(peer)) => {
                    match setup(conn.clone(), Some(peer.clone())).await {
                        Ok(t) => {
                            let settle = settle_early(
                                endpoint.clone(),
                                addr,
                                conn.clone(),
                                accepted,
                                peer,
                                slot.clone(),
                                ours,
                                observer,
                            );
                            let e = Early(settle.boxed().shared());
                            // Settled even if nobody waits for it.
                            let driver = e.clone();
                            tokio::spawn(async move { driver.outcome().await });
                            let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                            state.dialing = None;
                            state.live = Some(Live {
                                conn: conn.clone(),
                                t: t.clone(),
                                replace_at: None,
                                early: Some(e.clone()),
                            });
                            return Ok(Pooled {
                                conn,
                                t,
                                early: Some(e),
                            });
                        }
                        Err(e) => Err(e),
                    }
                }
                (Ok(Handshake::Early(conn, _)), None) => {
                    // Cannot happen: early dials need a last peer.
                    conn.close(0u32.into(), b"");
                    Err(ConnectError::Setup {
                        addr,
                        reason: "0-RTT without a known peer".into(),
                    })
                }
                (Err(e), _) => Err(e),
            };
            let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
            state.dialing = None;
            result.map_err(Arc::new)
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

/// Whether a 0-RTT connection whose early data was not accepted got through
/// its handshake (the peer rejected the early data) rather than failing:
/// it knows its peer, and nobody but us closed it. (quinn reports both as
/// "not accepted"; on a rejection HTTP/3 may close the connection itself
/// first, its control streams having been lost with the early data.)
fn rejected(conn: &quinn::Connection) -> bool {
    conn.peer_identity().is_some()
        && matches!(
            conn.close_reason(),
            None | Some(quinn::ConnectionError::LocallyClosed)
        )
}

enum Wait<T> {
    Dial(Dial<T>),
    Handshake(Early),
}

/// QUIC application close code of a connection whose 0-RTT data the peer
/// rejected: we close it and dial a full handshake, since the HTTP/3
/// control streams it opened early were lost with the rest.
pub const EARLY_REJECTED: u32 = 0x57_04;

/// Wait for the end of a 0-RTT handshake and update the slot: an accepted
/// connection whose peer still verifies, as the identity its session was
/// made with, becomes a normal pooled connection; any other is closed and
/// forgotten, so the next caller dials afresh.
#[allow(clippy::too_many_arguments)]
async fn settle_early<T>(
    endpoint: MeshEndpoint,
    addr: SocketAddr,
    conn: quinn::Connection,
    accepted: quinn::ZeroRttAccepted,
    expected: SpiffeId,
    slot: Arc<Slot<T>>,
    ours: Option<SystemTime>,
    observer: Observer,
) -> EarlyOutcome {
    let outcome = if accepted.await {
        match endpoint.verify(addr, &conn) {
            Ok(())
                if crate::tls::peer_id(&conn, endpoint.tls().trust_domain()).as_ref()
                    == Some(&expected) =>
            {
                EarlyOutcome::Accepted
            }
            Ok(()) => {
                conn.close(CERT_EXPIRED.into(), b"peer identity changed");
                EarlyOutcome::Failed(Arc::new(ConnectError::Setup {
                    addr,
                    reason: format!("the peer is no longer {expected}"),
                }))
            }
            Err(e) => EarlyOutcome::Failed(Arc::new(e)),
        }
    } else if !rejected(&conn) {
        EarlyOutcome::Failed(Arc::new(ConnectError::Handshake {
            addr,
            source: conn
                .close_reason()
                .unwrap_or(quinn::ConnectionError::LocallyClosed),
        }))
    } else {
        conn.close(EARLY_REJECTED.into(), b"0-RTT rejected");
        EarlyOutcome::Rejected
    };
    if let Some(f) = &observer {
        f(&outcome);
    }
    let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
    let ours_now = matches!(&state.live, Some(l) if l.conn.stable_id() == conn.stable_id());
    match &outcome {
        EarlyOutcome::Accepted => {
            state.rejected = false;
            if ours_now {
                if let Some(live) = &mut state.live {
                    live.early = None;
                    live.replace_at = earlier(close_at_peer_expiry(&conn), own_replace_at(ours));
                }
            }
        }
        EarlyOutcome::Rejected | EarlyOutcome::Failed(_) => {
            state.rejected |= outcome.rejected();
            if ours_now {
                state.live = None;
            }
        }
    }
    outcome
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
