//! Routing end to end: weighted backends (canaries), header and cookie
//! routes (A/B tests), mirroring, fault injection, live reload of weights
//! and the admin view of clusters, through real sidecars.
//!
//! Statistical assertions use bands of 5 standard deviations of the
//! binomial count (σ = √(n·p·(1−p))): a correct mesh falls outside one
//! about once in 1.7 million checks, while a share that is ignored, doubled
//! or applied to the wrong requests lands far outside. (The mirror's ±6 %
//! band, as the issue asks, is 3.8σ: about once in 7,000.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::mesh::{Mesh, Protocol};
use weft_tests::fleet::{by_app, load, quantile, spec, Answer, Client, Fleet};
use weft_tests::{metric_sum, scrape, tcp_echo_app, wait_until, Pair, TD};

/// Every test here finishes in a few seconds; this only turns a hang into a failure.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait for a counter or a reload that should come at once.
const SETTLE: Duration = Duration::from_secs(10);

/// `count` is within `sigmas` standard deviations of the binomial mean n·p.
fn within_binomial(count: usize, n: usize, p: f64, sigmas: f64) -> bool {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (count as f64 - mean).abs() <= sigmas * sd
}

/// Answers that satisfy `pred`; a transport error satisfies nothing.
fn count(answers: &[Result<Answer, String>], pred: impl Fn(&Answer) -> bool) -> usize {
    answers
        .iter()
        .filter(|a| a.as_ref().is_ok_and(&pred))
        .count()
}

/// Like `load`, but answers come in the order they finish, so a delayed
/// request does not hold back the ones after it.
async fn load_unordered<F, Fut>(n: usize, concurrency: usize, f: F) -> Vec<Result<Answer, String>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Answer, String>>,
{
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(concurrency)
        .collect()
        .await
}

fn from_app(a: &Answer, app: &str) -> bool {
    a.status == 200 && a.header("x-app") == Some(app) && a.header("x-weft-error").is_none()
}

const CANARY: &str = r#"
[[services.payment.routes]]
name = "canary-header"
match = { headers = { "x-canary" = "1" } }
backends = [{ subset = { version = "v2" } }]
[[services.payment.routes]]
name = "split"
backends = [{ subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_90_10_and_a_header_route_pins_the_canary() {
    let fleet = Fleet::start(
        &[
            spec("payment", "v1", &[("version", "v1")]),
            spec("payment", "v2", &[("version", "v2")]),
        ],
        CANARY,
    )
    .await;
    let client = Client::new(fleet.upstream("payment"));
    let answers = load(2000, 16, |i| client.get(&format!("/pay/{i}"), &[])).await;
    let counts = by_app(&answers);
    assert_eq!(counts.values().sum::<usize>(), 2000, "{counts:?}");
    let v2 = counts.get("v2").copied().unwrap_or(0) as f64 / 2000.0;
    assert!((0.06..=0.14).contains(&v2), "v2 share {v2}: {counts:?}");
    assert_eq!(
        counts.get("v1").copied().unwrap_or(0) + counts.get("v2").copied().unwrap_or(0),
        2000,
        "{counts:?}"
    );

    let pinned = load(200, 8, |_| client.get("/pay", &[("x-canary", "1")])).await;
    let counts = by_app(&pinned);
    assert_eq!(counts.get("v2"), Some(&200), "{counts:?}");
    let m = fleet
        .client_metric(
            "weft_requests_total",
            &[("route", "canary-header"), ("status", "200")],
        )
        .await;
    assert_eq!(m, 200.0);
}

const AB: &str = r#"
[[services.payment.routes]]
name = "ab-group-b"
match = { cookies = { group = "b" } }
backends = [{ subset = { version = "v2" } }]
[[services.payment.routes]]
name = "ab-split"
backends = [{ subset = { version = "v1" }, weight = 80 }, { subset = { version = "v2" }, weight = 20 }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_route_pins_group_b_to_v2_and_the_rest_follow_the_weights() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let fleet = Fleet::start(
            &[
                spec("payment", "v1", &[("version", "v1")]),
                spec("payment", "v2", &[("version", "v2")]),
            ],
            AB,
        )
        .await;
        let client = Client::new(fleet.upstream("payment"));

        // Group b, however the cookie header is written: alone, among other
        // cookies, quoted, or in a second `cookie` field.
        let group_b: [&[(&str, &str)]; 4] = [
            &[("cookie", "group=b")],
            &[("cookie", "theme=dark; group=b; lang=en")],
            &[("cookie", "group=\"b\"")],
            &[("cookie", "theme=dark"), ("cookie", "group=b")],
        ];
        let pinned = load(400, 16, |i| {
            client.get(&format!("/cart/{i}"), group_b[i % 4])
        })
        .await;
        let counts = by_app(&pinned);
        assert_eq!(
            counts.get("v2"),
            Some(&400),
            "group b must all go to v2: {counts:?}"
        );

        // Not group b: another value, a longer name or value, the value in a
        // header instead of a cookie, no cookie at all. These take the split.
        let others: [&[(&str, &str)]; 5] = [
            &[("cookie", "group=a")],
            &[("cookie", "group=bb")],
            &[("cookie", "xgroup=b")],
            &[("group", "b")],
            &[],
        ];
        const N: usize = 1000;
        let split = load(N, 16, |i| client.get(&format!("/cart/{i}"), others[i % 5])).await;
        let counts = by_app(&split);
        let v1 = counts.get("v1").copied().unwrap_or(0);
        let v2 = counts.get("v2").copied().unwrap_or(0);
        assert_eq!(v1 + v2, N, "every request answered by v1 or v2: {counts:?}");
        // 80/20 over 1000: σ = √(1000·0.2·0.8) ≈ 12.6, so 5σ is v2 in 137..=263.
        // Had the cookie route caught these, v2 would be 1000; had the weights
        // been ignored (equal shares), about 500.
        assert!(
            within_binomial(v2, N, 0.2, 5.0),
            "v2 got {v2} of {N}: {counts:?}"
        );

        let fleet = &fleet;
        let route = |name: &'static str| async move {
            fleet
                .client_metric(
                    "weft_requests_total",
                    &[("service", "payment"), ("route", name), ("status", "200")],
                )
                .await
        };
        assert_eq!(route("ab-group-b").await, 400.0);
        assert_eq!(route("ab-split").await, N as f64);
        assert_eq!(fleet.server("v1").app.requests() as usize, v1);
        assert_eq!(fleet.server("v2").app.requests() as usize, 400 + v2);
    })
    .await
    .expect("test timed out");
}

/// Endpoint fields of `service` from the client's `/clusters`.
async fn cluster_endpoints(fleet: &Fleet, service: &str) -> Vec<serde_json::Value> {
    fleet.clusters().await[service]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Requests the client has in flight to `service`, mirrored ones included.
async fn in_flight(fleet: &Fleet, service: &str) -> u64 {
    cluster_endpoints(fleet, service)
        .await
        .iter()
        .map(|e| e["in_flight"].as_u64().unwrap_or(0))
        .sum()
}

/// `weft_mirrored_requests_total` of one route and target, by result.
async fn mirrored(fleet: &Fleet, route: &str, target: &str, result: &str) -> u64 {
    fleet
        .client_metric(
            "weft_mirrored_requests_total",
            &[("route", route), ("target", target), ("result", result)],
        )
        .await as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_gets_its_share_marked_and_the_primary_is_untouched() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let fleet = Fleet::start(
            &[
                spec("payment", "v1", &[("version", "v1")]),
                spec("payment-shadow", "shadow", &[("version", "next")]),
            ],
            r#"
[[services.payment.routes]]
name = "shadowed"
mirror = { service = "payment-shadow", percent = 50 }
"#,
        )
        .await;
        let client = Client::new(fleet.upstream("payment"));
        const N: usize = 1000;
        let answers = load(N, 16, |i| client.get(&format!("/pay/{i}"), &[])).await;
        let counts = by_app(&answers);
        assert_eq!(counts.get("v1"), Some(&N), "primary answers: {counts:?}");

        let primary = &fleet.server("v1").app.seen;
        let shadow = &fleet.server("shadow").app.seen;
        // Mirrors are fire-and-forget: wait until every copy has been
        // answered and counted (nothing in flight to the shadow, the shadow
        // saw exactly the copies counted as sent, and that count held still
        // between two looks).
        let last_sent = std::cell::Cell::new(u64::MAX);
        let settled = wait_until(SETTLE, || async {
            let sent = mirrored(&fleet, "shadowed", "payment-shadow", "sent").await;
            let held = last_sent.replace(sent) == sent;
            held && in_flight(&fleet, "payment-shadow").await == 0
                && sent == shadow.requests.load(Ordering::SeqCst)
        })
        .await;
        let sent = mirrored(&fleet, "shadowed", "payment-shadow", "sent").await;
        let seen = shadow.requests.load(Ordering::SeqCst);
        assert!(
            settled,
            "mirror counts never settled: {sent} sent, shadow saw {seen}"
        );
        for result in ["dropped", "skipped", "failed"] {
            assert_eq!(
                mirrored(&fleet, "shadowed", "payment-shadow", result).await,
                0,
                "mirrored {result} with a fast, healthy shadow"
            );
        }
        // 50 % of 1000: σ ≈ 15.8; ±6 % (±60) is 3.8σ (p ≈ 1.5e-4 of a false alarm).
        assert!(
            (440..=560).contains(&seen),
            "the shadow saw {seen} of {N} requests, want about 500"
        );
        assert_eq!(
            shadow.mirrored.load(Ordering::SeqCst),
            seen,
            "every request at the shadow carries x-weft-mirror"
        );
        let last = shadow.last_headers.lock().expect("lock").clone();
        assert_eq!(last.get("x-weft-mirror").map(String::as_str), Some("1"));
        assert!(
            last.get("x-weft-peer-id")
                .is_some_and(|id| id.ends_with("/sa/customer")),
            "the copy comes from the caller's sidecar: {last:?}"
        );

        assert_eq!(primary.requests.load(Ordering::SeqCst), N as u64);
        assert_eq!(
            primary.mirrored.load(Ordering::SeqCst),
            0,
            "the primary never sees the mirror mark"
        );
        assert_eq!(
            fleet
                .client_metric(
                    "weft_requests_total",
                    &[("route", "shadowed"), ("status", "200")],
                )
                .await,
            N as f64,
            "mirrored copies are not counted as requests of the route"
        );
    })
    .await
    .expect("test timed out");
}

/// The mesh file a fleet started with `policy` wrote, minus that policy:
/// the services and endpoints the fleet generated.
fn fleet_base(fleet: &Fleet, policy: &str) -> String {
    let text = std::fs::read_to_string(&fleet.mesh_path).expect("read mesh file");
    text.strip_suffix(policy)
        .unwrap_or_else(|| panic!("the mesh file does not end with the policy:\n{text}"))
        .to_string()
}

/// `base` with `keys` (TOML lines) added to the table of service `name`, for
/// per-service settings such as `connect_timeout`, which cannot be appended
/// after the fleet's generated `[services.NAME]` table has ended.
fn with_service_keys(base: &str, name: &str, keys: &str) -> String {
    let header = format!("[services.{name}]\n");
    let start = base
        .find(&header)
        .unwrap_or_else(|| panic!("no {header:?} in:\n{base}"));
    // The generated table is the header and one `endpoints = [...]` line.
    let endpoints_end = start
        + header.len()
        + base[start + header.len()..]
            .find('\n')
            .expect("endpoints line")
        + 1;
    format!(
        "{}{keys}\n{}",
        &base[..endpoints_end],
        &base[endpoints_end..]
    )
}

/// Replace the mesh file in one step (write a temporary file, rename it
/// over), as Kubernetes swaps a ConfigMap: the client polls the file, and
/// an in-place write can be read half done (empty, or cut after some line).
fn replace_mesh_file(fleet: &Fleet, text: &str) {
    let tmp = fleet.mesh_path.with_extension("toml.next");
    std::fs::write(&tmp, text).expect("write mesh file");
    std::fs::rename(&tmp, &fleet.mesh_path).expect("replace mesh file");
}

/// Write `text` as the mesh file and wait until the client has applied it.
async fn write_mesh(fleet: &Fleet, text: &str) {
    Mesh::parse(text, "mesh.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let before = fleet.reloads("success").await;
    replace_mesh_file(fleet, text);
    let applied = wait_until(SETTLE, || async { fleet.reloads("success").await > before }).await;
    assert!(applied, "the client did not apply:\n{text}");
}

/// Write an invalid mesh file and wait until the client has rejected it.
async fn write_bad_mesh(fleet: &Fleet, text: &str) {
    assert!(
        Mesh::parse(text, "mesh.toml").is_err(),
        "meant to be invalid:\n{text}"
    );
    let before = fleet.reloads("failure").await;
    replace_mesh_file(fleet, text);
    let rejected = wait_until(SETTLE, || async { fleet.reloads("failure").await > before }).await;
    assert!(rejected, "the client did not reject:\n{text}");
}

/// Requests in one [`primary_phase`]: about half a second of traffic here,
/// longer than the dead mirror's 300 ms connect timeout, so a phase sees
/// copies time out (and new ones start) and not only copies waiting.
const PHASE_REQUESTS: usize = 2000;

/// One phase of primary traffic: `n` GETs, 8 at a time; every answer must
/// be v1's 200.
async fn primary_phase(client: &Client, n: usize, what: &str) -> Vec<Result<Answer, String>> {
    let answers = load(n, 8, |i| client.get(&format!("/pay/{i}"), &[])).await;
    let ok = count(&answers, |a| from_app(a, "v1"));
    assert_eq!(ok, answers.len(), "{what}: {:?}", by_app(&answers));
    answers
}

/// p99 allowed for a phase with a mirror, given the baseline p99 without.
///
/// `max(2 × baseline, baseline + 30 ms)`. What this guards against costs far
/// more: a primary that waited for its dead mirror would wait out the 300 ms
/// connect timeout, one that waited for the slow mirror 2 s. Below that, a
/// debug build on a shared machine has scheduling hiccups of tens of ms in
/// any run of this size, and the first copies to a new mirror pay for a
/// QUIC handshake on the same two worker threads (seen: p99 2.2 ms → 6 ms
/// quiet, for the first handful of requests only), so a tighter bound would
/// mostly measure the machine.
fn p99_allowance(baseline: Duration) -> Duration {
    (baseline * 2).max(baseline + Duration::from_millis(30))
}

/// Run [`primary_phase`] until its p99 is within `allowed`, at most 3
/// times; the p99 of each run. A mirror that holds the primary back does
/// so in every run; a hiccup of a loaded machine (seen: a 64 ms p99 against
/// a 13 ms baseline with 6 tests at once on 2 cores) rarely twice in a row.
/// (Under such load the dead mirror costs most: each copy queued for it
/// starts its own QUIC handshake once the one before it is cancelled by
/// the connect timeout, about 50 in half a second here.)
async fn p99_within(client: &Client, allowed: Duration, what: &str) -> Vec<Duration> {
    let mut p99s = Vec::new();
    for _ in 0..3 {
        let p99 = quantile(&primary_phase(client, PHASE_REQUESTS, what).await, 0.99);
        p99s.push(p99);
        if p99 <= allowed {
            break;
        }
    }
    p99s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_slow_mirror_never_fails_or_slows_the_primary() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // `payment-shadow` has a real server (slowed below); `shadow-dead`'s
        // only endpoint is a UDP port nobody serves, so a QUIC dial to it
        // fails by timeout.
        let fleet = Fleet::start_with(
            &[
                spec("payment", "v1", &[("version", "v1")]),
                spec("payment-shadow", "shadow", &[]),
            ],
            &[("shadow-dead", "{ addr = \"127.0.0.1:9\" }")],
            "",
        )
        .await;
        let base = with_service_keys(
            &fleet_base(&fleet, ""),
            "shadow-dead",
            "connect_timeout = \"300ms\"",
        );
        let client = Client::new(fleet.upstream("payment"));

        // Baseline: no mirror, after a warm-up (the first requests pay for
        // the QUIC handshake and the peer's connections to its app).
        write_mesh(&fleet, &base).await;
        primary_phase(&client, 400, "warm-up").await;
        let base_p99 = quantile(
            &primary_phase(&client, PHASE_REQUESTS, "baseline").await,
            0.99,
        );
        let allowed = p99_allowance(base_p99);

        // Every request mirrored to the dead service.
        write_mesh(
            &fleet,
            &format!(
                "{base}[[services.payment.routes]]\nname = \"to-dead\"\n\
                 mirror = {{ service = \"shadow-dead\", percent = 100 }}\n"
            ),
        )
        .await;
        let dead_p99 = p99_within(&client, allowed, "dead mirror").await;
        assert!(
            dead_p99.last().is_some_and(|p| *p <= allowed),
            "dead mirror: p99 {dead_p99:?}, baseline {base_p99:?}, allowed {allowed:?}"
        );
        // The copies were really attempted, and failed by connect timeout.
        let failed = wait_until(SETTLE, || async {
            mirrored(&fleet, "to-dead", "shadow-dead", "failed").await > 0
        })
        .await;
        assert!(failed, "no mirrored copy to the dead service failed");
        assert_eq!(mirrored(&fleet, "to-dead", "shadow-dead", "sent").await, 0);

        // Every request mirrored to a shadow that answers after 2 s, with at
        // most 4 copies in flight: the rest are dropped at once.
        fleet.server("shadow").app.set(0, Duration::from_secs(2));
        write_mesh(
            &fleet,
            &format!(
                "{base}[[services.payment.routes]]\nname = \"to-slow\"\n\
                 mirror = {{ service = \"payment-shadow\", percent = 100, max_in_flight = 4 }}\n"
            ),
        )
        .await;
        let slow_p99 = p99_within(&client, allowed, "slow mirror").await;
        assert!(
            slow_p99.last().is_some_and(|p| *p <= allowed),
            "slow mirror: p99 {slow_p99:?}, baseline {base_p99:?}, allowed {allowed:?}"
        );
        let dropped = mirrored(&fleet, "to-slow", "payment-shadow", "dropped").await;
        assert!(
            dropped > 0,
            "no copy dropped with {PHASE_REQUESTS} requests and 4 slots"
        );
        // Every request was rolled (100 %): each one is accounted for once
        // the slow copies in flight have been answered.
        let accounted = wait_until(SETTLE, || async {
            let mut sum = 0;
            for r in ["sent", "dropped", "skipped", "failed"] {
                sum += mirrored(&fleet, "to-slow", "payment-shadow", r).await;
            }
            sum == (slow_p99.len() * PHASE_REQUESTS) as u64
        })
        .await;
        let sent = mirrored(&fleet, "to-slow", "payment-shadow", "sent").await;
        assert!(
            accounted,
            "mirror results do not add up to {} requests",
            slow_p99.len() * PHASE_REQUESTS
        );
        let shadow = fleet.server("shadow").app.requests();
        assert!(
            sent >= 1 && sent == shadow,
            "sent {sent}, shadow saw {shadow}"
        );
        eprintln!(
            "p99: baseline {base_p99:?}, dead mirror {dead_p99:?}, slow mirror {slow_p99:?}; \
             slow mirror: {sent} sent, {dropped} dropped"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_delays_and_aborts_hit_their_share_and_aborts_never_reach_the_app() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let fleet = Fleet::start(
            &[spec("payment", "v1", &[])],
            r#"
[[services.payment.routes]]
name = "chaos"
fault = { delay = { percent = 20, duration = "100ms" }, abort = { percent = 10, status = 503 } }
"#,
        )
        .await;
        let client = Client::new(fleet.upstream("payment"));
        const N: usize = 1000;
        const DELAY: Duration = Duration::from_millis(100);
        let answers = load_unordered(N, 32, |i| client.get(&format!("/pay/{i}"), &[])).await;

        let aborted = count(&answers, |a| {
            a.status == 503 && a.header("x-weft-fault") == Some("abort")
        });
        let ok = count(&answers, |a| from_app(a, "v1"));
        assert_eq!(
            aborted + ok,
            N,
            "every answer is the app's 200 or an injected 503: {:?}",
            by_app(&answers)
        );
        // Binomial bands of 5σ: aborts p = 0.1, σ ≈ 9.5 → 53..=147;
        // delays p = 0.2, σ ≈ 12.6 → 137..=263.
        assert!(
            within_binomial(aborted, N, 0.1, 5.0),
            "{aborted} of {N} aborted"
        );
        let app = &fleet.server("v1").app;
        assert_eq!(
            app.requests() as usize,
            N - aborted,
            "aborted requests must not reach the app"
        );

        let fleet = &fleet;
        let faults = |reason: &'static str| async move {
            fleet
                .client_metric(
                    "weft_faults_injected_total",
                    &[
                        ("service", "payment"),
                        ("route", "chaos"),
                        ("reason", reason),
                    ],
                )
                .await
        };
        assert_eq!(faults("abort").await, aborted as f64);
        assert_eq!(
            fleet
                .client_metric(
                    "weft_requests_total",
                    &[("route", "chaos"), ("status", "503")]
                )
                .await,
            aborted as f64
        );
        // Delay and abort are rolled independently, so aborted requests may
        // be delayed too. Responses do not say which were delayed: every
        // delayed one took at least the delay, so at least `delayed` answers
        // took ≥ 100 ms; and on loopback an undelayed request takes a few
        // ms, so few more did. 5 % of N are allowed for a loaded machine
        // (seen: 3.7 % with six such tests at once on two cores, 0 alone);
        // a delay applied beyond its share, or not counted, shows as far more.
        let delayed = faults("delay").await as usize;
        assert!(
            within_binomial(delayed, N, 0.2, 5.0),
            "{delayed} of {N} delayed"
        );
        let slow = count(&answers, |a| a.elapsed >= DELAY);
        assert!(
            slow >= delayed && slow <= delayed + N / 20,
            "{slow} answers took ≥ {DELAY:?}, {delayed} delays injected"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_triggered_fault_hits_only_marked_requests() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let fleet = Fleet::start(
            &[spec("payment", "v1", &[])],
            r#"
[[services.payment.routes]]
name = "targeted"
fault = { abort = { percent = 100, status = 500 }, headers = { "x-chaos" = "1" } }
"#,
        )
        .await;
        let client = Client::new(fleet.upstream("payment"));
        // Marked: x-chaos: 1. Unmarked: no header, another value, a value
        // that only contains "1", a different header with the value 1.
        let unmarked: [&[(&str, &str)]; 4] = [
            &[],
            &[("x-chaos", "0")],
            &[("x-chaos", "11")],
            &[("x-chaos-2", "1")],
        ];
        let answers = load(400, 16, |i| {
            if i % 2 == 0 {
                client.get(&format!("/pay/{i}"), &[("x-chaos", "1")])
            } else {
                client.get(&format!("/pay/{i}"), unmarked[(i / 2) % 4])
            }
        })
        .await;
        for (i, a) in answers.iter().enumerate() {
            let a = a.as_ref().expect("the sidecar answers");
            if i % 2 == 0 {
                assert_eq!(a.status, 500, "marked request {i}");
                assert_eq!(
                    a.header("x-weft-fault"),
                    Some("abort"),
                    "marked request {i}"
                );
            } else {
                assert!(from_app(a, "v1"), "unmarked request {i}: {a:?}");
            }
        }
        assert_eq!(
            fleet.server("v1").app.requests(),
            200,
            "only unmarked requests reach the app"
        );
        assert_eq!(
            fleet
                .client_metric(
                    "weft_faults_injected_total",
                    &[("route", "targeted"), ("reason", "abort")],
                )
                .await,
            200.0
        );
    })
    .await
    .expect("test timed out");
}

fn weights(v1: u32, v2: u32) -> String {
    format!(
        "[[services.payment.routes]]\nname = \"live\"\n\
         backends = [{{ subset = {{ version = \"v1\" }}, weight = {v1} }}, \
         {{ subset = {{ version = \"v2\" }}, weight = {v2} }}]\n"
    )
}

/// One request of [`Traffic`]: the even phase it ran entirely in (`None`
/// if the phase changed meanwhile), and the app that answered or the error.
type Logged = (Option<usize>, Result<String, String>);

/// Traffic that runs until stopped, each request recorded with the phase
/// of the test it ran in. The test moves to an odd phase before it edits
/// the mesh file and to the next even one once the edit is applied (or
/// rejected), so a request that saw the same even phase when it started
/// and when it ended ran entirely under one known config.
struct Traffic {
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Logged>>>,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(client: Arc<Client>, loops: usize) -> Traffic {
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let loops = (0..loops)
            .map(|l| {
                let (client, phase, stop, log) =
                    (client.clone(), phase.clone(), stop.clone(), log.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let p0 = phase.load(Ordering::SeqCst);
                        let answer = client.get(&format!("/live/{l}/{i}"), &[]).await;
                        let p1 = phase.load(Ordering::SeqCst);
                        let outcome = match answer {
                            Ok(a) if a.status == 200 && a.header("x-weft-error").is_none() => {
                                Ok(a.header("x-app").unwrap_or("?").to_string())
                            }
                            Ok(a) => Err(format!("status {}: {}", a.status, a.body.trim())),
                            Err(e) => Err(e),
                        };
                        let p = (p0 == p1 && p0 % 2 == 0).then_some(p0);
                        log.lock().expect("lock").push((p, outcome));
                        i += 1;
                    }
                })
            })
            .collect();
        Traffic {
            phase,
            stop,
            log,
            loops,
        }
    }

    /// Requests so far that ran entirely in `phase`, by app.
    fn counts(&self, phase: usize) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (p, outcome) in self.log.lock().expect("lock").iter() {
            if *p == Some(phase) {
                let key = match outcome {
                    Ok(app) => app.clone(),
                    Err(e) => format!("error: {e}"),
                };
                *out.entry(key).or_insert(0) += 1;
            }
        }
        out
    }

    /// Wait until at least `n` requests ran entirely in `phase`; their counts by app.
    async fn wait_for(&self, phase: usize, n: usize) -> BTreeMap<String, usize> {
        let enough = wait_until(SETTLE, || async {
            self.counts(phase).values().sum::<usize>() >= n
        })
        .await;
        let counts = self.counts(phase);
        assert!(enough, "phase {phase}: only {counts:?}");
        counts
    }

    /// Run `edit` between the phase that is now and the next even one.
    async fn change<F: std::future::Future<Output = ()>>(&self, edit: F) -> usize {
        let now = self.phase.fetch_add(1, Ordering::SeqCst);
        assert_eq!(now % 2, 0);
        edit.await;
        self.phase.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Stop and return every outcome.
    async fn stop(self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::SeqCst);
        for l in self.loops {
            l.await.expect("traffic loop");
        }
        let log = std::mem::take(&mut *self.log.lock().expect("lock"));
        log.into_iter().map(|(_, o)| o).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weights_change_live_under_load_without_a_failed_request() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let initial = weights(100, 0);
        let fleet = Fleet::start(
            &[
                spec("payment", "v1", &[("version", "v1")]),
                spec("payment", "v2", &[("version", "v2")]),
            ],
            &initial,
        )
        .await;
        // Edits replace the file in one step (`write_mesh`), not in place as
        // `Fleet::set_policy` does: a poll that reads an in-place write half
        // done may apply a cut-off file (say, without the routes) for one
        // interval, and this test checks every request.
        let base = fleet_base(&fleet, &initial);
        let client = Arc::new(Client::new(fleet.upstream("payment")));
        let traffic = Traffic::start(client, 16);
        const PER_PHASE: usize = 300;

        let counts = traffic.wait_for(0, PER_PHASE).await;
        assert_eq!(
            counts.keys().collect::<Vec<_>>(),
            ["v1"],
            "100/0: {counts:?}"
        );

        let p = traffic
            .change(write_mesh(&fleet, &(base.clone() + &weights(0, 100))))
            .await;
        let counts = traffic.wait_for(p, PER_PHASE).await;
        assert_eq!(
            counts.keys().collect::<Vec<_>>(),
            ["v2"],
            "0/100: {counts:?}"
        );

        // Invalid edits that would send everything back to v1: rejected, and
        // traffic keeps the last good weights (all to v2).
        let failures = fleet.reloads("failure").await;
        let bad_type =
            base.clone() + &weights(100, 0).replace("weight = 100", "weight = \"one hundred\"");
        let p = traffic.change(write_bad_mesh(&fleet, &bad_type)).await;
        let counts = traffic.wait_for(p, PER_PHASE).await;
        assert_eq!(
            counts.keys().collect::<Vec<_>>(),
            ["v2"],
            "after a bad weight: {counts:?}"
        );

        let unknown_subset = base.clone()
            + "[[services.payment.routes]]\nname = \"live\"\n\
               backends = [{ subset = { version = \"v9\" }, weight = 100 }, \
               { subset = { version = \"v1\" }, weight = 100 }]\n";
        let p = traffic
            .change(write_bad_mesh(&fleet, &unknown_subset))
            .await;
        let counts = traffic.wait_for(p, PER_PHASE).await;
        assert_eq!(
            counts.keys().collect::<Vec<_>>(),
            ["v2"],
            "after an unknown subset: {counts:?}"
        );
        assert_eq!(fleet.reloads("failure").await, failures + 2.0);

        let p = traffic
            .change(write_mesh(&fleet, &(base.clone() + &weights(50, 50))))
            .await;
        let counts = traffic.wait_for(p, 2 * PER_PHASE).await;
        let n: usize = counts.values().sum();
        let v1 = counts.get("v1").copied().unwrap_or(0);
        assert_eq!(
            v1 + counts.get("v2").copied().unwrap_or(0),
            n,
            "50/50: {counts:?}"
        );
        // σ = √(n/4) ≈ 12 for n = 600: 5σ is about ±61 around 300.
        assert!(within_binomial(v1, n, 0.5, 5.0), "50/50: {counts:?}");

        // Not one request failed, in any phase or during any switch.
        let all = traffic.stop().await;
        let failed: Vec<_> = all.iter().filter_map(|o| o.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{} of {} requests failed, e.g. {:?}",
            failed.len(),
            all.len(),
            failed.first()
        );
        eprintln!("{} requests across 5 configs, none failed", all.len());
    })
    .await
    .expect("test timed out");
}

/// How one TCP connection through the mesh ended.
#[derive(Debug, PartialEq)]
enum TcpOutcome {
    Echoed,
    /// Reset (or refused) before any echo came back.
    Reset,
    Other(String),
}

/// Send a line, half-close, read the echo to EOF.
async fn tcp_ping(addr: std::net::SocketAddr, i: usize) -> TcpOutcome {
    let msg = format!("ping {i}\n");
    let reset = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    };
    let mut s = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        // The sidecar may reset the connection before connect() returns.
        Err(e) if reset(&e) => return TcpOutcome::Reset,
        Err(e) => return TcpOutcome::Other(format!("connect: {e}")),
    };
    if let Err(e) = s.write_all(msg.as_bytes()).await {
        return if reset(&e) {
            TcpOutcome::Reset
        } else {
            TcpOutcome::Other(e.to_string())
        };
    }
    if let Err(e) = s.shutdown().await {
        return if reset(&e) {
            TcpOutcome::Reset
        } else {
            TcpOutcome::Other(e.to_string())
        };
    }
    let mut back = Vec::new();
    match s.read_to_end(&mut back).await {
        Ok(_) if back == msg.as_bytes() => TcpOutcome::Echoed,
        Ok(_) => TcpOutcome::Other(format!("echo {:?}", String::from_utf8_lossy(&back))),
        Err(e) if reset(&e) && back.is_empty() => TcpOutcome::Reset,
        Err(e) => TcpOutcome::Other(format!("read after {} bytes: {e}", back.len())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_fault_resets_its_share_of_streams_before_they_reach_the_app() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, seen) = tcp_echo_app().await;
        let pair = Pair::start(&[("echo", Protocol::Tcp)], app).await;
        let text = format!(
            "trust_domain = \"{TD}\"\n\
             [services.echo]\nprotocol = \"tcp\"\nendpoints = [\"{}\"]\n\
             [[services.echo.routes]]\nname = \"tcp-chaos\"\n\
             fault = {{ abort = {{ percent = 30 }} }}\n",
            pair.server.inbound_addr
        );
        pair.client
            .set_mesh(Mesh::parse(&text, "mesh.toml").unwrap_or_else(|e| panic!("{e}\n{text}")));
        let upstream = pair.upstream("echo");
        const N: usize = 400;
        let outcomes: Vec<TcpOutcome> = {
            use futures::StreamExt;
            futures::stream::iter(0..N)
                .map(|i| tcp_ping(upstream, i))
                .buffered(16)
                .collect()
                .await
        };
        let echoed = outcomes
            .iter()
            .filter(|o| **o == TcpOutcome::Echoed)
            .count();
        let reset = outcomes.iter().filter(|o| **o == TcpOutcome::Reset).count();
        let other: Vec<_> = outcomes
            .iter()
            .filter(|o| matches!(o, TcpOutcome::Other(_)))
            .collect();
        assert!(other.is_empty(), "neither echoed nor reset: {other:?}");
        assert_eq!(echoed + reset, N);
        // 30 % of 400: σ ≈ 9.2, 5σ is 74..=166 resets.
        assert!(within_binomial(reset, N, 0.3, 5.0), "{reset} of {N} reset");
        assert_eq!(
            seen.connections.load(Ordering::SeqCst) as usize,
            echoed,
            "reset streams must not reach the app"
        );
        let admin = pair.client.admin_addr;
        assert_eq!(
            metric_sum(
                &scrape(admin).await,
                "weft_faults_injected_total",
                &[
                    ("service", "echo"),
                    ("route", "tcp-chaos"),
                    ("reason", "reset")
                ],
            ),
            reset as f64
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_clusters_lists_endpoints_with_labels_and_health() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // v1 and v2 have servers; v3 is a hand-written endpoint nobody
        // serves, left out of the route (tier "spare") so no request waits
        // for it. One backend holds v1 and v2, so ejecting v2 leaves v1 to
        // take its traffic (a backend whose only endpoint is ejected has no
        // one else to send to).
        let fleet = Fleet::start_with(
            &[
                spec("payment", "v1", &[("version", "v1"), ("tier", "live")]),
                spec("payment", "v2", &[("version", "v2"), ("tier", "live")]),
            ],
            &[(
                "payment",
                "{ addr = \"127.0.0.1:9\", labels = { version = \"v3\", tier = \"spare\" } }",
            )],
            r#"
[[services.payment.routes]]
name = "live"
backends = [{ subset = { tier = "live" } }]
[services.payment.circuit_breaker]
max_requests = 7
[services.payment.outlier_detection]
consecutive_5xx = 3
base_ejection_time = "30s"
"#,
        )
        .await;
        let addr_of = |name: &str| fleet.server(name).sidecar.inbound_addr.to_string();
        let by_addr = |eps: &[serde_json::Value]| -> BTreeMap<String, serde_json::Value> {
            eps.iter()
                .map(|e| (e["addr"].as_str().unwrap_or("?").to_string(), e.clone()))
                .collect()
        };

        let clusters = fleet.clusters().await;
        assert_eq!(clusters["payment"]["circuit_breaker"]["max_requests"], 7);
        let eps = by_addr(&cluster_endpoints(&fleet, "payment").await);
        assert_eq!(eps.len(), 3, "{eps:#?}");
        for (addr, version, tier) in [
            (addr_of("v1"), "v1", "live"),
            (addr_of("v2"), "v2", "live"),
            ("127.0.0.1:9".to_string(), "v3", "spare"),
        ] {
            let e = &eps[&addr];
            assert_eq!(
                e["labels"],
                serde_json::json!({ "version": version, "tier": tier }),
                "{addr}: {e}"
            );
            assert_eq!(e["health"], "healthy", "{addr}: {e}");
            assert_eq!(e["ejected"], false, "{addr}: {e}");
        }

        // v2 starts failing: after 3 consecutive 5xx it is ejected, and
        // /clusters says so while the others stay healthy.
        fleet.server("v2").app.set(100, Duration::ZERO);
        let client = Client::new(fleet.upstream("payment"));
        let ejected = wait_until(SETTLE, || async {
            load(10, 2, |i| client.get(&format!("/pay/{i}"), &[])).await;
            fleet
                .client_metric("weft_outlier_ejections_total", &[("service", "payment")])
                .await
                >= 1.0
        })
        .await;
        assert!(ejected, "v2 was never ejected");
        let eps = by_addr(&cluster_endpoints(&fleet, "payment").await);
        let v2 = &eps[&addr_of("v2")];
        assert_eq!(v2["health"], "ejected", "{v2}");
        assert_eq!(v2["times_ejected"], 1, "{v2}");
        assert!(
            v2["ejected_for_ms"]
                .as_u64()
                .is_some_and(|ms| ms > 20_000 && ms <= 30_000),
            "ejected for the base ejection time: {v2}"
        );
        assert_eq!(eps[&addr_of("v1")]["health"], "healthy");
        assert_eq!(eps["127.0.0.1:9"]["health"], "healthy");
        // With v2 out, every request goes to v1.
        let answers = load(50, 4, |i| client.get(&format!("/pay/{i}"), &[])).await;
        assert_eq!(
            by_app(&answers).get("v1"),
            Some(&50),
            "{:?}",
            by_app(&answers)
        );
    })
    .await
    .expect("test timed out");
}
