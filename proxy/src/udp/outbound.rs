//! The client side of UDP services: a local UDP socket per `--upstream
//! SERVICE=ADDR/udp`; each app source address is a flow, given to one peer
//! (chosen by the load balancer when the flow starts, then sticky) on its
//! own `weft-l4` stream, with its datagrams as QUIC DATAGRAM frames.
//!
//! Phases per flow: first datagram → pick endpoint → open stream, preamble
//! (the peer authorizes) → datagrams both ways until idle, the reply limit,
//! the peer's end of the stream, or a drain. Datagrams that arrive while
//! the stream opens wait in the flow's queue; if the peer refuses the flow
//! they are dropped and counted (`unauthorized`, `unreachable`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use weft_transport::preamble::{self, Kind, Status};

use super::{reason, Counters, Outcome, FLOW_QUEUE, MAX_UDP_PAYLOAD};
use crate::cluster::Cluster;
use crate::lifecycle::Phase;
use crate::mesh::Protocol;
use crate::metrics::{ServiceReasonLabels, OUTBOUND};
use crate::sidecar::Ctx;

/// Flows one upstream listener keeps at once; datagrams from more app
/// addresses are dropped (`queue_full`). Each flow holds a QUIC stream on
/// the peer, which allows 1024 per connection by default.
const MAX_FLOWS: usize = 1024;

/// Endpoints a flow tries before its datagrams are dropped as unreachable.
const MAX_TRIES: usize = 3;

/// How long the peer may take to answer a flow's preamble beyond the
/// connect timeout (it opens its app socket first, which is immediate).
const PREAMBLE_GRACE: Duration = Duration::from_secs(1);

/// Read the app's datagrams for `service` and hand them to flows, until drained.
pub(crate) async fn listen(ctx: Arc<Ctx>, service: String, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let counters = Counters::new(&ctx.metrics, OUTBOUND, &service);
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<Ended>();
    let mut flows = Flows {
        ctx: ctx.clone(),
        service: service.clone(),
        socket: socket.clone(),
        counters,
        by_addr: HashMap::new(),
        ended: ended_tx,
        next_id: 0,
    };
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD];
    loop {
        let (n, from) = tokio::select! {
            Some(e) = ended.recv() => {
                if flows.by_addr.get(&e.addr).is_some_and(|(f, _)| *f == e.id) {
                    flows.by_addr.remove(&e.addr);
                }
                // Datagrams that reached the flow's queue as it ended (the
                // app's next query from the same port): a new flow takes them.
                if !e.leftovers.is_empty() {
                    flows.dispatch(e.addr, e.leftovers);
                }
                continue;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // Nothing an app does makes an unconnected socket fail
                    // for long; do not spin if the kernel does.
                    tracing::warn!(%service, error = %e, "UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        flows.dispatch(from, vec![Bytes::copy_from_slice(&buf[..n])]);
    }
}

/// A flow that ended, with what was still queued for it.
struct Ended {
    addr: SocketAddr,
    id: u64,
    leftovers: Vec<Bytes>,
}

/// The flows of one listener, by app address.
struct Flows {
    ctx: Arc<Ctx>,
    service: String,
    socket: Arc<UdpSocket>,
    counters: Arc<Counters>,
    by_addr: HashMap<SocketAddr, (u64, mpsc::Sender<Bytes>)>,
    ended: mpsc::UnboundedSender<Ended>,
    next_id: u64,
}

impl Flows {
    /// Queue datagrams from `from` on its flow, starting one if needed.
    fn dispatch(&mut self, from: SocketAddr, payloads: Vec<Bytes>) {
        let mut payloads = payloads.into_iter();
        if let Some((_, tx)) = self.by_addr.get(&from) {
            for p in payloads.by_ref() {
                match tx.try_send(p) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        self.counters.dropped(reason::QUEUE_FULL)
                    }
                    // The flow has ended: the rest starts a new one.
                    Err(mpsc::error::TrySendError::Closed(p)) => {
                        self.by_addr.remove(&from);
                        let rest: Vec<Bytes> = std::iter::once(p).chain(payloads).collect();
                        return self.dispatch(from, rest);
                    }
                }
            }
            return;
        }
        if self.by_addr.len() >= MAX_FLOWS {
            self.counters
                .dropped_n(reason::QUEUE_FULL, payloads.len() as u64);
            return;
        }
        let (tx, rx) = mpsc::channel(FLOW_QUEUE);
        for p in payloads {
            if tx.try_send(p).is_err() {
                self.counters.dropped(reason::QUEUE_FULL);
            }
        }
        self.next_id += 1;
        let id = self.next_id;
        self.by_addr.insert(from, (id, tx));
        let (ctx, service, socket, counters, ended) = (
            self.ctx.clone(),
            self.service.clone(),
            self.socket.clone(),
            self.counters.clone(),
            self.ended.clone(),
        );
        self.ctx.spawn(async move {
            let leftovers = flow(&ctx, &service, &counters, &socket, from, rx).await;
            let _ = ended.send(Ended {
                addr: from,
                id,
                leftovers,
            });
        });
    }
}

/// A flow the peer accepted.
struct Opened {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    idle: Duration,
    replies_per_flow: Option<u32>,
    /// Breaker slot and in-flight count, held while the flow lives.
    _hold: (crate::breaker::BreakerPermit, crate::balance::InFlight),
}

async fn flow(
    ctx: &Arc<Ctx>,
    service: &str,
    counters: &Arc<Counters>,
    socket: &UdpSocket,
    client: SocketAddr,
    mut rx: mpsc::Receiver<Bytes>,
) -> Vec<Bytes> {
    let opened = match connect(ctx, service).await {
        Ok(o) => o,
        Err((why, msg)) => {
            tracing::warn!(%service, %client, error = %msg, "UDP flow refused");
            rx.close();
            let mut n = 0;
            while rx.try_recv().is_ok() {
                n += 1;
            }
            counters.dropped_n(why, n);
            return Vec::new();
        }
    };
    let _active = counters.open_flow();
    let Opened {
        conn,
        mut send,
        mut recv,
        idle,
        replies_per_flow,
        _hold,
    } = opened;
    let qsid = weft_transport::l4::quarter_stream_id(send.id());
    let table = ctx.udp.of(&conn, &ctx.metrics);
    let (reply_tx, mut replies) = mpsc::channel::<Bytes>(FLOW_QUEUE);
    table.insert(qsid, reply_tx, counters.clone());
    tracing::debug!(%service, %client, peer = %conn.remote_address(), qsid, "UDP flow open");
    let mut phase = ctx.phase.clone();
    let mut last = Instant::now();
    let mut answered = 0u32;
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            d = rx.recv() => match d {
                // The listener is gone (drain).
                None => break,
                Some(p) => match super::send(&conn, qsid, &p, counters) {
                    Outcome::Delivered => {
                        counters.sent(p.len());
                        last = Instant::now();
                    }
                    Outcome::Dropped => {}
                    Outcome::Lost => break,
                },
            },
            Some(p) = replies.recv() => {
                match socket.send_to(&p, client).await {
                    Ok(_) => counters.received(p.len()),
                    Err(e) => tracing::debug!(%service, %client, error = %e, "UDP reply to the app failed"),
                }
                last = Instant::now();
                answered += 1;
                if replies_per_flow.is_some_and(|limit| answered >= limit) {
                    break;
                }
            }
            // The peer sends nothing on the stream; its end (or the
            // connection's) ends the flow.
            r = recv.read(&mut scratch) => if !matches!(r, Ok(Some(_))) { break },
            _ = tokio::time::sleep_until(last + idle) => break,
            _ = crate::lifecycle::reached(&mut phase, Phase::Draining) => break,
        }
    }
    table.remove(qsid);
    let _ = send.finish();
    // Queued but never sent: the listener gives them to a new flow.
    rx.close();
    let mut leftovers = Vec::new();
    while let Ok(p) = rx.try_recv() {
        leftovers.push(p);
    }
    leftovers
}

/// Pick an endpoint and open the flow's stream; a failure to connect tries
/// another endpoint (nothing was sent yet), a refusal does not.
async fn connect(ctx: &Arc<Ctx>, service: &str) -> Result<Opened, (&'static str, String)> {
    let unreachable = |msg: String| (reason::UNREACHABLE, msg);
    let state = ctx.state.load_full();
    let cluster = state
        .cluster(service)
        .cloned()
        .ok_or_else(|| unreachable(format!("service {service} is no longer in the mesh")))?;
    if cluster.service.protocol != Protocol::Udp {
        return Err(unreachable(format!(
            "service {service} is {:?} now, not UDP",
            cluster.service.protocol
        )));
    }
    let endpoints = cluster.subset(&BTreeMap::new());
    let policy = &cluster.service.policy;
    let permit = match tokio::time::timeout(policy.connect_timeout, cluster.breaker.acquire()).await
    {
        Ok(Ok(p)) => p,
        Ok(Err(overflow)) => {
            ctx.metrics
                .overflows
                .get_or_create(&ServiceReasonLabels {
                    service: service.to_string(),
                    reason: "flows",
                })
                .inc();
            return Err((
                reason::QUEUE_FULL,
                format!("{service} overflow: {overflow}"),
            ));
        }
        Err(_) => return Err(unreachable(format!("timed out queued for {service}"))),
    };
    let mut tried = Vec::new();
    loop {
        let ep = crate::balance::choose(
            cluster.lb,
            &endpoints,
            &tried,
            &cluster.rr,
            &mut rand::rng(),
            Instant::now(),
        )
        .ok_or_else(|| unreachable(format!("service {service} has no endpoints")))?;
        tried.push(ep.addr());
        let in_flight = ep.start();
        let started = Instant::now();
        match open(ctx, &cluster, service, ep.addr()).await {
            Ok((conn, send, recv)) => {
                ep.observe_latency(started.elapsed(), Instant::now());
                return Ok(Opened {
                    conn,
                    send,
                    recv,
                    // The checker gives every UDP service an idle timeout.
                    idle: policy
                        .idle_timeout
                        .unwrap_or(crate::mesh::policy::UDP_IDLE_TIMEOUT),
                    replies_per_flow: policy.replies_per_flow,
                    _hold: (permit, in_flight),
                });
            }
            Err(Open::Refused(status, msg)) => {
                let why = if status == Status::Unauthorized {
                    reason::UNAUTHORIZED
                } else {
                    reason::UNREACHABLE
                };
                return Err((why, msg));
            }
            Err(Open::Failed(msg)) => {
                let elsewhere = endpoints.iter().any(|e| !tried.contains(&e.addr()));
                if !elsewhere || tried.len() >= MAX_TRIES {
                    return Err(unreachable(msg));
                }
                tracing::debug!(%service, endpoint = %ep.addr(), error = %msg, "UDP flow: trying another endpoint");
            }
        }
    }
}

enum Open {
    /// The peer answered no (authorization, unknown service): final.
    Refused(Status, String),
    /// The endpoint could not be reached or could not reach its app.
    Failed(String),
}

/// Open a flow stream to the sidecar at `addr` and complete the preamble.
async fn open(
    ctx: &Arc<Ctx>,
    cluster: &Cluster,
    service: &str,
    addr: SocketAddr,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), Open> {
    let connect_timeout = cluster.service.policy.connect_timeout;
    let failed = |m: String| Open::Failed(m);
    let exchange = async {
        let (conn, _peer) = ctx
            .l4_pool
            .get(addr)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(e.to_string()))?;
        let req = preamble::Request {
            target: service.to_string(),
            port: cluster.service.port,
            deadline_ms: u32::try_from(connect_timeout.as_millis()).unwrap_or(u32::MAX),
        };
        let bytes = req
            .encode_kind(Kind::Udp)
            .map_err(|e| failed(e.to_string()))?;
        send.write_all(&bytes)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let resp = weft_transport::l4::read_response(&mut recv)
            .await
            .map_err(|e| failed(format!("reading the answer of {addr}: {e}")))?;
        let msg = format!(
            "{addr} refused the flow: {:?} {}",
            resp.status, resp.message
        );
        match resp.status {
            Status::Ok => Ok((conn, send, recv)),
            Status::Unauthorized | Status::UnknownTarget | Status::Malformed => {
                Err(Open::Refused(resp.status, msg))
            }
            Status::ConnectFailed | Status::Overloaded => Err(Open::Failed(msg)),
        }
    };
    let wait = connect_timeout + PREAMBLE_GRACE;
    tokio::time::timeout(wait, exchange)
        .await
        .map_err(|_| failed(format!("{addr} did not open the flow in {wait:?}")))?
}
