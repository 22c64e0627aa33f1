//! The sidecar: configuration, start-up wiring and the running handle.
//!
//! Start-up phases: identity (files, or a CSR to `weft-ca serve`) → TLS →
//! QUIC endpoint → outbound listeners → admin. `/ready` turns 200 only after
//! all of them; every spawned task stops when the sidecar is drained.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weft_transport::endpoint::{ConnectError, EndpointOptions};
use weft_transport::pool::EarlyOutcome;
use weft_transport::{Credentials, MeshEndpoint, MeshTls, Pool, SpiffeId, ALPN_H3, ALPN_L4};

use crate::body::ProxyBody;
use crate::cluster::State;
use crate::lifecycle::{Activity, DrainReport, Phase};
use crate::mesh::{Mesh, Protocol};
use crate::metrics::{Metrics, QuicLabels, ZeroRttLabels, OUTBOUND};

/// Where the sidecar's certificate comes from.
#[derive(Clone)]
pub enum IdentitySource {
    /// `cert.pem`, `key.pem`, `bundle.pem` in a directory (weft-ca issue, cert-manager, SPIRE).
    CertDir(PathBuf),
    /// A CSR to `weft-ca serve`; the key stays here. Renewed at half-life
    /// with the current certificate as the credential.
    Ca {
        url: String,
        /// Verifies the CA's serving certificate (until a renewal brings a newer bundle).
        bundle_pem: String,
        /// What proves our identity to the CA the first time.
        credential: CaCredential,
        /// If set, the issued identity must be this one.
        expect_id: Option<String>,
    },
    /// Credentials already in memory (tests, `weft demo`).
    Static(Credentials),
}

/// The credential a sidecar presents to the CA for its first certificate
/// (and again if renewing with its certificate fails).
#[derive(Clone)]
pub enum CaCredential {
    /// A join token from `weft-ca token` (VMs, local runs).
    JoinToken(String),
    /// A projected Kubernetes service-account token, re-read on every use
    /// because the kubelet rotates it.
    KubernetesTokenFile(PathBuf),
}

/// Resource limits; a peer that exceeds them gets an error, others are unaffected.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Limits {
    /// Largest request/response header section accepted, in bytes.
    pub max_header_bytes: usize,
    /// Concurrent streams (requests, TCP connections) a peer may have on one QUIC connection.
    pub max_streams_per_connection: u32,
    /// Concurrent inbound QUIC connections.
    pub max_connections: usize,
    /// PING a QUIC connection that has been quiet this long (see
    /// [`weft_transport::endpoint::KEEP_ALIVE`]); below `quic_idle_timeout`.
    #[serde(serialize_with = "as_humantime")]
    pub quic_keep_alive: std::time::Duration,
    /// A peer silent this long is dead: its connection closes and the load
    /// balancer avoids it until a handshake succeeds (see
    /// [`weft_transport::endpoint::IDLE_TIMEOUT`] and docs/quic.md).
    #[serde(serialize_with = "as_humantime")]
    pub quic_idle_timeout: std::time::Duration,
    /// Reconnect to known peers with 0-RTT: safe HTTP requests (GET, HEAD,
    /// OPTIONS, TRACE) and TCP streams of services with `early_data = true`
    /// go out with the first flight (see docs/quic.md for the replay risk).
    pub zero_rtt: bool,
}

fn as_humantime<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl Limits {
    /// Refuses settings that cannot work, saying what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.quic_idle_timeout.is_zero() {
            return Err("--quic-idle-timeout must be above zero (e.g. 15s)".into());
        }
        if self.quic_keep_alive.is_zero() || self.quic_keep_alive >= self.quic_idle_timeout {
            return Err(format!(
                "--quic-keep-alive ({}) must be above zero and below --quic-idle-timeout ({}), \
                 or idle connections to healthy peers time out; a third of it is a good value",
                humantime::format_duration(self.quic_keep_alive),
                humantime::format_duration(self.quic_idle_timeout)
            ));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Envoy, nginx and hyper all default near 8–64 KiB; 64 KiB admits
            // large cookies and JWTs while bounding memory per request.
            max_header_bytes: 64 << 10,
            max_streams_per_connection: 1024,
            // One connection per peer sidecar: 10k peers is a large mesh.
            max_connections: 10_000,
            quic_keep_alive: weft_transport::endpoint::KEEP_ALIVE,
            quic_idle_timeout: weft_transport::endpoint::IDLE_TIMEOUT,
            zero_rtt: true,
        }
    }
}

/// Everything a sidecar needs to start.
#[derive(Clone)]
pub struct SidecarConfig {
    pub mesh: Mesh,
    pub identity: IdentitySource,
    /// UDP address of the inbound QUIC endpoint.
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// The local app that inbound traffic is forwarded to.
    pub app: Option<SocketAddr>,
    /// Local TCP listeners for the app: (service, listen address).
    pub upstreams: Vec<(String, SocketAddr)>,
    /// Local UDP sockets for the app (`--upstream SERVICE=ADDR/udp`), one
    /// per UDP service: (service, bind address).
    pub udp_upstreams: Vec<(String, SocketAddr)>,
    pub limits: Limits,
    /// Spans and trace headers (off unless an export endpoint is set).
    pub tracing: crate::trace::TraceConfig,
    /// Transparent interception (off unless `capture.listen` has addresses).
    pub capture: crate::intercept::CaptureConfig,
    /// How often DNS names in the mesh file are looked up again.
    pub dns_refresh: std::time::Duration,
}

/// Start-up failures. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("identity: {0}")]
    Identity(String),
    #[error("TLS: {0}")]
    Tls(#[from] weft_transport::tls::TlsError),
    #[error("QUIC endpoint: {0}")]
    Bind(#[from] weft_transport::endpoint::BindError),
    #[error("listening on {addr} for {what}: {source}")]
    Listen {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--upstream {0}: no such service in the mesh file")]
    UnknownUpstream(String),
    #[error("--upstream {service}: the service's protocol is {protocol}; {hint}")]
    UpstreamProtocol {
        service: String,
        protocol: &'static str,
        hint: &'static str,
    },
    #[error("tracing: {0}")]
    Tracing(#[from] crate::trace::TraceError),
}

pub(crate) type H3Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// The peer's SPIFFE ID, read once per pooled connection (not per request).
pub(crate) type PeerId = Arc<str>;

fn peer_of(peer: Option<SpiffeId>) -> PeerId {
    peer.map(|id| Arc::from(id.as_str()))
        .unwrap_or_else(|| Arc::from(""))
}

/// Counts 0-RTT handshakes of one pool by outcome.
fn count_zero_rtt(
    metrics: &Arc<Metrics>,
    alpn: &'static str,
) -> impl Fn(&EarlyOutcome) + Send + Sync + 'static {
    let metrics = metrics.clone();
    move |outcome| {
        let result = match outcome {
            EarlyOutcome::Accepted => "accepted",
            EarlyOutcome::Rejected => "rejected",
            EarlyOutcome::Failed(_) => "failed",
        };
        metrics
            .zero_rtt
            .get_or_create(&ZeroRttLabels { alpn, result })
            .inc();
    }
}

/// State shared by every task of one sidecar.
pub(crate) struct Ctx {
    /// The mesh file in force and the policy state of its services.
    pub state: ArcSwap<State>,
    pub tls: Arc<MeshTls>,
    pub metrics: Arc<Metrics>,
    pub h3_pool: Pool<(H3Sender, PeerId)>,
    pub l4_pool: Pool<PeerId>,
    pub app: Option<SocketAddr>,
    pub app_client: hyper_util::client::legacy::Client<HttpConnector, ProxyBody>,
    pub limits: Limits,
    pub inbound_connections: AtomicUsize,
    pub ready: AtomicBool,
    pub drain: watch::Receiver<bool>,
    /// Serving, draining (no new work; work in progress finishes) or
    /// cutting (the drain deadline passed): see [`crate::lifecycle`].
    pub phase: watch::Receiver<Phase>,
    /// Work in progress, which a drain waits for.
    pub activity: Activity,
    /// Peers that are draining, avoided until a new handshake succeeds.
    pub peers: crate::outbound::Peers,
    pub effective: serde_json::Value,
    pub tracer: crate::trace::Tracer,
    /// Wakes the DNS resolver (a new mesh names something it has not looked up).
    pub resolve_now: tokio::sync::Notify,
    /// UDP flows on pooled `weft-l4` connections, by connection.
    pub udp: Arc<crate::udp::ClientTables>,
}

impl Ctx {
    /// Put `mesh` in force for new requests and streams; the policy state of
    /// services and endpoints that stay is carried over.
    pub fn apply_mesh(&self, mesh: Mesh) {
        let next = State::new(mesh, Some(&self.state.load()));
        let unresolved = next
            .source()
            .dns_names()
            .iter()
            .any(|n| !next.dns().contains_key(n));
        self.state.store(Arc::new(next));
        if unresolved {
            self.resolve_now.notify_one();
        }
    }

    /// Spawn an accept loop (listener): it ends when the sidecar starts
    /// draining, so no new connection is taken, while the connections it
    /// accepted (spawned with [`Ctx::spawn`]) go on until drained.
    pub fn spawn_listener<F>(&self, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut phase = self.phase.clone();
        self.spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = crate::lifecycle::reached(&mut phase, Phase::Draining) => {}
            }
        })
    }

    /// Whether the sidecar has started draining.
    pub fn draining(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }

    /// Spawn a task that ends when the sidecar stops (after its drain).
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut drain = self.drain.clone();
        // Boxed first: a request's future is kilobytes (4.4 KiB for an
        // inbound h3 request), and the task would otherwise copy it whole
        // on every move into the runtime and again to store its end state.
        let fut = Box::pin(fut);
        tokio::spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = drain.wait_for(|d| *d) => {}
            }
        })
    }
}

/// A running sidecar. Dropping it stops everything it started.
pub struct Sidecar {
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub upstream_addrs: BTreeMap<String, SocketAddr>,
    /// Where the UDP upstream sockets are bound, by service.
    pub udp_upstream_addrs: BTreeMap<String, SocketAddr>,
    /// Where the outbound capture listeners are bound.
    pub capture_addrs: Vec<SocketAddr>,
    ctx: Arc<Ctx>,
    endpoint: MeshEndpoint,
    drain: watch::Sender<bool>,
    phase: watch::Sender<Phase>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sidecar {
    pub async fn start(cfg: SidecarConfig) -> Result<Sidecar, SidecarError> {
        let obtained = crate::identity::obtain(&cfg.identity).await?;
        let tls = MeshTls::new(&cfg.mesh.trust_domain, &obtained.creds)?;
        tracing::info!(identity = %tls.identity(), "certificate loaded");
        let mut opts = EndpointOptions::new(cfg.inbound);
        opts.max_streams_per_connection = cfg.limits.max_streams_per_connection;
        opts.keep_alive = cfg.limits.quic_keep_alive;
        opts.idle_timeout = cfg.limits.quic_idle_timeout;
        let endpoint = MeshEndpoint::bind(tls.clone(), &opts)?;
        let inbound_addr = endpoint
            .local_addr()
            .map_err(|source| SidecarError::Listen {
                what: "inbound".into(),
                addr: cfg.inbound,
                source,
            })?;
        let metrics = Metrics::new();
        let (drain_tx, drain) = watch::channel(false);
        let (phase_tx, phase) = watch::channel(Phase::Serving);
        // Pooled connections report peers that drain (GOAWAY, DRAINING close).
        let (peer_events, peer_events_rx) = tokio::sync::mpsc::unbounded_channel();

        let h3_pool = {
            let count = count_zero_rtt(&metrics, "h3");
            let metrics = metrics.clone();
            let max_header = cfg.limits.max_header_bytes as u64;
            let events = peer_events.clone();
            Pool::with_setup(endpoint.clone(), ALPN_H3, move |conn, peer| {
                let metrics = metrics.clone();
                let peer = peer_of(peer);
                let events = events.clone();
                Box::pin(async move {
                    let addr = conn.remote_address();
                    let (driver, sender) = h3::client::builder()
                        .max_field_section_size(max_header)
                        .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
                        .await
                        .map_err(|e| ConnectError::Setup {
                            addr,
                            reason: e.to_string(),
                        })?;
                    tokio::spawn(crate::outbound::drive_h3(driver, conn.clone(), events));
                    track_outbound(&metrics, &conn, "h3");
                    metrics.quic_peers.track(OUTBOUND, &peer, &conn);
                    Ok((sender, peer))
                })
            })
            .zero_rtt(cfg.limits.zero_rtt)
            .on_early_outcome(count)
        };
        let l4_pool = {
            let count = count_zero_rtt(&metrics, "weft-l4");
            let metrics = metrics.clone();
            Pool::with_setup(endpoint.clone(), ALPN_L4, move |conn, peer| {
                track_outbound(&metrics, &conn, "weft-l4");
                crate::outbound::watch_l4(conn.clone(), peer_events.clone());
                let peer = peer_of(peer);
                metrics.quic_peers.track(OUTBOUND, &peer, &conn);
                Box::pin(async move { Ok(peer) })
            })
            .zero_rtt(cfg.limits.zero_rtt)
            .on_early_outcome(count)
        };

        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        let app_client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build(http);

        check_upstreams(&cfg)?;

        let effective = serde_json::json!({
            "identity": tls.identity().to_string(),
            "inbound": inbound_addr.to_string(),
            "app": cfg.app.map(|a| a.to_string()),
            "upstreams": cfg.upstreams.iter().map(|(s, a)| (s.clone(), a.to_string()))
                .chain(cfg.udp_upstreams.iter().map(|(s, a)| (s.clone(), format!("{a}/udp"))))
                .collect::<BTreeMap<_, _>>(),
            "limits": cfg.limits,
            "tracing": cfg.tracing,
            "capture": cfg.capture,
        });
        let (tracer, exporter) = crate::trace::Tracer::new(
            &cfg.tracing,
            crate::trace::Resource::of(&cfg.tracing, &tls.identity()),
            metrics.clone(),
        )?;
        let ctx = Arc::new(Ctx {
            state: ArcSwap::from_pointee(State::new(cfg.mesh.clone(), None)),
            tls,
            metrics,
            h3_pool,
            l4_pool,
            app: cfg.app,
            app_client,
            limits: cfg.limits.clone(),
            inbound_connections: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            drain,
            phase,
            activity: Activity::default(),
            peers: crate::outbound::Peers::default(),
            effective,
            tracer,
            resolve_now: tokio::sync::Notify::new(),
            udp: Arc::default(),
        });

        crate::identity::publish_expiry(&ctx);
        ctx.spawn(crate::outbound::peer_events(ctx.clone(), peer_events_rx));
        if let Some(exporter) = exporter {
            ctx.spawn(exporter);
        }
        let mut tasks = vec![
            ctx.spawn(crate::inbound::accept_loop(ctx.clone(), endpoint.clone())),
            ctx.spawn(crate::identity::maintain(
                ctx.clone(),
                cfg.identity.clone(),
                obtained.kept,
            )),
        ];
        let mut upstream_addrs = BTreeMap::new();
        for (svc, addr) in &cfg.upstreams {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| SidecarError::Listen {
                    what: format!("upstream {svc}"),
                    addr: *addr,
                    source,
                })?;
            let bound = listener
                .local_addr()
                .map_err(|source| SidecarError::Listen {
                    what: format!("upstream {svc}"),
                    addr: *addr,
                    source,
                })?;
            upstream_addrs.insert(svc.clone(), bound);
            tasks.push(ctx.spawn_listener(crate::outbound::listen(
                ctx.clone(),
                svc.clone(),
                listener,
            )));
        }
        let mut udp_upstream_addrs = BTreeMap::new();
        for (svc, addr) in &cfg.udp_upstreams {
            let listen_err = |source| SidecarError::Listen {
                what: format!("UDP upstream {svc}"),
                addr: *addr,
                source,
            };
            let socket = tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(listen_err)?;
            udp_upstream_addrs.insert(svc.clone(), socket.local_addr().map_err(listen_err)?);
            tasks.push(ctx.spawn_listener(crate::udp::outbound::listen(
                ctx.clone(),
                svc.clone(),
                socket,
            )));
        }
        let capture = Arc::new(cfg.capture.clone());
        let mut capture_addrs = Vec::new();
        for addr in &capture.listen {
            let listen_err = |source| SidecarError::Listen {
                what: "outbound capture".into(),
                addr: *addr,
                source,
            };
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(listen_err)?;
            capture_addrs.push(listener.local_addr().map_err(listen_err)?);
            tasks.push(ctx.spawn(crate::intercept::listen(
                ctx.clone(),
                capture.clone(),
                listener,
            )));
        }
        // The first DNS answers come in before the sidecar says it is ready.
        crate::resolve::refresh(&ctx).await;
        tasks.push(ctx.spawn(crate::resolve::maintain(ctx.clone(), cfg.dns_refresh)));
        let admin = tokio::net::TcpListener::bind(cfg.admin)
            .await
            .map_err(|source| SidecarError::Listen {
                what: "admin".into(),
                addr: cfg.admin,
                source,
            })?;
        let admin_addr = admin.local_addr().map_err(|source| SidecarError::Listen {
            what: "admin".into(),
            addr: cfg.admin,
            source,
        })?;
        tasks.push(ctx.spawn(crate::admin::serve(ctx.clone(), admin)));
        ctx.ready.store(true, Ordering::Release);
        tracing::info!(%inbound_addr, %admin_addr, ?upstream_addrs, "sidecar ready");
        Ok(Sidecar {
            inbound_addr,
            admin_addr,
            upstream_addrs,
            udp_upstream_addrs,
            capture_addrs,
            ctx,
            endpoint,
            drain: drain_tx,
            phase: phase_tx,
            tasks,
        })
    }

    /// Re-read `path` every `interval` and apply valid changes (see [`crate::reload`]).
    pub fn watch_mesh_file(&mut self, path: PathBuf, interval: std::time::Duration) {
        let task = self
            .ctx
            .spawn(crate::reload::watch(self.ctx.clone(), path, interval));
        self.tasks.push(task);
    }

    /// Replace the mesh configuration; applies to new requests and streams.
    pub fn set_mesh(&self, mesh: Mesh) {
        self.ctx.apply_mesh(mesh);
    }

    pub fn mesh(&self) -> Arc<Mesh> {
        Arc::new(self.ctx.state.load().mesh().clone())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.ctx.metrics
    }

    pub fn identity(&self) -> SpiffeId {
        self.ctx.tls.identity()
    }

    /// Where the peers of this sidecar's inbound QUIC connections are, as
    /// quinn sees them now (a migrated peer shows its new address).
    pub fn inbound_peer_addrs(&self) -> Vec<SocketAddr> {
        self.ctx
            .metrics
            .quic_peers
            .remote_addresses(crate::metrics::INBOUND)
    }

    /// Handshakes the HTTP/3 and L4 pools have started (dedup visible here).
    pub fn pool_handshakes(&self) -> (u64, u64) {
        (self.ctx.h3_pool.handshakes(), self.ctx.l4_pool.handshakes())
    }

    /// Move the QUIC endpoint to a new local UDP socket bound to `addr`
    /// (e.g. another port): connections and in-flight streams go on, and
    /// peers migrate them to the new address (docs/quic.md). Returns the new
    /// inbound address, also in [`Sidecar::inbound_addr`]. Peers dialing
    /// this sidecar anew must be told the new address (mesh file).
    pub fn rebind(&mut self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let bound = self.endpoint.rebind(addr)?;
        tracing::info!(from = %self.inbound_addr, to = %bound, "QUIC endpoint rebound");
        self.inbound_addr = bound;
        Ok(bound)
    }

    /// Drain gracefully: `/ready` turns 503, listeners and the inbound
    /// endpoint stop taking new connections, peers are told to go away
    /// (HTTP/3 GOAWAY, refused streams) and each connection is closed once
    /// what it carries has finished; after `timeout` whatever is left is
    /// cut. Returns what was in progress and what was cut. Call
    /// [`Sidecar::shutdown`] afterwards to end the remaining tasks.
    pub async fn drain(&mut self, timeout: std::time::Duration) -> DrainReport {
        crate::lifecycle::drain(&self.ctx, &self.phase, &self.endpoint, timeout).await
    }

    /// Whether [`Sidecar::drain`] has started.
    pub fn draining(&self) -> bool {
        self.ctx.draining()
    }

    /// Stop accepting, close connections, end every task.
    pub async fn shutdown(mut self) {
        // Spans still queued go out first (bounded: a dead collector waits no longer).
        self.ctx.tracer.flush(crate::trace::SHUTDOWN_FLUSH).await;
        self.stop();
        // Connections were closed above; give the close frames a moment to go out.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            self.endpoint.quinn().wait_idle(),
        )
        .await;
    }

    fn stop(&mut self) {
        let _ = self.drain.send(true);
        self.endpoint
            .quinn()
            .close(0u32.into(), b"sidecar shutting down");
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop();
    }
}

fn track_outbound(metrics: &Arc<Metrics>, conn: &quinn::Connection, alpn: &'static str) {
    let labels = QuicLabels {
        direction: OUTBOUND,
        alpn,
    };
    metrics.quic_connections.get_or_create(&labels).inc();
    let active = metrics.quic_active.get_or_create(&labels).clone();
    active.inc();
    let conn = conn.clone();
    tokio::spawn(async move {
        conn.closed().await;
        active.dec();
    });
}

/// Every upstream names a service of the mesh, of the right protocol: a
/// `/udp` upstream a UDP service, a plain one an HTTP or TCP service.
fn check_upstreams(cfg: &SidecarConfig) -> Result<(), SidecarError> {
    let tcp = cfg.upstreams.iter().map(|(s, _)| (s, false));
    let udp = cfg.udp_upstreams.iter().map(|(s, _)| (s, true));
    for (svc, wants_udp) in tcp.chain(udp) {
        let Some(service) = cfg.mesh.service(svc) else {
            return Err(SidecarError::UnknownUpstream(svc.clone()));
        };
        let is_udp = service.protocol == Protocol::Udp;
        if is_udp != wants_udp {
            return Err(SidecarError::UpstreamProtocol {
                service: svc.clone(),
                protocol: if is_udp { "udp" } else { "http or tcp" },
                hint: if is_udp {
                    "give its listener as SERVICE=ADDR/udp"
                } else {
                    "a SERVICE=ADDR/udp listener is only for protocol = \"udp\" services"
                },
            });
        }
    }
    Ok(())
}

/// The protocol of a service, if the mesh knows it.
pub(crate) fn protocol_of(mesh: &Mesh, service: &str) -> Option<Protocol> {
    mesh.service(service).map(|s| s.protocol)
}
