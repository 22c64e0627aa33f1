//! UDP services (`protocol = "udp"`): datagrams between an app and its peer
//! service, carried as QUIC DATAGRAM frames on the pooled `weft-l4`
//! connection. The flow mapping, wire format and limits are in `docs/udp.md`.
//!
//! A **flow** is one app source address talking to one service. The client
//! sidecar opens one bidirectional stream per flow whose preamble (kind
//! UDP) names the service; the peer authorizes the caller once, on that
//! stream, opens a connected UDP socket to its app and answers `Ok`. From
//! then on each datagram travels as an RFC 9297 HTTP Datagram whose
//! quarter stream ID is the flow stream's (RFC 9298 context 0), and closing
//! the stream ends the flow. Both sidecars end a flow idle for the service's
//! `idle_timeout`; the client also after `replies_per_flow` replies.
//!
//! This module holds what both directions share: the per-connection flow
//! table and its datagram reader, and the counters.

pub(crate) mod inbound;
pub(crate) mod outbound;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use weft_transport::datagram;

use crate::metrics::{Metrics, UdpDropLabels, UdpLabels};

/// Datagrams waiting for one flow, each direction. A DNS client has one or
/// two queries in flight per source port; 64 absorbs bursts of a chattier
/// protocol while a flow's stream opens, and bounds memory per flow.
pub(crate) const FLOW_QUEUE: usize = 64;

/// Largest UDP payload read from an app socket (the IPv4/IPv6 UDP maximum).
pub(crate) const MAX_UDP_PAYLOAD: usize = 65_535;

/// Why a datagram was dropped: the `reason` label values.
pub(crate) mod reason {
    /// Larger than the QUIC path allows (`max_datagram_size`).
    pub const TOO_LARGE: &str = "too_large";
    /// Its flow ended or never existed (a late reply, an unknown flow ID).
    pub const NO_FLOW: &str = "no_flow";
    /// Its flow's queue was full (the app sends faster than it can go).
    pub const QUEUE_FULL: &str = "queue_full";
    /// The peer refused the flow: the caller may not use the service.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// No peer took the flow (no endpoint, connect failure, unknown service).
    pub const UNREACHABLE: &str = "unreachable";
    /// Not a flow datagram (truncated header, a context ID other than 0).
    pub const MALFORMED: &str = "malformed";
}

/// The label used for datagrams whose service is unknown (no flow).
pub(crate) const UNKNOWN_SERVICE: &str = "unknown";

/// One flow's entry in a connection's table: where its datagrams go.
struct Entry {
    tx: mpsc::Sender<Bytes>,
    counters: Arc<Counters>,
}

/// The flows of one QUIC connection, by quarter stream ID, and the task
/// that reads the connection's datagrams into them.
#[derive(Default)]
pub(crate) struct FlowTable {
    flows: Mutex<HashMap<u64, Entry>>,
}

impl FlowTable {
    pub fn insert(&self, qsid: u64, tx: mpsc::Sender<Bytes>, counters: Arc<Counters>) {
        self.lock().insert(qsid, Entry { tx, counters });
    }

    pub fn remove(&self, qsid: u64) {
        self.lock().remove(&qsid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand one received DATAGRAM payload to its flow; drops are counted.
    fn deliver(&self, metrics: &Metrics, direction: &'static str, frame: Bytes) {
        let d = match datagram::decode(&frame) {
            Ok(d) if d.context_id == datagram::CONTEXT_UDP => d,
            // RFC 9298 §5: datagrams with an unknown context ID are dropped.
            _ => return drop_unknown(metrics, direction, reason::MALFORMED),
        };
        let offset = frame.len() - d.payload.len();
        let qsid = d.quarter_stream_id;
        let flows = self.lock();
        let Some(entry) = flows.get(&qsid) else {
            drop(flows);
            return drop_unknown(metrics, direction, reason::NO_FLOW);
        };
        match entry.tx.try_send(frame.slice(offset..)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => entry.counters.dropped(reason::QUEUE_FULL),
            Err(mpsc::error::TrySendError::Closed(_)) => entry.counters.dropped(reason::NO_FLOW),
        }
    }

    /// Read `conn`'s datagrams into the flows until the connection ends.
    pub async fn read(
        self: Arc<Self>,
        conn: quinn::Connection,
        metrics: Arc<Metrics>,
        dir: &'static str,
    ) {
        while let Ok(frame) = conn.read_datagram().await {
            self.deliver(&metrics, dir, frame);
        }
    }
}

fn drop_unknown(metrics: &Metrics, direction: &'static str, reason: &'static str) {
    metrics
        .udp_dropped
        .get_or_create(&UdpDropLabels {
            direction,
            service: UNKNOWN_SERVICE.to_string(),
            reason,
        })
        .inc();
}

/// The client side's flow tables, one per pooled `weft-l4` connection that
/// carries flows (keyed by the connection's stable ID), each with a reader.
#[derive(Default)]
pub(crate) struct ClientTables {
    tables: Mutex<HashMap<usize, Arc<FlowTable>>>,
}

impl ClientTables {
    /// The table of `conn`, created (and its reader started) on first use.
    pub fn of(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        metrics: &Arc<Metrics>,
    ) -> Arc<FlowTable> {
        let id = conn.stable_id();
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tables.get(&id) {
            return t.clone();
        }
        let table = Arc::new(FlowTable::default());
        tables.insert(id, table.clone());
        let (me, conn, metrics, t) = (self.clone(), conn.clone(), metrics.clone(), table.clone());
        tokio::spawn(async move {
            t.read(conn, metrics, crate::metrics::OUTBOUND).await;
            me.tables
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
        table
    }
}

/// The counters of one direction and service, looked up once per flow.
pub(crate) struct Counters {
    metrics: Arc<Metrics>,
    labels: UdpLabels,
    pub sent: Counter,
    pub sent_bytes: Counter,
    pub received: Counter,
    pub received_bytes: Counter,
    pub active: Gauge,
}

impl Counters {
    pub fn new(metrics: &Arc<Metrics>, direction: &'static str, service: &str) -> Arc<Counters> {
        let labels = UdpLabels {
            direction,
            service: service.to_string(),
        };
        Arc::new(Counters {
            sent: metrics.udp_sent_datagrams.get_or_create(&labels).clone(),
            sent_bytes: metrics.udp_sent_bytes.get_or_create(&labels).clone(),
            received: metrics
                .udp_received_datagrams
                .get_or_create(&labels)
                .clone(),
            received_bytes: metrics.udp_received_bytes.get_or_create(&labels).clone(),
            active: metrics.udp_flows_active.get_or_create(&labels).clone(),
            metrics: metrics.clone(),
            labels,
        })
    }

    pub fn dropped(&self, reason: &'static str) {
        self.dropped_n(reason, 1);
    }

    pub fn dropped_n(&self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        self.metrics
            .udp_dropped
            .get_or_create(&UdpDropLabels {
                direction: self.labels.direction,
                service: self.labels.service.clone(),
                reason,
            })
            .inc_by(n);
    }

    pub fn sent(&self, bytes: usize) {
        self.sent.inc();
        self.sent_bytes.inc_by(bytes as u64);
    }

    pub fn received(&self, bytes: usize) {
        self.received.inc();
        self.received_bytes.inc_by(bytes as u64);
    }

    /// Count a new flow and hold the active gauge until the guard drops.
    pub fn open_flow(self: &Arc<Self>) -> ActiveFlow {
        self.metrics.udp_flows.get_or_create(&self.labels).inc();
        self.active.inc();
        ActiveFlow(self.clone())
    }
}

/// An open flow, counted in `weft_udp_flows_active` while it lives.
pub(crate) struct ActiveFlow(Arc<Counters>);

impl Drop for ActiveFlow {
    fn drop(&mut self) {
        self.0.active.dec();
    }
}

/// What became of a datagram given to [`send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Handed to QUIC (which may still lose it on the way).
    Delivered,
    /// Dropped and counted (`too_large`).
    Dropped,
    /// The connection is gone: the flow should end.
    Lost,
}

/// Send `payload` on flow `qsid` of `conn` as one DATAGRAM frame. A
/// datagram the path cannot carry is dropped and counted as `too_large`,
/// never moved to a stream. The caller counts what was sent.
pub(crate) fn send(
    conn: &quinn::Connection,
    qsid: u64,
    payload: &[u8],
    counters: &Counters,
) -> Outcome {
    let room = conn.max_datagram_size().unwrap_or(0);
    if datagram::header_len(qsid) + payload.len() > room {
        counters.dropped(reason::TOO_LARGE);
        tracing::debug!(
            len = payload.len(),
            room,
            "UDP datagram larger than the path allows; dropped"
        );
        return Outcome::Dropped;
    }
    match conn.send_datagram(datagram::encode(qsid, payload)) {
        Ok(()) => Outcome::Delivered,
        Err(quinn::SendDatagramError::ConnectionLost(_)) => Outcome::Lost,
        Err(e) => {
            // TooLarge (the path shrank since we looked), or the peer or we
            // have datagrams disabled: the datagram cannot go, as too large.
            tracing::debug!(error = %e, "UDP datagram not sent");
            counters.dropped(reason::TOO_LARGE);
            Outcome::Dropped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{parse_text, sum};

    fn dropped(m: &Metrics, service: &str, why: &str) -> f64 {
        sum(
            &parse_text(&m.encode_prometheus()),
            "weft_udp_dropped_datagrams_total",
            &[
                ("direction", "inbound"),
                ("service", service),
                ("reason", why),
            ],
        )
    }

    #[tokio::test]
    async fn datagrams_reach_their_flow_or_are_counted_by_reason() {
        let m = Metrics::new();
        let table = FlowTable::default();
        let counters = Counters::new(&m, crate::metrics::INBOUND, "dns");
        let (tx, mut rx) = mpsc::channel(1);
        table.insert(4, tx, counters.clone());
        table.deliver(&m, crate::metrics::INBOUND, datagram::encode(4, b"query"));
        assert_eq!(rx.try_recv().ok().as_deref(), Some(&b"query"[..]));
        // The queue holds one: the second of two is dropped.
        table.deliver(&m, crate::metrics::INBOUND, datagram::encode(4, b"a"));
        table.deliver(&m, crate::metrics::INBOUND, datagram::encode(4, b"b"));
        assert_eq!(dropped(&m, "dns", reason::QUEUE_FULL), 1.0);
        // Unknown flow, unknown context, truncated header.
        table.deliver(&m, crate::metrics::INBOUND, datagram::encode(5, b"x"));
        table.deliver(
            &m,
            crate::metrics::INBOUND,
            Bytes::from_static(&[4, 1, 0xAA]),
        );
        table.deliver(&m, crate::metrics::INBOUND, Bytes::from_static(&[0x40]));
        assert_eq!(dropped(&m, UNKNOWN_SERVICE, reason::NO_FLOW), 1.0);
        assert_eq!(dropped(&m, UNKNOWN_SERVICE, reason::MALFORMED), 2.0);
        // A flow whose task is gone (its receiver dropped): no_flow, by service.
        drop(rx);
        table.deliver(&m, crate::metrics::INBOUND, datagram::encode(4, b"late"));
        assert_eq!(dropped(&m, "dns", reason::NO_FLOW), 1.0);
        table.remove(4);
        table.deliver(&m, crate::metrics::INBOUND, datagram::encode(4, b"later"));
        assert_eq!(dropped(&m, UNKNOWN_SERVICE, reason::NO_FLOW), 2.0);
        // The active-flow gauge follows the guard.
        let flow = counters.open_flow();
        assert_eq!(counters.active.get(), 1);
        drop(flow);
        assert_eq!(counters.active.get(), 0);
    }
}
