//! Graceful shutdown ("drain"): the phases a sidecar goes through when it
//! is told to stop, the work a drain waits for, and what it reports.
//!
//! 1. **Serving**: `/ready` is 200 (once started, with a valid certificate).
//! 2. **Draining** ([`Phase::Draining`]): `/ready` turns 503 so the pod
//!    leaves the Service's endpoints (`/live` stays 200); listeners stop
//!    accepting; the inbound endpoint refuses new QUIC connections; each
//!    inbound HTTP/3 connection gets a GOAWAY and each inbound `weft-l4`
//!    connection refuses new streams (reset with [`DRAINING`]); every
//!    connection is closed with [`DRAINING`] once what it had accepted has
//!    finished. The app's HTTP connections to the sidecar finish their
//!    request in flight and close. Peers stop using the draining sidecar
//!    at once and send requests that raced the drain elsewhere.
//! 3. **Cutting** ([`Phase::Cutting`]), when the drain timeout passes with
//!    work still running: TCP streams are ended with a FIN both ways,
//!    connections are closed with [`DRAIN_TIMEOUT`], and what was cut is
//!    logged and counted (`weft_drain_cut_total`).
//!
//! [`DRAINING`]: weft_transport::pool::DRAINING
//! [`DRAIN_TIMEOUT`]: weft_transport::pool::DRAIN_TIMEOUT

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use weft_transport::pool::{DRAINING, DRAIN_TIMEOUT};
use weft_transport::MeshEndpoint;

use crate::metrics::KindLabels;
use crate::sidecar::Ctx;

/// Default of `weft sidecar --drain-timeout`: Kubernetes' default
/// termination grace period is 30 s; 20 s leaves time for the endpoint
/// removal to reach every peer and for the process to exit before SIGKILL.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Where a sidecar is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// No new work is taken; work in progress finishes.
    Draining,
    /// The drain deadline passed: work still in progress is ended.
    Cutting,
}

/// Until the sidecar's phase is `at` or later (or the sidecar is gone).
pub async fn reached(phase: &mut watch::Receiver<Phase>, at: Phase) {
    let _ = phase.wait_for(|p| *p >= at).await;
}

/// A count of work in progress that a drain waits for.
#[derive(Debug)]
pub struct Gauge {
    n: AtomicUsize,
    /// Woken whenever a count of the same [`Activity`] drops.
    changed: Arc<Notify>,
}

impl Gauge {
    fn new(changed: Arc<Notify>) -> Arc<Gauge> {
        Arc::new(Gauge {
            n: AtomicUsize::new(0),
            changed,
        })
    }

    /// A stand-alone gauge (e.g. one connection's streams).
    pub fn standalone() -> Arc<Gauge> {
        Gauge::new(Arc::new(Notify::new()))
    }

    /// Count one more until the guard drops.
    pub fn enter(self: &Arc<Self>) -> Busy {
        self.n.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    pub fn get(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }

    /// Until the count is zero.
    pub async fn idle(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            changed.await;
        }
    }
}

/// One unit of work in progress; dropping it ends it.
#[derive(Debug)]
pub struct Busy(Arc<Gauge>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.n.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// Work in progress in one sidecar.
#[derive(Debug)]
pub struct Activity {
    changed: Arc<Notify>,
    /// Inbound QUIC connections (each closes itself once drained).
    pub inbound_connections: Arc<Gauge>,
    /// HTTP/3 requests from peers, until their response is sent.
    pub inbound_requests: Arc<Gauge>,
    /// TCP streams from peers.
    pub inbound_streams: Arc<Gauge>,
    /// The app's HTTP connections to the sidecar (upstream and captured listeners).
    pub app_connections: Arc<Gauge>,
    /// HTTP requests from the app, until their response head.
    pub outbound_requests: Arc<Gauge>,
    /// The app's TCP connections carried to peers.
    pub outbound_streams: Arc<Gauge>,
}

impl Default for Activity {
    fn default() -> Self {
        let changed = Arc::new(Notify::new());
        let g = || Gauge::new(changed.clone());
        Activity {
            inbound_connections: g(),
            inbound_requests: g(),
            inbound_streams: g(),
            app_connections: g(),
            outbound_requests: g(),
            outbound_streams: g(),
            changed,
        }
    }
}

/// Counts of work in progress at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub inbound_connections: usize,
    pub inbound_requests: usize,
    pub inbound_streams: usize,
    pub app_connections: usize,
    pub outbound_requests: usize,
    pub outbound_streams: usize,
}

impl Snapshot {
    /// Nothing the drain waits for is left.
    pub fn is_idle(&self) -> bool {
        self.inbound_connections == 0
            && self.inbound_requests == 0
            && self.inbound_streams == 0
            && self.app_connections == 0
            && self.outbound_requests == 0
            && self.outbound_streams == 0
    }
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} inbound connections, {} inbound requests, {} inbound TCP streams, \
             {} app connections, {} outbound requests, {} outbound TCP streams",
            self.inbound_connections,
            self.inbound_requests,
            self.inbound_streams,
            self.app_connections,
            self.outbound_requests,
            self.outbound_streams
        )
    }
}

impl Activity {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            inbound_connections: self.inbound_connections.get(),
            inbound_requests: self.inbound_requests.get(),
            inbound_streams: self.inbound_streams.get(),
            app_connections: self.app_connections.get(),
            outbound_requests: self.outbound_requests.get(),
            outbound_streams: self.outbound_streams.get(),
        }
    }

    /// Until nothing is in progress.
    pub async fn idle(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.snapshot().is_idle() {
                return;
            }
            changed.await;
        }
    }
}

/// What a drain found and did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrainReport {
    /// Work in progress when the drain started.
    pub started_with: Snapshot,
    /// Work still in progress at the deadline, which was cut (all zero if
    /// everything finished in time).
    pub cut: Snapshot,
    /// From the start of the drain until everything finished or was cut.
    pub elapsed: Duration,
}

impl DrainReport {
    /// Everything in progress finished before the deadline.
    pub fn clean(&self) -> bool {
        self.cut.is_idle()
    }
}

/// After the deadline, how long cut connections and streams get to end
/// (FINs sent, close frames out) before the sidecar stops.
const CUT_GRACE: Duration = Duration::from_secs(2);

/// Run a drain (see the module docs); `phase` is the sidecar's phase.
pub(crate) async fn drain(
    ctx: &Arc<Ctx>,
    phase: &watch::Sender<Phase>,
    endpoint: &MeshEndpoint,
    timeout: Duration,
) -> DrainReport {
    let start = tokio::time::Instant::now();
    let started_with = ctx.activity.snapshot();
    phase.send_if_modified(|p| {
        let was = *p;
        *p = was.max(Phase::Draining);
        was != *p
    });
    tracing::info!(
        timeout = %humantime::format_duration(timeout),
        "draining: not ready any more, taking no new connections; in progress: {started_with}"
    );
    let finished = tokio::time::timeout(timeout, ctx.activity.idle())
        .await
        .is_ok();
    let cut = if finished {
        tracing::info!(
            elapsed = ?start.elapsed(),
            "drained: everything in progress finished"
        );
        Snapshot::default()
    } else {
        let cut = ctx.activity.snapshot();
        phase.send_replace(Phase::Cutting);
        let m = &ctx.metrics;
        for (kind, n) in [
            ("inbound_request", cut.inbound_requests),
            ("inbound_stream", cut.inbound_streams),
            ("outbound_request", cut.outbound_requests),
            ("outbound_stream", cut.outbound_streams),
        ] {
            if n > 0 {
                m.drain_cut
                    .get_or_create(&KindLabels { kind })
                    .inc_by(n as u64);
            }
        }
        tracing::warn!(
            timeout = %humantime::format_duration(timeout),
            "drain deadline passed; cutting what is left: {cut}"
        );
        // Cut streams end with a FIN and connections close themselves.
        let _ = tokio::time::timeout(CUT_GRACE, ctx.activity.idle()).await;
        cut
    };
    // Pooled outbound connections, and anything that did not close in time.
    let (code, reason): (u32, &[u8]) = if finished {
        (DRAINING, b"sidecar drained")
    } else {
        (DRAIN_TIMEOUT, b"sidecar drain deadline passed")
    };
    endpoint.quinn().close(code.into(), reason);
    DrainReport {
        started_with,
        cut,
        elapsed: start.elapsed(),
    }
}

/// [`crate::copy::bidi`], ended at the drain deadline: the copy stops and
/// both sides get a FIN (the QUIC stream is finished, the TCP connection
/// closed), so the apps see the connection end rather than an error.
pub(crate) async fn copy_until_cut(
    ctx: &Ctx,
    tcp: tokio::net::TcpStream,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    idle: Option<Duration>,
) -> crate::copy::CopyResult {
    let mut phase = ctx.phase.clone();
    tokio::select! {
        r = crate::copy::bidi(tcp, send, recv, idle) => r,
        _ = reached(&mut phase, Phase::Cutting) => crate::copy::CopyResult {
            error: Some("cut at the drain deadline".into()),
            ..Default::default()
        },
    }
}

/// How long a drained connection stays open after its last stream ended,
/// so the peer can acknowledge the final bytes before the close frame
/// discards anything unacknowledged: a few round trips, within bounds.
pub fn linger(rtt: Duration) -> Duration {
    (rtt * 4).clamp(Duration::from_millis(50), Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_every_count() {
        let a = Arc::new(Activity::default());
        let r = a.inbound_requests.enter();
        let s = a.outbound_streams.enter();
        assert_eq!(a.snapshot().inbound_requests, 1);
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.idle().await })
        };
        drop(r);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(s);
        waiter.await.expect("idle");
        assert!(a.snapshot().is_idle());
    }

    #[test]
    fn linger_is_bounded() {
        assert_eq!(linger(Duration::ZERO), Duration::from_millis(50));
        assert_eq!(
            linger(Duration::from_millis(100)),
            Duration::from_millis(400)
        );
        assert_eq!(linger(Duration::from_secs(10)), Duration::from_secs(2));
    }
}
