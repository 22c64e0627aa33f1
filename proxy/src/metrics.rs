//! Prometheus metrics of one sidecar (its own registry, so several sidecars
//! can live in one process, as they do in `weft demo` and the tests).
//! Names follow Prometheus conventions: `weft_` prefix, base units, counters
//! end in `_total`; labels are low-cardinality (service names, mesh
//! identities, status codes).

mod quic;

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub use quic::{OpenStream, PeerLabels, QuicCollector, QuicPeers, StreamCount};

pub const OUTBOUND: &str = "outbound";
pub const INBOUND: &str = "inbound";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub service: String,
    /// The route's name outbound; empty inbound (routes are a client-side choice).
    pub route: String,
    /// The other side's SPIFFE ID: the caller inbound, the server outbound.
    pub peer: String,
    pub status: u16,
}

/// Direction and service: request durations and body bytes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub direction: &'static str,
    pub service: String,
}

/// Request duration: by route too, so latency objectives can be per route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestDurationLabels {
    pub direction: &'static str,
    pub service: String,
    /// The route's name outbound; empty inbound (routes are a client-side choice).
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    pub service: String,
    pub peer: String,
}

/// UDP datagrams and flows: direction and service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UdpLabels {
    pub direction: &'static str,
    pub service: String,
}

/// Datagrams dropped by the sidecar, by reason (see [`crate::udp`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UdpDropLabels {
    pub direction: &'static str,
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuicLabels {
    pub direction: &'static str,
    pub alpn: &'static str,
}

/// 0-RTT handshakes: which ALPN, and whether the peer took the early data.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ZeroRttLabels {
    pub alpn: &'static str,
    pub result: &'static str,
}

/// Requests and TCP streams carried as 0-RTT early data.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EarlyDataLabels {
    pub direction: &'static str,
    pub alpn: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Intercepted connections: where they went and the protocol seen.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterceptLabels {
    pub result: &'static str,
    pub protocol: &'static str,
}

/// What a drain cut at its deadline.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Span export: the format (`otlp`, `zipkin`) and the result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExportLabels {
    pub format: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub service: String,
    /// The caller's SPIFFE ID (it proved it in the handshake; bounded by the mesh's workloads).
    pub peer: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub service: String,
    pub route: String,
}

/// A policy decision on a route: retry reason, fault kind, timeout kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReasonLabels {
    pub service: String,
    pub route: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceReasonLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub service: String,
    pub route: String,
    /// The mirror's service.
    pub target: String,
    /// sent, dropped (in-flight limit), skipped (body too big to copy), failed.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s in doublings (20 buckets): a sidecar hop on loopback
    // takes a few hundred µs, so the low buckets resolve mesh overhead
    // (outbound minus inbound duration); the high ones cover slow backends.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// All metrics of one sidecar.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<RequestDurationLabels>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub tcp_active: Family<TcpLabels, Gauge>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub udp_sent_datagrams: Family<UdpLabels, Counter>,
    pub udp_sent_bytes: Family<UdpLabels, Counter>,
    pub udp_received_datagrams: Family<UdpLabels, Counter>,
    pub udp_received_bytes: Family<UdpLabels, Counter>,
    pub udp_dropped: Family<UdpDropLabels, Counter>,
    pub udp_flows: Family<UdpLabels, Counter>,
    pub udp_flows_active: Family<UdpLabels, Gauge>,
    pub quic_connections: Family<QuicLabels, Counter>,
    pub quic_active: Family<QuicLabels, Gauge>,
    pub quic_handshake_failures: Family<QuicLabels, Counter>,
    pub zero_rtt: Family<ZeroRttLabels, Counter>,
    pub early_data: Family<EarlyDataLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub trace_spans_dropped: Family<ReasonLabels, Counter>,
    pub trace_spans_exported: Family<TraceExportLabels, Counter>,
    pub trace_export_batches: Family<TraceExportLabels, Counter>,
    pub access_log_dropped: Counter,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub intercepted: Family<InterceptLabels, Counter>,
    pub dns_resolutions: Family<ResultLabels, Counter>,
    pub retries: Family<RouteReasonLabels, Counter>,
    pub drain_cut: Family<KindLabels, Counter>,
    pub retry_budget_exhausted: Family<RouteLabels, Counter>,
    pub timeouts: Family<RouteReasonLabels, Counter>,
    pub faults: Family<RouteReasonLabels, Counter>,
    pub mirrored: Family<MirrorLabels, Counter>,
    pub overflows: Family<ServiceReasonLabels, Counter>,
    pub ejections: Family<ServiceReasonLabels, Counter>,
    pub cert_expiry: Gauge,
    pub cert_renewals: Family<ResultLabels, Counter>,
    pub authz_denied: Family<AuthzLabels, Counter>,
    pub request_bytes: Family<DurationLabels, Counter>,
    pub response_bytes: Family<DurationLabels, Counter>,
    pub ca_requests: Family<ResultLabels, Counter>,
    pub build_info: Family<BuildLabels, Gauge>,
    /// QUIC connections by peer, read at scrape time.
    pub quic_peers: Arc<QuicPeers>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            tcp_connections: Family::default(),
            tcp_active: Family::default(),
            tcp_sent_bytes: Family::default(),
            tcp_received_bytes: Family::default(),
            udp_sent_datagrams: Family::default(),
            udp_sent_bytes: Family::default(),
            udp_received_datagrams: Family::default(),
            udp_received_bytes: Family::default(),
            udp_dropped: Family::default(),
            udp_flows: Family::default(),
            udp_flows_active: Family::default(),
            quic_connections: Family::default(),
            quic_active: Family::default(),
            quic_handshake_failures: Family::default(),
            zero_rtt: Family::default(),
            early_data: Family::default(),
            refused: Family::default(),
            trace_spans_dropped: Family::default(),
            trace_spans_exported: Family::default(),
            trace_export_batches: Family::default(),
            access_log_dropped: Counter::default(),
            config_reloads: Family::default(),
            intercepted: Family::default(),
            dns_resolutions: Family::default(),
            retries: Family::default(),
            drain_cut: Family::default(),
            retry_budget_exhausted: Family::default(),
            timeouts: Family::default(),
            faults: Family::default(),
            mirrored: Family::default(),
            overflows: Family::default(),
            ejections: Family::default(),
            cert_expiry: Gauge::default(),
            cert_renewals: Family::default(),
            authz_denied: Family::default(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            ca_requests: Family::default(),
            build_info: Family::default(),
            quic_peers: Arc::new(QuicPeers::default()),
        };
        let r = &mut m.registry;
        r.register(
            "weft_requests",
            "HTTP requests by direction, service, peer identity and status",
            m.requests.clone(),
        );
        r.register(
            "weft_request_duration_seconds",
            "HTTP request duration until response headers",
            m.request_duration.clone(),
        );
        r.register(
            "weft_tcp_connections",
            "TCP connections proxied",
            m.tcp_connections.clone(),
        );
        r.register(
            "weft_tcp_connections_active",
            "TCP connections open now",
            m.tcp_active.clone(),
        );
        r.register(
            "weft_tcp_sent_bytes",
            "Bytes sent towards the peer (outbound) or the app (inbound) on TCP streams",
            m.tcp_sent_bytes.clone(),
        );
        r.register(
            "weft_tcp_received_bytes",
            "Bytes received from the peer (outbound) or the app (inbound) on TCP streams",
            m.tcp_received_bytes.clone(),
        );
        r.register(
            "weft_udp_sent_datagrams",
            "UDP datagrams sent towards the peer (outbound) or the app (inbound)",
            m.udp_sent_datagrams.clone(),
        );
        r.register(
            "weft_udp_sent_bytes",
            "UDP payload bytes sent towards the peer (outbound) or the app (inbound)",
            m.udp_sent_bytes.clone(),
        );
        r.register(
            "weft_udp_received_datagrams",
            "UDP datagrams received from the peer (outbound) or the app (inbound) and delivered",
            m.udp_received_datagrams.clone(),
        );
        r.register(
            "weft_udp_received_bytes",
            "UDP payload bytes received from the peer (outbound) or the app (inbound) and delivered",
            m.udp_received_bytes.clone(),
        );
        r.register(
            "weft_udp_dropped_datagrams",
            "UDP datagrams the sidecar dropped, by reason (too_large, no_flow, queue_full, \
             unauthorized, unreachable, malformed)",
            m.udp_dropped.clone(),
        );
        r.register(
            "weft_udp_flows",
            "UDP flows opened (outbound: per app source address; inbound: accepted from a peer)",
            m.udp_flows.clone(),
        );
        r.register(
            "weft_udp_flows_active",
            "UDP flows open now",
            m.udp_flows_active.clone(),
        );
        r.register(
            "weft_quic_connections",
            "QUIC connections established (outbound: dialed, inbound: accepted)",
            m.quic_connections.clone(),
        );
        r.register(
            "weft_quic_connections_active",
            "QUIC connections open now",
            m.quic_active.clone(),
        );
        r.register(
            "weft_quic_handshake_failures",
            "QUIC handshakes that failed (bad or missing certificate, timeout)",
            m.quic_handshake_failures.clone(),
        );
        r.register(
            "weft_quic_zero_rtt",
            "Outbound handshakes that sent 0-RTT early data to a known peer, by whether the peer accepted it",
            m.zero_rtt.clone(),
        );
        r.register(
            "weft_early_data",
            "Requests (h3) and TCP streams (weft-l4) sent or received as 0-RTT early data",
            m.early_data.clone(),
        );
        r.register(
            "weft_refused",
            "Connections, streams or requests refused, by reason",
            m.refused.clone(),
        );
        r.register(
            "weft_trace_spans_dropped",
            "Spans not exported, by reason (queue_full: the export queue was full; export_failed: the collector refused or did not answer)",
            m.trace_spans_dropped.clone(),
        );
        r.register(
            "weft_trace_spans_exported",
            "Spans a collector accepted, by format (otlp, zipkin)",
            m.trace_spans_exported.clone(),
        );
        r.register(
            "weft_trace_export_batches",
            "Span export requests by format and result (success, failure)",
            m.trace_export_batches.clone(),
        );
        r.register(
            "weft_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        r.register(
            "weft_config_reloads",
            "Mesh file reloads by result (success, failure: rejected, last good config kept)",
            m.config_reloads.clone(),
        );
        r.register(
            "weft_intercepted_connections",
            "Connections captured by iptables, by result (mesh, passthrough, blocked, \
             no_original_dst) and protocol (http1, h2, opaque, tcp)",
            m.intercepted.clone(),
        );
        r.register(
            "weft_dns_resolutions",
            "DNS lookups of mesh-file names by result (success, failure: last answer kept)",
            m.dns_resolutions.clone(),
        );
        r.register(
            "weft_retries",
            "Outbound retries by service, route and the failure that caused them",
            m.retries.clone(),
        );
        r.register(
            "weft_drain_cut",
            "Work still in progress when a drain's deadline passed, cut short, by kind \
             (inbound_request, inbound_stream, outbound_request, outbound_stream)",
            m.drain_cut.clone(),
        );
        r.register(
            "weft_retry_budget_exhausted",
            "Retries not made because the service's retry budget was spent",
            m.retry_budget_exhausted.clone(),
        );
        r.register(
            "weft_request_timeouts",
            "Requests or tries that hit a timeout, by kind (request, per_try, deadline: the caller's deadline passed on the server side)",
            m.timeouts.clone(),
        );
        r.register(
            "weft_faults_injected",
            "Faults injected by route and kind (delay, abort, reset)",
            m.faults.clone(),
        );
        r.register(
            "weft_mirrored_requests",
            "Requests copied to a mirror, by result (sent, dropped, skipped, failed)",
            m.mirrored.clone(),
        );
        r.register(
            "weft_circuit_breaker_overflows",
            "Requests or streams refused at once because a service's concurrency limit and queue were full",
            m.overflows.clone(),
        );
        r.register(
            "weft_outlier_ejections",
            "Endpoints ejected by outlier detection, by service and reason",
            m.ejections.clone(),
        );
        r.register(
            "weft_cert_expiry_timestamp_seconds",
            "When this sidecar's current certificate expires (Unix time)",
            m.cert_expiry.clone(),
        );
        r.register(
            "weft_cert_renewals",
            "Certificate renewals by result (success, failure: retried with backoff)",
            m.cert_renewals.clone(),
        );
        r.register(
            "weft_authz_denied",
            "Inbound requests and streams refused by the service's authorization policy",
            m.authz_denied.clone(),
        );
        r.register(
            "weft_request_bytes",
            "HTTP request body bytes proxied (outbound: read from the app; inbound: from the peer)",
            m.request_bytes.clone(),
        );
        r.register(
            "weft_response_bytes",
            "HTTP response body bytes proxied (outbound: delivered to the app; inbound: read from the app)",
            m.response_bytes.clone(),
        );
        r.register(
            "weft_ca_requests",
            "Certificate requests this sidecar sent to weft-ca, by result (issued, refused, unavailable, error)",
            m.ca_requests.clone(),
        );
        r.register(
            "weft_build_info",
            "Always 1; the version label says which weft build runs",
            m.build_info.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register_collector(Box::new(QuicCollector(m.quic_peers.clone())));
        Arc::new(m)
    }

    /// The registry in the OpenMetrics text format (which Prometheus scrapes).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The registry in the Prometheus text format 0.0.4, for scrapers that
    /// do not ask for OpenMetrics (`promtool check metrics`, curl, older
    /// agents). Same samples; only the family names of counters differ.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode())
    }

    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// The `weft_request_bytes_total` counter of one direction and service
    /// (a handle: count with [`crate::body::counted`]).
    pub fn request_bytes_of(&self, direction: &'static str, service: &str) -> Counter {
        self.request_bytes
            .get_or_create(&DurationLabels {
                direction,
                service: service.to_string(),
            })
            .clone()
    }

    /// The `weft_response_bytes_total` counter of one direction and service.
    pub fn response_bytes_of(&self, direction: &'static str, service: &str) -> Counter {
        self.response_bytes
            .get_or_create(&DurationLabels {
                direction,
                service: service.to_string(),
            })
            .clone()
    }
}

/// Rewrite an OpenMetrics exposition (as prometheus-client writes it) as
/// Prometheus text 0.0.4: a counter family is named after its samples
/// (`weft_requests_total`, not `weft_requests`), `unknown` is `untyped`,
/// and there are no `# UNIT` or `# EOF` lines. Sample lines are unchanged.
pub fn openmetrics_to_prometheus(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let family = |name: &str| -> String {
        if counters.contains(name) && !name.ends_with("_total") {
            format!("{name}_total")
        } else {
            name.to_string()
        }
    };
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            format!("# HELP {} {help}", family(name))
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = if kind == "unknown" { "untyped" } else { kind };
            format!("# TYPE {} {kind}", family(name))
        } else {
            line.to_string()
        };
        out.push_str(&rewritten);
        out.push('\n');
    }
    out
}

/// One sample of a text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parse the samples of a Prometheus/OpenMetrics text exposition (as served on
/// `/metrics`). Lines that do not parse are skipped. Used by `weft demo` for its
/// summary and by tests, so both read what a scraper reads.
pub fn parse_text(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        None => (head.to_string(), Vec::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}')?;
            let mut labels = Vec::new();
            let mut rest = body;
            while !rest.is_empty() {
                let (k, r) = rest.split_once("=\"")?;
                let end = r.find('"')?;
                labels.push((k.trim_start_matches(',').to_string(), r[..end].to_string()));
                rest = &r[end + 1..];
            }
            (name.to_string(), labels)
        }
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Sum of the samples named `name` whose labels include all of `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_round_trips_through_the_parser() {
        let m = Metrics::new();
        let l = RequestLabels {
            direction: OUTBOUND,
            service: "payment".into(),
            route: "default".into(),
            peer: "spiffe://td/p".into(),
            status: 200,
        };
        m.requests.get_or_create(&l).inc_by(3);
        m.refuse("unauthorized");
        let samples = parse_text(&m.encode());
        assert_eq!(
            sum(
                &samples,
                "weft_requests_total",
                &[("service", "payment"), ("status", "200")]
            ),
            3.0
        );
        assert_eq!(
            sum(
                &samples,
                "weft_refused_total",
                &[("reason", "unauthorized")]
            ),
            1.0
        );
        assert_eq!(
            sum(&samples, "weft_refused_total", &[("reason", "other")]),
            0.0
        );
    }

    #[test]
    fn prometheus_text_names_counter_families_after_their_samples() {
        let m = Metrics::new();
        m.request_bytes_of(OUTBOUND, "payment").inc_by(42);
        let om = m.encode();
        assert!(om.contains("# TYPE weft_request_bytes counter\n"));
        assert!(om.ends_with("# EOF\n"));
        let text = m.encode_prometheus();
        assert!(text.contains("# TYPE weft_request_bytes_total counter\n"));
        assert!(text.contains("# HELP weft_request_bytes_total HTTP request body bytes"));
        assert!(text.contains("# TYPE weft_request_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE weft_cert_expiry_timestamp_seconds gauge\n"));
        assert!(!text.contains("# EOF"));
        // The samples are the same in both formats.
        assert_eq!(parse_text(&om), parse_text(&text));
        assert_eq!(
            sum(
                &parse_text(&text),
                "weft_request_bytes_total",
                &[("direction", "outbound"), ("service", "payment")]
            ),
            42.0
        );
    }

    #[test]
    fn duration_buckets_resolve_tens_of_microseconds_and_build_info_is_set() {
        let m = Metrics::new();
        let l = RequestDurationLabels {
            direction: INBOUND,
            service: "payment".into(),
            route: String::new(),
        };
        m.request_duration.get_or_create(&l).observe(0.000_07);
        let samples = parse_text(&m.encode_prometheus());
        let bucket = |le: &str| {
            sum(
                &samples,
                "weft_request_duration_seconds_bucket",
                &[("service", "payment"), ("le", le)],
            )
        };
        // 70 µs lands in the 100 µs bucket, not the 50 µs one.
        assert_eq!(bucket("0.00005"), 0.0);
        assert_eq!(bucket("0.0001"), 1.0);
        assert!(samples
            .iter()
            .any(|s| s.name == "weft_request_duration_seconds_bucket"
                && s.label("le") == Some("+Inf")));
        assert_eq!(
            sum(
                &samples,
                "weft_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0
        );
    }
}
