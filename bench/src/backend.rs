//! The built-in backend every scenario shares: one TCP port that answers
//! HTTP/1.1 and HTTP/2 (h2c) with a fixed-size body, and, for connections
//! that start with `SINK` or `ECHO`, swallows or echoes raw bytes (bulk
//! throughput). One port for both lets a single `--app` of a sidecar (and a
//! single HAProxy server line) serve every test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// First bytes of a bulk connection whose data the backend discards; it
/// closes after the client's EOF, once every byte was read.
pub const SINK: &[u8; 4] = b"SINK";
/// First bytes of a connection whose data the backend sends back.
pub const ECHO: &[u8; 4] = b"ECHO";

/// Serve forever on `listener`; HTTP answers carry `body_size` bytes.
pub async fn serve(listener: TcpListener, body_size: usize) {
    let body = Bytes::from(vec![b'w'; body_size]);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, body.clone()));
            }
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                eprintln!("weft-bench backend: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn handle(stream: TcpStream, body: Bytes) {
    let _ = stream.set_nodelay(true);
    match peek_marker(&stream).await {
        Some(m) if &m == SINK => sink(stream).await,
        Some(m) if &m == ECHO => echo(stream).await,
        _ => http(stream, body).await,
    }
}

/// The first four bytes, without consuming them; `None` if the peer sent
/// fewer before closing or pausing (then it is HTTP's business).
async fn peek_marker(stream: &TcpStream) -> Option<[u8; 4]> {
    let mut head = [0u8; 4];
    for _ in 0..50 {
        match stream.peek(&mut head).await {
            Ok(4) => return Some(head),
            Ok(0) | Err(_) => return None,
            // A partial first segment: give the rest a moment.
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    None
}

async fn sink(mut stream: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return,
        }
    }
    let _ = stream.shutdown().await;
}

async fn echo(mut stream: TcpStream) {
    let mut marker = [0u8; 4];
    if stream.read_exact(&mut marker).await.is_err() {
        return;
    }
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

async fn http(stream: TcpStream, body: Bytes) {
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let body = body.clone();
        async move {
            // Read the request body, whatever its size, before answering.
            let _ = req.into_body().collect().await;
            let mut resp = http::Response::new(Full::new(body));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            Ok::<_, Infallible>(resp)
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

/// Line the `backend` subcommand prints once it accepts connections.
pub const READY: &str = "weft-bench backend ready:";

pub fn ready_line(addr: SocketAddr, body_size: usize) -> String {
    format!("{READY} listen={addr} body_size={body_size}")
}
