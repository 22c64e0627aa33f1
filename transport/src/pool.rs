//! The connection pool: one QUIC connection per (peer address, ALPN) — one
//! [`Pool`] per ALPN — shared by every stream to that peer.
//!
//! Concurrent callers for a peer with no live connection wait for a single
//! handshake (deduplication); if that handshake fails, everyone who was
//! waiting for it gets its error instead of starting a handshake each. A
//! closed connection (idle timeout, peer gone, error) is replaced on the next
//! request. Each connection carries a `T` built once when it is established
//! (for HTTP/3: the h3 request sender whose driver runs beside it).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Number of handshakes started for this peer so far.
    attempts: AtomicU64,
    state: tokio::sync::Mutex<SlotState<T>>,
}

struct SlotState<T> {
    live: Option<(quinn::Connection, T)>,
    /// The last failed attempt: its number and error.
    failed: Option<(u64, Arc<ConnectError>)>,
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

    /// A live connection to `addr`, dialing if there is none.
    pub async fn get(&self, addr: SocketAddr) -> Result<(quinn::Connection, T), Arc<ConnectError>> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry(addr)
                .or_insert_with(|| {
                    Arc::new(Slot {
                        attempts: AtomicU64::new(0),
                        state: tokio::sync::Mutex::new(SlotState {
                            live: None,
                            failed: None,
                        }),
                    })
                })
                .clone()
        };
        let seen = slot.attempts.load(Ordering::Acquire);
        let mut state = slot.state.lock().await;
        if let Some((conn, t)) = &state.live {
            if conn.close_reason().is_none() {
                return Ok((conn.clone(), t.clone()));
            }
            state.live = None;
        }
        // A handshake that started after we arrived failed while we waited: share its result.
        if let Some((attempt, err)) = &state.failed {
            if *attempt > seen {
                return Err(err.clone());
            }
        }
        let attempt = slot.attempts.fetch_add(1, Ordering::AcqRel) + 1;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let result = match self.endpoint.connect(addr, self.alpn).await {
            Ok(conn) => (self.setup)(conn.clone()).await.map(|t| (conn, t)),
            Err(e) => Err(e),
        };
        match result {
            Ok((conn, t)) => {
                state.failed = None;
                state.live = Some((conn.clone(), t.clone()));
                Ok((conn, t))
            }
            Err(e) => {
                let e = Arc::new(e);
                state.failed = Some((attempt, e.clone()));
                Err(e)
            }
        }
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
                s.state
                    .try_lock()
                    .map(|st| matches!(&st.live, Some((c, _)) if c.close_reason().is_none()))
                    .unwrap_or(true)
            })
            .count()
    }
}
