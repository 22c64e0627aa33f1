//! HTTP through a pair of sidecars: the app speaks HTTP/1.1 or HTTP/2 to the
//! client sidecar, the sidecars speak HTTP/3 over mTLS QUIC, the server
//! sidecar speaks HTTP/1.1 to the app.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use weft_proxy::mesh::Protocol;
use weft_proxy::Limits;
use weft_tests::*;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

type TestBody = BoxBody<Bytes, Infallible>;

fn empty() -> TestBody {
    Empty::new().boxed()
}

fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).boxed()
}

/// A body streamed from [`pattern_chunks`]: the test never holds it whole.
fn pattern_body(total: usize) -> TestBody {
    let frames = futures::stream::iter(pattern_chunks(total, 64 << 10).map(|b| Ok(Frame::data(b))));
    StreamBody::new(frames).boxed()
}

/// Send one request on a new HTTP/1.1 connection to `addr`, as an app would.
async fn send(addr: SocketAddr, req: Request<TestBody>) -> hyper::Result<Response<Incoming>> {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the sidecar");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    sender.send_request(req).await
}

fn get(addr: SocketAddr, path: &str) -> Request<TestBody> {
    Request::get(path)
        .header("host", addr.to_string())
        .body(empty())
        .expect("request")
}

fn header<'a>(resp: &'a Response<Incoming>, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("response has no {name}: {:?}", resp.headers()))
}

async fn body_bytes(resp: Response<Incoming>) -> Bytes {
    resp.into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes()
}

/// All values of a header field in a parsed description.
fn values<'a>(fields: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    fields
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_carries_identity_host_and_target_and_strips_hop_by_hop() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, seen) = http_describe_app().await;
        let pair = Pair::start(&[("payment", Protocol::Http)], app).await;
        let up = pair.upstream("payment");
        let target = "/pay/items?id=42&note=a%20b&empty=";
        let req = Request::get(target)
            .header("host", up.to_string())
            // A calling app must not be able to claim an identity.
            .header("x-weft-peer-id", pair.ca.id("admin"))
            .header("x-weft-peer-id", "spiffe://evil.example/ns/x/sa/y")
            // Hop-by-hop: the field named by Connection, and keep-alive.
            .header("connection", "x-foo")
            .header("x-foo", "1")
            .header("keep-alive", "timeout=5")
            .header("x-keep", "yes")
            .body(empty())
            .expect("request");
        let resp = send(up, req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.headers().get("x-weft-error").is_none(),
            "{:?}",
            resp.headers()
        );
        let (line, fields) = parse_description(&body_bytes(resp).await);
        assert_eq!(
            line,
            format!("GET {target}"),
            "method, path and query reach the app intact"
        );
        assert_eq!(
            values(&fields, "x-weft-peer-id"),
            vec![pair.ca.id("customer").as_str()],
            "the app sees exactly the caller's real SPIFFE ID: {fields:?}"
        );
        assert_eq!(values(&fields, "host"), vec!["payment"], "{fields:?}");
        for hop in ["connection", "x-foo", "keep-alive"] {
            assert!(
                values(&fields, hop).is_empty(),
                "{hop} reached the app: {fields:?}"
            );
        }
        assert_eq!(
            values(&fields, "x-keep"),
            vec!["yes"],
            "end-to-end fields pass: {fields:?}"
        );
        assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_10_mib_is_echoed_byte_identical() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        const N: usize = 10 << 20;
        let (app, seen) = http_app().await;
        let pair = Pair::start(&[("payment", Protocol::Http)], app).await;
        let up = pair.upstream("payment");
        let sent = Bytes::from(pattern(N));
        let req = Request::post("/upload")
            .header("host", up.to_string())
            .body(full(sent.clone()))
            .expect("request");
        let resp = send(up, req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-seen-method"), "POST");
        assert_eq!(header(&resp, "x-seen-len"), N.to_string());
        let echoed = body_bytes(resp).await;
        assert_eq!(echoed.len(), N);
        assert!(echoed == sent, "echoed body differs from what was sent");
        assert_eq!(seen.body_bytes.load(Ordering::SeqCst), N as u64);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_from_the_app() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, seen) = http_app().await;
        let pair = Pair::start(&[("payment", Protocol::Http)], app).await;
        let up = pair.upstream("payment");
        let stream = TcpStream::connect(up).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake with the sidecar");
        tokio::spawn(conn);

        let uri = format!("http://{up}/h2/get?x=1");
        let get = Request::get(uri).body(empty()).expect("request");
        let body = Bytes::from(pattern(1 << 20));
        let post = Request::post(format!("http://{up}/h2/post"))
            .body(full(body.clone()))
            .expect("request");
        // Both streams on the one HTTP/2 connection, concurrently.
        let (mut s1, mut s2) = (sender.clone(), sender);
        let (r1, r2) = tokio::join!(s1.send_request(get), s2.send_request(post));
        let r1 = r1.expect("GET over h2");
        let r2 = r2.expect("POST over h2");

        assert_eq!(r1.status(), StatusCode::OK);
        assert_eq!(r1.version(), Version::HTTP_2);
        assert_eq!(header(&r1, "x-seen-method"), "GET");
        assert_eq!(header(&r1, "x-seen-path"), "/h2/get");
        assert_eq!(header(&r1, "x-seen-host"), "payment");
        assert_eq!(header(&r1, "x-seen-peer-id"), pair.ca.id("customer"));

        assert_eq!(r2.status(), StatusCode::OK);
        assert_eq!(r2.version(), Version::HTTP_2);
        assert_eq!(header(&r2, "x-seen-method"), "POST");
        assert_eq!(header(&r2, "x-seen-len"), body.len().to_string());
        let echoed = body_bytes(r2).await;
        assert!(echoed == body, "h2 POST body echoed differently");
        assert_eq!(seen.requests.load(Ordering::SeqCst), 2);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_quic_connection() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        const N: usize = 100;
        let (app, seen) = http_app().await;
        let pair = Pair::start(&[("payment", Protocol::Http)], app).await;
        let up = pair.upstream("payment");
        // No warm-up: all requests race for the first connection, so the
        // pool's handshake deduplication is what is under test.
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                tokio::spawn(async move {
                    let resp = send(up, get(up, &format!("/n/{i}")))
                        .await
                        .expect("response");
                    let status = resp.status();
                    let path = header(&resp, "x-seen-path").to_string();
                    (status, path)
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let (status, path) = t.await.expect("request task");
            assert_eq!(status, StatusCode::OK, "request {i}");
            assert_eq!(
                path,
                format!("/n/{i}"),
                "request {i} answered with another's response"
            );
        }
        assert_eq!(seen.requests.load(Ordering::SeqCst), N as u64);

        let client = scrape(pair.client.admin_addr).await;
        let server = scrape(pair.server.admin_addr).await;
        assert_eq!(quic_connections(&client, "outbound", "h3"), 1.0);
        assert_eq!(quic_connections(&server, "inbound", "h3"), 1.0);
        assert_eq!(
            pair.client.pool_handshakes().0,
            1,
            "one handshake for {N} concurrent requests"
        );
        assert_eq!(
            metric_sum(
                &client,
                "weft_requests_total",
                &[
                    ("direction", "outbound"),
                    ("service", "payment"),
                    ("status", "200")
                ]
            ),
            N as f64
        );
        assert_eq!(
            metric_sum(
                &server,
                "weft_requests_total",
                &[
                    ("direction", "inbound"),
                    ("service", "payment"),
                    ("status", "200")
                ]
            ),
            N as f64
        );
    })
    .await
    .expect("test timed out");
}

/// Download `n` bytes from `/big` and upload `n` bytes, both streamed.
async fn stream_both_ways(n: usize) {
    let (app, seen) = http_stream_app().await;
    let pair = Pair::start(&[("payment", Protocol::Http)], app).await;
    let up = pair.upstream("payment");
    let (want_len, want_sum) = Checksum::of_pattern(n);
    assert_eq!(want_len, n as u64);

    // Download, checked as it streams.
    let resp = send(up, get(up, &format!("/big?bytes={n}")))
        .await
        .expect("download response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Checksum::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("download body").into_data() {
            got.update(&data);
        }
    }
    assert_eq!(got.len(), n as u64, "download length");
    assert_eq!(got.hex(), want_sum, "download content");

    // Upload, generated as it streams.
    let req = Request::post("/upload")
        .header("host", up.to_string())
        .body(pattern_body(n))
        .expect("request");
    let resp = send(up, req).await.expect("upload response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "x-seen-len"),
        n.to_string(),
        "upload length at the app"
    );
    assert_eq!(
        header(&resp, "x-seen-sha256"),
        want_sum,
        "upload content at the app"
    );
    assert_eq!(seen.body_bytes.load(Ordering::SeqCst), n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_32_mib_download_and_upload() {
    tokio::time::timeout(TEST_TIMEOUT, stream_both_ways(32 << 20))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_100_mib_download_and_upload() {
    tokio::time::timeout(TEST_TIMEOUT, stream_both_ways(100 << 20))
        .await
        .expect("test timed out");
}

/// An app whose responses carry a header of `size` bytes.
async fn big_response_header_app(size: usize) -> SocketAddr {
    let listener = TcpListener::bind(any_port()).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                    let resp = Response::builder()
                        .header("x-huge", "h".repeat(size))
                        .body(Full::new(Bytes::from_static(b"ok")))
                        .expect("response");
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_an_http_status_not_a_hang() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        const LIMIT: usize = 16 << 10;
        let limits = Limits {
            max_header_bytes: LIMIT,
            ..Limits::default()
        };
        let (app, seen) = http_app().await;
        let huge_app = big_response_header_app(2 * LIMIT).await;
        let pair = Pair::start_with(&[("payment", Protocol::Http)], app, limits.clone()).await;
        let up = pair.upstream("payment");

        // One 32 KiB header: over the client sidecar's HTTP/1.1 limit.
        let req = Request::get("/too-big")
            .header("host", up.to_string())
            .header("x-big", "b".repeat(2 * LIMIT))
            .body(empty())
            .expect("request");
        match send(up, req).await {
            Ok(resp) => assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            // The sidecar may close before the client reads the 431: a clean error, not a hang.
            Err(e) => assert!(!e.is_canceled(), "unexpected client error: {e}"),
        }

        // Under the HTTP/1.1 buffer but over the HTTP/3 field-section limit
        // (which charges 32 bytes per field): refused as 431 too.
        let mut req = Request::get("/many").header("host", up.to_string());
        // 44 fields of 350 bytes: ~15.9 KB on the wire, ~17 KB as HTTP/3 counts it.
        for i in 0..44 {
            req = req.header(format!("x-f{i:02}"), "v".repeat(350));
        }
        let resp = send(up, req.body(empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(
            resp.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "{:?}",
            resp.headers()
        );
        assert_eq!(
            seen.requests.load(Ordering::SeqCst),
            0,
            "no oversized request reached the app"
        );

        // A normal request on a new connection still works.
        let resp = send(up, get(up, "/after")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-seen-path"), "/after");

        // A response header over the limit: the app gets an HTTP error status, not a hang.
        let huge = Pair::start_with(&[("payment", Protocol::Http)], huge_app, limits).await;
        let up = huge.upstream("payment");
        let resp = send(up, get(up, "/")).await.expect("response");
        assert!(
            resp.status().is_server_error(),
            "oversized response header: got {}",
            resp.status()
        );
        assert_eq!(header(&resp, "x-weft-error"), "1");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_services_get_503_and_others_keep_working() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, seen) = http_app().await;
        let pair = Pair::start(
            &[
                ("payment", Protocol::Http),
                ("empty", Protocol::Http),
                ("nowhere", Protocol::Http),
            ],
            app,
        )
        .await;
        // A UDP port nobody listens on: bind, note it, close.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free UDP port");
        let mut mesh = pair.mesh.clone();
        mesh.services
            .get_mut("empty")
            .expect("empty")
            .endpoints
            .clear();
        let nowhere = mesh.services.get_mut("nowhere").expect("nowhere");
        nowhere.endpoints.clear();
        let mesh = with_endpoint(mesh, "nowhere", dead);
        pair.client.set_mesh(mesh);

        let up = pair.upstream("empty");
        let resp = send(up, get(up, "/")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(&resp, "x-weft-error"), "1");

        let up_nowhere = pair.upstream("nowhere");
        let started = Instant::now();
        let pending = tokio::spawn(async move {
            let resp = send(up_nowhere, get(up_nowhere, "/"))
                .await
                .expect("response");
            (
                resp.status(),
                resp.headers().get("x-weft-error").cloned(),
                started.elapsed(),
            )
        });

        // While that dial hangs, other services are served.
        let up = pair.upstream("payment");
        for i in 0..3 {
            let resp = send(up, get(up, &format!("/ok/{i}")))
                .await
                .expect("response");
            assert_eq!(resp.status(), StatusCode::OK);
        }
        assert!(
            !pending.is_finished(),
            "the dead peer answered before its connect timeout"
        );

        let (status, err, elapsed) = pending.await.expect("task");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.as_ref().and_then(|v| v.to_str().ok()), Some("1"));
        let bound = weft_transport::endpoint::CONNECT_TIMEOUT + Duration::from_secs(3);
        assert!(
            elapsed < bound,
            "503 took {elapsed:?}, connect timeout is {:?}",
            weft_transport::endpoint::CONNECT_TIMEOUT
        );

        // And still afterwards.
        let resp = send(up, get(up, "/after")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            seen.requests.load(Ordering::SeqCst),
            4,
            "only payment requests reached the app"
        );
    })
    .await
    .expect("test timed out");
}

/// What [`aborting_app`] gives the test.
struct Aborting {
    addr: SocketAddr,
    /// Request body bytes received so far, over all requests.
    received: Arc<AtomicU64>,
    /// Each request body's (length, complete?) once it ended.
    bodies: tokio::sync::mpsc::UnboundedReceiver<(u64, bool)>,
    /// Fails the pending GET response bodies when notified.
    abort: Arc<Notify>,
}

/// An app that, for GET, streams `first` bytes of response body and then,
/// when told, fails it; for POST, records how the request body ended.
async fn aborting_app(first: usize) -> Aborting {
    let listener = TcpListener::bind(any_port()).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let (tx, bodies) = tokio::sync::mpsc::unbounded_channel();
    let received = Arc::new(AtomicU64::new(0));
    let abort = Arc::new(Notify::new());
    let (received2, abort2) = (received.clone(), abort.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tx, received, abort) = (tx.clone(), received2.clone(), abort2.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (tx, received, abort) = (tx.clone(), received.clone(), abort.clone());
                    async move {
                        type Body = BoxBody<Bytes, std::io::Error>;
                        if req.method() == http::Method::POST {
                            let mut body = req.into_body();
                            let mut n = 0u64;
                            let complete = loop {
                                match body.frame().await {
                                    None => break true,
                                    Some(Err(_)) => break false,
                                    Some(Ok(f)) => {
                                        let k = f.data_ref().map_or(0, |d| d.len() as u64);
                                        n += k;
                                        received.fetch_add(k, Ordering::SeqCst);
                                    }
                                }
                            };
                            let _ = tx.send((n, complete));
                            let body: Body = Empty::new().map_err(|e| match e {}).boxed();
                            return Ok::<_, Infallible>(Response::new(body));
                        }
                        let data = futures::stream::iter(
                            pattern_chunks(first, 16 << 10)
                                .map(|b| Ok::<_, std::io::Error>(Frame::data(b))),
                        );
                        let failure = futures::stream::once(async move {
                            abort.notified().await;
                            Err(std::io::Error::other("app failed mid-body"))
                        });
                        let body: Body =
                            StreamBody::new(futures::StreamExt::chain(data, failure)).boxed();
                        Ok(Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Aborting {
        addr,
        received,
        bodies,
        abort,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_aborted_mid_body_is_an_error_not_a_short_body() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        const FIRST: usize = 256 << 10;
        let app = aborting_app(FIRST).await;
        let pair = Pair::start(&[("payment", Protocol::Http)], app.addr).await;
        let up = pair.upstream("payment");
        let resp = send(up, get(up, "/abort")).await.expect("response head");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut n = 0usize;
        let ended = loop {
            if n == FIRST {
                // Everything before the failure has crossed the mesh: now fail.
                app.abort.notify_one();
            }
            match body.frame().await {
                None => break Ok(()),
                Some(Err(e)) => break Err(e),
                Some(Ok(f)) => n += f.data_ref().map_or(0, |d| d.len()),
            }
        };
        assert_eq!(n, FIRST, "bytes before the failure");
        assert!(
            ended.is_err(),
            "an aborted response body arrived as a clean end after {n} bytes"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_aborted_mid_body_is_an_error_at_the_app() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        const FIRST: usize = 256 << 10;
        let mut app = aborting_app(0).await;
        let pair = Pair::start(&[("payment", Protocol::Http)], app.addr).await;
        let up = pair.upstream("payment");

        // A chunked upload whose source fails after FIRST bytes, once the
        // app has received them all.
        let received = app.received.clone();
        let data = futures::stream::iter(
            pattern_chunks(FIRST, 16 << 10).map(|b| Ok::<_, std::io::Error>(Frame::data(b))),
        );
        let failure = futures::stream::once(async move {
            let arrived = wait_until(Duration::from_secs(20), || {
                let received = received.clone();
                async move { received.load(Ordering::SeqCst) == FIRST as u64 }
            })
            .await;
            Err(std::io::Error::other(format!(
                "caller failed mid-body (app had it all: {arrived})"
            )))
        });
        let req = Request::post("/upload")
            .header("host", up.to_string())
            .body(StreamBody::new(futures::StreamExt::chain(data, failure)))
            .expect("request");
        let stream = TcpStream::connect(up).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let result = sender.send_request(req).await;
        assert!(
            result.is_err(),
            "the caller's own client reports its failed body"
        );

        let (n, complete) = app.bodies.recv().await.expect("the app saw the request");
        assert_eq!(n, FIRST as u64, "bytes before the failure");
        assert!(
            !complete,
            "an aborted request body reached the app as complete ({n} bytes)"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connection_carries_head_get_and_post_in_turn() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (app, seen) = http_app().await;
        let pair = Pair::start(&[("payment", Protocol::Http)], app).await;
        let up = pair.upstream("payment");
        let stream = TcpStream::connect(up).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);

        // HEAD: the length of a body that is not sent must not confuse the
        // framing of the next response on the same connection.
        let head = Request::head("/big?bytes=1000")
            .header("host", up.to_string())
            .body(empty())
            .expect("request");
        let resp = sender.send_request(head).await.expect("HEAD");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "content-length"), "1000");
        assert!(
            body_bytes(resp).await.is_empty(),
            "HEAD response with a body"
        );

        sender
            .ready()
            .await
            .expect("connection reusable after HEAD");
        let resp = sender
            .send_request(get(up, "/big?bytes=3000"))
            .await
            .expect("GET");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_bytes(resp).await, Bytes::from(pattern(3000)));

        sender.ready().await.expect("connection reusable after GET");
        let post = Request::post("/p")
            .header("host", up.to_string())
            .body(full("ping"))
            .expect("request");
        let resp = sender.send_request(post).await.expect("POST");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "x-seen-path"), "/p");
        assert_eq!(body_bytes(resp).await, Bytes::from_static(b"ping"));
        assert_eq!(seen.requests.load(Ordering::SeqCst), 3);
    })
    .await
    .expect("test timed out");
}
