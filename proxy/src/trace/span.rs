//! A finished span as the exporters see it (format-neutral), the sampling
//! rule for new traces, and ID generation.

use std::time::SystemTime;

use super::context::{SpanId, TraceId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The outbound sidecar's side of a request.
    Client,
    /// The inbound sidecar's side.
    Server,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl Value {
    /// As text (Zipkin tags are strings).
    pub fn to_text(&self) -> String {
        match self {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => b.to_string(),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

/// One finished sidecar hop.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// The caller's `tracestate`, carried into OTLP as is.
    pub trace_state: String,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// Error description; `None` is an OK (or unset) status.
    pub error: Option<String>,
    /// The other side's service name (Zipkin `remoteEndpoint.serviceName`).
    pub remote_service: Option<String>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// Whether a new trace is sampled at `ratio`, decided from its ID alone
/// (as OpenTelemetry's `TraceIdRatioBased` does), so every sidecar that
/// has to decide for the same trace decides the same way.
pub fn sample(trace_id: &TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 || ratio.is_nan() {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    // 63 bits, so the comparison with the scaled ratio cannot overflow.
    let x = u64::from_be_bytes(low) >> 1;
    (x as f64) < ratio * (1u64 << 63) as f64
}

/// A random, non-zero trace ID.
pub fn new_trace_id() -> TraceId {
    loop {
        let id: TraceId = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

/// A random, non-zero span ID.
pub fn new_span_id() -> SpanId {
    loop {
        let id: SpanId = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

/// Nanoseconds since the Unix epoch (0 for a clock before it).
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_the_ratio_and_is_deterministic() {
        let ids: Vec<TraceId> = (0..20_000).map(|_| new_trace_id()).collect();
        let share = |r| ids.iter().filter(|id| sample(id, r)).count() as f64 / ids.len() as f64;
        assert_eq!(share(1.0), 1.0);
        assert_eq!(share(0.0), 0.0);
        assert!((share(0.1) - 0.1).abs() < 0.02, "{}", share(0.1));
        assert!((share(0.5) - 0.5).abs() < 0.03, "{}", share(0.5));
        // The same trace gets the same answer, and a lower ratio samples a subset.
        for id in &ids[..1000] {
            assert_eq!(sample(id, 0.3), sample(id, 0.3));
            assert!(!sample(id, 0.1) || sample(id, 0.3));
        }
        let mut max = [0xffu8; 16];
        assert!(!sample(&max, 0.999));
        max[8..].fill(0);
        assert!(sample(&max, 0.0001));
    }

    #[test]
    fn ids_are_never_zero() {
        for _ in 0..1000 {
            assert_ne!(new_span_id(), [0; 8]);
            assert_ne!(new_trace_id(), [0; 16]);
        }
    }
}
