//! Peers that are authenticated but misbehave: malformed L4 preambles, more
//! connections than allowed, oversized HTTP/3 header sections. Each abuse is
//! answered for the offending stream or connection only; everyone else, and
//! later well-formed traffic, is unaffected.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use weft_proxy::mesh::Protocol;
use weft_proxy::Limits;
use weft_tests::*;
use weft_transport::preamble::{self, Status};

const LIMIT: Duration = Duration::from_secs(60);

async fn refused(admin: SocketAddr, reason: &str) -> f64 {
    metric_sum(
        &scrape(admin).await,
        "weft_refused_total",
        &[("reason", reason)],
    )
}

/// One stream: send `bytes` (then finish if `finish`), read everything the
/// server sends back. Err if the stream was reset or the connection failed.
async fn stream_exchange(
    conn: &quinn::Connection,
    bytes: &[u8],
    finish: bool,
) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    // The server may stop our send side once it has seen enough: a write
    // error is not the outcome under test, the answer is.
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    recv.read_to_end(preamble::MAX_RESPONSE_LEN + (1 << 16))
        .await
        .map_err(|e| e.to_string())
}

fn status_of(bytes: &[u8]) -> Status {
    preamble::Response::decode(bytes)
        .unwrap_or_else(|e| panic!("not a preamble response ({e}): {bytes:?}"))
        .0
        .status
}

fn request(target: &str) -> Vec<u8> {
    preamble::Request {
        target: target.into(),
        port: 0,
        deadline_ms: 0,
    }
    .encode()
    .expect("encode")
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_preamble_abuse_is_answered_per_stream() {
    tokio::time::timeout(LIMIT, async {
        let ca = TestCa::new(TD);
        let (echo, echo_seen) = tcp_echo_app().await;
        let m = mesh(TD, &[("payment", Protocol::Http), ("echo", Protocol::Tcp)]);
        let server = sidecar(&m, ca.creds("echo"), Some(echo), &[], Limits::default()).await;
        let m = with_endpoint(
            with_endpoint(m, "echo", server.inbound_addr),
            "payment",
            server.inbound_addr,
        );
        server.set_mesh(m);

        let creds = ca.creds("prober");
        let endpoint = quic_client(&creds.bundle, Some(client_cert(&creds)), b"weft-l4");
        let conn = endpoint
            .connect(server.inbound_addr, "weft.mesh")
            .expect("dial")
            .await
            .expect("a valid mesh certificate is admitted");

        // Garbage: not even the magic.
        let back = stream_exchange(&conn, b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n", false)
            .await
            .expect("garbage is answered, not reset");
        assert_eq!(status_of(&back), Status::Malformed);

        // A valid preamble cut short, then the stream finished.
        let full = request("echo");
        let cut = &full[..full.len() - 3];
        match stream_exchange(&conn, cut, true).await {
            Ok(back) if back.is_empty() => {}
            Ok(back) => assert_eq!(status_of(&back), Status::Malformed),
            Err(_) => {} // reset: also a refusal
        }

        // Unknown targets: not in the mesh, and an HTTP service asked for as TCP.
        for target in ["nope", "payment"] {
            let back = stream_exchange(&conn, &request(target), true)
                .await
                .expect("unknown target is answered");
            assert_eq!(status_of(&back), Status::UnknownTarget, "target {target}");
        }

        assert_eq!(
            echo_seen.connections.load(Ordering::SeqCst),
            0,
            "no abuse may reach the app"
        );
        assert!(refused(server.admin_addr, "malformed_preamble").await >= 2.0);
        assert!(refused(server.admin_addr, "unknown_service").await >= 2.0);
        assert!(
            conn.close_reason().is_none(),
            "abuse must not cost the connection"
        );

        // The same connection still carries a well-formed stream.
        let mut msg = request("echo");
        msg.extend_from_slice(b"after the abuse");
        let back = stream_exchange(&conn, &msg, true)
            .await
            .expect("valid stream");
        let (resp, used) = preamble::Response::decode(&back).expect("response");
        assert_eq!(resp.status, Status::Ok, "{}", resp.message);
        assert_eq!(&back[used..], b"after the abuse");
        assert_eq!(echo_seen.connections.load(Ordering::SeqCst), 1);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_the_extra_peer_only() {
    tokio::time::timeout(LIMIT, async {
        let (app, seen) = http_app().await;
        let limits = Limits {
            max_connections: 1,
            ..Default::default()
        };
        let pair = Pair::start_with(&[("payment", Protocol::Http)], app, limits).await;

        let (status, _, _) = http_get(pair.upstream("payment"), "payment", "/first").await;
        assert_eq!(status, 200, "the first peer is admitted");

        let second = sidecar(
            &pair.mesh,
            pair.ca.creds("second"),
            None,
            &["payment"],
            Limits::default(),
        )
        .await;
        let (status, _, body) =
            http_get(second.upstream_addrs["payment"], "payment", "/second").await;
        assert_eq!(
            status,
            503,
            "the second peer is refused: {}",
            String::from_utf8_lossy(&body)
        );

        let (status, headers, _) =
            http_get(pair.upstream("payment"), "payment", "/first-again").await;
        assert_eq!(status, 200, "the first peer keeps working");
        assert_eq!(
            headers.get("x-seen-peer-id").and_then(|v| v.to_str().ok()),
            Some(pair.ca.id("customer").as_str())
        );
        assert_eq!(
            seen.requests.load(Ordering::SeqCst),
            2,
            "only the first peer's requests reach the app"
        );
        assert!(refused(pair.server.admin_addr, "connection_limit").await >= 1.0);
    })
    .await
    .expect("test timed out");
}

/// QUIC variable-length integer (RFC 9000 §16).
fn put_varint(b: &mut BytesMut, v: u64) {
    match v {
        0..=63 => b.put_u8(v as u8),
        64..=16383 => b.put_u16(0x4000 | v as u16),
        16384..=1_073_741_823 => b.put_u32(0x8000_0000 | v as u32),
        _ => b.put_u64(0xc000_0000_0000_0000 | v),
    }
}

/// QPACK/HPACK prefixed integer with an `n`-bit prefix; `flags` are the bits above it.
fn put_prefix_int(b: &mut BytesMut, n: u8, flags: u8, v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        b.put_u8(flags | v as u8);
        return;
    }
    b.put_u8(flags | max as u8);
    let mut rest = v - max;
    while rest >= 128 {
        b.put_u8((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    b.put_u8(rest as u8);
}

/// An HTTP/3 HEADERS frame for `GET https://{authority}/` plus one extra
/// header, QPACK-encoded without the dynamic table or Huffman coding. Written
/// by hand so that no client-side check can stop an oversized section: the
/// point is what the *server* does with it.
fn headers_frame(authority: &str, extra: (&str, &str)) -> BytesMut {
    let mut block = BytesMut::new();
    block.put_u8(0); // required insert count
    block.put_u8(0); // delta base
    block.put_u8(0xc0 | 17); // static 17 :method GET
    block.put_u8(0xc0 | 23); // static 23 :scheme https
    block.put_u8(0xc0 | 1); // static 1 :path /
    put_prefix_int(&mut block, 4, 0x50, 0); // literal, name = static 0 (:authority)
    put_prefix_int(&mut block, 7, 0, authority.len());
    block.put_slice(authority.as_bytes());
    put_prefix_int(&mut block, 3, 0x20, extra.0.len()); // literal name and value
    block.put_slice(extra.0.as_bytes());
    put_prefix_int(&mut block, 7, 0, extra.1.len());
    block.put_slice(extra.1.as_bytes());
    let mut frame = BytesMut::new();
    put_varint(&mut frame, 0x01); // HEADERS
    put_varint(&mut frame, block.len() as u64);
    frame.put_slice(&block);
    frame
}

fn get_varint(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    let mut v = u64::from(first & 0x3f);
    for byte in b.get(1..len)? {
        v = (v << 8) | u64::from(*byte);
    }
    Some((v, len))
}

/// The `:status` of a response that starts with a HEADERS frame whose first
/// field line names `:status` by a static-table reference: indexed (e.g. 25 =
/// 200) or literal with a plain or Huffman-coded value (what h3 writes for
/// codes without a static entry, such as 431). None if it is anything else.
fn response_status(bytes: &[u8]) -> Option<String> {
    let (kind, n) = get_varint(bytes)?;
    let (len, m) = get_varint(&bytes[n..])?;
    let block = bytes.get(n + m..n + m + len as usize)?;
    if kind != 0x01 || block.len() < 3 {
        return None;
    }
    let line = &block[2..]; // after required insert count and delta base
    const STATIC_STATUS: [(u8, &str); 5] = [
        (25, "200"),
        (27, "404"),
        (28, "503"),
        (67, "400"),
        (71, "500"),
    ];
    if line[0] & 0xc0 == 0xc0 {
        let index = line[0] & 0x3f;
        let index = if index == 0x3f {
            0x3f + *line.get(1)?
        } else {
            index
        };
        return STATIC_STATUS
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, s)| s.to_string());
    }
    // Literal with static name reference 24 (":status"): 0101 1111, 24 - 15.
    if line.get(..2)? != [0x5f, 0x09] {
        return None;
    }
    let (huffman, vlen) = (line[2] & 0x80 != 0, usize::from(line[2] & 0x7f));
    let value = line.get(3..3 + vlen)?;
    if !huffman {
        return String::from_utf8(value.to_vec()).ok();
    }
    // Three digits in HPACK Huffman code ('0'-'2' are 5 bits, '3'-'9' 6 bits).
    let mut bits: u32 = 0;
    let mut nbits = 0;
    for b in value {
        bits = (bits << 8) | u32::from(*b);
        nbits += 8;
    }
    let mut out = String::new();
    let mut pos = nbits;
    while out.len() < 3 && pos >= 5 {
        let five = (bits >> (pos - 5)) & 0x1f;
        if five <= 2 {
            out.push(char::from(b'0' + five as u8));
            pos -= 5;
        } else {
            let six = (bits >> (pos - 6)) & 0x3f;
            if !(0x19..=0x1f).contains(&six) {
                return None;
            }
            out.push(char::from(b'3' + (six - 0x19) as u8));
            pos -= 6;
        }
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_section_fails_that_request_only() {
    tokio::time::timeout(LIMIT, async {
        let (app, seen) = http_app().await;
        let limits = Limits {
            max_header_bytes: 4096,
            ..Default::default()
        };
        let pair = Pair::start_with(&[("payment", Protocol::Http)], app, limits.clone()).await;

        let creds = pair.ca.creds("bigheaders");
        let endpoint = quic_client(&creds.bundle, Some(client_cert(&creds)), b"h3");
        let conn = endpoint
            .connect(pair.server.inbound_addr, "weft.mesh")
            .expect("dial")
            .await
            .expect("handshake");
        // Our control stream: type 0x00, then an empty SETTINGS frame. It stays
        // open for the life of the connection, as HTTP/3 requires.
        let mut control = conn.open_uni().await.expect("control stream");
        control
            .write_all(&[0x00, 0x04, 0x00])
            .await
            .expect("settings");

        let big = "v".repeat(2 * limits.max_header_bytes);
        let frame = headers_frame("payment", ("x-big", &big));
        let (mut send, mut recv) = conn.open_bi().await.expect("request stream");
        send.write_all(&frame).await.expect("send headers");
        let _ = send.finish();
        let answer = recv.read_to_end(1 << 16).await;
        // The server may answer 431 or reset the stream; never 200, never the app.
        if let Ok(bytes) = &answer {
            let status = response_status(bytes);
            assert_eq!(
                status.as_deref(),
                Some("431"),
                "answer to an oversized request: {bytes:x?}"
            );
        }
        let counted = wait_until(Duration::from_secs(10), || async {
            refused(pair.server.admin_addr, "bad_request").await >= 1.0
        })
        .await;
        assert!(counted, "the server must count the refused request");
        assert_eq!(
            seen.requests.load(Ordering::SeqCst),
            0,
            "the oversized request must not reach the app"
        );
        assert!(
            conn.close_reason().is_none(),
            "only the request fails, not the connection"
        );

        // A normal request on a new connection is served.
        let (status, _, _) = http_get(pair.upstream("payment"), "payment", "/normal").await;
        assert_eq!(status, 200);
        assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
        drop(control);
    })
    .await
    .expect("test timed out");
}
