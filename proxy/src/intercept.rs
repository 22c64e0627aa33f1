//! Transparent interception, outbound side: the pod's iptables rules
//! ([`iptables`]) redirect the app's TCP connections to the sidecar's
//! capture listeners (`--capture-outbound`, port 15001 by default). For each
//! connection the sidecar reads where the app meant to go (`SO_ORIGINAL_DST`,
//! IPv4 and IPv6), looks that address up in the mesh (`addresses` of a
//! service, IPs or DNS names), and then
//! - for a TCP service, carries the bytes on a `weft-l4` stream at once;
//! - for an HTTP service, peeks at the first bytes ([`sniff`]): HTTP/1.x or
//!   the HTTP/2 preface go the per-request path (routes, retries, …);
//!   anything else (or silence until the detection limit) goes as opaque TCP
//!   to the same service. Ports listed as server-first skip detection;
//! - for any other destination, connects straight to it (`allow`, the
//!   default, like Istio's ALLOW_ANY) or refuses (`deny`, REGISTRY_ONLY).

pub mod iptables;
pub mod sniff;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::mesh::Protocol;
use crate::metrics::InterceptLabels;
use crate::sidecar::{protocol_of, Ctx};
use sniff::Detected;

/// Where intercepted connections to unknown destinations go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutboundPolicy {
    /// Connect to the original destination directly (no mesh).
    Allow,
    /// Refuse the connection (reset).
    Deny,
}

/// The capture listeners and what they do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaptureConfig {
    /// Addresses to listen on; empty: no interception.
    pub listen: Vec<SocketAddr>,
    pub outbound_policy: OutboundPolicy,
    /// Destination ports whose protocol speaks first from the server
    /// (MySQL, SMTP…): never wait to detect HTTP on them.
    pub server_first_ports: Vec<u16>,
    /// How long to wait for the first bytes before treating a connection to
    /// an HTTP service as opaque TCP.
    #[serde(serialize_with = "crate::mesh::policy::ser_duration")]
    pub detect_timeout: Duration,
    /// Connect timeout for passthrough connections.
    #[serde(serialize_with = "crate::mesh::policy::ser_duration")]
    pub passthrough_connect_timeout: Duration,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            listen: Vec::new(),
            outbound_policy: OutboundPolicy::Allow,
            // MySQL, PostgreSQL is client-first; SMTP, POP3, IMAP, MongoDB…
            // are covered by declaring their services `tcp`.
            server_first_ports: vec![25, 3306, 110, 143, 587],
            // Istio's protocol detection waits 100 ms; a client that has
            // not sent its request line by then is slow or server-first.
            detect_timeout: Duration::from_millis(100),
            passthrough_connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Why no original destination could be used.
#[derive(Debug, thiserror::Error)]
pub enum OrigDstError {
    #[error("no original destination (was the connection redirected by iptables?): {0}")]
    Lookup(std::io::Error),
    #[error("the original destination {0} is the capture listener itself: connect to a service address, not to the capture port")]
    Loop(SocketAddr),
}

/// Where the app meant to connect before iptables redirected it here.
pub fn original_dst(stream: &TcpStream) -> Result<SocketAddr, OrigDstError> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().map_err(OrigDstError::Lookup)?;
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }
    .map_err(OrigDstError::Lookup)?;
    let dst = addr.as_socket().ok_or_else(|| {
        OrigDstError::Lookup(std::io::Error::other("original destination is not IP"))
    })?;
    let dst = normalize(dst);
    // Without NAT the kernel reports the address we were reached at.
    if dst == normalize(local) {
        return Err(OrigDstError::Loop(dst));
    }
    Ok(dst)
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as plain IPv4, so mesh addresses match.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Accept intercepted connections until drained.
pub(crate) async fn listen(ctx: Arc<Ctx>, cfg: Arc<CaptureConfig>, listener: TcpListener) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "capture accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (ctx2, cfg) = (ctx.clone(), cfg.clone());
        ctx.spawn(async move { handle(ctx2, &cfg, stream, from).await });
    }
}

async fn handle(ctx: Arc<Ctx>, cfg: &CaptureConfig, stream: TcpStream, from: SocketAddr) {
    let count = |result: &'static str, protocol: &'static str| {
        ctx.metrics
            .intercepted
            .get_or_create(&InterceptLabels { result, protocol })
            .inc();
    };
    let dst = match original_dst(&stream) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%from, error = %e, "intercepted connection refused");
            count("no_original_dst", "none");
            crate::copy::reset(stream);
            return;
        }
    };
    let service = ctx.state.load().service_at(dst).map(str::to_string);
    let Some(service) = service else {
        match cfg.outbound_policy {
            OutboundPolicy::Allow => {
                count("passthrough", "tcp");
                passthrough(stream, dst, cfg.passthrough_connect_timeout).await;
            }
            OutboundPolicy::Deny => {
                tracing::info!(%from, %dst, "destination is not in the mesh; refused (outbound policy deny)");
                count("blocked", "tcp");
                crate::copy::reset(stream);
            }
        }
        return;
    };
    let proto = protocol_of(&ctx.state.load(), &service);
    match proto {
        Some(Protocol::Tcp) => {
            count("mesh", "tcp");
            crate::outbound::tcp(ctx, service, stream, from).await
        }
        Some(Protocol::Http) => {
            let detected = if cfg.server_first_ports.contains(&dst.port()) {
                Detected::Opaque
            } else {
                sniff::detect(&stream, cfg.detect_timeout).await
            };
            count("mesh", detected.label());
            match detected {
                Detected::Http1 | Detected::Http2 => {
                    crate::outbound::http(ctx, service, stream).await
                }
                Detected::Opaque => crate::outbound::tcp(ctx, service, stream, from).await,
            }
        }
        // A UDP service lists no addresses (the checker refuses them), so
        // a TCP connection cannot map to one; refuse it if it ever does.
        Some(Protocol::Udp) | None => crate::copy::reset(stream),
    }
}

/// Copy bytes between the app and `dst` directly, outside the mesh.
async fn passthrough(mut stream: TcpStream, dst: SocketAddr, connect_timeout: Duration) {
    let upstream = match tokio::time::timeout(connect_timeout, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%dst, error = %e, "passthrough connect failed");
            crate::copy::reset(stream);
            return;
        }
        Err(_) => {
            tracing::debug!(%dst, "passthrough connect timed out");
            crate::copy::reset(stream);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut upstream = upstream;
    if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
        tracing::debug!(%dst, error = %e, "passthrough ended with error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_v4_is_plain_v4() {
        let mapped: SocketAddr = "[::ffff:10.96.0.20]:80".parse().unwrap();
        assert_eq!(normalize(mapped), "10.96.0.20:80".parse().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(normalize(v6), v6);
    }

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_usable_original_dst() {
        // Straight to the listener: either conntrack knows nothing (error)
        // or it reports the listener itself (a loop). Both are refused.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (s, _) = s.unwrap();
        let err = original_dst(&s).unwrap_err();
        assert!(
            matches!(err, OrigDstError::Lookup(_) | OrigDstError::Loop(_)),
            "{err}"
        );
    }
}
