//! Resilience end to end, through real sidecars: retries (and their budget),
//! request and per-try timeouts with deadline propagation, outlier ejection,
//! the circuit breaker, non-idempotent requests and connect failures.
//!
//! Service-level keys (`load_balancer`, `connect_timeout`) go at the top of a
//! policy: the harness writes one `[services.X]` table per service, in name
//! order, just before the policy, so keys above the policy's first table
//! header land in the last of them. Tests that do this have one service
//! only, and check on the admin port that the setting took.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use weft_tests::fleet::{by_app, load, load_unordered, spec, Answer, Client, Fleet, Server};
use weft_tests::{admin_get, metric_sum, scrape, wait_until};

/// No test here should come near this; it turns a hang into a failure.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn ok(a: &Result<Answer, String>) -> &Answer {
    a.as_ref()
        .unwrap_or_else(|e| panic!("the client sidecar failed: {e}"))
}

fn statuses(answers: &[Result<Answer, String>], status: u16) -> usize {
    answers.iter().filter(|a| ok(a).status == status).count()
}

/// Sum of a metric on a server sidecar.
async fn server_metric(server: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&scrape(server.sidecar.admin_addr).await, name, labels)
}

/// `/clusters` entry of the endpoint `server` for `service`.
async fn endpoint(fleet: &Fleet, service: &str, server: &Server) -> serde_json::Value {
    let clusters = fleet.clusters().await;
    let addr = server.sidecar.inbound_addr.to_string();
    clusters[service]["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["addr"] == addr.as_str()).cloned())
        .unwrap_or_else(|| panic!("{addr} not in /clusters {service}: {clusters}"))
}

fn requests(server: &Server) -> u64 {
    server.app.seen.requests.load(Ordering::SeqCst)
}

// ---- retries -------------------------------------------------------------------

/// Two endpoints that each fail 30 % of requests with 503.
///
/// Each request gets 5 tries (attempts = 4), so it fails only if all five
/// do: p = 0.3^5 = 0.243 %. Over 4,000 requests that is 9.7 failures on
/// average, and the chance of more than 20 (0.5 %) is 0.11 % (binomial
/// tail). Over 1,000 requests the same bound would fail 3.7 % of runs, so
/// this test sends 4,000. The backoff is short (5 ms doubling) to keep it fast;
/// it plays no part in what is asserted.
const FLAKY_REQUESTS: usize = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_lift_a_30_percent_failure_rate_to_99_5_percent_success() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let fleet = Fleet::start(
            &[spec("payment", "p1", &[]), spec("payment", "p2", &[])],
            r#"
[[services.payment.routes]]
name = "pay"
retries = { attempts = 4, on = ["5xx"], backoff_base = "5ms" }
[services.payment.retry_budget]
ratio = 1.0
"#,
        )
        .await;
        for s in &fleet.servers {
            s.app.set(30, Duration::ZERO);
        }
        let client = Client::new(fleet.upstream("payment"));
        let start = Instant::now();
        let answers = load_unordered(FLAKY_REQUESTS, 16, |i| {
            client.get(&format!("/pay/{i}"), &[])
        })
        .await;
        let took = start.elapsed();
        let counts = by_app(&answers);
        let good = statuses(&answers, 200);
        let bad = statuses(&answers, 503);
        assert_eq!(good + bad, FLAKY_REQUESTS, "{counts:?}");
        assert!(
            good * 1000 >= FLAKY_REQUESTS * 995,
            "success {good}/{FLAKY_REQUESTS} is below 99.5 %: {counts:?}"
        );
        // The 503s that got through are the app's (after 5 tries), not the sidecar's.
        assert!(answers
            .iter()
            .map(ok)
            .filter(|a| a.status == 503)
            .all(|a| a.header("x-app").is_some() && a.header("x-weft-error").is_none()));

        let retries = fleet
            .client_metric(
                "weft_retries_total",
                &[("service", "payment"), ("route", "pay"), ("reason", "5xx")],
            )
            .await;
        let all_retries = fleet.client_metric("weft_retries_total", &[]).await;
        assert_eq!(retries, all_retries, "every retry was for a 5xx");
        let seen: u64 = fleet.servers.iter().map(requests).sum();
        let failed: u64 = fleet
            .servers
            .iter()
            .map(|s| s.app.seen.failed.load(Ordering::SeqCst))
            .sum();
        // Every try reached an app exactly once...
        assert_eq!(
            seen,
            FLAKY_REQUESTS as u64 + retries as u64,
            "app requests = requests + retries"
        );
        // ...and every failure the apps gave was either retried or answered.
        assert_eq!(
            failed,
            retries as u64 + bad as u64,
            "failures = retries + 503s returned"
        );
        // About 0.3/0.7 retries per request (a loose band around 0.43).
        let per_request = retries / FLAKY_REQUESTS as f64;
        assert!(
            (0.35..=0.52).contains(&per_request),
            "{per_request} retries per request"
        );
        assert_eq!(
            fleet
                .client_metric("weft_retry_budget_exhausted_total", &[])
                .await,
            0.0,
            "a ratio-1.0 budget never runs out here"
        );
        eprintln!("{FLAKY_REQUESTS} requests in {took:?}: {counts:?}, {retries} retries");
    })
    .await
    .expect("test timed out");
}

/// The retry budget's window in the mesh file's defaults.
const BUDGET_RATIO: f64 = 0.2;
const BUDGET_MIN_PER_SECOND: f64 = 10.0;
const BUDGET_TTL: Duration = Duration::from_secs(10);
/// The budget's window keeps at least `ttl - ttl/10` of history (it is a ring
/// of ten slots), so nothing expires from it during a test shorter than this.
const BUDGET_NO_EXPIRY: Duration = Duration::from_secs(9);

/// A backend failing every request, 3 retries each, the default budget.
///
/// The bound: the budget allows `ratio × requests + min_per_second × ttl`
/// retries in its window (Linkerd's and tower's semantics: the floor's
/// `min_per_second × ttl` reserve is there from the start, not earned per
/// second). While the test runs for less than `BUDGET_NO_EXPIRY` nothing
/// leaves the window, so over the whole test
///   retries ≤ 0.2 × N + 10/s × 10 s = 0.2 N + 100,
/// and app-seen tries ≤ 1.2 N + 100 ≤ 1.25 N + 100. (For a test of duration
/// D longer than that, the floor term would grow to 100 per started 9 s.)
/// Without a budget it would be 4 N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_against_a_dead_backend() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let fleet = Fleet::start(
            &[spec("payment", "down", &[])],
            r#"
[[services.payment.routes]]
name = "pay"
retries = { attempts = 3, on = ["5xx"] }
"#,
        )
        .await;
        let app = &fleet.server("down").app;
        app.set(100, Duration::ZERO);
        let client = Client::new(fleet.upstream("payment"));
        const N: usize = 1000;
        let start = Instant::now();
        let answers = load(N, 16, |i| client.get(&format!("/pay/{i}"), &[])).await;
        let took = start.elapsed();
        assert!(
            took < BUDGET_NO_EXPIRY,
            "the test took {took:?}; the bound below assumes less than {BUDGET_NO_EXPIRY:?}"
        );
        assert_eq!(statuses(&answers, 503), N, "{:?}", by_app(&answers));

        let floor = BUDGET_MIN_PER_SECOND * BUDGET_TTL.as_secs_f64();
        let tries = requests(fleet.server("down")) as f64;
        let retries = fleet
            .client_metric("weft_retries_total", &[("route", "pay")])
            .await;
        let exhausted = fleet
            .client_metric(
                "weft_retry_budget_exhausted_total",
                &[("service", "payment"), ("route", "pay")],
            )
            .await;
        eprintln!("{N} requests in {took:?}: {tries} tries, {retries} retries, budget exhausted {exhausted} times");
        assert_eq!(tries, N as f64 + retries, "app tries = requests + retries");
        assert!(
            tries <= 1.25 * N as f64 + floor,
            "{tries} tries for {N} requests: more than 1.25 × {N} + {floor}"
        );
        // The implementation's exact window bound, tighter than the issue's.
        let allowance = (BUDGET_RATIO * N as f64 + floor).floor();
        assert!(retries <= allowance, "{retries} retries > allowance {allowance}");
        // The budget, not something else, is what stopped the retries: it was
        // spent (ratio share and floor), and then refused retries.
        assert!(retries >= BUDGET_RATIO * N as f64, "only {retries} retries");
        assert!(exhausted > 0.0, "weft_retry_budget_exhausted_total stayed 0");
        let budget = &fleet.clusters().await["payment"]["retry_budget"];
        assert_eq!(budget["requests"], N as u64, "{budget}");
        assert_eq!(budget["retries"], retries as u64, "{budget}");
    })
    .await
    .expect("test timed out");
}

// ---- timeouts ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_fires_on_time_and_the_server_stops_the_app_call() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let fleet = Fleet::start(
            &[spec("payment", "slow", &[])],
            r#"
[[services.payment.routes]]
name = "pay"
timeout = "300ms"
"#,
        )
        .await;
        let server = fleet.server("slow");
        server.app.set(0, Duration::from_secs(2));
        let client = Client::new(fleet.upstream("payment"));
        const N: u64 = 4;
        for i in 0..N {
            let a = client.get("/pay", &[]).await.expect("answer");
            eprintln!("request timeout: 504 after {:?}", a.elapsed);
            assert_eq!(a.status, 504, "request {i}: {a:?}");
            assert_eq!(a.header("x-weft-error"), Some("1"), "sidecar-made: {a:?}");
            assert!(a.header("x-app").is_none(), "{a:?}");
            assert!(
                a.elapsed >= Duration::from_millis(300),
                "request {i}: 504 after {:?}, before the 300 ms timeout",
                a.elapsed
            );
            assert!(
                a.elapsed <= Duration::from_millis(350),
                "request {i}: 504 after {:?}, more than 50 ms late",
                a.elapsed
            );
        }
        assert_eq!(
            fleet
                .client_metric(
                    "weft_request_timeouts_total",
                    &[("route", "pay"), ("reason", "request")]
                )
                .await,
            N as f64
        );
        // The deadline went to the server sidecar, which gave up on the app
        // (closing its connection) instead of waiting out the 2 s.
        let seen = &server.app.seen;
        let cancelled = wait_until(Duration::from_secs(1), || async {
            seen.cancelled.load(Ordering::SeqCst) == N
        })
        .await;
        assert!(
            cancelled,
            "the app saw {} of {N} requests cancelled ({} arrived)",
            seen.cancelled.load(Ordering::SeqCst),
            seen.requests.load(Ordering::SeqCst)
        );
        assert_eq!(seen.requests.load(Ordering::SeqCst), N);
        let deadline = server_metric(
            server,
            "weft_request_timeouts_total",
            &[("service", "payment"), ("reason", "deadline")],
        )
        .await;
        assert_eq!(deadline, N as f64, "server-side deadline timeouts");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_retries_on_the_healthy_endpoint() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Round robin sends every other first try to the slow endpoint;
        // P2C would learn to avoid it after its first timeout, and the retry
        // path would run once or twice.
        let fleet = Fleet::start(
            &[spec("payment", "fast", &[]), spec("payment", "slow", &[])],
            r#"load_balancer = "round-robin"
[[services.payment.routes]]
name = "pay"
timeout = "3s"
retries = { attempts = 2, per_try_timeout = "200ms", on = ["reset"] }
"#,
        )
        .await;
        assert_eq!(fleet.clusters().await["payment"]["load_balancer"], "round-robin");
        let (fast, slow) = (fleet.server("fast"), fleet.server("slow"));
        slow.app.set(0, Duration::from_secs(2));
        let client = Client::new(fleet.upstream("payment"));
        const N: usize = 40;
        let answers = load(N, 4, |i| client.get(&format!("/pay/{i}"), &[])).await;
        let counts = by_app(&answers);
        assert_eq!(counts.get("fast"), Some(&N), "{counts:?}");
        let per_try = fleet
            .client_metric(
                "weft_request_timeouts_total",
                &[("route", "pay"), ("reason", "per_try")],
            )
            .await;
        let retries = fleet
            .client_metric(
                "weft_retries_total",
                &[("route", "pay"), ("reason", "per-try-timeout")],
            )
            .await;
        let slow_tries = requests(slow);
        eprintln!(
            "per-try timeouts {per_try}, retries {retries}, slow tries {slow_tries}, p50 {:?}, max {:?}",
            weft_tests::fleet::quantile(&answers, 0.5),
            weft_tests::fleet::quantile(&answers, 1.0)
        );
        assert!(per_try > 0.0, "no per-try timeout fired");
        // Every first try on the slow endpoint timed out and was retried on
        // the fast one, which answered every request exactly once.
        assert_eq!(per_try, slow_tries as f64);
        assert_eq!(retries, per_try);
        assert_eq!(requests(fast), N as u64);
        assert_eq!(
            fleet
                .client_metric("weft_request_timeouts_total", &[("reason", "request")])
                .await,
            0.0
        );
        // A retried request took the per-try timeout, a backoff of at most
        // 25 ms and a fast answer: never anywhere near the slow app's 2 s.
        let late = answers
            .iter()
            .map(ok)
            .filter(|a| a.elapsed >= Duration::from_millis(200))
            .count();
        assert!(late as f64 >= per_try, "{late} answers took 200 ms, {per_try} per-try timeouts");
        for a in answers.iter().map(ok) {
            assert!(a.elapsed < Duration::from_millis(300), "{a:?}");
        }
        // Each abandoned try told the server its 200 ms deadline, so the
        // slow app's calls were all cancelled, not left to run 2 s.
        let seen = &slow.app.seen;
        assert!(
            wait_until(Duration::from_secs(1), || async {
                seen.cancelled.load(Ordering::SeqCst) == slow_tries
            })
            .await,
            "slow app: {} of {slow_tries} cancelled",
            seen.cancelled.load(Ordering::SeqCst)
        );
    })
    .await
    .expect("test timed out");
}

// ---- outlier detection ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_returning_500_is_ejected_and_comes_back_after_the_ejection_time() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let fleet = Fleet::start(
            &[
                spec("payment", "a", &[]),
                spec("payment", "b", &[]),
                spec("payment", "bad", &[]),
            ],
            r#"
[[services.payment.routes]]
name = "pay"
retries = { attempts = 0 }
[services.payment.outlier_detection]
consecutive_5xx = 3
base_ejection_time = "1s"
max_ejection_percent = 50
"#,
        )
        .await;
        let bad = fleet.server("bad");
        bad.app.behaviour.fail_status.store(500, Ordering::SeqCst);
        bad.app.set(100, Duration::ZERO);
        let client = Client::new(fleet.upstream("payment"));
        let ejections = || async {
            fleet
                .client_metric(
                    "weft_outlier_ejections_total",
                    &[("service", "payment"), ("reason", "5xx")],
                )
                .await
        };

        // One request at a time, so each result is counted before the next
        // request picks an endpoint: the third 500 must eject, not earlier.
        let mut failures = 0;
        let mut sent = 0;
        while failures < 3 {
            sent += 1;
            assert!(sent <= 200, "bad got only {failures} requests out of 200");
            let a = client.get("/pay", &[]).await.expect("answer");
            if a.status == 500 {
                assert_eq!(a.header("x-app"), Some("bad"));
                failures += 1;
                let want = if failures == 3 { 1.0 } else { 0.0 };
                assert_eq!(
                    ejections().await,
                    want,
                    "ejections after {failures} failures"
                );
            } else {
                assert_eq!(a.status, 200, "{a:?}");
            }
        }
        let ejected_at = Instant::now();
        let ep = endpoint(&fleet, "payment", bad).await;
        assert_eq!(ep["ejected"], true, "{ep}");
        assert_eq!(ep["health"], "ejected", "{ep}");
        assert_eq!(ep["times_ejected"], 1, "{ep}");
        for name in ["a", "b"] {
            let ep = endpoint(&fleet, "payment", fleet.server(name)).await;
            assert_eq!(ep["ejected"], false, "{name}: {ep}");
        }

        // Healthy again, but still ejected: it gets nothing until the second is up.
        bad.app.set(0, Duration::ZERO);
        let bad_before = requests(bad);
        let answers = load(300, 8, |i| client.get(&format!("/pay/{i}"), &[])).await;
        let during = ejected_at.elapsed();
        eprintln!("300 requests while ejected: done {during:?} after the ejection");
        let still_ejected = endpoint(&fleet, "payment", bad).await["ejected"] == true;
        assert!(
            still_ejected && during < Duration::from_millis(950),
            "300 requests took {during:?}: longer than the ejection, so this test cannot \
             tell where they went"
        );
        let counts = by_app(&answers);
        assert_eq!(
            counts.get("a").copied().unwrap_or(0) + counts.get("b").copied().unwrap_or(0),
            300,
            "{counts:?}"
        );
        assert_eq!(requests(bad), bad_before, "an ejected endpoint got traffic");

        // After the ejection time it is tried again (probation) and stays in.
        let back = wait_until(Duration::from_secs(3), || async {
            let _ = load(4, 2, |_| client.get("/pay", &[])).await;
            requests(bad) > bad_before
        })
        .await;
        let back_after = ejected_at.elapsed();
        eprintln!("traffic back {back_after:?} after the ejection");
        assert!(back, "the ejected endpoint never got traffic again");
        assert!(
            back_after >= Duration::from_millis(950),
            "traffic came back after {back_after:?}, before the 1 s ejection ended"
        );
        assert!(
            back_after < Duration::from_secs(2),
            "back after {back_after:?}"
        );
        let ep = endpoint(&fleet, "payment", bad).await;
        assert_eq!(ep["ejected"], false, "{ep}");
        assert_eq!(ep["probation"], false, "a success ends probation: {ep}");
        assert_eq!(ejections().await, 1.0);
    })
    .await
    .expect("test timed out");
}

// ---- circuit breaker -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_beyond_the_limits_answers_503_at_once() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let fleet = Fleet::start(
            &[spec("payment", "p", &[]), spec("ledger", "l", &[])],
            r#"
[services.payment.circuit_breaker]
max_requests = 4
max_pending = 0
[services.ledger.circuit_breaker]
max_requests = 4
max_pending = 2
"#,
        )
        .await;
        for s in &fleet.servers {
            s.app.set(0, Duration::from_secs(1));
        }
        let breaker = |service: &'static str| {
            let fleet = &fleet;
            move || async move {
                let c = fleet.clusters().await;
                let b = &c[service]["circuit_breaker"];
                (
                    b["active"].as_u64().unwrap_or(0),
                    b["pending"].as_u64().unwrap_or(0),
                )
            }
        };
        let overflow = |a: &Answer| {
            assert_eq!(a.status, 503, "{a:?}");
            assert_eq!(a.header("x-weft-overflow"), Some("1"), "{a:?}");
            assert_eq!(a.header("x-weft-error"), Some("1"), "{a:?}");
            assert!(
                a.elapsed < Duration::from_millis(200),
                "overflow after {:?}",
                a.elapsed
            );
        };

        let no_queue = async {
            let client = Client::new(fleet.upstream("payment"));
            let held: Vec<_> = (0..4)
                .map(|_| tokio::spawn(client.get("/pay", &[])))
                .collect();
            let state = breaker("payment");
            assert!(
                wait_until(Duration::from_secs(5), || async { state().await == (4, 0) }).await,
                "payment breaker: {:?}",
                state().await
            );
            overflow(&client.get("/pay", &[]).await.expect("answer"));
            for h in held {
                let a = h.await.expect("task").expect("answer");
                assert_eq!((a.status, a.header("x-app")), (200, Some("p")), "{a:?}");
            }
        };

        let queue = async {
            let client = Client::new(fleet.upstream("ledger"));
            let held: Vec<_> = (0..4)
                .map(|_| tokio::spawn(client.get("/led", &[])))
                .collect();
            let state = breaker("ledger");
            assert!(
                wait_until(Duration::from_secs(5), || async { state().await == (4, 0) }).await,
                "ledger breaker: {:?}",
                state().await
            );
            let queued: Vec<_> = (0..2)
                .map(|_| tokio::spawn(client.get("/led", &[])))
                .collect();
            assert!(
                wait_until(Duration::from_secs(5), || async { state().await == (4, 2) }).await,
                "ledger breaker: {:?}",
                state().await
            );
            overflow(&client.get("/led", &[]).await.expect("answer"));
            for h in held {
                let a = h.await.expect("task").expect("answer");
                assert_eq!((a.status, a.header("x-app")), (200, Some("l")), "{a:?}");
            }
            for h in queued {
                let a = h.await.expect("task").expect("answer");
                assert_eq!((a.status, a.header("x-app")), (200, Some("l")), "{a:?}");
                // It waited for a slot, then for the app.
                assert!(a.elapsed > Duration::from_millis(1500), "{a:?}");
            }
        };
        tokio::join!(no_queue, queue);

        for (service, app) in [("payment", "p"), ("ledger", "l")] {
            let m = fleet
                .client_metric(
                    "weft_circuit_breaker_overflows_total",
                    &[("service", service), ("reason", "requests")],
                )
                .await;
            assert_eq!(m, 1.0, "{service} overflows");
            let want = if service == "payment" { 4 } else { 6 };
            assert_eq!(
                requests(fleet.server(app)),
                want,
                "{service}: the overflow never reached the app"
            );
        }
    })
    .await
    .expect("test timed out");
}

// ---- what may be retried -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_retried_only_when_the_route_allows_and_its_body_is_replayed_whole() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // The default budget's floor (100 retries) covers the 30 retries here.
        let fleet = Fleet::start(
            &[spec("payment", "down", &[])],
            r#"
[[services.payment.routes]]
name = "replay"
match = { path_prefix = "/replay" }
retries = { attempts = 3, on = ["5xx"], non_idempotent = true }
[[services.payment.routes]]
name = "plain"
retries = { attempts = 3, on = ["5xx"] }
"#,
        )
        .await;
        let app = fleet.server("down");
        app.app.set(100, Duration::ZERO);
        let client = Client::new(fleet.upstream("payment"));
        let retries = |route: &'static str| {
            let fleet = &fleet;
            async move {
                fleet
                    .client_metric("weft_retries_total", &[("route", route)])
                    .await
            }
        };
        let from_app_503 = |a: &Answer, len: usize| {
            assert_eq!(a.status, 503, "{a:?}");
            assert_eq!(a.header("x-app"), Some("down"), "{a:?}");
            assert_eq!(
                a.header("x-body-len"),
                Some(len.to_string().as_str()),
                "{a:?}"
            );
        };

        // POST on a route that retries 5xx but not non-idempotent methods.
        let body = vec![7u8; 1024];
        for _ in 0..10 {
            from_app_503(
                &client
                    .send("POST", "/plain", &[], &body)
                    .await
                    .expect("answer"),
                1024,
            );
        }
        assert_eq!(requests(app), 10, "one try per POST");
        assert_eq!(retries("plain").await, 0.0);
        // The same route does retry a GET: it is the method that stopped it.
        for _ in 0..5 {
            from_app_503(&client.get("/plain", &[]).await.expect("answer"), 0);
        }
        assert_eq!(requests(app), 10 + 5 * 4);
        assert_eq!(retries("plain").await, 15.0);

        // With non_idempotent = true the POST is retried, and each try gets
        // the whole body (40 KiB: several frames, kept for replay).
        let body: Vec<u8> = (0..40 * 1024).map(|i| (i % 251) as u8).collect();
        for _ in 0..5 {
            // The answer is the fourth try's: a replayed body.
            from_app_503(
                &client
                    .send("POST", "/replay", &[], &body)
                    .await
                    .expect("answer"),
                body.len(),
            );
        }
        assert_eq!(requests(app), 30 + 5 * 4);
        assert_eq!(retries("replay").await, 15.0);

        // A body above max_body_bytes (64 KiB) streams and is not kept: no retry.
        let big = vec![1u8; 100 * 1024];
        from_app_503(
            &client
                .send("POST", "/replay", &[], &big)
                .await
                .expect("answer"),
            big.len(),
        );
        assert_eq!(requests(app), 50 + 1);
        assert_eq!(retries("replay").await, 15.0);
        assert_eq!(
            fleet
                .client_metric("weft_retry_budget_exhausted_total", &[])
                .await,
            0.0
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_on_a_live_endpoint_by_default() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Nothing listens on UDP port 9 (discard): the handshake never
        // completes and the 300 ms connect timeout ends each try there.
        let fleet = Fleet::start_with(
            &[spec("payment", "live", &[])],
            &[("payment", r#"{ addr = "127.0.0.1:9" }"#)],
            r#"connect_timeout = "300ms"
"#,
        )
        .await;
        let (_, config) = admin_get(fleet.client.admin_addr, "/config").await;
        assert!(
            config.contains("300ms"),
            "connect_timeout not applied: {config}"
        );
        let live = fleet.server("live");
        let client = Client::new(fleet.upstream("payment"));
        const N: usize = 50;
        let start = Instant::now();
        let answers = load(N, 4, |i| client.get(&format!("/pay/{i}"), &[])).await;
        let took = start.elapsed();
        let counts = by_app(&answers);
        assert_eq!(counts.get("live"), Some(&N), "{counts:?}");
        assert_eq!(requests(live), N as u64, "one try each reached the app");
        let retries = fleet
            .client_metric(
                "weft_retries_total",
                &[("service", "payment"), ("reason", "connect-failure")],
            )
            .await;
        eprintln!(
            "{N} requests in {took:?}, {retries} connect-failure retries, p50 {:?}, max {:?}",
            weft_tests::fleet::quantile(&answers, 0.5),
            weft_tests::fleet::quantile(&answers, 1.0)
        );
        // Some first tries went to the dead endpoint (P2C cannot know yet),
        // but once one has failed, its estimate (the 300 ms it cost) keeps
        // P2C off it: only tries already under way could pick it, and no
        // more than the 4 in flight can be.
        assert!(
            (1.0..=4.0).contains(&retries),
            "{retries} requests tried the dead endpoint first"
        );
        for a in answers.iter().map(ok) {
            // At worst one connect timeout, a backoff and the live answer.
            assert!(a.elapsed < Duration::from_millis(450), "{a:?}");
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_costs_one_handshake_not_one_per_request() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // The only endpoint of `zombie` never answers. Each request gives up
        // after the 300 ms connect timeout, but the handshake itself (the
        // transport's 5 s limit) goes on for everyone: requests queued
        // behind it must join it, not start their own.
        let fleet = Fleet::start_with(
            &[spec("payment", "live", &[])],
            // (Last in name order, so the policy line lands in its table.)
            &[("zombie", r#"{ addr = "127.0.0.1:9" }"#)],
            "connect_timeout = \"300ms\"\n",
        )
        .await;
        let client = Client::new(fleet.upstream("zombie"));
        let start = Instant::now();
        let answers = load(40, 8, |_| client.get("/", &[])).await;
        let took = start.elapsed();
        assert!(
            answers
                .iter()
                .all(|a| a.as_ref().is_ok_and(|a| a.status == 503)),
            "{:?}",
            weft_tests::fleet::by_app(&answers)
        );
        let (h3_handshakes, _) = fleet.client.pool_handshakes();
        assert!(
            took < Duration::from_secs(4),
            "{took:?}: the 300 ms connect timeout did not apply"
        );
        assert!(
            h3_handshakes <= 2,
            "{h3_handshakes} handshakes for 40 requests in {took:?} to one dead peer"
        );
    })
    .await
    .expect("test timed out");
}
