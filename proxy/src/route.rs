//! Per-request decisions that need no I/O: which route a request takes,
//! which weighted backend gets it, and whether a fault or a mirror applies.
//! Randomness comes in as a parameter so tests can seed it.

use std::time::Duration;

use http::{HeaderMap, Method};
use rand::Rng;

use crate::mesh::{Backend, Fault, HeaderMatch, PathMatch, Route, RouteMatch};

/// The first route whose match accepts the request.
pub fn select<'a>(
    routes: &'a [Route],
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Option<&'a Route> {
    routes
        .iter()
        .find(|r| r.matches.matches(method, path, headers))
}

impl RouteMatch {
    /// Whether a request with this method, path (no query) and headers matches.
    pub fn matches(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method.as_str()) {
            return false;
        }
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => path == p,
            Some(PathMatch::Prefix(p)) => path_has_prefix(path, p),
            Some(PathMatch::Regex(r)) => r.is_match(path),
        };
        path_ok
            && headers_match(&self.headers, headers)
            && self
                .cookies
                .iter()
                .all(|(name, m)| value_matches(m, cookies(headers, name)))
    }
}

/// Prefix match on path segments' text, as Envoy's `prefix`: "/api" matches
/// "/api", "/api/x" and also "/apix"; use "/api/" to mean the directory.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    path.starts_with(prefix)
}

/// Whether every header condition holds.
pub fn headers_match(conditions: &[(String, HeaderMatch)], headers: &HeaderMap) -> bool {
    conditions.iter().all(|(name, m)| {
        let values = headers
            .get_all(name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok());
        value_matches(m, values)
    })
}

/// A condition holds if any of the values satisfies it (a header may repeat).
fn value_matches<'a>(m: &HeaderMatch, mut values: impl Iterator<Item = &'a str>) -> bool {
    match m {
        HeaderMatch::Present(want) => values.next().is_some() == *want,
        HeaderMatch::Exact(v) => values.any(|x| x == v),
        HeaderMatch::Regex(r) => values.any(|x| r.is_match(x)),
    }
}

/// The values of cookie `name` in the request's `cookie` headers.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"'))
        })
}

/// Pick a backend with probability proportional to its weight. `backends`
/// is never empty and some weight is above 0 (the mesh checker ensures it).
pub fn pick_backend<'a>(backends: &'a [Backend], rng: &mut impl Rng) -> Option<&'a Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return backends.first();
    }
    let mut x = rng.random_range(0..total);
    for b in backends {
        let w = u64::from(b.weight);
        if x < w {
            return Some(b);
        }
        x -= w;
    }
    backends.last()
}

/// True with probability `percent` / 100.
pub fn roll(percent: f64, rng: &mut impl Rng) -> bool {
    percent >= 100.0 || (percent > 0.0 && rng.random::<f64>() * 100.0 < percent)
}

/// What fault injection does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultAction {
    pub delay: Option<Duration>,
    /// HTTP status to answer with (0 for a TCP reset).
    pub abort: Option<u16>,
}

/// Decide the faults for one request. `headers` is `None` for TCP streams;
/// a fault with header conditions then never applies.
pub fn fault_action(fault: &Fault, headers: Option<&HeaderMap>, rng: &mut impl Rng) -> FaultAction {
    let targeted = match headers {
        Some(h) => headers_match(&fault.headers, h),
        None => fault.headers.is_empty(),
    };
    if !targeted {
        return FaultAction::default();
    }
    FaultAction {
        delay: fault
            .delay
            .as_ref()
            .filter(|d| roll(d.percent, rng))
            .map(|d| d.duration),
        abort: fault
            .abort
            .as_ref()
            .filter(|a| roll(a.percent, rng))
            .map(|a| a.status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::Mesh;
    use rand::SeedableRng;

    fn mesh(routes: &str) -> Mesh {
        let text = format!(
            "trust_domain = \"td\"\n[services.p]\nendpoints = [{{ addr = \"127.0.0.1:1\", labels = {{ version = \"v1\" }} }}, {{ addr = \"127.0.0.1:2\", labels = {{ version = \"v2\" }} }}]\n{routes}"
        );
        Mesh::parse(&text, "m").unwrap_or_else(|e| panic!("{e}"))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn route_name(m: &Mesh, method: &str, path: &str, h: &[(&str, &str)]) -> Option<String> {
        let routes = &m.service("p").unwrap().routes;
        select(routes, &method.parse().unwrap(), path, &headers(h)).map(|r| r.name.clone())
    }

    #[test]
    fn first_matching_route_wins() {
        let m = mesh(
            r#"
[[services.p.routes]]
name = "canary"
match = { headers = { "x-canary" = "1" }, path_prefix = "/api/" }
backends = [{ subset = { version = "v2" } }]
[[services.p.routes]]
name = "exact"
match = { path = "/health", method = "GET" }
[[services.p.routes]]
name = "regex"
match = { path_regex = "/users/[0-9]+", methods = ["get", "PUT"] }
[[services.p.routes]]
name = "ab"
match = { cookies = { group = "b" } }
[[services.p.routes]]
name = "rest"
"#,
        );
        assert_eq!(
            route_name(&m, "GET", "/api/x", &[("x-canary", "1")]).as_deref(),
            Some("canary")
        );
        assert_eq!(
            route_name(&m, "GET", "/api/x", &[("x-canary", "2")]).as_deref(),
            Some("rest")
        );
        assert_eq!(
            route_name(&m, "GET", "/other", &[("x-canary", "1")]).as_deref(),
            Some("rest")
        );
        // A repeated header matches if any value does.
        assert_eq!(
            route_name(&m, "GET", "/api/", &[("x-canary", "0"), ("x-canary", "1")]).as_deref(),
            Some("canary")
        );
        assert_eq!(
            route_name(&m, "GET", "/health", &[]).as_deref(),
            Some("exact")
        );
        assert_eq!(
            route_name(&m, "POST", "/health", &[]).as_deref(),
            Some("rest")
        );
        assert_eq!(
            route_name(&m, "GET", "/health/x", &[]).as_deref(),
            Some("rest")
        );
        assert_eq!(
            route_name(&m, "PUT", "/users/42", &[]).as_deref(),
            Some("regex")
        );
        // Regexes are anchored: the whole path must match.
        assert_eq!(
            route_name(&m, "GET", "/users/42/x", &[]).as_deref(),
            Some("rest")
        );
        assert_eq!(
            route_name(&m, "DELETE", "/users/42", &[]).as_deref(),
            Some("rest")
        );
        assert_eq!(
            route_name(&m, "GET", "/", &[("cookie", "a=1; group=b")]).as_deref(),
            Some("ab")
        );
        assert_eq!(
            route_name(&m, "GET", "/", &[("cookie", "group=bb")]).as_deref(),
            Some("rest")
        );
    }

    #[test]
    fn header_regex_present_and_absent() {
        let m = mesh(
            r#"
[[services.p.routes]]
name = "mobile"
match = { headers = { "user-agent" = { regex = ".*(iPhone|Android).*" }, "x-debug" = false } }
[[services.p.routes]]
name = "traced"
match = { headers = { "X-Trace" = { present = true } } }
"#,
        );
        assert_eq!(
            route_name(&m, "GET", "/", &[("user-agent", "Mozilla (iPhone)")]).as_deref(),
            Some("mobile")
        );
        assert_eq!(
            route_name(
                &m,
                "GET",
                "/",
                &[("user-agent", "Mozilla (iPhone)"), ("x-debug", "1")]
            )
            .as_deref(),
            None
        );
        assert_eq!(
            route_name(&m, "GET", "/", &[("x-trace", "")]).as_deref(),
            Some("traced")
        );
        // No route matches: the caller falls back to the default route.
        assert_eq!(route_name(&m, "GET", "/", &[]), None);
    }

    #[test]
    fn weights_split_traffic_in_proportion() {
        let m = mesh(
            r#"
[[services.p.routes]]
backends = [{ subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 }, { subset = { version = "v2" }, weight = 0 }]
"#,
        );
        let backends = &m.service("p").unwrap().routes[0].backends;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = [0u32; 3];
        for _ in 0..10_000 {
            let b = pick_backend(backends, &mut rng).unwrap();
            let i = backends.iter().position(|x| std::ptr::eq(x, b)).unwrap();
            counts[i] += 1;
        }
        assert!((8_800..=9_200).contains(&counts[0]), "{counts:?}");
        assert!((800..=1_200).contains(&counts[1]), "{counts:?}");
        assert_eq!(counts[2], 0, "a weight of 0 gets nothing");
    }

    #[test]
    fn faults_hit_their_share_and_only_targeted_requests() {
        let m = mesh(
            r#"
[[services.p.routes]]
fault = { delay = { percent = 10, duration = "100ms" }, abort = { percent = 5, status = 503 } }
[[services.p.routes]]
name = "chaos"
fault = { abort = { percent = 100, status = 500 }, headers = { "x-chaos" = "1" } }
"#,
        );
        let routes = &m.service("p").unwrap().routes;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut delayed, mut aborted) = (0, 0);
        for _ in 0..10_000 {
            let a = fault_action(
                routes[0].fault.as_ref().unwrap(),
                Some(&HeaderMap::new()),
                &mut rng,
            );
            if let Some(d) = a.delay {
                assert_eq!(d, Duration::from_millis(100));
                delayed += 1;
            }
            if let Some(s) = a.abort {
                assert_eq!(s, 503);
                aborted += 1;
            }
        }
        assert!((850..=1_150).contains(&delayed), "{delayed}");
        assert!((400..=600).contains(&aborted), "{aborted}");
        let chaos = routes[1].fault.as_ref().unwrap();
        assert_eq!(
            fault_action(chaos, Some(&HeaderMap::new()), &mut rng),
            FaultAction::default()
        );
        assert_eq!(fault_action(chaos, None, &mut rng), FaultAction::default());
        assert_eq!(
            fault_action(chaos, Some(&headers(&[("x-chaos", "1")])), &mut rng).abort,
            Some(500)
        );
    }

    #[test]
    fn roll_edges() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        assert!((0..1000).all(|_| roll(100.0, &mut rng)));
        assert!((0..1000).all(|_| !roll(0.0, &mut rng)));
    }
}
