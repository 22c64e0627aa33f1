//! Protocol detection on an intercepted connection: peek (never consume)
//! the first bytes the app sends and decide whether they are HTTP/1.x, the
//! HTTP/2 connection preface, or something else, within a time limit.
//!
//! A client that says nothing (a server-first protocol such as MySQL or
//! SMTP) or sends a partial request line too slowly is treated as opaque
//! TCP once the limit passes; ports listed as server-first skip detection.

use std::time::Duration;

use tokio::net::TcpStream;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How much we peek at most; a request line longer than this is judged on
/// its method alone.
pub const MAX_PEEK: usize = 4096;
/// The longest method token we accept before calling the bytes opaque.
const MAX_METHOD: usize = 24;
/// Methods that make a long, still unterminated request line HTTP.
const KNOWN_METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// Anything else, no bytes before the limit, or EOF.
    Opaque,
}

impl Detected {
    pub fn label(self) -> &'static str {
        match self {
            Detected::Http1 => "http1",
            Detected::Http2 => "h2",
            Detected::Opaque => "opaque",
        }
    }
}

/// Classify a prefix of a connection; `None` while more bytes could change the answer.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let k = buf.len().min(H2_PREFACE.len());
    if buf[..k] == H2_PREFACE[..k] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Detected::Http2);
    }
    // request-line = method SP request-target SP HTTP-version CRLF (RFC 9112 §3)
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    if method_len == buf.len() {
        return (method_len > MAX_METHOD).then_some(Detected::Opaque);
    }
    if method_len == 0 || method_len > MAX_METHOD || buf[method_len] != b' ' {
        return Some(Detected::Opaque);
    }
    let rest = &buf[method_len + 1..];
    let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
        // No end of line yet: a control byte or a second space-separated
        // field that is not a version already rules HTTP out.
        if rest.iter().any(|b| b.is_ascii_control() && *b != b'\r') {
            return Some(Detected::Opaque);
        }
        if buf.len() >= MAX_PEEK {
            let known = KNOWN_METHODS.contains(&&buf[..method_len]);
            return Some(if known {
                Detected::Http1
            } else {
                Detected::Opaque
            });
        }
        return None;
    };
    let line = &rest[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(sp) = line.iter().rposition(|b| *b == b' ') else {
        return Some(Detected::Opaque);
    };
    let (target, version) = (&line[..sp], &line[sp + 1..]);
    let target_ok = !target.is_empty() && target.iter().all(|b| b.is_ascii_graphic() || *b >= 0x80);
    if target_ok && (version == b"HTTP/1.1" || version == b"HTTP/1.0") {
        Some(Detected::Http1)
    } else {
        Some(Detected::Opaque)
    }
}

/// token characters of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Peek at `stream` until its first bytes are classified, it ends, or
/// `limit` passes. Nothing is consumed: the bytes stay for whoever reads next.
pub async fn detect(stream: &TcpStream, limit: Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = vec![0u8; MAX_PEEK];
    let mut seen = 0;
    let mut backoff = Duration::from_millis(1);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            // An error or the limit: let the opaque path deal with it.
            Ok(Err(_)) | Err(_) => return Detected::Opaque,
        };
        if n == 0 {
            return Detected::Opaque;
        }
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        // peek() is ready again at once while the same bytes sit unread, so
        // wait a little before looking for more (a partial first line is rare:
        // clients write their request line in one go).
        if n == seen {
            backoff = (backoff * 2).min(Duration::from_millis(20));
        } else {
            backoff = Duration::from_millis(1);
        }
        seen = n;
        if tokio::time::timeout_at(deadline, tokio::time::sleep(backoff))
            .await
            .is_err()
        {
            // One last look before giving up.
            return match futures::FutureExt::now_or_never(stream.peek(&mut buf)) {
                Some(Ok(n)) if n > 0 => classify(&buf[..n]).unwrap_or(Detected::Opaque),
                _ => Detected::Opaque,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn classifies_complete_preludes() {
        assert_eq!(
            classify(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(Detected::Http1)
        );
        assert_eq!(classify(b"POST / HTTP/1.0\n"), Some(Detected::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(classify(&h2), Some(Detected::Http2));
    }

    #[test]
    fn every_proper_prefix_of_an_http_prelude_waits() {
        for full in [&b"GET /index.html HTTP/1.1\r\n"[..], H2_PREFACE] {
            for len in 1..full.len() - 1 {
                assert_eq!(classify(&full[..len]), None, "{:?}", &full[..len]);
            }
        }
    }

    #[test]
    fn rejects_what_is_not_http() {
        // TLS ClientHello, a Redis command, SSH banner-like bytes, binary.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Some(Detected::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"GET /x HTTP/2.0\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"GET /x\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"GET /a b\x01"), Some(Detected::Opaque));
        assert_eq!(
            classify(b"HELO mail.example.org\r\n"),
            Some(Detected::Opaque)
        );
        assert_eq!(classify(&[b'A'; 40]), Some(Detected::Opaque));
        // The preface diverging late is not HTTP/2 (nor a valid HTTP/1 line).
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nXX"),
            Some(Detected::Opaque)
        );
    }

    #[test]
    fn a_very_long_request_line_is_judged_by_its_method() {
        let mut long = b"GET /".to_vec();
        long.resize(MAX_PEEK, b'a');
        assert_eq!(classify(&long), Some(Detected::Http1));
        let mut odd = b"FOO /".to_vec();
        odd.resize(MAX_PEEK, b'a');
        assert_eq!(classify(&odd), Some(Detected::Opaque));
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    #[tokio::test]
    async fn a_prelude_written_in_pieces_is_detected_and_left_unread() {
        let (mut client, server) = pair().await;
        let writer = tokio::spawn(async move {
            for piece in [&b"GE"[..], b"T /slow", b" HTTP/1", b".1\r\n\r\n"] {
                client.write_all(piece).await.expect("write");
                client.flush().await.expect("flush");
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            client
        });
        let got = detect(&server, Duration::from_secs(5)).await;
        assert_eq!(got, Detected::Http1);
        let _client = writer.await.expect("writer");
        // Nothing was consumed: the whole request is still there to read.
        let mut server = server;
        let want = b"GET /slow HTTP/1.1\r\n\r\n";
        let mut buf = vec![0u8; want.len()];
        tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut buf))
            .await
            .expect("read in time")
            .expect("read");
        assert_eq!(&buf[..], want);
    }

    #[tokio::test]
    async fn a_silent_client_times_out_as_opaque() {
        let (_client, server) = pair().await;
        let started = tokio::time::Instant::now();
        let got = detect(&server, Duration::from_millis(100)).await;
        assert_eq!(got, Detected::Opaque);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_partial_prelude_that_stalls_times_out_as_opaque() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET /never-ends").await.expect("write");
        let got = detect(&server, Duration::from_millis(100)).await;
        assert_eq!(got, Detected::Opaque);
    }

    #[tokio::test]
    async fn eof_before_any_byte_is_opaque() {
        let (client, server) = pair().await;
        drop(client);
        assert_eq!(
            detect(&server, Duration::from_secs(5)).await,
            Detected::Opaque
        );
    }

    #[tokio::test]
    async fn h2_preface_is_detected() {
        let (mut client, server) = pair().await;
        client.write_all(H2_PREFACE).await.expect("write");
        assert_eq!(
            detect(&server, Duration::from_secs(5)).await,
            Detected::Http2
        );
    }
}
