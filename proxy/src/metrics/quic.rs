//! Per-peer QUIC health, read from quinn's connection statistics when
//! Prometheus scrapes (a [`Collector`]): nothing runs between scrapes.
//!
//! Series are labelled by direction and the peer's SPIFFE ID, never by
//! connection or address, so cardinality is bounded by the mesh's workload
//! identities: every connection to (or from) the same identity — several
//! pods, both ALPNs — is folded into one series. Counters of connections
//! that closed are kept per identity, so totals never go down when a
//! connection is replaced.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::TypedMetric;

use super::INBOUND;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PeerLabels {
    pub direction: &'static str,
    /// The peer sidecar's SPIFFE ID (proved in the handshake).
    pub peer: String,
}

/// Monotonic per-connection counters, from `quinn::ConnectionStats`.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    sent_packets: u64,
    lost_packets: u64,
    lost_bytes: u64,
    congestion_events: u64,
    sent_bytes: u64,
    received_bytes: u64,
}

impl Totals {
    fn of(s: &quinn::ConnectionStats) -> Totals {
        Totals {
            sent_packets: s.path.sent_packets,
            lost_packets: s.path.lost_packets,
            lost_bytes: s.path.lost_bytes,
            congestion_events: s.path.congestion_events,
            sent_bytes: s.udp_tx.bytes,
            received_bytes: s.udp_rx.bytes,
        }
    }

    fn add(&mut self, o: &Totals) {
        self.sent_packets += o.sent_packets;
        self.lost_packets += o.lost_packets;
        self.lost_bytes += o.lost_bytes;
        self.congestion_events += o.congestion_events;
        self.sent_bytes += o.sent_bytes;
        self.received_bytes += o.received_bytes;
    }
}

struct Live {
    labels: PeerLabels,
    conn: quinn::Connection,
    streams: Arc<AtomicI64>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    live: HashMap<u64, Live>,
    /// Totals of closed connections, per identity and direction.
    closed: BTreeMap<PeerLabels, Totals>,
}

/// The QUIC connections of one sidecar, for the scrape-time collector.
#[derive(Default)]
pub struct QuicPeers {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for QuicPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicPeers").finish_non_exhaustive()
    }
}

/// Counts the streams open on one tracked connection; see [`StreamCount::open`].
#[derive(Clone)]
pub struct StreamCount(Arc<AtomicI64>);

impl StreamCount {
    /// One more open stream, until the guard drops.
    pub fn open(&self) -> OpenStream {
        self.0.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.0.clone())
    }
}

/// An open stream; dropping it closes it in the count.
pub struct OpenStream(Arc<AtomicI64>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl QuicPeers {
    /// The remote address of every live connection in `direction`, as quinn
    /// sees it now: after a peer migrates (rebinds, NAT rebinding) this is
    /// its new address.
    pub fn remote_addresses(&self, direction: &str) -> Vec<std::net::SocketAddr> {
        self.lock()
            .live
            .values()
            .filter(|l| l.labels.direction == direction && l.conn.close_reason().is_none())
            .map(|l| l.conn.remote_address())
            .collect()
    }

    /// Follow `conn` (to or from `peer`) until it closes; then its final
    /// counters join the peer's closed totals.
    pub fn track(
        self: &Arc<Self>,
        direction: &'static str,
        peer: &str,
        conn: &quinn::Connection,
    ) -> StreamCount {
        let streams = Arc::new(AtomicI64::new(0));
        let labels = PeerLabels {
            direction,
            peer: peer.to_string(),
        };
        let id = {
            let mut inner = self.lock();
            let id = inner.next_id;
            inner.next_id += 1;
            inner.live.insert(
                id,
                Live {
                    labels,
                    conn: conn.clone(),
                    streams: streams.clone(),
                },
            );
            id
        };
        let this = self.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            conn.closed().await;
            // A closed connection's statistics are final.
            let last = Totals::of(&conn.stats());
            let mut inner = this.lock();
            if let Some(live) = inner.live.remove(&id) {
                inner.closed.entry(live.labels).or_default().add(&last);
            }
        });
        StreamCount(streams)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One row per (direction, peer), read now.
    fn snapshot(&self) -> BTreeMap<PeerLabels, Row> {
        let inner = self.lock();
        let mut rows: BTreeMap<PeerLabels, Row> = inner
            .closed
            .iter()
            .map(|(l, t)| (l.clone(), Row::closed(*t)))
            .collect();
        for live in inner.live.values() {
            let stats = live.conn.stats();
            let row = rows
                .entry(live.labels.clone())
                .or_insert_with(|| Row::closed(Totals::default()));
            row.totals.add(&Totals::of(&stats));
            row.connections += 1;
            row.rtt = Some(row.rtt.map_or(stats.path.rtt, |r| r.max(stats.path.rtt)));
            row.cwnd = Some(row.cwnd.map_or(stats.path.cwnd, |c| c.min(stats.path.cwnd)));
            row.streams += live.streams.load(Ordering::Relaxed);
        }
        rows
    }
}

/// What one (direction, peer) series shows.
struct Row {
    totals: Totals,
    connections: i64,
    /// Largest smoothed RTT among the open connections.
    rtt: Option<std::time::Duration>,
    /// Smallest congestion window among the open connections.
    cwnd: Option<u64>,
    streams: i64,
}

impl Row {
    fn closed(totals: Totals) -> Row {
        Row {
            totals,
            connections: 0,
            rtt: None,
            cwnd: None,
            streams: 0,
        }
    }
}

/// Registered in the sidecar's registry; encodes [`QuicPeers`] on each scrape.
#[derive(Debug)]
pub struct QuicCollector(pub Arc<QuicPeers>);

fn gauges<V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(&PeerLabels, V)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, ConstGauge::<V>::TYPE)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(*labels)?)?;
    }
    Ok(())
}

fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &BTreeMap<PeerLabels, Row>,
    value: fn(&Totals) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, ConstCounter::<u64>::TYPE)?;
    for (labels, row) in rows {
        ConstCounter::new(value(&row.totals)).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for QuicCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = self.0.snapshot();
        let open = |f: fn(&Row) -> Option<f64>| -> Vec<(&PeerLabels, f64)> {
            rows.iter()
                .filter_map(|(l, r)| f(r).map(|v| (l, v)))
                .collect()
        };
        let conns: Vec<(&PeerLabels, i64)> = rows.iter().map(|(l, r)| (l, r.connections)).collect();
        gauges(
            &mut enc,
            "weft_quic_peer_connections",
            "QUIC connections open now to (outbound) or from (inbound) a peer identity",
            &conns,
        )?;
        gauges(
            &mut enc,
            "weft_quic_rtt_seconds",
            "Smoothed round-trip time; the largest among the open connections with the peer",
            &open(|r| r.rtt.map(|d| d.as_secs_f64())),
        )?;
        gauges(
            &mut enc,
            "weft_quic_congestion_window_bytes",
            "Congestion window; the smallest among the open connections with the peer",
            &open(|r| r.cwnd.map(|c| c as f64)),
        )?;
        let streams: Vec<(&PeerLabels, i64)> = rows
            .iter()
            .filter(|(l, _)| l.direction == INBOUND)
            .map(|(l, r)| (l, r.streams))
            .collect();
        gauges(
            &mut enc,
            "weft_quic_streams_active",
            "Request and TCP streams open now on the peer's connections (counted where the streams are accepted: inbound)",
            &streams,
        )?;
        counters(
            &mut enc,
            "weft_quic_sent_packets",
            "QUIC packets sent to the peer",
            &rows,
            |t| t.sent_packets,
        )?;
        counters(
            &mut enc,
            "weft_quic_lost_packets",
            "QUIC packets to the peer declared lost",
            &rows,
            |t| t.lost_packets,
        )?;
        counters(
            &mut enc,
            "weft_quic_lost_bytes",
            "Bytes in QUIC packets to the peer declared lost",
            &rows,
            |t| t.lost_bytes,
        )?;
        counters(
            &mut enc,
            "weft_quic_congestion_events",
            "Congestion events (window reductions) on connections with the peer",
            &rows,
            |t| t.congestion_events,
        )?;
        counters(
            &mut enc,
            "weft_quic_sent_bytes",
            "Bytes sent to the peer in UDP datagrams (QUIC headers and encryption included)",
            &rows,
            |t| t.sent_bytes,
        )?;
        counters(
            &mut enc,
            "weft_quic_received_bytes",
            "Bytes received from the peer in UDP datagrams (QUIC headers and encryption included)",
            &rows,
            |t| t.received_bytes,
        )?;
        Ok(())
    }
}
