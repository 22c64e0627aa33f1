//! Load balancing within one service (a "cluster"): per-endpoint runtime
//! state, endpoint selection, and outlier detection (passive health checks
//! that eject endpoints which keep failing).
//!
//! Everything here is pure: time comes in as `now` and randomness as a
//! `rand::Rng`, so the logic is tested with explicit instants and seeded
//! generators, and nothing runs in the background.
//!
//! # Selection
//!
//! [`choose`] skips ejected endpoints unless every endpoint is ejected
//! (Envoy's *panic mode*: sending somewhere beats failing every request), and
//! prefers endpoints a retry has not tried yet. Endpoints whose sidecar is
//! draining ([`EndpointState::set_draining`]) or unreachable
//! ([`EndpointState::set_unreachable`]: its connection timed out, or a
//! handshake got no answer) are skipped like ejected ones, and last of all
//! in panic mode; outlier detection never counts draining against them.
//! Both last until a new handshake succeeds. Among what is left:
//! - `p2c-ewma` (default): power of two choices on a peak-EWMA latency
//!   estimate times outstanding requests, as Finagle, Linkerd and tower do;
//! - `least-request`: power of two choices on outstanding requests;
//! - `round-robin`: a shared counter modulo the candidate count.
//!
//! # Outlier detection
//!
//! Each endpoint keeps three consecutive-failure counters, as Envoy does:
//! - *5xx*: any 5xx status, a reset or per-try timeout, or a connect failure
//!   (locally-originated failures count as 5xx);
//! - *gateway errors*: 502, 503, 504, a reset or timeout, or a connect failure;
//! - *connect failures*: only a failure to connect.
//!
//! A result that does not fail a class resets that class's counter: a status
//! below 500 resets all three, a 500 resets the gateway counter, and any
//! result but a connect failure resets the connect counter (a connection was
//! made). When a counter of an enabled class reaches its threshold it is reset
//! and, unless the endpoint is already ejected, the endpoint is ejected if
//! `(currently_ejected + 1) * 100 / all.len() <= max_ejection_percent`
//! (otherwise it stays in, and a fresh run of failures is needed).
//!
//! An ejection increments `times_ejected` and lasts
//! `min(base_ejection_time * times_ejected, max_ejection_time)`. The endpoint
//! comes back lazily once `now >= ejected_until` (seen by whatever looks next:
//! [`EndpointState::is_ejected`], [`choose`], [`Outlier::record`]) and is on
//! *probation*: if its first result fails any enabled class it is ejected
//! again at once (same percent rule, longer since `times_ejected` grew; if the
//! rule forbids it, probation continues); a result that fails no enabled class
//! ends probation. `times_ejected` drops by one per `base_ejection_time` the
//! endpoint spends back in service, so a long-healthy endpoint starts over.
//!
//! Results recorded while an endpoint is ejected (requests sent before the
//! ejection) are ignored: they neither extend nor repeat the ejection.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// Time constant of the latency EWMA: a sample's weight falls to 1/e after
/// this long. Linkerd's and Finagle's default; long enough to ride out a
/// burst, short enough to follow a real shift within seconds.
pub const DECAY: Duration = Duration::from_secs(10);

/// Latency estimate of an endpoint nothing has been measured on yet.
/// Linkerd's default: a plausible in-cluster RTT, so a new endpoint is
/// neither favoured (it would be swamped) nor shunned (it would never be
/// measured).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// Load-balancing policy of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LbPolicy {
    /// Power of two choices on peak-EWMA latency × outstanding requests.
    #[default]
    P2cEwma,
    RoundRobin,
    /// Power of two choices on outstanding requests.
    LeastRequest,
}

impl LbPolicy {
    /// The name used in config files and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LbPolicy::P2cEwma => "p2c-ewma",
            LbPolicy::RoundRobin => "round-robin",
            LbPolicy::LeastRequest => "least-request",
        }
    }
}

impl fmt::Display for LbPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LbPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            LbPolicy::P2cEwma,
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| {
            format!(
                "unknown load-balancing policy {s:?}: use \"p2c-ewma\" (the default), \
                     \"round-robin\" or \"least-request\""
            )
        })
    }
}

/// Outlier detection settings (checked config). A `None` threshold is off.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OutlierConfig {
    /// Consecutive 5xx statuses, resets, timeouts or connect failures.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 statuses, resets, timeouts or connect failures.
    pub consecutive_gateway_errors: Option<u32>,
    /// Consecutive connect failures.
    pub consecutive_connect_failures: Option<u32>,
    /// An ejection lasts this times the number of ejections so far.
    pub base_ejection_time: Duration,
    /// Cap on one ejection.
    pub max_ejection_time: Duration,
    /// Never eject if that would put more than this percent of the
    /// endpoints out.
    pub max_ejection_percent: u8,
}

/// What one attempt to an endpoint ended with, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// A response with this status (any status; 5xx counts as a failure).
    Status(u16),
    /// No connection could be made (handshake or connect error).
    ConnectFailure,
    /// Stream reset, connection lost, or per-try timeout: no response.
    Reset,
}

impl AttemptResult {
    fn is_5xx(self) -> bool {
        match self {
            AttemptResult::Status(s) => (500..600).contains(&s),
            AttemptResult::ConnectFailure | AttemptResult::Reset => true,
        }
    }

    fn is_gateway_error(self) -> bool {
        match self {
            AttemptResult::Status(s) => matches!(s, 502..=504),
            AttemptResult::ConnectFailure | AttemptResult::Reset => true,
        }
    }

    fn is_connect_failure(self) -> bool {
        self == AttemptResult::ConnectFailure
    }
}

/// Shared state of one endpoint; survives config reloads (kept by address).
#[derive(Debug)]
pub struct EndpointState {
    addr: SocketAddr,
    in_flight: AtomicUsize,
    /// Its sidecar is draining: avoid it until a new handshake succeeds.
    draining: AtomicBool,
    /// Its sidecar stopped answering: avoid it until a new handshake succeeds.
    unreachable: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Peak-EWMA latency estimate, in nanoseconds.
    rtt_ns: f64,
    /// When `rtt_ns` last took a sample.
    rtt_at: Instant,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_connect: u32,
    /// Set while ejected; cleared lazily by `refresh`.
    ejected_until: Option<Instant>,
    /// Back from an ejection and no result seen yet.
    probation: bool,
    times_ejected: u32,
    /// `times_ejected` drops by one per `decay_step` after `decay_from`.
    decay_from: Instant,
    /// The base ejection time in force at the last ejection.
    decay_step: Duration,
}

impl Inner {
    /// Brings the outlier state up to `now`: ends an ejection that is over
    /// and decays `times_ejected`.
    fn refresh(&mut self, now: Instant) {
        if let Some(until) = self.ejected_until {
            if now < until {
                return;
            }
            self.ejected_until = None;
            self.probation = true;
        }
        if self.times_ejected == 0 || now <= self.decay_from {
            return;
        }
        if self.decay_step.is_zero() {
            self.times_ejected = 0;
            return;
        }
        let steps = (now - self.decay_from).as_nanos() / self.decay_step.as_nanos();
        let steps = u32::try_from(steps)
            .unwrap_or(u32::MAX)
            .min(self.times_ejected);
        self.times_ejected -= steps;
        // steps * decay_step <= now - decay_from, so this cannot overflow.
        self.decay_from += self.decay_step * steps;
    }

    /// Counts `result` and says which class, if any, calls for an ejection.
    /// Must be called on an endpoint that is not ejected.
    fn count(&mut self, cfg: &OutlierConfig, result: AttemptResult) -> Option<&'static str> {
        // Most specific first: that is the reason reported when several
        // classes trip at once.
        let classes = [
            (
                "connect-failure",
                cfg.consecutive_connect_failures,
                result.is_connect_failure(),
                &mut self.consecutive_connect,
            ),
            (
                "gateway-error",
                cfg.consecutive_gateway_errors,
                result.is_gateway_error(),
                &mut self.consecutive_gateway,
            ),
            (
                "5xx",
                cfg.consecutive_5xx,
                result.is_5xx(),
                &mut self.consecutive_5xx,
            ),
        ];
        let mut tripped = None;
        let mut first_failed = None;
        for (name, threshold, failed, counter) in classes {
            *counter = if failed { counter.saturating_add(1) } else { 0 };
            let Some(threshold) = threshold else { continue };
            if !failed {
                continue;
            }
            first_failed.get_or_insert(name);
            if *counter >= threshold {
                // Reset even if the percent rule keeps the endpoint in, as
                // Envoy does: the next attempt needs a fresh run of failures.
                *counter = 0;
                tripped.get_or_insert(name);
            }
        }
        if self.probation {
            if first_failed.is_none() {
                self.probation = false;
            }
            return first_failed;
        }
        tripped
    }

    fn eject(&mut self, cfg: &OutlierConfig, now: Instant) {
        self.times_ejected = self.times_ejected.saturating_add(1);
        let time = cfg
            .base_ejection_time
            .saturating_mul(self.times_ejected)
            .min(cfg.max_ejection_time);
        // A time past the clock's range (validation prevents it) ejects for
        // nothing rather than panicking.
        let until = now.checked_add(time).unwrap_or(now);
        self.ejected_until = Some(until);
        self.probation = false;
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        self.consecutive_connect = 0;
        self.decay_from = until;
        self.decay_step = cfg.base_ejection_time;
    }
}

/// Weight an old estimate keeps after `elapsed`: exp(-elapsed / DECAY).
fn decay_weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

impl EndpointState {
    pub fn new(addr: SocketAddr, now: Instant) -> Arc<Self> {
        Arc::new(EndpointState {
            addr,
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            unreachable: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                rtt_at: now,
                consecutive_5xx: 0,
                consecutive_gateway: 0,
                consecutive_connect: 0,
                ejected_until: None,
                probation: false,
                times_ejected: 0,
                decay_from: now,
                decay_step: Duration::ZERO,
            }),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: Arc::clone(self),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Mark (or clear) the endpoint's sidecar as draining; says whether
    /// that changed anything.
    pub fn set_draining(&self, draining: bool) -> bool {
        self.draining.swap(draining, Ordering::AcqRel) != draining
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Mark (or clear) the endpoint's sidecar as not answering (dead,
    /// partitioned); says whether that changed anything.
    pub fn set_unreachable(&self, unreachable: bool) -> bool {
        self.unreachable.swap(unreachable, Ordering::AcqRel) != unreachable
    }

    pub fn is_unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Acquire)
    }

    /// Neither draining nor unreachable.
    pub fn is_available(&self) -> bool {
        !self.is_draining() && !self.is_unreachable()
    }

    /// Forget the latency estimate (back to [`DEFAULT_RTT`], as for a new
    /// endpoint): the endpoint is back after being unreachable or draining,
    /// usually a new process, and the samples of the requests that hung on
    /// the dead one (up to the idle timeout each) would otherwise keep it
    /// out of P2C's choices for a minute or more.
    pub fn reset_latency(&self, now: Instant) {
        let mut inner = self.lock();
        inner.rtt_ns = DEFAULT_RTT.as_nanos() as f64;
        inner.rtt_at = now;
    }

    /// Feeds one latency sample to the peak-EWMA estimate: a sample above the
    /// estimate replaces it at once (react to trouble fast); a lower one is
    /// blended in with the old estimate weighted by exp(-elapsed / DECAY)
    /// (recover slowly).
    pub fn observe_latency(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let mut inner = self.lock();
        if sample > inner.rtt_ns {
            inner.rtt_ns = sample;
        } else {
            let w = decay_weight(now.saturating_duration_since(inner.rtt_at));
            inner.rtt_ns = inner.rtt_ns * w + sample * (1.0 - w);
        }
        inner.rtt_at = inner.rtt_at.max(now);
    }

    /// Load cost for P2C: the latency estimate, decayed toward zero by the
    /// time since its last sample (as tower does, so an endpoint that was
    /// slow once gets tried again), times outstanding requests plus one.
    pub fn cost(&self, now: Instant) -> f64 {
        let estimate = {
            let inner = self.lock();
            inner.rtt_ns * decay_weight(now.saturating_duration_since(inner.rtt_at))
        };
        estimate * (self.in_flight() as f64 + 1.0)
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        inner.refresh(now);
        inner.ejected_until.is_some()
    }

    pub fn snapshot(&self, now: Instant) -> EndpointSnapshot {
        let mut inner = self.lock();
        inner.refresh(now);
        let ejected_for = inner.ejected_until.map(|u| u - now);
        EndpointSnapshot {
            addr: self.addr.to_string(),
            in_flight: self.in_flight(),
            draining: self.is_draining(),
            unreachable: self.is_unreachable(),
            ewma_ms: inner.rtt_ns / 1e6,
            ejected: ejected_for.is_some(),
            ejected_for_ms: ejected_for.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            times_ejected: inner.times_ejected,
            consecutive_failures: inner
                .consecutive_5xx
                .max(inner.consecutive_gateway)
                .max(inner.consecutive_connect),
            probation: inner.probation,
        }
    }
}

/// A request in flight to an endpoint; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<EndpointState>,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One endpoint as the admin server shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointSnapshot {
    pub addr: String,
    pub in_flight: usize,
    /// Its sidecar is draining (avoided until it accepts a new connection).
    pub draining: bool,
    /// Its sidecar stopped answering (avoided until a handshake succeeds).
    pub unreachable: bool,
    /// The latency estimate as of its last sample (not decayed).
    pub ewma_ms: f64,
    pub ejected: bool,
    /// Time left in the current ejection.
    pub ejected_for_ms: Option<u64>,
    pub times_ejected: u32,
    /// The longest of the three consecutive-failure runs.
    pub consecutive_failures: u32,
    pub probation: bool,
}

/// Per-cluster outlier detector: holds the config; the per-endpoint counters
/// live in [`EndpointState`].
#[derive(Debug)]
pub struct Outlier {
    cfg: Option<OutlierConfig>,
    /// Makes "count the ejected, then eject" one step, so concurrent
    /// ejections cannot overshoot `max_ejection_percent` together.
    ejecting: Mutex<()>,
}

impl Outlier {
    /// `None` turns detection off: `record` then does nothing.
    pub fn new(cfg: Option<OutlierConfig>) -> Self {
        Outlier {
            cfg,
            ejecting: Mutex::new(()),
        }
    }

    /// Records an attempt result for `ep` (one of `all`). Returns the reason
    /// ("5xx", "gateway-error" or "connect-failure") when this call ejected
    /// the endpoint.
    pub fn record(
        &self,
        ep: &EndpointState,
        all: &[Arc<EndpointState>],
        result: AttemptResult,
        now: Instant,
    ) -> Option<&'static str> {
        let cfg = self.cfg.as_ref()?;
        let reason = {
            let mut inner = ep.lock();
            inner.refresh(now);
            if inner.ejected_until.is_some() {
                return None;
            }
            inner.count(cfg, result)?
        };
        let _one_at_a_time = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        // `ep` is skipped by identity: it is not ejected, and locking it
        // again from here would be pointless.
        let ejected = all
            .iter()
            .filter(|e| !std::ptr::eq(e.as_ref(), ep) && e.is_ejected(now))
            .count();
        let total = all.len().max(1);
        if (ejected + 1) * 100 / total > usize::from(cfg.max_ejection_percent) {
            return None;
        }
        let mut inner = ep.lock();
        inner.refresh(now);
        if inner.ejected_until.is_some() {
            return None;
        }
        inner.eject(cfg, now);
        Some(reason)
    }
}

/// Chooses an endpoint among `all`, or `None` if it is empty.
///
/// Ejected, draining and unreachable endpoints are skipped unless all are
/// (panic mode, which still prefers ejected to draining or unreachable ones); endpoints whose address
/// is in `tried` are skipped unless nothing else is left, so retries go
/// elsewhere when they can.
pub fn choose(
    policy: LbPolicy,
    all: &[Arc<EndpointState>],
    tried: &[SocketAddr],
    rr: &AtomicUsize,
    rng: &mut impl rand::Rng,
    now: Instant,
) -> Option<Arc<EndpointState>> {
    let up: Vec<&Arc<EndpointState>> = all.iter().filter(|e| e.is_available()).collect();
    let healthy: Vec<&Arc<EndpointState>> =
        up.iter().copied().filter(|e| !e.is_ejected(now)).collect();
    let pool = match (healthy.is_empty(), up.is_empty()) {
        (false, _) => healthy,
        (true, false) => up,
        (true, true) => all.iter().collect(),
    };
    let untried: Vec<&Arc<EndpointState>> = pool
        .iter()
        .copied()
        .filter(|e| !tried.contains(&e.addr))
        .collect();
    let candidates = if untried.is_empty() { pool } else { untried };
    let chosen = match candidates.len() {
        0 => return None,
        1 => candidates[0],
        n => match policy {
            LbPolicy::RoundRobin => candidates[rr.fetch_add(1, Ordering::Relaxed) % n],
            LbPolicy::P2cEwma => p2c(&candidates, rng, |e| e.cost(now)),
            LbPolicy::LeastRequest => p2c(&candidates, rng, |e| e.in_flight() as f64),
        },
    };
    Some(Arc::clone(chosen))
}

/// Power of two choices: two distinct random candidates, the cheaper wins
/// (a tie goes to the first drawn). `candidates` has at least two entries.
fn p2c<'a>(
    candidates: &[&'a Arc<EndpointState>],
    rng: &mut impl rand::Rng,
    cost: impl Fn(&EndpointState) -> f64,
) -> &'a Arc<EndpointState> {
    let n = candidates.len();
    let a = rng.random_range(0..n);
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (candidates[a], candidates[b]);
    if cost(b) < cost(a) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const BASE: Duration = Duration::from_secs(30);

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 8000 + i as u16))
    }

    fn endpoints(n: usize, now: Instant) -> Vec<Arc<EndpointState>> {
        (0..n).map(|i| EndpointState::new(addr(i), now)).collect()
    }

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: None,
            consecutive_gateway_errors: None,
            consecutive_connect_failures: None,
            base_ejection_time: BASE,
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 100,
        }
    }

    fn outlier_5xx(n: u32) -> Outlier {
        Outlier::new(Some(OutlierConfig {
            consecutive_5xx: Some(n),
            ..config()
        }))
    }

    /// How often each endpoint of `all` is chosen in `picks` calls.
    fn shares(
        policy: LbPolicy,
        all: &[Arc<EndpointState>],
        tried: &[SocketAddr],
        picks: usize,
        now: Instant,
    ) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(7);
        let rr = AtomicUsize::new(0);
        let mut counts = vec![0; all.len()];
        for _ in 0..picks {
            let e = choose(policy, all, tried, &rr, &mut rng, now).expect("an endpoint");
            let i = all
                .iter()
                .position(|x| Arc::ptr_eq(x, &e))
                .expect("one of all");
            counts[i] += 1;
        }
        counts
    }

    /// Records `result` `n` times; returns the reasons of any ejections.
    fn record_n(
        o: &Outlier,
        ep: &Arc<EndpointState>,
        all: &[Arc<EndpointState>],
        result: AttemptResult,
        n: usize,
        now: Instant,
    ) -> Vec<&'static str> {
        (0..n)
            .filter_map(|_| o.record(ep, all, result, now))
            .collect()
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [
            LbPolicy::P2cEwma,
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
        ] {
            assert_eq!(p.as_str().parse::<LbPolicy>(), Ok(p));
            let json = serde_json::to_string(&p).expect("serialize");
            assert_eq!(json, format!("\"{p}\""));
            assert_eq!(serde_json::from_str::<LbPolicy>(&json).expect("parse"), p);
        }
        assert_eq!(LbPolicy::default(), LbPolicy::P2cEwma);
        let err = "random".parse::<LbPolicy>().expect_err("unknown name");
        assert!(
            err.contains("round-robin") && err.contains("least-request"),
            "{err}"
        );
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let ep = EndpointState::new(addr(0), t0);
        assert_eq!(ep.snapshot(t0).ewma_ms, 30.0);

        // A spike replaces the estimate at once, however recent the last sample.
        ep.observe_latency(Duration::from_millis(200), t0);
        assert_eq!(ep.snapshot(t0).ewma_ms, 200.0);

        // A low sample one DECAY later keeps 1/e of the old estimate.
        let t1 = t0 + DECAY;
        ep.observe_latency(Duration::from_millis(10), t1);
        let e = std::f64::consts::E;
        let want = 200.0 / e + 10.0 * (1.0 - 1.0 / e);
        let got = ep.snapshot(t1).ewma_ms;
        assert!((got - want).abs() < 1e-6, "{got} != {want}");

        // An immediate low sample barely moves it.
        ep.observe_latency(Duration::from_millis(10), t1);
        assert!((ep.snapshot(t1).ewma_ms - got).abs() < 1e-6);
    }

    #[test]
    fn cost_decays_when_idle_and_grows_with_in_flight() {
        let t0 = Instant::now();
        let ep = EndpointState::new(addr(0), t0);
        ep.observe_latency(Duration::from_millis(100), t0);
        let fresh = ep.cost(t0);
        assert_eq!(fresh, 100e6);

        let idle = ep.cost(t0 + DECAY);
        assert!((idle - fresh / std::f64::consts::E).abs() < 1.0, "{idle}");

        let a = ep.start();
        let b = ep.start();
        assert_eq!(ep.in_flight(), 2);
        assert_eq!(ep.cost(t0), 3.0 * fresh);
        assert_eq!(a.endpoint().addr(), addr(0));
        drop(a);
        assert_eq!(ep.in_flight(), 1);
        drop(b);
        assert_eq!(ep.in_flight(), 0);
        assert_eq!(ep.cost(t0), fresh);
    }

    #[test]
    fn p2c_ewma_avoids_the_slow_endpoint_until_the_fast_ones_queue() {
        let t0 = Instant::now();
        let all = endpoints(3, t0);
        // A minute on, a 5 ms sample all but replaces the 30 ms default.
        let now = t0 + Duration::from_secs(60);
        all[0].observe_latency(Duration::from_millis(5), now);
        all[1].observe_latency(Duration::from_millis(5), now);
        all[2].observe_latency(Duration::from_millis(50), now);
        assert!(all[0].cost(now) < 5.1e6);

        // Candidates are distinct, so the slow one always loses its pair.
        let counts = shares(LbPolicy::P2cEwma, &all, &[], 10_000, now);
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!((4_500..=5_500).contains(&counts[0]), "{counts:?}");

        // With 10 requests queued on each fast endpoint (cost > 55 ms), the
        // idle slow one (50 ms) wins every pair it is in: 2/3 of the picks.
        let _held: Vec<InFlight> = all[..2]
            .iter()
            .flat_map(|e| (0..10).map(|_| e.start()))
            .collect();
        let counts = shares(LbPolicy::P2cEwma, &all, &[], 10_000, now);
        assert!((6_300..=7_000).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn p2c_ewma_retries_an_endpoint_idle_long_enough() {
        let t0 = Instant::now();
        let all = endpoints(2, t0);
        all[1].observe_latency(Duration::from_millis(300), t0);
        let counts = shares(LbPolicy::P2cEwma, &all, &[], 100, t0);
        assert_eq!(counts, [100, 0]);
        // 30 s on, the fast one has a fresh 30 ms sample while the slow
        // one's estimate has decayed to 300 ms / e^3 ≈ 15 ms: try it again.
        let t1 = t0 + Duration::from_secs(30);
        all[0].observe_latency(Duration::from_millis(30), t1);
        let counts = shares(LbPolicy::P2cEwma, &all, &[], 100, t1);
        assert_eq!(counts, [0, 100]);
    }

    #[test]
    fn least_request_prefers_fewer_in_flight() {
        let now = Instant::now();
        let all = endpoints(3, now);
        let _b = all[1].start();
        let _c: Vec<InFlight> = (0..5).map(|_| all[2].start()).collect();
        let counts = shares(LbPolicy::LeastRequest, &all, &[], 9_000, now);
        // The busiest loses every pair; the idle one wins the 2/3 it is in.
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!((5_700..=6_300).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn draining_endpoints_are_avoided_and_last_in_panic_mode() {
        let now = Instant::now();
        let all = endpoints(3, now);
        assert!(all[0].set_draining(true));
        assert!(!all[0].set_draining(true), "already draining");
        let counts = shares(LbPolicy::P2cEwma, &all, &[], 1_000, now);
        assert_eq!(counts[0], 0, "{counts:?}");
        // Ejected beats draining when nothing is healthy.
        let o = outlier_5xx(1);
        record_n(&o, &all[1], &all, AttemptResult::Status(500), 1, now);
        all[2].set_draining(true);
        assert_eq!(shares(LbPolicy::RoundRobin, &all, &[], 10, now), [0, 10, 0]);
        // All draining: still somewhere to send to.
        all[1].set_draining(true);
        assert_eq!(
            shares(LbPolicy::RoundRobin, &all, &[], 9, now)
                .iter()
                .sum::<usize>(),
            9
        );
        assert!(all[0].snapshot(now).draining);
        assert!(all[0].set_draining(false));
        assert!(!all[0].snapshot(now).draining);
    }

    #[test]
    fn unreachable_endpoints_are_avoided_until_cleared() {
        let now = Instant::now();
        let all = endpoints(2, now);
        let rr = AtomicUsize::new(0);
        let mut rng = StdRng::seed_from_u64(5);
        assert!(all[0].set_unreachable(true));
        for _ in 0..50 {
            let e = choose(LbPolicy::P2cEwma, &all, &[], &rr, &mut rng, now).expect("one");
            assert_eq!(e.addr(), all[1].addr());
        }
        assert!(all[0].snapshot(now).unreachable);
        // Nothing else left: still somewhere to send to.
        all[1].set_unreachable(true);
        assert!(choose(LbPolicy::P2cEwma, &all, &[], &rr, &mut rng, now).is_some());
        assert!(all[0].set_unreachable(false));
        assert!(all[0].is_available());
        all[0].observe_latency(Duration::from_secs(15), now);
        all[0].reset_latency(now);
        assert_eq!(
            all[0].snapshot(now).ewma_ms,
            DEFAULT_RTT.as_secs_f64() * 1e3
        );
    }

    #[test]
    fn round_robin_cycles_evenly() {
        let now = Instant::now();
        let all = endpoints(3, now);
        let rr = AtomicUsize::new(0);
        let mut rng = StdRng::seed_from_u64(1);
        let order: Vec<SocketAddr> = (0..6)
            .map(|_| {
                choose(LbPolicy::RoundRobin, &all, &[], &rr, &mut rng, now)
                    .expect("an endpoint")
                    .addr()
            })
            .collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2].map(addr));
        assert_eq!(
            shares(LbPolicy::RoundRobin, &all, &[], 300, now),
            [100, 100, 100]
        );
    }

    #[test]
    fn tried_endpoints_are_avoided_while_others_remain() {
        let now = Instant::now();
        let all = endpoints(3, now);
        for policy in [
            LbPolicy::P2cEwma,
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
        ] {
            let counts = shares(policy, &all, &[addr(0), addr(1)], 50, now);
            assert_eq!(counts, [0, 0, 50], "{policy}");
            let counts = shares(policy, &all, &[addr(0)], 50, now);
            assert_eq!(counts[0], 0, "{policy}");
            let counts = shares(policy, &all, &[addr(0), addr(1), addr(2)], 60, now);
            assert_eq!(counts.iter().sum::<usize>(), 60, "{policy}");
            assert!(counts.iter().filter(|&&c| c > 0).count() >= 2, "{policy}");
        }
    }

    #[test]
    fn empty_gives_none_and_one_gives_it() {
        let now = Instant::now();
        let rr = AtomicUsize::new(0);
        let mut rng = StdRng::seed_from_u64(1);
        assert!(choose(LbPolicy::P2cEwma, &[], &[], &rr, &mut rng, now).is_none());
        let one = endpoints(1, now);
        let tried = [addr(0)];
        for policy in [
            LbPolicy::P2cEwma,
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
        ] {
            let e = choose(policy, &one, &tried, &rr, &mut rng, now).expect("the only one");
            assert!(Arc::ptr_eq(&e, &one[0]));
        }
    }

    #[test]
    fn consecutive_5xx_ejects_on_the_threshold_and_success_resets() {
        let now = Instant::now();
        let all = endpoints(3, now);
        let o = outlier_5xx(5);
        let ep = &all[0];

        assert!(record_n(&o, ep, &all, AttemptResult::Status(500), 4, now).is_empty());
        assert_eq!(ep.snapshot(now).consecutive_failures, 4);
        assert_eq!(o.record(ep, &all, AttemptResult::Status(404), now), None);
        assert_eq!(ep.snapshot(now).consecutive_failures, 0);
        assert!(record_n(&o, ep, &all, AttemptResult::Reset, 4, now).is_empty());
        assert!(!ep.is_ejected(now));

        assert_eq!(
            o.record(ep, &all, AttemptResult::Status(503), now),
            Some("5xx")
        );
        assert!(ep.is_ejected(now));
        let snap = ep.snapshot(now);
        assert_eq!(snap.ejected_for_ms, Some(30_000));
        assert_eq!(snap.times_ejected, 1);
        assert_eq!(snap.consecutive_failures, 0);

        let counts = shares(LbPolicy::P2cEwma, &all, &[], 1_000, now);
        assert_eq!(counts[0], 0, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoint_returns_on_probation_after_base_time() {
        let all = endpoints(3, Instant::now());
        let o = outlier_5xx(1);
        let ep = &all[0];
        assert_eq!(
            o.record(ep, &all, AttemptResult::Reset, Instant::now()),
            Some("5xx")
        );

        tokio::time::advance(BASE - Duration::from_millis(1)).await;
        assert!(ep.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        let now = Instant::now();
        assert!(!ep.is_ejected(now));
        assert!(ep.snapshot(now).probation);
        let counts = shares(LbPolicy::RoundRobin, &all, &[], 30, now);
        assert_eq!(counts, [10, 10, 10]);
    }

    #[test]
    fn probation_failure_re_ejects_for_longer() {
        let t0 = Instant::now();
        let all = endpoints(3, t0);
        let o = outlier_5xx(5);
        let ep = &all[0];
        assert_eq!(
            record_n(&o, ep, &all, AttemptResult::Status(502), 5, t0),
            ["5xx"]
        );

        // One failure is enough on probation, and the second ejection is 2×.
        let t1 = t0 + BASE;
        assert_eq!(
            o.record(ep, &all, AttemptResult::Status(500), t1),
            Some("5xx")
        );
        let snap = ep.snapshot(t1);
        assert_eq!(snap.ejected_for_ms, Some(60_000));
        assert_eq!(snap.times_ejected, 2);
        assert!(!snap.probation);
    }

    #[test]
    fn probation_success_restores_normal_counting() {
        let t0 = Instant::now();
        let all = endpoints(3, t0);
        let o = outlier_5xx(5);
        let ep = &all[0];
        record_n(&o, ep, &all, AttemptResult::Status(500), 5, t0);

        let t1 = t0 + BASE;
        assert_eq!(o.record(ep, &all, AttemptResult::Status(200), t1), None);
        assert!(!ep.snapshot(t1).probation);
        assert!(record_n(&o, ep, &all, AttemptResult::Status(500), 4, t1).is_empty());
        assert!(!ep.is_ejected(t1));
    }

    #[test]
    fn results_while_ejected_change_nothing() {
        let t0 = Instant::now();
        let all = endpoints(3, t0);
        let o = outlier_5xx(1);
        let ep = &all[0];
        o.record(ep, &all, AttemptResult::Reset, t0);

        let t1 = t0 + Duration::from_secs(10);
        assert!(record_n(&o, ep, &all, AttemptResult::Reset, 10, t1).is_empty());
        let snap = ep.snapshot(t1);
        assert_eq!(snap.ejected_for_ms, Some(20_000));
        assert_eq!(snap.times_ejected, 1);
        assert_eq!(snap.consecutive_failures, 0);
    }

    #[test]
    fn times_ejected_decays_and_ejection_time_is_capped() {
        let t0 = Instant::now();
        let all = endpoints(3, t0);
        let o = Outlier::new(Some(OutlierConfig {
            consecutive_5xx: Some(1),
            max_ejection_time: Duration::from_secs(70),
            ..config()
        }));
        let ep = &all[0];

        // Ejections of 30 s, then 60 s, then capped at 70 s (not 90 s).
        let mut now = t0;
        for want in [30, 60, 70] {
            assert_eq!(o.record(ep, &all, AttemptResult::Reset, now), Some("5xx"));
            assert_eq!(ep.snapshot(now).ejected_for_ms, Some(want * 1000));
            now += Duration::from_secs(want);
        }
        assert_eq!(ep.snapshot(now).times_ejected, 3);

        // Healthy for two base times: two ejections forgiven.
        assert_eq!(o.record(ep, &all, AttemptResult::Status(200), now), None);
        now += 2 * BASE;
        assert_eq!(ep.snapshot(now).times_ejected, 1);
        assert_eq!(o.record(ep, &all, AttemptResult::Reset, now), Some("5xx"));
        assert_eq!(ep.snapshot(now).ejected_for_ms, Some(60_000));
    }

    #[test]
    fn max_ejection_percent_limits_ejections() {
        let now = Instant::now();
        let all = endpoints(3, now);
        let o = Outlier::new(Some(OutlierConfig {
            consecutive_5xx: Some(5),
            max_ejection_percent: 50,
            ..config()
        }));
        assert_eq!(
            record_n(&o, &all[0], &all, AttemptResult::Status(500), 5, now),
            ["5xx"]
        );
        // 2 of 3 would be 66 % > 50 %.
        assert!(record_n(&o, &all[1], &all, AttemptResult::Status(500), 10, now).is_empty());
        assert!(!all[1].is_ejected(now));
        // Once the first is back, the second may go.
        let later = now + BASE;
        assert_eq!(
            record_n(&o, &all[1], &all, AttemptResult::Status(500), 5, later),
            ["5xx"]
        );
    }

    #[test]
    fn connect_failures_count_only_connect_failures() {
        let now = Instant::now();
        let all = endpoints(3, now);
        let o = Outlier::new(Some(OutlierConfig {
            consecutive_connect_failures: Some(3),
            ..config()
        }));
        let ep = &all[0];
        assert!(record_n(&o, ep, &all, AttemptResult::Status(503), 10, now).is_empty());
        assert!(record_n(&o, ep, &all, AttemptResult::ConnectFailure, 2, now).is_empty());
        // A reset means a connection was made: the run starts over.
        assert_eq!(o.record(ep, &all, AttemptResult::Reset, now), None);
        assert!(record_n(&o, ep, &all, AttemptResult::ConnectFailure, 2, now).is_empty());
        assert_eq!(
            o.record(ep, &all, AttemptResult::ConnectFailure, now),
            Some("connect-failure")
        );
    }

    #[test]
    fn gateway_errors_ignore_500() {
        let now = Instant::now();
        let all = endpoints(3, now);
        let o = Outlier::new(Some(OutlierConfig {
            consecutive_gateway_errors: Some(3),
            ..config()
        }));
        let ep = &all[0];
        assert!(record_n(&o, ep, &all, AttemptResult::Status(500), 10, now).is_empty());
        for status in [502, 504, 500, 503, 502] {
            assert_eq!(o.record(ep, &all, AttemptResult::Status(status), now), None);
        }
        assert_eq!(
            o.record(ep, &all, AttemptResult::Reset, now),
            Some("gateway-error")
        );
    }

    #[test]
    fn most_specific_reason_wins() {
        let now = Instant::now();
        let all = endpoints(3, now);
        let o = Outlier::new(Some(OutlierConfig {
            consecutive_5xx: Some(2),
            consecutive_gateway_errors: Some(2),
            consecutive_connect_failures: Some(2),
            ..config()
        }));
        assert_eq!(
            record_n(&o, &all[0], &all, AttemptResult::ConnectFailure, 2, now),
            ["connect-failure"]
        );
        assert_eq!(
            record_n(&o, &all[1], &all, AttemptResult::Status(503), 2, now),
            ["gateway-error"]
        );
    }

    #[test]
    fn all_ejected_is_panic_mode() {
        let now = Instant::now();
        let all = endpoints(3, now);
        let o = outlier_5xx(1);
        for ep in &all {
            assert_eq!(o.record(ep, &all, AttemptResult::Reset, now), Some("5xx"));
        }
        assert!(all.iter().all(|e| e.is_ejected(now)));
        let counts = shares(LbPolicy::P2cEwma, &all, &[], 300, now);
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    }

    #[test]
    fn detection_off_never_ejects() {
        let now = Instant::now();
        let all = endpoints(3, now);
        let o = Outlier::new(None);
        for result in [
            AttemptResult::Status(503),
            AttemptResult::Reset,
            AttemptResult::ConnectFailure,
        ] {
            assert!(record_n(&o, &all[0], &all, result, 100, now).is_empty());
        }
        assert!(!all[0].is_ejected(now));
        assert_eq!(all[0].snapshot(now).consecutive_failures, 0);
    }
}
