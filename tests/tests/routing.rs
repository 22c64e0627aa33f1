//! Routing end to end: weighted backends (canaries), header and cookie
//! routes (A/B tests), through real sidecars.

use weft_tests::fleet::{by_app, load, spec, Client, Fleet};

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
