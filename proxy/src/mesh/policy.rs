//! Traffic policy in the mesh file: routes (matches, weighted backends,
//! timeouts, retries, faults, mirrors) and per-service resilience settings
//! (circuit breaker, outlier detection, load balancer, retry budget, TCP
//! timeouts). Raw `serde` shapes keep spans; [`Checker`] turns them into the
//! checked types below, collecting every error with its position.
//!
//! ```toml
//! [[services.payment.routes]]
//! match = { headers = { "x-canary" = "1" }, path_prefix = "/" }
//! backends = [ { subset = { version = "v2" } } ]
//! [[services.payment.routes]]
//! backends = [ { subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 } ]
//! timeout = "2s"
//! retries = { attempts = 3, per_try_timeout = "500ms", on = ["5xx", "connect-failure"] }
//! fault = { delay = { percent = 10, duration = "100ms" }, abort = { percent = 5, status = 503 } }
//! mirror = { service = "payment-shadow", percent = 100 }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

use super::{Checker, Protocol};
use crate::balance::{LbPolicy, OutlierConfig};
use crate::breaker::BreakerConfig;
use crate::retry::{BudgetConfig, RetryOn};

/// Most retries a route may ask for: beyond this, retries only add load.
const MAX_RETRY_ATTEMPTS: u32 = 10;

// ---- checked types -------------------------------------------------------------

/// One route of a service: requests that match go to its weighted backends
/// under its policies. Routes are tried in file order; the first match wins.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    /// For metrics and logs: `name` from the file, else `route-N` (1-based), or
    /// `default` for the route every service has when it lists none.
    pub name: String,
    #[serde(rename = "match")]
    pub matches: RouteMatch,
    /// Never empty; weights sum to more than 0.
    pub backends: Vec<Backend>,
    /// Whole-request deadline, retries included, until the response head.
    #[serde(serialize_with = "ser_opt_duration")]
    pub timeout: Option<Duration>,
    pub retries: RetryPolicy,
    pub fault: Option<Fault>,
    pub mirror: Option<Mirror>,
}

/// What a request must look like for a route to apply; empty matches all.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    /// Upper-case method names; empty means any method.
    pub methods: Vec<String>,
    /// Lower-case header names; every entry must match.
    pub headers: Vec<(String, HeaderMatch)>,
    /// Cookie names; every entry must match a cookie of the request.
    pub cookies: Vec<(String, HeaderMatch)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderMatch {
    Exact(String),
    Regex(Pattern),
    /// `true`: the header must be present; `false`: it must be absent.
    Present(bool),
}

/// A compiled regular expression, anchored at both ends (the whole value
/// must match, as in Envoy and Istio).
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

impl Pattern {
    pub fn new(source: &str) -> Result<Pattern, regex::Error> {
        let regex = regex::Regex::new(&format!("^(?:{source})$"))?;
        Ok(Pattern {
            source: source.to_string(),
            regex,
        })
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.regex.is_match(s)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// Where a share of a route's traffic goes: endpoints of `service` whose
/// labels include all of `subset`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backend {
    pub service: String,
    pub subset: BTreeMap<String, String>,
    pub weight: u32,
}

/// When and how a failed request is tried again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try (Istio's and Envoy's meaning): up to
    /// `attempts + 1` tries in all.
    pub attempts: u32,
    #[serde(serialize_with = "ser_opt_duration")]
    pub per_try_timeout: Option<Duration>,
    pub on: Vec<RetryOn>,
    #[serde(serialize_with = "ser_duration")]
    pub backoff_base: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub backoff_max: Duration,
    /// Retry POST, PATCH… too (after a response or reset, not only when the
    /// request never reached the peer).
    pub non_idempotent: bool,
    /// Request bodies up to this size are kept for replay; a larger body is
    /// streamed and its request is not retried.
    pub max_body_bytes: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            // Two retries of requests that never reached the peer's app
            // (connect failure, refused stream): always safe, and they hide
            // an endpoint that just went away. Like Istio's default, minus
            // retrying 503s, which the app may have meant.
            attempts: 2,
            per_try_timeout: None,
            on: vec![RetryOn::ConnectFailure, RetryOn::RefusedStream],
            // Envoy's defaults: 25 ms doubling, capped at 10× the base.
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            non_idempotent: false,
            // 64 KiB: covers typical JSON/gRPC calls; bigger uploads stream.
            max_body_bytes: 64 << 10,
        }
    }
}

/// Chaos testing: delay and/or abort a share of a route's requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
    /// Only requests with these headers are candidates (targeted experiments).
    pub headers: Vec<(String, HeaderMatch)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDelay {
    pub percent: f64,
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultAbort {
    pub percent: f64,
    /// HTTP status to answer with; TCP streams are reset instead.
    pub status: u16,
}

/// Copy a share of a route's requests to another service, fire-and-forget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mirror {
    pub service: String,
    pub subset: BTreeMap<String, String>,
    pub percent: f64,
    /// Mirrored requests in flight at once per route; more are dropped (and counted).
    pub max_in_flight: usize,
}

/// Per-service resilience settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePolicy {
    pub load_balancer: LbPolicy,
    pub circuit_breaker: BreakerConfig,
    pub outlier_detection: Option<OutlierConfig>,
    pub retry_budget: BudgetConfig,
    /// Opening a stream to a peer (QUIC handshake included) and, on the peer,
    /// connecting to its app.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// A TCP stream with no bytes either way for this long is closed; for
    /// a UDP service, a flow with no datagram either way.
    #[serde(serialize_with = "ser_opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// UDP only: a flow ends once this many reply datagrams reached the
    /// app (DNS: 1), instead of waiting out `idle_timeout`.
    pub replies_per_flow: Option<u32>,
    /// TCP only: the service's protocol tolerates replays, so a stream to a
    /// known peer may start in 0-RTT early data (docs/quic.md). HTTP
    /// services need no setting: safe methods go early, others do not.
    pub early_data: bool,
}

/// The flow idle timeout of a UDP service that sets none: Envoy's UDP
/// proxy default, and inside the 120 s conntrack keeps an answered UDP
/// "connection". A flow that sees no datagram for this long ends.
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for ServicePolicy {
    fn default() -> Self {
        ServicePolicy {
            load_balancer: LbPolicy::default(),
            circuit_breaker: BreakerConfig::default(),
            // Off unless configured (as in Istio): ejection needs thresholds
            // tuned to the service.
            outlier_detection: None,
            retry_budget: BudgetConfig::default(),
            // Envoy's default connect timeout is 5 s too.
            connect_timeout: Duration::from_secs(5),
            // Envoy's TCP proxy default: an hour of silence.
            idle_timeout: Some(Duration::from_secs(3600)),
            // Flows end when idle unless a UDP service says otherwise.
            replies_per_flow: None,
            // A TCP stream's bytes may not be safe to replay: opt in.
            early_data: false,
        }
    }
}

impl Route {
    /// The route of a service that lists none: everything to all endpoints.
    pub fn default_for(service: &str) -> Route {
        Route {
            name: "default".into(),
            matches: RouteMatch::default(),
            backends: vec![Backend {
                service: service.to_string(),
                subset: BTreeMap::new(),
                weight: 1,
            }],
            timeout: None,
            retries: RetryPolicy::default(),
            fault: None,
            mirror: None,
        }
    }
}

pub(crate) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

// ---- raw shapes ------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default, rename = "match")]
    matches: Option<Spanned<RawMatch>>,
    // Default: the whole service, so a route may only set policies.
    #[serde(default)]
    backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    retries: Option<Spanned<RawRetries>>,
    #[serde(default)]
    fault: Option<Spanned<RawFault>>,
    #[serde(default)]
    mirror: Option<Spanned<RawMirror>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    path: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    path_regex: Option<Spanned<String>>,
    method: Option<Spanned<String>>,
    methods: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    headers: BTreeMap<Spanned<String>, Spanned<RawHeaderMatch>>,
    #[serde(default)]
    cookies: BTreeMap<Spanned<String>, Spanned<RawHeaderMatch>>,
}

/// `"value"` (exact), `true`/`false` (present/absent), or a table with one
/// of `exact`, `regex`, `present`.
enum RawHeaderMatch {
    Exact(String),
    Regex(String),
    Present(bool),
}

impl<'de> Deserialize<'de> for RawHeaderMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(HeaderMatchVisitor)
    }
}

struct HeaderMatchVisitor;

impl<'de> Visitor<'de> for HeaderMatchVisitor {
    type Value = RawHeaderMatch;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a header match: a string (exact value), true/false (present/absent), \
             or a table with one of exact = \"…\", regex = \"…\", present = true",
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawHeaderMatch, E> {
        Ok(RawHeaderMatch::Exact(v.to_string()))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawHeaderMatch, E> {
        Ok(RawHeaderMatch::Present(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeaderMatch, A::Error> {
        const FIELDS: &[&str] = &["exact", "regex", "present"];
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            let m = match key.as_str() {
                "exact" => RawHeaderMatch::Exact(map.next_value()?),
                "regex" => RawHeaderMatch::Regex(map.next_value()?),
                "present" => RawHeaderMatch::Present(map.next_value()?),
                other => return Err(de::Error::unknown_field(other, FIELDS)),
            };
            if found.replace(m).is_some() {
                return Err(de::Error::custom(
                    "a header match takes exactly one of exact, regex, present",
                ));
            }
        }
        found.ok_or_else(|| de::Error::custom("empty header match: give exact, regex or present"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    service: Option<Spanned<String>>,
    #[serde(default)]
    subset: BTreeMap<Spanned<String>, Spanned<String>>,
    // Default 1: equal shares when no weights are given.
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetries {
    attempts: Option<u32>,
    per_try_timeout: Option<Spanned<String>>,
    on: Option<Vec<Spanned<RawRetryOn>>>,
    backoff_base: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
    non_idempotent: Option<bool>,
    max_body_bytes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawRetryOn {
    Name(String),
    Code(i64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    delay: Option<Spanned<RawDelay>>,
    abort: Option<Spanned<RawAbort>>,
    #[serde(default)]
    headers: BTreeMap<Spanned<String>, Spanned<RawHeaderMatch>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelay {
    percent: Spanned<f64>,
    duration: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAbort {
    percent: Spanned<f64>,
    status: Option<Spanned<u16>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    service: Option<Spanned<String>>,
    #[serde(default)]
    subset: BTreeMap<Spanned<String>, Spanned<String>>,
    // Default: mirror everything; a shadow deployment usually wants it all.
    #[serde(default = "hundred")]
    percent: Spanned<f64>,
    max_in_flight: Option<usize>,
}

fn hundred() -> Spanned<f64> {
    Spanned::new(0..0, 100.0)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCircuitBreaker {
    max_requests: Option<Spanned<usize>>,
    max_pending: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutlier {
    consecutive_5xx: Option<u32>,
    consecutive_gateway_errors: Option<u32>,
    consecutive_connect_failures: Option<u32>,
    base_ejection_time: Option<Spanned<String>>,
    max_ejection_time: Option<Spanned<String>>,
    max_ejection_percent: Option<Spanned<u8>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    ratio: Option<Spanned<f64>>,
    min_per_second: Option<u32>,
    ttl: Option<Spanned<String>>,
}

/// The policy fields of a raw service (serde cannot flatten them into
/// `RawService` and still deny unknown fields, so they are copied here).
#[derive(Default)]
pub(super) struct RawServicePolicy {
    pub routes: Option<Vec<Spanned<RawRoute>>>,
    pub circuit_breaker: Option<Spanned<RawCircuitBreaker>>,
    pub outlier_detection: Option<Spanned<RawOutlier>>,
    pub load_balancer: Option<Spanned<String>>,
    pub retry_budget: Option<Spanned<RawBudget>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub replies_per_flow: Option<Spanned<u32>>,
    pub early_data: Option<Spanned<bool>>,
}

/// A reference from one service to another (backend or mirror), checked
/// once every service is known.
pub(super) struct Reference {
    pub from: String,
    pub span: Range<usize>,
    pub target: String,
    pub subset: BTreeMap<String, String>,
    pub protocol: Protocol,
    pub what: &'static str,
}

// ---- checking ------------------------------------------------------------------

impl Checker<'_> {
    fn duration(&mut self, ctx: &str, field: &str, raw: &Spanned<String>) -> Option<Duration> {
        match humantime::parse_duration(raw.get_ref()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.error(
                    Some(raw.span()),
                    format!("{ctx}: {field} must be more than 0; leave it out for no limit"),
                );
                None
            }
            Err(e) => {
                self.error(
                    Some(raw.span()),
                    format!(
                        "{ctx}: {field} {:?} is not a duration ({e}); write e.g. \"500ms\", \"2s\" or \"1m\"",
                        raw.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn percent(&mut self, ctx: &str, field: &str, raw: &Spanned<f64>) -> f64 {
        let p = *raw.get_ref();
        if !(0.0..=100.0).contains(&p) {
            self.error(
                Some(raw.span()),
                format!("{ctx}: {field} is {p}; use a percentage from 0 to 100"),
            );
        }
        p.clamp(0.0, 100.0)
    }

    fn pattern(&mut self, ctx: &str, span: Range<usize>, source: &str) -> Option<Pattern> {
        match Pattern::new(source) {
            Ok(p) => Some(p),
            Err(e) => {
                let e = e.to_string().replace('\n', " ");
                self.error(
                    Some(span),
                    format!("{ctx}: {source:?} is not a valid regular expression: {e}"),
                );
                None
            }
        }
    }

    fn header_matches(
        &mut self,
        ctx: &str,
        raw: BTreeMap<Spanned<String>, Spanned<RawHeaderMatch>>,
        lowercase: bool,
    ) -> Vec<(String, HeaderMatch)> {
        let mut out = Vec::new();
        for (name, m) in raw {
            let key = if lowercase {
                name.get_ref().to_ascii_lowercase()
            } else {
                name.get_ref().clone()
            };
            if lowercase && http::HeaderName::from_bytes(key.as_bytes()).is_err() {
                self.error(
                    Some(name.span()),
                    format!("{ctx}: {:?} is not a valid header name", name.get_ref()),
                );
                continue;
            }
            let span = m.span();
            let m = match m.into_inner() {
                RawHeaderMatch::Exact(v) => HeaderMatch::Exact(v),
                RawHeaderMatch::Present(b) => HeaderMatch::Present(b),
                RawHeaderMatch::Regex(r) => match self.pattern(ctx, span, &r) {
                    Some(p) => HeaderMatch::Regex(p),
                    None => continue,
                },
            };
            out.push((key, m));
        }
        out
    }

    fn route_match(&mut self, ctx: &str, raw: Spanned<RawMatch>) -> RouteMatch {
        let span = raw.span();
        let raw = raw.into_inner();
        let mut paths = Vec::new();
        if let Some(p) = raw.path {
            paths.push((p.span(), PathMatch::Exact(p.into_inner())));
        }
        if let Some(p) = raw.path_prefix {
            paths.push((p.span(), PathMatch::Prefix(p.into_inner())));
        }
        if let Some(p) = raw.path_regex {
            if let Some(pat) = self.pattern(ctx, p.span(), p.get_ref()) {
                paths.push((p.span(), PathMatch::Regex(pat)));
            }
        }
        if paths.len() > 1 {
            self.error(
                Some(span),
                format!("{ctx}: give at most one of path, path_prefix, path_regex"),
            );
        }
        for (span, p) in &paths {
            if let PathMatch::Exact(s) | PathMatch::Prefix(s) = p {
                if !s.starts_with('/') {
                    self.error(
                        Some(span.clone()),
                        format!("{ctx}: path {s:?} must start with '/'"),
                    );
                }
            }
        }
        let mut methods = Vec::new();
        for m in raw
            .method
            .into_iter()
            .chain(raw.methods.into_iter().flatten())
        {
            let upper = m.get_ref().to_ascii_uppercase();
            if http::Method::from_bytes(upper.as_bytes()).is_err() || upper.is_empty() {
                self.error(
                    Some(m.span()),
                    format!("{ctx}: {:?} is not an HTTP method", m.get_ref()),
                );
            }
            methods.push(upper);
        }
        RouteMatch {
            path: paths.into_iter().next().map(|(_, p)| p),
            methods,
            headers: self.header_matches(ctx, raw.headers, true),
            cookies: self.header_matches(ctx, raw.cookies, false),
        }
    }

    fn retries(&mut self, ctx: &str, raw: RawRetries) -> RetryPolicy {
        let d = RetryPolicy::default();
        let on_given = raw.on.is_some();
        let attempts = raw.attempts.unwrap_or(d.attempts);
        if attempts > MAX_RETRY_ATTEMPTS {
            self.error(
                None,
                format!("{ctx}: retries.attempts is {attempts}; at most {MAX_RETRY_ATTEMPTS}"),
            );
        }
        let mut on = Vec::new();
        for item in raw.on.unwrap_or_default() {
            let text = match item.get_ref() {
                RawRetryOn::Name(s) => s.clone(),
                RawRetryOn::Code(c) => c.to_string(),
            };
            match text.parse::<RetryOn>() {
                Ok(r) => on.push(r),
                Err(e) => self.error(Some(item.span()), format!("{ctx}: retries.on: {e}")),
            }
        }
        let mut dur = |field: &str, raw: &Option<Spanned<String>>| {
            raw.as_ref().and_then(|r| self.duration(ctx, field, r))
        };
        let per_try_timeout = dur("retries.per_try_timeout", &raw.per_try_timeout);
        let backoff_base = dur("retries.backoff_base", &raw.backoff_base).unwrap_or(d.backoff_base);
        let backoff_max =
            dur("retries.backoff_max", &raw.backoff_max).unwrap_or(d.backoff_max.max(backoff_base));
        RetryPolicy {
            attempts: attempts.min(MAX_RETRY_ATTEMPTS),
            per_try_timeout,
            on: if on_given { on } else { d.on },
            backoff_base,
            backoff_max: backoff_max.max(backoff_base),
            non_idempotent: raw.non_idempotent.unwrap_or(d.non_idempotent),
            max_body_bytes: raw.max_body_bytes.unwrap_or(d.max_body_bytes),
        }
    }

    fn fault(&mut self, ctx: &str, protocol: Protocol, raw: Spanned<RawFault>) -> Fault {
        let span = raw.span();
        let raw = raw.into_inner();
        let delay = raw.delay.map(|d| {
            let d = d.into_inner();
            FaultDelay {
                percent: self.percent(ctx, "fault.delay.percent", &d.percent),
                duration: self
                    .duration(ctx, "fault.delay.duration", &d.duration)
                    .unwrap_or_default(),
            }
        });
        let abort = raw.abort.map(|a| {
            let a = a.into_inner();
            let status = match (&a.status, protocol) {
                (Some(s), Protocol::Tcp | Protocol::Udp) => {
                    self.error(
                        Some(s.span()),
                        format!("{ctx}: fault.abort.status has no meaning for a TCP service (aborted streams are reset); remove it"),
                    );
                    0
                }
                (Some(s), Protocol::Http) => {
                    let v = *s.get_ref();
                    if !(200..=599).contains(&v) {
                        self.error(
                            Some(s.span()),
                            format!("{ctx}: fault.abort.status {v} is not an HTTP status from 200 to 599"),
                        );
                    }
                    v
                }
                (None, Protocol::Http) => {
                    self.error(
                        Some(a.percent.span()),
                        format!("{ctx}: fault.abort needs a status for an HTTP service, e.g. status = 503"),
                    );
                    503
                }
                (None, Protocol::Tcp | Protocol::Udp) => 0,
            };
            FaultAbort {
                percent: self.percent(ctx, "fault.abort.percent", &a.percent),
                status,
            }
        });
        if delay.is_none() && abort.is_none() {
            self.error(
                Some(span.clone()),
                format!("{ctx}: fault needs a delay or an abort (or both)"),
            );
        }
        if protocol == Protocol::Tcp && !raw.headers.is_empty() {
            self.error(
                Some(span.clone()),
                format!("{ctx}: fault.headers needs HTTP; a TCP stream has no headers"),
            );
        }
        Fault {
            delay,
            abort,
            headers: self.header_matches(ctx, raw.headers, true),
        }
    }

    fn subset(
        &mut self,
        service: &str,
        raw: BTreeMap<Spanned<String>, Spanned<String>>,
    ) -> BTreeMap<String, String> {
        self.labels(service, raw)
    }

    /// Check the routes and policies of service `name`.
    pub(super) fn policy(
        &mut self,
        name: &str,
        name_span: Range<usize>,
        protocol: Protocol,
        mut raw: RawServicePolicy,
        refs: &mut Vec<Reference>,
    ) -> (Vec<Route>, ServicePolicy) {
        let mut routes = Vec::new();
        let raw_routes = raw.routes.take().unwrap_or_default();
        if let Some(e) = raw
            .early_data
            .as_ref()
            .filter(|_| protocol != Protocol::Tcp)
        {
            let why = if protocol == Protocol::Http {
                "HTTP requests go as 0-RTT early data by method (GET, HEAD, OPTIONS, TRACE)"
            } else {
                "datagrams are never sent as early data"
            };
            self.error(
                Some(e.span()),
                format!("service {name:?}: early_data is for TCP services ({why}); remove it"),
            );
        }
        if protocol == Protocol::Udp {
            self.udp_only_fields(name, &raw, raw_routes.first().map(|r| r.span()));
            // Checked above: a UDP service takes no routes (its flows go to
            // the whole service), so none are looked at further.
            let policy = self.service_policy(name, protocol, raw);
            return (vec![Route::default_for(name)], policy);
        }
        if let Some(r) = &raw.replies_per_flow {
            self.error(
                Some(r.span()),
                format!("service {name:?}: replies_per_flow is for UDP services; remove it"),
            );
        }
        if protocol == Protocol::Tcp && raw_routes.len() > 1 {
            self.error(
                Some(raw_routes[1].span()),
                format!("service {name:?} is TCP: it takes one route (backends and fault), since a TCP stream has nothing to match on"),
            );
        }
        for (i, r) in raw_routes.into_iter().enumerate() {
            let route_span = r.span();
            let r = r.into_inner();
            let route_name = match &r.name {
                Some(n) => n.get_ref().clone(),
                None => format!("route-{}", i + 1),
            };
            if let Some(n) = &r.name {
                if let Err(why) = super::check_label(n.get_ref()) {
                    self.error(
                        Some(n.span()),
                        format!(
                            "service {name:?}: route name {:?} is not valid: {why}",
                            n.get_ref()
                        ),
                    );
                }
            }
            let ctx = format!("service {name:?} route {route_name:?}");
            if protocol == Protocol::Tcp {
                let http_only = [
                    ("match", r.matches.as_ref().map(|m| m.span())),
                    ("timeout", r.timeout.as_ref().map(|m| m.span())),
                    ("retries", r.retries.as_ref().map(|m| m.span())),
                    ("mirror", r.mirror.as_ref().map(|m| m.span())),
                ];
                for (field, span) in http_only {
                    if let Some(span) = span {
                        self.error(
                            Some(span),
                            format!("{ctx}: {field} needs HTTP; service {name:?} is TCP (use connect_timeout/idle_timeout on the service)"),
                        );
                    }
                }
            }
            let matches = r
                .matches
                .map(|m| self.route_match(&ctx, m))
                .unwrap_or_default();
            let mut backends = Vec::new();
            match r.backends {
                Some(list) => {
                    if list.get_ref().is_empty() {
                        self.error(
                            Some(list.span()),
                            format!(
                                "{ctx}: backends is empty; leave it out to use the whole service"
                            ),
                        );
                    }
                    for b in list.into_inner() {
                        let span = b.span();
                        let b = b.into_inner();
                        let target = b
                            .service
                            .map(|s| s.into_inner())
                            .unwrap_or_else(|| name.to_string());
                        let subset = self.subset(name, b.subset);
                        refs.push(Reference {
                            from: name.to_string(),
                            span,
                            target: target.clone(),
                            subset: subset.clone(),
                            protocol,
                            what: "backend",
                        });
                        backends.push(Backend {
                            service: target,
                            subset,
                            weight: b.weight,
                        });
                    }
                    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
                        self.error(Some(route_span.clone()), format!("{ctx}: every backend has weight 0; give at least one a weight above 0"));
                    }
                }
                None => backends = Route::default_for(name).backends,
            }
            let timeout = r
                .timeout
                .as_ref()
                .and_then(|t| self.duration(&ctx, "timeout", t));
            let retries = r
                .retries
                .map(|x| self.retries(&ctx, x.into_inner()))
                .unwrap_or_default();
            let fault = r.fault.map(|f| self.fault(&ctx, protocol, f));
            let mirror = r.mirror.map(|m| {
                let span = m.span();
                let m = m.into_inner();
                let target = match m.service {
                    Some(s) => s.into_inner(),
                    None => {
                        self.error(Some(span.clone()), format!("{ctx}: mirror needs a service, e.g. mirror = {{ service = \"payment-shadow\" }}"));
                        String::new()
                    }
                };
                let subset = self.subset(name, m.subset);
                if !target.is_empty() {
                    refs.push(Reference {
                        from: name.to_string(),
                        span,
                        target: target.clone(),
                        subset: subset.clone(),
                        protocol: Protocol::Http,
                        what: "mirror",
                    });
                }
                Mirror {
                    service: target,
                    subset,
                    percent: self.percent(&ctx, "mirror.percent", &m.percent),
                    // 100 in flight: enough for a shadow at a few thousand
                    // req/s with fast answers, and a bound on the memory a
                    // slow or dead mirror can hold.
                    max_in_flight: m.max_in_flight.unwrap_or(100),
                }
            });
            routes.push(Route {
                name: route_name,
                matches,
                backends,
                timeout,
                retries,
                fault,
                mirror,
            });
        }
        let mut names = BTreeMap::new();
        for r in &routes {
            if names.insert(r.name.clone(), ()).is_some() {
                self.error(
                    Some(name_span.clone()),
                    format!(
                        "service {name:?}: two routes are named {:?}; route names must differ",
                        r.name
                    ),
                );
            }
        }
        if routes.is_empty() {
            routes.push(Route::default_for(name));
        }
        let policy = self.service_policy(name, protocol, raw);
        (routes, policy)
    }

    /// A UDP service's flows go to the whole service, one endpoint per flow
    /// chosen by the load balancer: nothing to route on, no response to
    /// retry or judge. Refuse the policies that cannot apply.
    fn udp_only_fields(
        &mut self,
        name: &str,
        raw: &RawServicePolicy,
        first_route: Option<Range<usize>>,
    ) {
        let why = "a UDP flow has no requests or responses to match, retry or judge";
        let refused = [
            ("routes", first_route, "its flows go to the whole service"),
            (
                "retry_budget",
                raw.retry_budget.as_ref().map(|r| r.span()),
                "flows are not retried",
            ),
            (
                "outlier_detection",
                raw.outlier_detection.as_ref().map(|r| r.span()),
                "there are no responses to judge an endpoint by",
            ),
        ];
        for (field, span, what) in refused {
            if let Some(span) = span {
                self.error(
                    Some(span),
                    format!(
                        "service {name:?} is UDP: {field} does not apply ({what}; {why}); remove it"
                    ),
                );
            }
        }
        if let Some(t) = &raw.idle_timeout {
            if t.get_ref() == "none" {
                self.error(
                    Some(t.span()),
                    format!(
                        "service {name:?} is UDP: idle_timeout cannot be \"none\", since a \
                         flow ends only when idle; give a duration (default 60s)"
                    ),
                );
            }
        }
        if let Some(r) = &raw.replies_per_flow {
            if *r.get_ref() == 0 {
                self.error(
                    Some(r.span()),
                    format!(
                        "service {name:?}: replies_per_flow must be at least 1; leave it out \
                         to end flows only when idle"
                    ),
                );
            }
        }
    }

    fn service_policy(
        &mut self,
        name: &str,
        protocol: Protocol,
        raw: RawServicePolicy,
    ) -> ServicePolicy {
        let ctx = format!("service {name:?}");
        let mut d = ServicePolicy::default();
        if protocol == Protocol::Udp {
            d.idle_timeout = Some(UDP_IDLE_TIMEOUT);
        }
        let load_balancer = match raw.load_balancer {
            None => d.load_balancer,
            Some(lb) => match lb.get_ref().parse::<LbPolicy>() {
                Ok(p) => p,
                Err(e) => {
                    self.error(Some(lb.span()), format!("{ctx}: load_balancer: {e}"));
                    d.load_balancer
                }
            },
        };
        let mut circuit_breaker = d.circuit_breaker;
        if let Some(cb) = raw.circuit_breaker {
            let cb = cb.into_inner();
            if let Some(m) = cb.max_requests {
                if *m.get_ref() == 0 {
                    self.error(
                        Some(m.span()),
                        format!("{ctx}: circuit_breaker.max_requests must be at least 1"),
                    );
                }
                circuit_breaker.max_requests = (*m.get_ref()).max(1);
            }
            if let Some(p) = cb.max_pending {
                circuit_breaker.max_pending = p;
            }
        }
        let outlier_detection = raw.outlier_detection.map(|o| {
            let span = o.span();
            let o = o.into_inner();
            let base = o
                .base_ejection_time
                .as_ref()
                .and_then(|t| self.duration(&ctx, "outlier_detection.base_ejection_time", t))
                // Envoy's and Istio's default.
                .unwrap_or(Duration::from_secs(30));
            let max = o
                .max_ejection_time
                .as_ref()
                .and_then(|t| self.duration(&ctx, "outlier_detection.max_ejection_time", t))
                // Envoy's default: however often an endpoint fails, it is tried again within 5 minutes.
                .unwrap_or(Duration::from_secs(300))
                .max(base);
            let pct = match o.max_ejection_percent {
                Some(p) => {
                    if *p.get_ref() > 100 {
                        self.error(Some(p.span()), format!("{ctx}: outlier_detection.max_ejection_percent is {}; use 0 to 100", p.get_ref()));
                    }
                    (*p.get_ref()).min(100)
                }
                // Half the endpoints: enough to route around a bad canary,
                // never so many that the rest are overloaded.
                None => 50,
            };
            let any = o.consecutive_5xx.is_some()
                || o.consecutive_gateway_errors.is_some()
                || o.consecutive_connect_failures.is_some();
            for (f, v) in [("consecutive_5xx", o.consecutive_5xx), ("consecutive_gateway_errors", o.consecutive_gateway_errors), ("consecutive_connect_failures", o.consecutive_connect_failures)] {
                if v == Some(0) {
                    self.error(Some(span.clone()), format!("{ctx}: outlier_detection.{f} must be at least 1; leave it out to disable"));
                }
            }
            OutlierConfig {
                // Envoy's default when no threshold is named.
                consecutive_5xx: if any { o.consecutive_5xx } else { Some(5) },
                consecutive_gateway_errors: o.consecutive_gateway_errors,
                consecutive_connect_failures: o.consecutive_connect_failures,
                base_ejection_time: base,
                max_ejection_time: max,
                max_ejection_percent: pct,
            }
        });
        let mut retry_budget = d.retry_budget;
        if let Some(b) = raw.retry_budget {
            let b = b.into_inner();
            if let Some(r) = b.ratio {
                let v = *r.get_ref();
                if !(0.0..=10.0).contains(&v) {
                    self.error(Some(r.span()), format!("{ctx}: retry_budget.ratio is {v}; use 0 to 10 (0.2 = retries may add 20 % to the load)"));
                }
                retry_budget.ratio = v.clamp(0.0, 10.0);
            }
            if let Some(m) = b.min_per_second {
                retry_budget.min_per_second = m;
            }
            if let Some(t) = b
                .ttl
                .as_ref()
                .and_then(|t| self.duration(&ctx, "retry_budget.ttl", t))
            {
                retry_budget.ttl = t;
            }
        }
        let connect_timeout = raw
            .connect_timeout
            .as_ref()
            .and_then(|t| self.duration(&ctx, "connect_timeout", t))
            .unwrap_or(d.connect_timeout);
        let idle_timeout = match &raw.idle_timeout {
            None => d.idle_timeout,
            // Refused for UDP (udp_only_fields); keep the default there.
            Some(t) if t.get_ref() == "none" && protocol == Protocol::Udp => d.idle_timeout,
            Some(t) if t.get_ref() == "none" => None,
            Some(t) => self.duration(&ctx, "idle_timeout", t).or(d.idle_timeout),
        };
        ServicePolicy {
            load_balancer,
            circuit_breaker,
            outlier_detection,
            retry_budget,
            connect_timeout,
            idle_timeout,
            replies_per_flow: raw
                .replies_per_flow
                .map(|r| r.into_inner())
                .filter(|r| *r > 0 && protocol == Protocol::Udp),
            early_data: raw.early_data.is_some_and(|e| *e.get_ref()) && protocol == Protocol::Tcp,
        }
    }

    /// Check that every backend and mirror names a known service of the
    /// right protocol and that its subset selects at least one endpoint.
    pub(super) fn references(
        &mut self,
        services: &BTreeMap<String, super::Service>,
        refs: Vec<Reference>,
    ) {
        for r in refs {
            let Some(target) = services.get(&r.target) else {
                self.error(Some(r.span), format!("service {:?}: {} service {:?} is not in the mesh file; add it or fix the name", r.from, r.what, r.target));
                continue;
            };
            if target.protocol != r.protocol {
                self.error(
                    Some(r.span),
                    format!(
                        "service {:?}: {} service {:?} is {:?}, not {:?}",
                        r.from, r.what, r.target, target.protocol, r.protocol
                    ),
                );
                continue;
            }
            if !target.endpoints.is_empty()
                && !target
                    .endpoints
                    .iter()
                    .any(|e| super::in_subset(e, &r.subset))
            {
                self.error(Some(r.span), format!("service {:?}: {} subset {:?} of service {:?} selects no endpoint; label an endpoint with it or fix the subset", r.from, r.what, r.subset, r.target));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Mesh, MeshError, MeshErrors};

    /// The issue's example, with the services it names.
    const EXAMPLE: &str = r#"trust_domain = "td"
[services.payment]
endpoints = [{ addr = "127.0.0.1:1", labels = { version = "v1" } }, { addr = "127.0.0.1:2", labels = { version = "v2" } }]
[services.payment-shadow]
endpoints = ["127.0.0.1:3"]
[[services.payment.routes]]
match = { headers = { "x-canary" = "1" }, path_prefix = "/" }
backends = [ { subset = { version = "v2" }, weight = 100 } ]
[[services.payment.routes]]
backends = [ { subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 } ]
timeout = "2s"
retries = { attempts = 3, per_try_timeout = "500ms", on = ["5xx", "connect-failure", 409] }
fault = { delay = { percent = 10, duration = "100ms" }, abort = { percent = 5, status = 503 } }
mirror = { service = "payment-shadow", percent = 100 }
[services.payment.circuit_breaker]
max_requests = 1000
max_pending = 100
[services.payment.outlier_detection]
consecutive_5xx = 5
base_ejection_time = "30s"
max_ejection_percent = 50
"#;

    fn errors(text: &str) -> Vec<MeshError> {
        match Mesh::parse(text, "mesh.toml") {
            Ok(m) => panic!("expected errors, got {m:#?}"),
            Err(MeshErrors(e)) => e,
        }
    }

    fn base(extra: &str) -> String {
        format!(
            "trust_domain = \"td\"\n[services.p]\nendpoints = [{{ addr = \"127.0.0.1:1\", labels = {{ v = \"1\" }} }}]\n[services.t]\nprotocol = \"tcp\"\nendpoints = [\"127.0.0.1:2\"]\n{extra}"
        )
    }

    #[test]
    fn parses_the_issue_example() {
        let mesh = Mesh::parse(EXAMPLE, "m").unwrap_or_else(|e| panic!("{e}"));
        let p = mesh.service("payment").unwrap();
        assert_eq!(p.routes.len(), 2);
        let canary = &p.routes[0];
        assert_eq!(canary.name, "route-1");
        assert_eq!(
            canary.matches.headers,
            [("x-canary".to_string(), HeaderMatch::Exact("1".into()))]
        );
        assert_eq!(canary.matches.path, Some(PathMatch::Prefix("/".into())));
        assert_eq!(canary.retries, RetryPolicy::default());
        let split = &p.routes[1];
        assert_eq!(
            split.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [90, 10]
        );
        assert!(split.backends.iter().all(|b| b.service == "payment"));
        assert_eq!(split.timeout, Some(Duration::from_secs(2)));
        assert_eq!(split.retries.attempts, 3);
        assert_eq!(
            split.retries.per_try_timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            split.retries.on,
            [
                RetryOn::Status5xx,
                RetryOn::ConnectFailure,
                RetryOn::Status(409)
            ]
        );
        let fault = split.fault.as_ref().unwrap();
        assert_eq!(
            fault.delay.as_ref().unwrap().duration,
            Duration::from_millis(100)
        );
        assert_eq!(fault.abort.as_ref().unwrap().status, 503);
        assert_eq!(split.mirror.as_ref().unwrap().service, "payment-shadow");
        assert_eq!(p.policy.circuit_breaker.max_requests, 1000);
        assert_eq!(p.policy.circuit_breaker.max_pending, 100);
        let od = p.policy.outlier_detection.as_ref().unwrap();
        assert_eq!(od.consecutive_5xx, Some(5));
        assert_eq!(od.base_ejection_time, Duration::from_secs(30));
        // A service without routes gets the default route.
        let shadow = mesh.service("payment-shadow").unwrap();
        assert_eq!(shadow.routes, [Route::default_for("payment-shadow")]);
        // /config shows durations as people write them.
        let json = serde_json::to_value(&mesh).unwrap();
        assert_eq!(json["services"]["payment"]["routes"][1]["timeout"], "2s");
        assert_eq!(
            json["services"]["payment"]["routes"][1]["retries"]["on"][2],
            "409"
        );
        assert_eq!(json["services"]["payment"]["load_balancer"], "p2c-ewma");
    }

    #[test]
    fn every_policy_error_is_reported_with_its_line() {
        let text = base(
            r#"[[services.p.routes]]
timeout = "soon"
[[services.p.routes]]
match = { path_regex = "(" }
[[services.p.routes]]
backends = [{ service = "nope" }]
[[services.p.routes]]
backends = [{ subset = { v = "9" } }]
[[services.p.routes]]
fault = { abort = { percent = 150 } }
[[services.p.routes]]
retries = { on = ["sometimes"] }
[[services.t.routes]]
match = { path = "/x" }
"#,
        );
        let errors = errors(&text);
        let lines: Vec<_> = errors.iter().map(|e| e.line.unwrap_or(0)).collect();
        let msgs: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(lines, [8, 10, 12, 14, 16, 16, 18, 20], "{msgs:#?}");
        assert!(
            msgs[0].contains("\"soon\" is not a duration"),
            "{}",
            msgs[0]
        );
        assert!(
            msgs[1].contains("not a valid regular expression"),
            "{}",
            msgs[1]
        );
        assert!(
            msgs[2].contains("backend service \"nope\" is not in the mesh"),
            "{}",
            msgs[2]
        );
        assert!(msgs[3].contains("selects no endpoint"), "{}", msgs[3]);
        assert!(
            msgs[4..6].iter().any(|m| m.contains("needs a status")),
            "{msgs:?}"
        );
        assert!(
            msgs[4..6]
                .iter()
                .any(|m| m.contains("percentage from 0 to 100")),
            "{msgs:?}"
        );
        assert!(msgs[6].contains("sometimes"), "{}", msgs[6]);
        assert!(msgs[7].contains("match needs HTTP"), "{}", msgs[7]);
    }

    #[test]
    fn service_policy_defaults_and_errors() {
        let mesh = Mesh::parse(&base(""), "m").unwrap();
        let p = &mesh.service("p").unwrap().policy;
        assert_eq!(p, &ServicePolicy::default());
        assert!(p.outlier_detection.is_none());
        let text = base(
            "[services.p.outlier_detection]\nmax_ejection_percent = 101\n[services.p.circuit_breaker]\nmax_requests = 0\n",
        );
        let e = errors(&text);
        assert_eq!(
            e.iter().map(|e| e.line).collect::<Vec<_>>(),
            [Some(8), Some(10)],
            "{e:#?}"
        );
        // An outlier table without thresholds means Envoy's default of 5.
        let mesh = Mesh::parse(&base("[services.p.outlier_detection]\n"), "m").unwrap();
        let od = mesh
            .service("p")
            .unwrap()
            .policy
            .outlier_detection
            .clone()
            .unwrap();
        assert_eq!(od.consecutive_5xx, Some(5));
        assert_eq!(od.max_ejection_percent, 50);
        let e =
            errors(&base("").replace("[services.t]", "load_balancer = \"random\"\n[services.t]"));
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].message.contains("load_balancer"), "{e:#?}");
        assert!(
            e[0].message.contains("least-request"),
            "lists the valid names: {e:#?}"
        );
    }

    #[test]
    fn tcp_service_takes_one_route_with_backends_and_fault() {
        let text = r#"trust_domain = "td"
[services.t]
protocol = "tcp"
endpoints = ["127.0.0.1:2"]
connect_timeout = "2s"
idle_timeout = "none"
[[services.t.routes]]
fault = { abort = { percent = 5 }, delay = { percent = 1, duration = "1s" } }
"#;
        let mesh = Mesh::parse(text, "m").unwrap_or_else(|e| panic!("{e}"));
        let t = mesh.service("t").unwrap();
        assert_eq!(t.policy.connect_timeout, Duration::from_secs(2));
        assert_eq!(t.policy.idle_timeout, None);
        let abort = t.routes[0].fault.as_ref().unwrap().abort.as_ref().unwrap();
        assert_eq!((abort.percent, abort.status), (5.0, 0));
        // A status means nothing to TCP, and a second route could never match.
        let e = errors(&base(
            "[[services.t.routes]]\nfault = { abort = { percent = 5, status = 503 } }\n[[services.t.routes]]\n",
        ));
        assert_eq!(e.len(), 2, "{e:#?}");
    }

    #[test]
    fn udp_service_defaults_and_settings() {
        let text = r#"trust_domain = "td"
[services.dns]
protocol = "udp"
port = 5353
endpoints = ["127.0.0.1:2", "127.0.0.1:3"]
load_balancer = "round-robin"
connect_timeout = "2s"
replies_per_flow = 1
circuit_breaker = { max_requests = 500 }
authorization = { allow = ["spiffe://td/ns/a/sa/b"] }
[services.ntp]
protocol = "udp"
endpoints = ["127.0.0.1:4"]
idle_timeout = "5s"
"#;
        let mesh = Mesh::parse(text, "m").unwrap_or_else(|e| panic!("{e}"));
        let dns = mesh.service("dns").unwrap();
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.port, 5353);
        assert_eq!(dns.policy.idle_timeout, Some(UDP_IDLE_TIMEOUT));
        assert_eq!(dns.policy.replies_per_flow, Some(1));
        assert_eq!(dns.policy.load_balancer, LbPolicy::RoundRobin);
        assert_eq!(dns.policy.circuit_breaker.max_requests, 500);
        assert!(dns.authorization.is_some());
        assert_eq!(dns.routes, vec![Route::default_for("dns")]);
        let ntp = mesh.service("ntp").unwrap();
        assert_eq!(ntp.policy.idle_timeout, Some(Duration::from_secs(5)));
        assert_eq!(ntp.policy.replies_per_flow, None);
        let json = serde_json::to_value(&mesh).unwrap();
        assert_eq!(json["services"]["dns"]["protocol"], "udp");
        assert_eq!(json["services"]["dns"]["replies_per_flow"], 1);
    }

    #[test]
    fn udp_service_refuses_what_does_not_apply() {
        let text = r#"trust_domain = "td"
[services.dns]
protocol = "udp"
endpoints = ["127.0.0.1:2"]
idle_timeout = "none"
replies_per_flow = 0
addresses = ["10.96.0.10:53"]
retry_budget = { ratio = 0.1 }
outlier_detection = { consecutive_5xx = 1 }
[[services.dns.routes]]
retries = { attempts = 2 }
[services.web]
endpoints = ["127.0.0.1:3"]
replies_per_flow = 1
early_data = true
"#;
        let e = errors(text);
        let got: Vec<(Option<usize>, &str)> =
            e.iter().map(|e| (e.line, e.message.as_str())).collect();
        let has = |line: usize, part: &str| {
            assert!(
                got.iter()
                    .any(|(l, m)| *l == Some(line) && m.contains(part)),
                "line {line}: {part:?} in {got:#?}"
            )
        };
        has(5, "idle_timeout cannot be \"none\"");
        has(6, "replies_per_flow must be at least 1");
        has(7, "is UDP: addresses are for intercepted TCP connections");
        has(8, "is UDP: retry_budget does not apply");
        has(9, "is UDP: outlier_detection does not apply");
        has(10, "is UDP: routes does not apply");
        has(14, "replies_per_flow is for UDP services");
        has(15, "early_data is for TCP services (HTTP requests go");
        assert_eq!(e.len(), 8, "{e:#?}");
        // A TCP route cannot send its streams to a UDP service.
        let e = errors(
            "trust_domain = \"td\"\n[services.dns]\nprotocol = \"udp\"\nendpoints = [\"127.0.0.1:2\"]\n\
             [services.t]\nprotocol = \"tcp\"\nendpoints = [\"127.0.0.1:3\"]\n\
             [[services.t.routes]]\nbackends = [{ service = \"dns\" }]\n",
        );
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].message.contains("is Udp, not Tcp"), "{e:#?}");
    }
}
