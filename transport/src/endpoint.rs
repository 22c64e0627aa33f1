//! One QUIC endpoint per sidecar: one UDP socket that both accepts peers
//! (server role, ALPNs `h3` and `weft-l4`) and dials them (client role).
//!
//! Tuning constants carry the measurement behind them: `bench/src/bin/quic_tuning.rs`
//! moves one 128 MiB stream between two Weft endpoints (real mTLS, real UDP)
//! with each setting reverted to the library/kernel default, side by side in
//! one run, on plain loopback and through a UDP relay adding 10 ms RTT.
//! Figures below are the medians of one such run on the 2-core build machine
//! (2026-11-26), as ratios to Weft's settings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::tls::{MeshTls, TlsError, ALPN_H3, ALPN_L4};

/// UDP socket send and receive buffers. With the kernel default (208 KiB)
/// the receiver drops datagrams during bursts, which QUIC reads as
/// congestion: 0.90x on loopback and 0.55x at 10 ms RTT. 4 MiB holds a full
/// burst. (The kernel caps this at net.core.rmem_max/wmem_max; .ci/run raises
/// them to 4 MiB.)
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Per-stream receive window. One TCP tunnel or one HTTP body is one stream,
/// so this caps a single transfer at window / RTT. quinn's default (1.25 MB)
/// is invisible on loopback (1.01x) but gives 0.45x at 10 ms RTT, where it
/// caps a stream near 120 MB/s; 8 MiB allows ~800 MB/s at 10 ms and bounds
/// what one stream can make the receiver buffer.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;

/// Connection-wide receive window: four streams at full speed at once.
/// quinn's default is unbounded; bounding it bounds memory per peer no matter
/// how many streams it opens.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 32 << 20;

/// Send window: matches the connection receive window so one sender can fill it.
pub const SEND_WINDOW: u64 = 32 << 20;

/// Keep-alive: a PING on a connection that has been quiet this long. A third
/// of the idle timeout, so two lost PINGs in a row do not kill a healthy
/// connection, and well inside NAT/conntrack UDP timeouts (Linux: 30 s) so
/// idle pooled connections survive. Costs one small packet per idle
/// connection per interval. (Linkerd pings idle HTTP/2 connections every
/// 10 s and gives up 3 s later; QUIC needs the interval to fit in the idle
/// timeout several times instead of a separate ping timeout.)
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// QUIC DATAGRAM buffers (UDP services, `docs/udp.md`), each direction. quinn
/// advertises `max_datagram_frame_size` only when a receive buffer is set,
/// so this is what enables DATAGRAM frames at all. 1 MiB holds ~800 full
/// datagrams; when an app outpaces the path the oldest are dropped, as UDP
/// would drop them.
pub const DATAGRAM_BUFFER_BYTES: usize = 1 << 20;

/// How large a UDP payload MTU discovery probes for: quinn's default, 1452
/// (an Ethernet path). Probing higher should find jumbo frames and
/// loopback's 64 KiB and cut the per-packet work that bounds bulk
/// throughput, but measured with quinn 0.11 it is worse: `quic_tuning`
/// (128 MiB, 5 rounds, 2026-11-26) gave 0.53x (8973) and 0.42x (65527) on
/// loopback and 0.01x / 0.18x at 10 ms RTT, because losses of large
/// packets under a saturating transfer trip black-hole detection, which
/// drops the MTU to 1200 for a minute (15 of 20 such transfers ended at
/// 1200). Kept as an option for that benchmark.
pub const MTU_UPPER_BOUND: u16 = 1452;

/// A peer silent for this long is gone: the connection closes (its streams
/// fail), the pool replaces it and the load balancer avoids the peer until a
/// handshake succeeds. This bounds how long a dead or unreachable peer (killed
/// process, lost node, partition) can hold requests: 15 s is close to
/// Linkerd's 13 s (10 s ping interval + 3 s timeout), and quinn's default of
/// 30 s held in-flight requests twice as long. The two ends' values are
/// negotiated: the smaller wins.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a dial (QUIC + TLS handshake) may take before it fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings for [`MeshEndpoint::bind`].
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    pub bind: SocketAddr,
    /// Concurrent bidirectional streams a peer may open on one connection.
    pub max_streams_per_connection: u32,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    /// Flow-control and socket tuning; the defaults are the constants above
    /// (bench `quic_tuning` compares alternatives side by side).
    pub stream_receive_window: u32,
    pub connection_receive_window: u32,
    pub send_window: u64,
    pub udp_buffer_bytes: usize,
    pub gso: bool,
    /// Largest UDP payload MTU discovery probes for (see [`MTU_UPPER_BOUND`]).
    pub mtu_upper_bound: u16,
    /// Ask peers to acknowledge less often (the ACK-frequency extension).
    /// Off: `quic_tuning` measured no gain for bulk transfers (0.94x on
    /// loopback, 0.96x at 10 ms RTT).
    pub ack_frequency: bool,
}

impl EndpointOptions {
    pub fn new(bind: SocketAddr) -> Self {
        EndpointOptions {
            bind,
            // Envoy and Linkerd allow hundreds of concurrent HTTP/2 streams per
            // connection; 1024 covers a busy caller without letting one peer
            // hold unbounded state (excess streams wait for credit, they do not fail).
            max_streams_per_connection: 1024,
            idle_timeout: IDLE_TIMEOUT,
            keep_alive: KEEP_ALIVE,
            connect_timeout: CONNECT_TIMEOUT,
            stream_receive_window: STREAM_RECEIVE_WINDOW,
            connection_receive_window: CONNECTION_RECEIVE_WINDOW,
            send_window: SEND_WINDOW,
            udp_buffer_bytes: UDP_BUFFER_BYTES,
            gso: true,
            mtu_upper_bound: MTU_UPPER_BOUND,
            ack_frequency: false,
        }
    }
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot dial {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("handshake with {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("setting up connection to {addr}: {reason}")]
    Setup { addr: SocketAddr, reason: String },
    /// A resumed session's peer no longer verifies (its certificate expired
    /// since the ticket was issued, or its root left the bundle).
    #[error("peer {addr} refused after resumption: {source}")]
    Verify {
        addr: SocketAddr,
        source: rustls::Error,
    },
}

/// A dial's result: a connection whose handshake is done, or one still in
/// its handshake that already carries 0-RTT data ([`MeshEndpoint::connect_early`]).
pub enum Dialed {
    Established(quinn::Connection),
    /// Streams opened now are sent as 0-RTT early data, which the peer may
    /// reject (then they fail with `ZeroRttRejected` and the connection
    /// goes on without them) and an attacker may replay: only for requests
    /// that are safe to replay. The future resolves when the handshake is
    /// done: `true` if the early data was accepted. The peer is not
    /// verified until then: call [`MeshEndpoint::verify`] after it.
    Early(quinn::Connection, quinn::ZeroRttAccepted),
}

/// What a server reads of an incoming connection before its handshake is
/// done ([`MeshEndpoint::accept_early`]).
pub struct Accepted {
    pub conn: quinn::Connection,
    /// Resolves when the handshake ends (its value means nothing on a
    /// server: quinn gives `false` whether it succeeded or not; it did if
    /// the connection is still open). Until then the connection is resuming a session and may
    /// carry 0-RTT data from a peer already verified (below).
    pub handshake: Option<quinn::ZeroRttAccepted>,
}

impl ConnectError {
    /// The peer answered the handshake with CONNECTION_REFUSED: it is up
    /// but takes no new connections (draining, or at its connection limit).
    /// Nothing was sent, so the request may go elsewhere.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            ConnectError::Handshake {
                source: quinn::ConnectionError::ConnectionClosed(c),
                ..
            } if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        )
    }

    /// Nobody answered the handshake in time (or the address answered with
    /// a stateless reset): the peer is dead or unreachable, not refusing.
    pub fn is_unanswered(&self) -> bool {
        matches!(
            self,
            ConnectError::Timeout { .. }
                | ConnectError::Handshake {
                    source: quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset,
                    ..
                }
        )
    }
}

/// Errors creating the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("binding UDP {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("QUIC TLS config: {0}")]
    Quic(String),
}

/// The sidecar's QUIC endpoint.
#[derive(Clone)]
pub struct MeshEndpoint {
    endpoint: quinn::Endpoint,
    tls: Arc<MeshTls>,
    client_h3: quinn::ClientConfig,
    client_l4: quinn::ClientConfig,
    connect_timeout: Duration,
    udp_buffer_bytes: usize,
}

impl MeshEndpoint {
    /// Bind the UDP socket and start serving handshakes.
    pub fn bind(tls: Arc<MeshTls>, opts: &EndpointOptions) -> Result<Self, BindError> {
        let transport = Arc::new(transport_config(opts));
        let mut server_tls = tls.server_config_resumable(&[ALPN_H3, ALPN_L4])?;
        // QUIC allows 0 (no early data) or all of it.
        server_tls.max_early_data_size = u32::MAX;
        let server_crypto =
            QuicServerConfig::try_from(server_tls).map_err(|e| BindError::Quic(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client = |alpn: &[u8]| -> Result<quinn::ClientConfig, BindError> {
            let crypto = QuicClientConfig::try_from(tls.client_config_resumable(alpn)?)
                .map_err(|e| BindError::Quic(e.to_string()))?;
            let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
            cfg.transport_config(transport.clone());
            Ok(cfg)
        };
        let client_h3 = client(ALPN_H3)?;
        let client_l4 = client(ALPN_L4)?;
        let socket =
            udp_socket(opts.bind, opts.udp_buffer_bytes).map_err(|source| BindError::Io {
                addr: opts.bind,
                source,
            })?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        // What we accept from peers: MTU discovery on their side can only
        // go as high as this (it is sent as max_udp_payload_size).
        endpoint_config
            .max_udp_payload_size(opts.mtu_upper_bound.clamp(1472, 65_527))
            .map_err(|e| BindError::Quic(format!("max UDP payload: {e}")))?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| BindError::Io {
            addr: opts.bind,
            source,
        })?;
        Ok(MeshEndpoint {
            endpoint,
            tls,
            client_h3,
            client_l4,
            connect_timeout: opts.connect_timeout,
            udp_buffer_bytes: opts.udp_buffer_bytes,
        })
    }

    /// Move to a new UDP socket bound to `addr` (another port or address):
    /// connections and their streams go on, as after a NAT rebinding. Peers
    /// see packets from the new address and validate the new path (QUIC
    /// connection migration; quinn's servers allow it by default). Returns
    /// the new local address. Handshakes to this endpoint must use it too.
    pub fn rebind(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let socket = udp_socket(addr, self.udp_buffer_bytes)?;
        self.endpoint.rebind(socket)?;
        self.endpoint.local_addr()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn tls(&self) -> &Arc<MeshTls> {
        &self.tls
    }

    /// The underlying quinn endpoint (accept loop, close, stats).
    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Dial `addr` with the given ALPN (`ALPN_H3` or `ALPN_L4`) and wait for
    /// the handshake. A known peer may resume its session (one round trip
    /// less of TLS work, no early data); its certificate is checked as in
    /// a full handshake either way.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        alpn: &[u8],
    ) -> Result<quinn::Connection, ConnectError> {
        let connecting = self.connecting(addr, alpn)?;
        self.established(addr, connecting).await
    }

    /// Dial `addr`, and if we hold a session ticket from it, return at once
    /// with a connection that sends 0-RTT early data ([`Dialed::Early`]);
    /// otherwise as [`MeshEndpoint::connect`].
    pub async fn connect_early(
        &self,
        addr: SocketAddr,
        alpn: &[u8],
    ) -> Result<Dialed, ConnectError> {
        match self.connecting(addr, alpn)?.into_0rtt() {
            Ok((conn, accepted)) => Ok(Dialed::Early(conn, accepted)),
            Err(connecting) => self
                .established(addr, connecting)
                .await
                .map(Dialed::Established),
        }
    }

    /// Verify the peer of a connection whose handshake is done (see
    /// [`MeshTls::verify_connection`]); a peer that fails is closed.
    pub fn verify(&self, addr: SocketAddr, conn: &quinn::Connection) -> Result<(), ConnectError> {
        self.tls
            .verify_connection(conn, webpki::KeyUsage::server_auth())
            .map(|_| ())
            .map_err(|source| {
                conn.close(
                    crate::pool::CERT_EXPIRED.into(),
                    b"peer certificate refused",
                );
                ConnectError::Verify { addr, source }
            })
    }

    fn connecting(&self, addr: SocketAddr, alpn: &[u8]) -> Result<quinn::Connecting, ConnectError> {
        let cfg = if alpn == ALPN_H3 {
            self.client_h3.clone()
        } else {
            self.client_l4.clone()
        };
        // The server name is not used for verification (the SPIFFE ID is);
        // it keys the session tickets, one set per peer address.
        self.endpoint
            .connect_with(cfg, addr, &crate::tls::server_name_for(addr))
            .map_err(|source| ConnectError::Connect { addr, source })
    }

    async fn established(
        &self,
        addr: SocketAddr,
        connecting: quinn::Connecting,
    ) -> Result<quinn::Connection, ConnectError> {
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(conn)) => {
                self.verify(addr, &conn)?;
                Ok(conn)
            }
            Ok(Err(source)) => Err(ConnectError::Handshake { addr, source }),
            Err(_) => Err(ConnectError::Timeout {
                addr,
                after: self.connect_timeout,
            }),
        }
    }

    /// Accept an incoming connection as early as its peer can be known: a
    /// peer resuming a session is verified from its ticket's certificate
    /// chain as soon as its ClientHello is read (so its 0-RTT requests can
    /// be served before the handshake ends, `handshake` is `Some`); any
    /// other peer after the whole handshake (`None`). A peer that fails
    /// verification is closed and reported as an error.
    pub async fn accept_early(&self, incoming: quinn::Incoming) -> Result<Accepted, AcceptError> {
        let mut connecting = incoming.accept().map_err(AcceptError::Handshake)?;
        // The ClientHello (which may span several packets) has been read
        // once this returns: a resumed session's peer chain is known.
        connecting
            .handshake_data()
            .await
            .map_err(AcceptError::Handshake)?;
        let Ok((conn, handshake)) = connecting.into_0rtt() else {
            // quinn: always Ok on a server.
            return Err(AcceptError::Refused(rustls::Error::General(
                "server connection cannot take 0.5-RTT data".into(),
            )));
        };
        let handshake = if conn.peer_identity().is_some() {
            Some(handshake)
        } else {
            // A full handshake: the client certificate comes last.
            handshake.await;
            if let Some(e) = conn.close_reason() {
                return Err(AcceptError::Handshake(e));
            }
            None
        };
        if let Err(e) = self
            .tls
            .verify_connection(&conn, webpki::KeyUsage::client_auth())
        {
            conn.close(
                crate::pool::CERT_EXPIRED.into(),
                b"peer certificate refused",
            );
            return Err(AcceptError::Refused(e));
        }
        Ok(Accepted { conn, handshake })
    }
}

/// Why an incoming connection was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("handshake failed: {0}")]
    Handshake(quinn::ConnectionError),
    #[error("peer refused after resumption: {0}")]
    Refused(rustls::Error),
}

fn transport_config(opts: &EndpointOptions) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(opts.max_streams_per_connection));
    // HTTP/3 needs three unidirectional streams per side (control, QPACK
    // encoder/decoder); a few spare for extensions.
    t.max_concurrent_uni_streams(VarInt::from_u32(16));
    t.stream_receive_window(VarInt::from_u32(opts.stream_receive_window));
    t.receive_window(VarInt::from_u32(opts.connection_receive_window));
    t.send_window(opts.send_window);
    t.keep_alive_interval(Some(opts.keep_alive));
    t.max_idle_timeout(IdleTimeout::try_from(opts.idle_timeout).ok());
    // GSO: one syscall sends up to 64 segments. Off, throughput fell to 0.32x
    // on loopback (0.90x at 10 ms RTT, where the window binds first). quinn
    // falls back by itself where the kernel lacks it.
    t.enable_segmentation_offload(opts.gso);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(opts.mtu_upper_bound);
    t.mtu_discovery_config(Some(mtu));
    if opts.ack_frequency {
        t.ack_frequency_config(Some(quinn::AckFrequencyConfig::default()));
    }
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER_BYTES));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER_BYTES);
    t
}

fn udp_socket(bind: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    if bind.is_ipv6() {
        // Accept IPv4-mapped peers too when bound to [::].
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller kernel cap is not fatal, only slower.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&bind.into())?;
    Ok(socket.into())
}
