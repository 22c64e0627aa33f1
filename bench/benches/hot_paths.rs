//! Micro-benchmarks of the pure functions on every request or stream: the
//! L4 preamble codec, route matching, and header handling at the mesh
//! boundary. Run: `cargo bench -p weft-bench --bench hot_paths`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use weft_proxy::Mesh;
use weft_transport::preamble::{Request, Response, Status};

fn preamble(c: &mut Criterion) {
    let req = Request {
        target: "payment.shop.svc".into(),
        port: 8080,
        deadline_ms: 1500,
    };
    let encoded = req.encode().expect("valid target");
    c.bench_function("preamble/request_encode", |b| {
        b.iter(|| black_box(&req).encode())
    });
    c.bench_function("preamble/request_decode", |b| {
        b.iter(|| Request::decode(black_box(&encoded)))
    });
    let resp = Response::new(Status::Ok, "");
    let encoded = resp.encode();
    c.bench_function("preamble/response_encode", |b| {
        b.iter(|| black_box(&resp).encode())
    });
    c.bench_function("preamble/response_decode", |b| {
        b.iter(|| Response::decode(black_box(&encoded)))
    });
}

const MESH: &str = r#"
trust_domain = "example.org"
[services.payment]
endpoints = [
  { addr = "127.0.0.1:15108", labels = { version = "v1" } },
  { addr = "127.0.0.1:15208", labels = { version = "v2" } },
]
[[services.payment.routes]]
name = "canary-header"
match = { headers = { "x-canary" = "1" }, path_prefix = "/" }
backends = [ { subset = { version = "v2" } } ]
[[services.payment.routes]]
name = "admin"
match = { path_regex = "^/admin/[a-z]+$", methods = ["POST"] }
backends = [ { subset = { version = "v1" } } ]
[[services.payment.routes]]
name = "beta-cookie"
match = { cookies = { "beta" = "yes" } }
backends = [ { subset = { version = "v2" } } ]
[[services.payment.routes]]
name = "split"
backends = [ { subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 } ]
"#;

fn browser_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "payment.shop.svc"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) bench"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("cookie", "session=abc123; theme=dark; beta=no"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("connection", "keep-alive"),
        ("content-type", "application/json"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn routes(c: &mut Criterion) {
    let mesh = Mesh::parse(MESH, "bench mesh").expect("the bench mesh is valid");
    let service = mesh
        .service("payment")
        .expect("payment is in the bench mesh");
    let headers = browser_headers();
    // The request falls through three routes to the last one: the common worst case.
    c.bench_function("route/select_fallthrough_4_routes", |b| {
        b.iter(|| {
            weft_proxy::route::select(
                black_box(&service.routes),
                &Method::GET,
                black_box("/charge/42"),
                black_box(&headers),
            )
        })
    });
    let mut canary = headers.clone();
    canary.insert("x-canary", HeaderValue::from_static("1"));
    c.bench_function("route/select_first_route_header", |b| {
        b.iter(|| {
            weft_proxy::route::select(
                black_box(&service.routes),
                &Method::GET,
                black_box("/charge/42"),
                black_box(&canary),
            )
        })
    });
}

fn headers(c: &mut Criterion) {
    let headers = browser_headers();
    c.bench_function("headers/strip_hop_by_hop", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                weft_proxy::headers::strip_hop_by_hop(&mut h);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("headers/clone_only_baseline", |b| {
        b.iter(|| black_box(&headers).clone())
    });
}

criterion_group!(benches, preamble, routes, headers);
criterion_main!(benches);
