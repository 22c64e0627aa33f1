//! Retry policy pieces for outbound HTTP: which failures a route retries
//! (`retries.on` in the mesh file), which methods are safe to retry, how long
//! to wait between attempts, and a per-service retry budget that stops retries
//! from multiplying load on a service that is already failing.
//!
//! Everything here is pure; the budget reads the clock through
//! `tokio::time::Instant` so tests can pause and advance time.

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// One retry condition of a route (`retries.on` in the mesh file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// `connect-failure`: no connection to the endpoint could be made.
    ConnectFailure,
    /// `refused-stream`: the peer refused the stream before processing it.
    RefusedStream,
    /// `reset`: the stream or connection was lost, or the per-try timeout hit.
    Reset,
    /// `5xx`: any 5xx response, or no response at all.
    Status5xx,
    /// `gateway-error`: 502, 503 or 504, or no response at all.
    GatewayError,
    /// A status code such as `409`: exactly that status.
    Status(u16),
}

const NAMES: &str = "connect-failure, refused-stream, reset, 5xx, gateway-error, \
                     or a status code from 100 to 599";

impl FromStr for RetryOn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "connect-failure" => return Ok(Self::ConnectFailure),
            "refused-stream" => return Ok(Self::RefusedStream),
            "reset" => return Ok(Self::Reset),
            "5xx" => return Ok(Self::Status5xx),
            "gateway-error" => return Ok(Self::GatewayError),
            _ => {}
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u16>() {
                Ok(code @ 100..=599) => Ok(Self::Status(code)),
                _ => Err(format!(
                    "retry condition {s:?} is not an HTTP status code: \
                     use a code from 100 to 599"
                )),
            };
        }
        Err(format!(
            "unknown retry condition {s:?}: expected one of {NAMES}"
        ))
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectFailure => f.write_str("connect-failure"),
            Self::RefusedStream => f.write_str("refused-stream"),
            Self::Reset => f.write_str("reset"),
            Self::Status5xx => f.write_str("5xx"),
            Self::GatewayError => f.write_str("gateway-error"),
            Self::Status(code) => write!(f, "{code}"),
        }
    }
}

impl serde::Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why one attempt failed, as the retry policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection to the endpoint (the request was never sent).
    ConnectFailure,
    /// The peer refused the stream before processing it (HTTP/3
    /// `H3_REQUEST_REJECTED`, or the connection was closing): safe to retry.
    RefusedStream,
    /// The peer is draining and refused the request or stream before
    /// processing it (GOAWAY, `H3_REQUEST_REJECTED`, a stream reset with
    /// `DRAINING`, a connection closed with `DRAINING`, a refused
    /// handshake). Retried once on another endpoint even without a retry
    /// policy, and otherwise treated like a refused stream.
    Draining,
    /// The stream was reset or the connection lost after the request was sent.
    Reset,
    /// No response head within the per-try timeout.
    PerTryTimeout,
    /// Sent as 0-RTT early data that was not processed: the peer rejected
    /// the early data (it no longer knew the session, e.g. it restarted),
    /// or answered `425 Too Early`. Sent once more after the handshake,
    /// even without a retry policy.
    EarlyData,
    /// A response with this status.
    Status(u16),
}

impl Failure {
    /// The `reason` label for retry metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ConnectFailure => "connect-failure",
            Self::RefusedStream => "refused-stream",
            Self::Draining => "drain",
            Self::Reset => "reset",
            Self::PerTryTimeout => "per-try-timeout",
            Self::EarlyData => "early-data",
            Self::Status(code) if *code >= 500 => "5xx",
            Self::Status(_) => "status",
        }
    }

    /// No response at all: what Envoy's `5xx` and `gateway-error` also cover.
    fn no_response(self) -> bool {
        matches!(
            self,
            Self::ConnectFailure
                | Self::RefusedStream
                | Self::Draining
                | Self::EarlyData
                | Self::Reset
                | Self::PerTryTimeout
        )
    }
}

/// The first condition in `on` that makes `f` retryable, if any. Envoy's
/// semantics:
/// - `connect-failure`: a connect failure; `refused-stream`: a refused stream;
///   `reset`: a reset or a per-try timeout.
/// - `5xx`: any status >= 500, and any failure with no response at all
///   (connect failure, refused stream, reset, per-try timeout).
/// - `gateway-error`: 502, 503 or 504, and any failure with no response.
/// - a status code: exactly that status.
pub fn retryable(on: &[RetryOn], f: Failure) -> Option<RetryOn> {
    on.iter().copied().find(|&c| covers(c, f))
}

fn covers(c: RetryOn, f: Failure) -> bool {
    match c {
        RetryOn::ConnectFailure => f == Failure::ConnectFailure,
        RetryOn::RefusedStream => matches!(
            f,
            Failure::RefusedStream | Failure::Draining | Failure::EarlyData
        ),
        RetryOn::Reset => matches!(f, Failure::Reset | Failure::PerTryTimeout),
        RetryOn::Status5xx => f.no_response() || matches!(f, Failure::Status(s) if s >= 500),
        RetryOn::GatewayError => f.no_response() || matches!(f, Failure::Status(502..=504)),
        RetryOn::Status(n) => f == Failure::Status(n),
    }
}

/// Whether `f` happened before the request could have reached the app (a
/// connect failure or a refused stream): such requests are retried even when
/// the method is not idempotent.
pub fn never_processed(f: Failure) -> bool {
    matches!(
        f,
        Failure::ConnectFailure | Failure::RefusedStream | Failure::Draining | Failure::EarlyData
    )
}

/// Safe methods per RFC 9110 §9.2.1: GET, HEAD, OPTIONS and TRACE. Only
/// these go out as 0-RTT early data, which may be replayed (an idempotent
/// PUT or DELETE replayed later could undo a newer write).
pub fn is_safe(m: &http::Method) -> bool {
    use http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(m)
}

/// Idempotent methods per RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT and
/// DELETE.
pub fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(m)
}

/// The delay before retry number `retry` (1 is the first retry; 0 is treated
/// as 1).
///
/// The ceiling is `base × 2^(retry-1)`, capped at `max`. The delay is drawn
/// with "equal jitter" (AWS Architecture Blog, "Exponential Backoff and
/// Jitter"): half the ceiling plus a uniform draw from the other half, so the
/// result lies in `[ceiling/2, ceiling]`. Unlike full jitter, a retry never
/// goes out immediately, which keeps a burst of failures from turning into an
/// instant burst of retries; the jitter still spreads retries from many
/// clients apart. Saturates instead of overflowing for large `retry`.
pub fn backoff(retry: u32, base: Duration, max: Duration, rng: &mut impl rand::Rng) -> Duration {
    if base.is_zero() {
        return Duration::ZERO;
    }
    // base × 2^(retry-1), saturating once either factor overflows.
    let ceiling = 2u32
        .checked_pow(retry.saturating_sub(1))
        .and_then(|factor| base.checked_mul(factor))
        .unwrap_or(Duration::MAX)
        .min(max);
    let half = ceiling / 2;
    let spread = (ceiling - half).as_nanos();
    let jitter = rng.random_range(0..=spread);
    half.saturating_add(nanos_to_duration(jitter))
}

/// `Duration::from_nanos` for a `u128` that came from a `Duration`.
fn nanos_to_duration(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 10^9, so it always fits.
    let sub = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, sub)
}

/// A retry budget (Linkerd/Finagle style): over a sliding window of `ttl`,
/// retries may be at most `ratio × requests + min_per_second × ttl_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BudgetConfig {
    /// Retries allowed per original request in the window.
    pub ratio: f64,
    /// Retries allowed per second regardless of traffic, so that a quiet
    /// service still gets retries for its occasional failure.
    pub min_per_second: u32,
    /// How long requests and retries count against the budget.
    #[serde(serialize_with = "as_humantime")]
    pub ttl: Duration,
}

impl Default for BudgetConfig {
    /// Linkerd's (and Finagle's) defaults: 20% extra load from retries at
    /// most, which a service that is merely degraded can absorb but which
    /// stops a retry storm from amplifying an outage; 10 retries per second as
    /// a floor so low-traffic services can still retry; and a 10 s window,
    /// long enough to smooth bursts yet short enough to recover quickly once
    /// the service is healthy again.
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

/// Serialises the `ttl` as a humantime string ("10s"), as written in the mesh file.
fn as_humantime<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// How many slots the window is split into; the window is exact to one slot.
const SLOTS: usize = 10;

/// A retry budget shared by all requests to one service.
///
/// The window is a ring of [`SLOTS`] counters of `ttl / SLOTS` each; slots
/// older than `ttl` are cleared when the budget is next touched. The window
/// therefore covers between `ttl - ttl/SLOTS` and `ttl` of history.
#[derive(Debug)]
pub struct Budget {
    cfg: BudgetConfig,
    /// The floor's share of the allowance: `min_per_second × ttl`.
    floor: f64,
    slot_len: Duration,
    start: Instant,
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    slots: [Slot; SLOTS],
    /// The slot number (counted in `slot_len`s since `start`) of the newest slot.
    head: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    requests: u64,
    retries: u64,
}

impl Window {
    fn totals(&self) -> Slot {
        self.slots.iter().fold(Slot::default(), |a, s| Slot {
            requests: a.requests.saturating_add(s.requests),
            retries: a.retries.saturating_add(s.retries),
        })
    }
}

/// The state of a [`Budget`], for the admin endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BudgetSnapshot {
    /// Original requests in the current window.
    pub requests: u64,
    /// Retries spent in the current window.
    pub retries: u64,
    /// Retries the current window allows in total.
    pub allowance: u64,
}

impl Budget {
    pub fn new(cfg: BudgetConfig) -> Self {
        // A zero ttl would make every slot zero-length; one nanosecond keeps the
        // arithmetic defined and leaves only the ratio in effect.
        let slot_len = (cfg.ttl / SLOTS as u32).max(Duration::from_nanos(1));
        Self {
            cfg,
            floor: f64::from(cfg.min_per_second) * cfg.ttl.as_secs_f64(),
            slot_len,
            start: Instant::now(),
            window: Mutex::new(Window::default()),
        }
    }

    pub fn config(&self) -> BudgetConfig {
        self.cfg
    }

    /// Records one original request (once per request, not per retry).
    pub fn deposit(&self) {
        self.with_current(|w, i| {
            w.slots[i].requests = w.slots[i].requests.saturating_add(1);
        });
    }

    /// Asks to spend one retry; false when the budget is exhausted (the caller
    /// then returns the last failure and counts it).
    pub fn withdraw(&self) -> bool {
        self.with_current(|w, i| {
            let t = w.totals();
            if t.retries < self.allowance(t.requests) {
                w.slots[i].retries = w.slots[i].retries.saturating_add(1);
                true
            } else {
                false
            }
        })
    }

    pub fn snapshot(&self) -> BudgetSnapshot {
        self.with_current(|w, _| {
            let t = w.totals();
            BudgetSnapshot {
                requests: t.requests,
                retries: t.retries,
                allowance: self.allowance(t.requests),
            }
        })
    }

    /// Retries allowed in a window holding `requests` original requests.
    fn allowance(&self, requests: u64) -> u64 {
        // The epsilon absorbs rounding such as 0.29 × 100 = 28.999…; the cast
        // saturates (NaN and negatives become 0).
        (self.cfg.ratio * requests as f64 + self.floor + 1e-9).floor() as u64
    }

    /// Expires old slots, then runs `f` on the window and the current slot.
    fn with_current<T>(&self, f: impl FnOnce(&mut Window, usize) -> T) -> T {
        let elapsed = Instant::now().saturating_duration_since(self.start);
        let now = u64::try_from(elapsed.as_nanos() / self.slot_len.as_nanos()).unwrap_or(u64::MAX);
        // A panic elsewhere cannot leave the counters inconsistent: keep going.
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if now > w.head {
            let stale = (now - w.head).min(SLOTS as u64);
            for k in 0..stale {
                let idx = slot_index(now - k);
                w.slots[idx] = Slot::default();
            }
            w.head = now;
        }
        let current = slot_index(w.head);
        f(&mut w, current)
    }
}

fn slot_index(n: u64) -> usize {
    // The remainder is below SLOTS, so the cast is lossless.
    (n % SLOTS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn parses_names_and_codes() {
        let cases = [
            ("connect-failure", RetryOn::ConnectFailure),
            ("refused-stream", RetryOn::RefusedStream),
            ("reset", RetryOn::Reset),
            ("5xx", RetryOn::Status5xx),
            ("gateway-error", RetryOn::GatewayError),
            ("409", RetryOn::Status(409)),
            ("100", RetryOn::Status(100)),
            ("599", RetryOn::Status(599)),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<RetryOn>(), Ok(want), "{s}");
            assert_eq!(want.to_string(), s, "display of {want:?}");
        }
    }

    #[test]
    fn rejects_bad_names_and_codes_helpfully() {
        let err = "5XX".parse::<RetryOn>().unwrap_err();
        assert!(err.contains("\"5XX\""), "{err}");
        assert!(
            err.contains("gateway-error") && err.contains("status code"),
            "{err}"
        );
        let err = "".parse::<RetryOn>().unwrap_err();
        assert!(err.contains("unknown retry condition"), "{err}");
        for code in ["99", "600", "0", "70000"] {
            let err = code.parse::<RetryOn>().unwrap_err();
            assert!(err.contains(code) && err.contains("100 to 599"), "{err}");
        }
        assert!("-1".parse::<RetryOn>().is_err());
        assert!(" 503".parse::<RetryOn>().is_err());
    }

    #[test]
    fn serializes_as_name() {
        let json = serde_json::to_string(&[RetryOn::Status5xx, RetryOn::Status(409)]).unwrap();
        assert_eq!(json, r#"["5xx","409"]"#);
    }

    #[test]
    fn failure_labels() {
        assert_eq!(Failure::ConnectFailure.label(), "connect-failure");
        assert_eq!(Failure::RefusedStream.label(), "refused-stream");
        assert_eq!(Failure::Draining.label(), "drain");
        assert_eq!(
            retryable(&[RetryOn::RefusedStream], Failure::Draining),
            Some(RetryOn::RefusedStream)
        );
        assert_eq!(Failure::Reset.label(), "reset");
        assert_eq!(Failure::PerTryTimeout.label(), "per-try-timeout");
        assert_eq!(Failure::Status(500).label(), "5xx");
        assert_eq!(Failure::Status(503).label(), "5xx");
        assert_eq!(Failure::Status(409).label(), "status");
    }

    #[test]
    fn retryable_table() {
        use Failure as F;
        use RetryOn as R;
        let no_response = [
            F::ConnectFailure,
            F::RefusedStream,
            F::Reset,
            F::PerTryTimeout,
        ];
        // (condition, failure, retryable?)
        let mut table = vec![
            (R::ConnectFailure, F::ConnectFailure, true),
            (R::ConnectFailure, F::RefusedStream, false),
            (R::ConnectFailure, F::Reset, false),
            (R::ConnectFailure, F::Status(503), false),
            (R::RefusedStream, F::RefusedStream, true),
            (R::RefusedStream, F::ConnectFailure, false),
            (R::RefusedStream, F::Reset, false),
            (R::Reset, F::Reset, true),
            (R::Reset, F::PerTryTimeout, true),
            (R::Reset, F::ConnectFailure, false),
            (R::Reset, F::Status(502), false),
            (R::Status5xx, F::Status(500), true),
            (R::Status5xx, F::Status(503), true),
            (R::Status5xx, F::Status(599), true),
            (R::Status5xx, F::Status(404), false),
            (R::Status5xx, F::Status(499), false),
            (R::GatewayError, F::Status(502), true),
            (R::GatewayError, F::Status(503), true),
            (R::GatewayError, F::Status(504), true),
            (R::GatewayError, F::Status(500), false),
            (R::GatewayError, F::Status(501), false),
            (R::GatewayError, F::Status(505), false),
            (R::Status(409), F::Status(409), true),
            (R::Status(409), F::Status(408), false),
            (R::Status(409), F::Status(410), false),
            (R::Status(409), F::Reset, false),
            (R::Status(409), F::ConnectFailure, false),
        ];
        for f in no_response {
            table.push((R::Status5xx, f, true));
            table.push((R::GatewayError, f, true));
        }
        for (c, f, want) in table {
            let got = retryable(&[c], f);
            assert_eq!(got, want.then_some(c), "{c} on {f:?}");
        }
    }

    #[test]
    fn retryable_returns_first_matching_condition() {
        let on = [RetryOn::Status(409), RetryOn::Reset, RetryOn::Status5xx];
        assert_eq!(retryable(&on, Failure::Reset), Some(RetryOn::Reset));
        assert_eq!(
            retryable(&on, Failure::Status(503)),
            Some(RetryOn::Status5xx)
        );
        assert_eq!(
            retryable(&on, Failure::Status(409)),
            Some(RetryOn::Status(409))
        );
        assert_eq!(retryable(&on, Failure::Status(404)), None);
        assert_eq!(retryable(&[], Failure::ConnectFailure), None);
    }

    #[test]
    fn never_processed_only_before_sending() {
        assert!(never_processed(Failure::ConnectFailure));
        assert!(never_processed(Failure::RefusedStream));
        assert!(never_processed(Failure::Draining));
        assert!(never_processed(Failure::EarlyData));
        assert!(!never_processed(Failure::Reset));
        assert!(!never_processed(Failure::PerTryTimeout));
        assert!(!never_processed(Failure::Status(503)));
    }

    #[test]
    fn idempotent_methods() {
        use http::Method;
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
        let custom = Method::from_bytes(b"PURGE").unwrap();
        assert!(!is_idempotent(&custom));
    }

    #[test]
    fn backoff_grows_is_capped_and_jitter_stays_in_range() {
        let base = Duration::from_millis(25);
        let max = Duration::from_millis(250);
        let mut rng = StdRng::seed_from_u64(7);
        // Ceilings: 25, 50, 100, 200, 250 (capped), 250.
        let ceilings = [25u64, 50, 100, 200, 250, 250].map(Duration::from_millis);
        for (i, ceiling) in ceilings.into_iter().enumerate() {
            let retry = i as u32 + 1;
            let mut lo = Duration::MAX;
            let mut hi = Duration::ZERO;
            for _ in 0..1000 {
                let d = backoff(retry, base, max, &mut rng);
                assert!(d >= ceiling / 2 && d <= ceiling, "retry {retry}: {d:?}");
                lo = lo.min(d);
                hi = hi.max(d);
            }
            // The draws really are spread over the range, not constant.
            let spread = ceiling / 2;
            assert!(lo < ceiling / 2 + spread / 10, "retry {retry}: min {lo:?}");
            assert!(hi > ceiling - spread / 10, "retry {retry}: max {hi:?}");
        }
        // Retry 0 is treated as the first retry.
        let d = backoff(0, base, max, &mut rng);
        assert!(d >= base / 2 && d <= base, "{d:?}");
    }

    #[test]
    fn backoff_does_not_overflow() {
        let mut rng = StdRng::seed_from_u64(1);
        let max = Duration::from_secs(30);
        for retry in [32, 33, 64, 1000, u32::MAX] {
            let d = backoff(retry, Duration::from_millis(100), max, &mut rng);
            assert!(d >= max / 2 && d <= max, "retry {retry}: {d:?}");
        }
        // Even with no cap to speak of.
        let d = backoff(1000, Duration::from_secs(1), Duration::MAX, &mut rng);
        assert!(d >= Duration::MAX / 2, "{d:?}");
        let d = backoff(1000, Duration::from_nanos(1), Duration::MAX, &mut rng);
        assert!(d >= Duration::MAX / 2, "{d:?}");
        // A zero base means no backoff at all.
        assert_eq!(backoff(1000, Duration::ZERO, max, &mut rng), Duration::ZERO);
    }

    #[test]
    fn default_budget_is_linkerds() {
        let cfg = BudgetConfig::default();
        assert_eq!(cfg.ratio, 0.2);
        assert_eq!(cfg.min_per_second, 10);
        assert_eq!(cfg.ttl, Duration::from_secs(10));
        let json = serde_json::to_value(cfg).unwrap();
        assert_eq!(json["ttl"], "10s");
    }

    fn ratio_only() -> BudgetConfig {
        BudgetConfig {
            ratio: 0.2,
            min_per_second: 0,
            ttl: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_ratio_of_requests() {
        let b = Budget::new(ratio_only());
        assert!(!b.withdraw(), "no requests and no floor: no retries");
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20);
        assert!(!b.withdraw());
        assert_eq!(
            b.snapshot(),
            BudgetSnapshot {
                requests: 100,
                retries: 20,
                allowance: 20
            }
        );
        // Five more requests buy one more retry.
        for _ in 0..5 {
            b.deposit();
        }
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn budget_floor_alone() {
        let b = Budget::new(BudgetConfig {
            ratio: 0.2,
            min_per_second: 3,
            ttl: Duration::from_secs(10),
        });
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 30);
        assert_eq!(b.snapshot().allowance, 30);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_window_slides() {
        let cfg = ratio_only();
        let b = Budget::new(cfg);
        for _ in 0..50 {
            b.deposit();
        }
        assert_eq!((0..50).filter(|_| b.withdraw()).count(), 10);
        assert!(!b.withdraw());

        // Half a window later the old requests and retries still count.
        tokio::time::advance(cfg.ttl / 2).await;
        assert!(!b.withdraw());
        assert_eq!(b.snapshot().requests, 50);

        // Once the whole window has passed, it is empty again.
        tokio::time::advance(cfg.ttl / 2).await;
        assert_eq!(
            b.snapshot(),
            BudgetSnapshot {
                requests: 0,
                retries: 0,
                allowance: 0
            }
        );
        for _ in 0..10 {
            b.deposit();
        }
        assert_eq!((0..10).filter(|_| b.withdraw()).count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_expires_slot_by_slot() {
        let cfg = ratio_only();
        let b = Budget::new(cfg);
        let slot = cfg.ttl / SLOTS as u32;
        for _ in 0..10 {
            b.deposit();
        }
        tokio::time::advance(slot * 5).await;
        for _ in 0..20 {
            b.deposit();
        }
        assert_eq!(b.snapshot().requests, 30);
        // The first batch leaves once a full ttl has passed since it arrived...
        tokio::time::advance(slot * 5).await;
        assert_eq!(b.snapshot().requests, 20);
        // ...and the second batch a ttl after it arrived; far jumps clear all.
        tokio::time::advance(cfg.ttl * 100).await;
        assert_eq!(b.snapshot().requests, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_zero_ttl_does_not_panic() {
        let b = Budget::new(BudgetConfig {
            ratio: 1.0,
            min_per_second: 10,
            ttl: Duration::ZERO,
        });
        b.deposit();
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }
}
