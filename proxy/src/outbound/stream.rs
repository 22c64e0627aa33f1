//! One outbound TCP connection: fault injection (delay, reset) → backend by
//! weight → circuit breaker (concurrent streams) → connect to an endpoint
//! with retries on connect failure (the bytes have not been sent, so this
//! is always safe) → copy both ways until both sides end or the stream is
//! idle for the service's `idle_timeout`.
//!
//! A stream a draining peer refused before its preamble answer (reset with
//! `DRAINING`, the connection closed with `DRAINING`, a refused handshake)
//! never reached the app: it is opened once more on another endpoint even
//! when the route has no retry policy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use weft_transport::preamble;

use super::drain::{Alpn, EarlyFailure};
use crate::balance::{self, AttemptResult, EndpointState};
use crate::cluster::Cluster;
use crate::metrics::{
    EarlyDataLabels, RouteLabels, RouteReasonLabels, ServiceReasonLabels, TcpLabels, OUTBOUND,
};
use crate::retry::{self, Failure};
use crate::route;
use crate::sidecar::Ctx;
use weft_transport::pool::{drained, Drained, Early, Pooled, DRAINING};

/// How long the peer sidecar may take to answer a TCP stream preamble,
/// beyond the connect timeout it is given (it connects to its app first).
const PREAMBLE_GRACE: Duration = Duration::from_secs(1);

pub(super) async fn proxy(ctx: Arc<Ctx>, service: String, stream: TcpStream, from: SocketAddr) {
    let started = (std::time::SystemTime::now(), std::time::Instant::now());
    let _busy = ctx.activity.outbound_streams.enter();
    let labels = TcpLabels {
        direction: OUTBOUND,
        service: service.clone(),
        peer: String::new(),
    };
    ctx.metrics.tcp_connections.get_or_create(&labels).inc();
    match connect(&ctx, &service).await {
        Ok(Connected {
            send,
            recv,
            peer,
            idle,
            hold,
        }) => {
            let labels = TcpLabels { peer, ..labels };
            let active = ctx.metrics.tcp_active.get_or_create(&labels).clone();
            active.inc();
            let result = crate::lifecycle::copy_until_cut(&ctx, stream, send, recv, idle).await;
            drop(hold);
            active.dec();
            ctx.metrics
                .tcp_sent_bytes
                .get_or_create(&labels)
                .inc_by(result.to_peer);
            ctx.metrics
                .tcp_received_bytes
                .get_or_create(&labels)
                .inc_by(result.from_peer);
            let error = result.error.as_ref().map(|e| e.to_string());
            let (up, down) = (result.to_peer, result.from_peer);
            ctx.tracer
                .tcp_log(OUTBOUND, &service, &labels.peer, started, up, down, error);
            if let Some(e) = result.error {
                tracing::debug!(%service, %from, error = %e, "TCP stream ended with error");
            }
        }
        Err(e) => {
            tracing::warn!(%service, %from, error = %e, "TCP stream refused");
            ctx.tracer
                .tcp_log(OUTBOUND, &service, "", started, 0, 0, Some(e.clone()));
            crate::copy::reset(stream);
        }
    }
}

struct Connected {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: String,
    idle: Option<Duration>,
    /// Breaker slot and in-flight count, held while the stream lives.
    hold: (crate::breaker::BreakerPermit, balance::InFlight),
}

async fn connect(ctx: &Arc<Ctx>, service: &str) -> Result<Connected, String> {
    let state = ctx.state.load_full();
    let svc = state
        .service(service)
        .ok_or_else(|| format!("service {service} is no longer in the mesh"))?;
    let fallback;
    let route = match svc.routes.first() {
        Some(r) => r,
        None => {
            fallback = crate::mesh::Route::default_for(service);
            &fallback
        }
    };
    let rl = RouteLabels {
        service: service.to_string(),
        route: route.name.clone(),
    };
    let fault = |reason| {
        ctx.metrics
            .faults
            .get_or_create(&RouteReasonLabels {
                service: rl.service.clone(),
                route: rl.route.clone(),
                reason,
            })
            .inc()
    };
    if let Some(f) = &route.fault {
        let action = route::fault_action(f, None, &mut rand::rng());
        if let Some(d) = action.delay {
            fault("delay");
            tokio::time::sleep(d).await;
        }
        if action.abort.is_some() {
            fault("reset");
            return Err("fault injected: stream reset".into());
        }
    }
    let backend = route::pick_backend(&route.backends, &mut rand::rng())
        .ok_or_else(|| format!("route {} has no backends", route.name))?;
    let cluster = state
        .cluster(&backend.service)
        .cloned()
        .ok_or_else(|| format!("backend service {} is not in the mesh", backend.service))?;
    let endpoints = cluster.subset(&backend.subset);
    let policy = &cluster.service.policy;
    let permit = match tokio::time::timeout(policy.connect_timeout, cluster.breaker.acquire()).await
    {
        Ok(Ok(p)) => p,
        Ok(Err(overflow)) => {
            ctx.metrics
                .overflows
                .get_or_create(&ServiceReasonLabels {
                    service: backend.service.clone(),
                    reason: "streams",
                })
                .inc();
            return Err(format!("{} overflow: {overflow}", backend.service));
        }
        Err(_) => return Err(format!("timed out queued for {}", backend.service)),
    };
    cluster.budget.deposit();
    let mut tried = Vec::new();
    let mut retries = 0;
    let mut drain_retried = false;
    loop {
        let ep = balance::choose(
            cluster.lb,
            &endpoints,
            &tried,
            &cluster.rr,
            &mut rand::rng(),
            Instant::now(),
        )
        .ok_or_else(|| format!("service {} has no endpoints", backend.service))?;
        tried.push(ep.addr());
        let in_flight = ep.start();
        let started = Instant::now();
        let (error, draining) = match open(ctx, &cluster, &backend.service, &ep).await {
            Ok((send, recv, peer)) => {
                ep.observe_latency(started.elapsed(), Instant::now());
                record(ctx, &cluster, &ep, AttemptResult::Status(200));
                return Ok(Connected {
                    send,
                    recv,
                    peer,
                    idle: policy.idle_timeout,
                    hold: (permit, in_flight),
                });
            }
            // The peer refused us (authorization, unknown service): another
            // endpoint would too, and the endpoint is healthy.
            Err(OpenError::Refused(msg)) => return Err(msg),
            // A second rejection after a full handshake: a failure.
            Err(OpenError::Failed(msg) | OpenError::EarlyRejected(msg)) => (msg, false),
            Err(OpenError::Draining(msg)) => (msg, true),
        };
        let elsewhere = endpoints.iter().any(|e| !tried.contains(&e.addr()));
        if draining {
            // Never reached the app: once more elsewhere, whatever the policy.
            if !drain_retried && elsewhere {
                drain_retried = true;
                ctx.metrics
                    .retries
                    .get_or_create(&RouteReasonLabels {
                        service: rl.service.clone(),
                        route: rl.route.clone(),
                        reason: Failure::Draining.label(),
                    })
                    .inc();
                tracing::debug!(service = %backend.service, endpoint = %ep.addr(), %error, "peer draining; opening the stream elsewhere");
                continue;
            }
        } else {
            record(ctx, &cluster, &ep, AttemptResult::ConnectFailure);
        }
        let p = &route.retries;
        if retry::retryable(&p.on, Failure::ConnectFailure).is_none()
            || retries >= p.attempts
            || !elsewhere
        {
            return Err(error);
        }
        if !cluster.budget.withdraw() {
            ctx.metrics.retry_budget_exhausted.get_or_create(&rl).inc();
            return Err(error);
        }
        retries += 1;
        ctx.metrics
            .retries
            .get_or_create(&RouteReasonLabels {
                service: rl.service.clone(),
                route: rl.route.clone(),
                reason: Failure::ConnectFailure.label(),
            })
            .inc();
        tracing::debug!(service = %backend.service, endpoint = %ep.addr(), %error, "retrying TCP connect");
        let pause = retry::backoff(retries, p.backoff_base, p.backoff_max, &mut rand::rng());
        tokio::time::sleep(pause).await;
    }
}

fn record(ctx: &Ctx, cluster: &Cluster, ep: &EndpointState, result: AttemptResult) {
    if let Some(reason) = cluster
        .outlier
        .record(ep, &cluster.states, result, Instant::now())
    {
        tracing::warn!(service = %cluster.service.name, endpoint = %ep.addr(), reason, "endpoint ejected");
        ctx.metrics
            .ejections
            .get_or_create(&ServiceReasonLabels {
                service: cluster.service.name.clone(),
                reason,
            })
            .inc();
    }
}

/// Why a stream could not be opened.
enum OpenError {
    /// The endpoint or its app could not be reached: try another.
    Failed(String),
    /// The peer answered and said no (a policy answer, not a failure).
    Refused(String),
    /// The peer is draining and refused the stream before reading it.
    Draining(String),
    /// The preamble went as 0-RTT early data the peer rejected: nothing
    /// reached its app; open again after the handshake.
    EarlyRejected(String),
}

impl OpenError {
    fn message(&self) -> &str {
        match self {
            OpenError::Failed(m)
            | OpenError::Refused(m)
            | OpenError::Draining(m)
            | OpenError::EarlyRejected(m) => m,
        }
    }
}

impl From<String> for OpenError {
    fn from(s: String) -> Self {
        OpenError::Failed(s)
    }
}

type Opened = (quinn::SendStream, quinn::RecvStream, String);

/// Open a stream to one endpoint and complete the preamble exchange. For a
/// service marked `early_data`, to a peer we hold a session ticket from,
/// the preamble goes as 0-RTT early data: the peer connects to its app
/// while the handshake ends, a round trip sooner. The app's bytes only
/// follow the peer's answer, so none of them is early data; if the peer
/// rejects the early data the stream is opened again after the handshake.
async fn open(
    ctx: &Arc<Ctx>,
    cluster: &Cluster,
    service: &str,
    ep: &EndpointState,
) -> Result<Opened, OpenError> {
    let early_ok = cluster.service.policy.early_data;
    match open_once(ctx, cluster, service, ep, early_ok).await {
        Err(OpenError::EarlyRejected(msg)) => {
            tracing::debug!(endpoint = %ep.addr(), reason = %msg, "opening the stream again after the handshake");
            ctx.metrics
                .retries
                .get_or_create(&RouteReasonLabels {
                    service: service.to_string(),
                    route: String::new(),
                    reason: "early-data",
                })
                .inc();
            open_once(ctx, cluster, service, ep, false).await
        }
        r => r,
    }
}

async fn open_once(
    ctx: &Arc<Ctx>,
    cluster: &Cluster,
    service: &str,
    ep: &EndpointState,
    early_ok: bool,
) -> Result<Opened, OpenError> {
    let addr = ep.addr();
    let connect_timeout = cluster.service.policy.connect_timeout;
    let get = ctx.l4_pool.get_pooled(addr, early_ok);
    let Pooled {
        conn,
        t: peer,
        early,
    } = match tokio::time::timeout(connect_timeout, get)
        .await
        .map_err(|_| {
            super::drain::peer_unreachable(ctx, addr, Alpn::L4);
            format!("connect to {addr} timed out")
        })? {
        Ok(x) => x,
        Err(e) if e.is_refused() => {
            super::drain::peer_draining(ctx, addr, Alpn::L4);
            return Err(OpenError::Draining(e.to_string()));
        }
        Err(e) => {
            if e.is_unanswered() {
                super::drain::peer_unreachable(ctx, addr, Alpn::L4);
            }
            return Err(OpenError::Failed(e.to_string()));
        }
    };
    let peer = peer.to_string();
    if early.as_ref().is_some_and(Early::pending) {
        ctx.metrics
            .early_data
            .get_or_create(&EarlyDataLabels {
                direction: OUTBOUND,
                alpn: "weft-l4",
            })
            .inc();
    }
    let result = exchange(ctx, cluster, service, addr, &conn).await;
    let result = match result {
        Err(e) => Err(
            match super::drain::early_failure(ctx, addr, Alpn::L4, early.as_ref()).await {
                // Nothing reached the peer's app: open again after the handshake.
                Some(EarlyFailure::Rejected) => OpenError::EarlyRejected(e.message().to_string()),
                Some(EarlyFailure::Draining(m)) => OpenError::Draining(m),
                Some(EarlyFailure::Failed(m)) => OpenError::Failed(m),
                None => e,
            },
        ),
        ok => ok,
    };
    result.map(|(send, recv)| (send, recv, peer))
}

/// Open a stream on `conn` and exchange preambles.
async fn exchange(
    ctx: &Arc<Ctx>,
    cluster: &Cluster,
    service: &str,
    addr: std::net::SocketAddr,
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
    let connect_timeout = cluster.service.policy.connect_timeout;
    // Whether an error on this stream means the peer drains (and then
    // stop using its connection).
    let drain_error = |msg: String, reset: Option<quinn::VarInt>| {
        let draining = reset == Some(quinn::VarInt::from_u32(DRAINING))
            || drained(conn) == Some(Drained::Graceful);
        if draining || drained(conn).is_some() {
            ctx.l4_pool.evict(addr, conn);
            super::drain::peer_draining(ctx, addr, Alpn::L4);
        }
        if draining {
            OpenError::Draining(msg)
        } else {
            OpenError::Failed(msg)
        }
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| drain_error(e.to_string(), None))?;
    let req = preamble::Request {
        target: service.to_string(),
        port: cluster.service.port,
        // The peer bounds its connect to the app by what we will wait.
        deadline_ms: u32::try_from(connect_timeout.as_millis()).unwrap_or(u32::MAX),
    };
    let bytes = req.encode().map_err(|e| e.to_string())?;
    if let Err(e) = send.write_all(&bytes).await {
        let code = match &e {
            quinn::WriteError::Stopped(code) => Some(*code),
            _ => None,
        };
        return Err(drain_error(e.to_string(), code));
    }
    let wait = connect_timeout + PREAMBLE_GRACE;
    let resp = tokio::time::timeout(wait, weft_transport::l4::read_response(&mut recv))
        .await
        .map_err(|_| format!("{addr} did not answer the stream preamble in {wait:?}"))?
        .map_err(|e| {
            let code = match &e {
                weft_transport::l4::ReadError::Stream(quinn::ReadError::Reset(code)) => Some(*code),
                _ => None,
            };
            drain_error(format!("reading the answer of {addr}: {e}"), code)
        })?;
    let msg = format!(
        "{addr} refused the stream: {:?} {}",
        resp.status, resp.message
    );
    match resp.status {
        preamble::Status::Ok => {}
        preamble::Status::Unauthorized
        | preamble::Status::UnknownTarget
        | preamble::Status::Malformed => return Err(OpenError::Refused(msg)),
        preamble::Status::ConnectFailed | preamble::Status::Overloaded => {
            return Err(OpenError::Failed(msg))
        }
    }
    Ok((send, recv))
}
