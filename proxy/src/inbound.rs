//! Inbound: one QUIC endpoint accepts peer sidecars (mTLS is checked during
//! the handshake by weft-transport). ALPN picks the path: `h3` requests are
//! forwarded to the local app over pooled HTTP/1.1 connections, `weft-l4`
//! streams are answered with a preamble response and then copied to a new
//! TCP connection to the app, or stand for a UDP flow ([`crate::udp`])
//! whose datagrams arrive beside them.
//!
//! Phases per stream: accept → context (peer identity) → check → connect → copy.
//!
//! Draining (see [`crate::lifecycle`]): new QUIC connections are refused;
//! an HTTP/3 connection gets a GOAWAY (later requests are rejected with
//! `H3_REQUEST_REJECTED`, so the peer sends them elsewhere) and a `weft-l4`
//! connection resets new streams with [`DRAINING`]; once what a connection
//! had accepted has finished it is closed with [`DRAINING`], or with
//! [`DRAIN_TIMEOUT`] when the drain deadline cuts it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use weft_transport::pool::{DRAINING, DRAIN_TIMEOUT};
use weft_transport::preamble::{self, Status};
use weft_transport::{MeshEndpoint, SpiffeId, ALPN_H3, ALPN_L4};

use crate::body::{self, ChannelBody};
use crate::headers;
use crate::lifecycle::{Gauge, Phase};
use crate::metrics::{
    EarlyDataLabels, QuicLabels, RequestDurationLabels, RequestLabels, StreamCount, TcpLabels,
    INBOUND,
};
use crate::sidecar::Ctx;

/// A peer must send its stream preamble within this time.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// At the drain deadline, how long a connection waits for its cut TCP
/// streams' FINs to get out before it is closed (HTTP/3 requests are not
/// waited for: they are cut by the close itself).
const CUT_LINGER: Duration = Duration::from_secs(1);
/// How long to wait for the app to accept a TCP connection.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn accept_loop(ctx: Arc<Ctx>, endpoint: MeshEndpoint) {
    while let Some(incoming) = endpoint.quinn().accept().await {
        if ctx.draining() {
            // CONNECTION_REFUSED at once: the peer tries another endpoint.
            ctx.metrics.refuse("draining");
            incoming.refuse();
            continue;
        }
        if ctx.inbound_connections.load(Ordering::Relaxed) >= ctx.limits.max_connections {
            ctx.metrics.refuse("connection_limit");
            tracing::warn!(remote = %incoming.remote_address(), limit = ctx.limits.max_connections,
                "refusing QUIC connection: connection limit reached");
            incoming.refuse();
            continue;
        }
        let ctx2 = ctx.clone();
        let endpoint = endpoint.clone();
        ctx.spawn(async move {
            let remote = incoming.remote_address();
            let accepted = match endpoint.accept_early(incoming).await {
                Ok(a) => a,
                Err(e) => {
                    ctx2.metrics
                        .quic_handshake_failures
                        .get_or_create(&QuicLabels {
                            direction: INBOUND,
                            alpn: "",
                        })
                        .inc();
                    tracing::warn!(%remote, error = %e, "inbound handshake failed");
                    return;
                }
            };
            let conn = accepted.conn.clone();
            let handshake = accepted.handshake.map(|h| Handshake::new(h, conn));
            connection(ctx2, accepted.conn, handshake).await;
        });
    }
}

/// The handshake of a connection that resumed a session and may carry 0-RTT
/// early data: streams accepted before it completes are early data, which
/// an attacker could have replayed (not here: tickets are single-use) and
/// which a client should only send when replaying it is harmless.
#[derive(Clone)]
struct Handshake(futures::future::Shared<futures::future::BoxFuture<'static, bool>>);

impl Handshake {
    fn new(done: quinn::ZeroRttAccepted, conn: quinn::Connection) -> Handshake {
        use futures::FutureExt;
        // On a server quinn's value says nothing (false either way): the
        // handshake succeeded if the connection is still open when it ends.
        let ended = async move {
            done.await;
            conn.close_reason().is_none()
        };
        let h = Handshake(ended.boxed().shared());
        // Polled to completion even if no stream waits for it, so that
        // `pending` turns false when the handshake ends.
        let driver = h.0.clone();
        tokio::spawn(async move {
            driver.await;
        });
        h
    }

    /// Whether the handshake is still going on (so what arrives is early
    /// data). Polled here, not only read off the driver task: quinn settles
    /// the handshake while processing the client's Finished, before any
    /// 1-RTT stream data (RFC 9001 §5.7) can reach us, so a request sent
    /// after the handshake is never taken for early data.
    fn pending(&self) -> bool {
        use futures::FutureExt;
        self.0.clone().now_or_never().is_none()
    }

    /// Wait for the handshake: `false` if it failed (a replayed flight
    /// never completes one), and then nothing early may go on.
    async fn done(&self) -> bool {
        self.0.clone().await
    }
}

/// Whether a stream accepted now on a connection with `handshake` is early data.
fn early(handshake: &Option<Handshake>) -> bool {
    handshake.as_ref().is_some_and(Handshake::pending)
}

async fn connection(ctx: Arc<Ctx>, conn: quinn::Connection, handshake: Option<Handshake>) {
    let Some(peer) = weft_transport::tls::peer_id(&conn, ctx.tls.trust_domain()) else {
        // The verifier admitted the peer, so this cannot happen; refuse anyway.
        conn.close(1u32.into(), b"no peer identity");
        return;
    };
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    let alpn_label = match alpn.as_deref() {
        Some(ALPN_H3) => "h3",
        Some(ALPN_L4) => "weft-l4",
        _ => {
            conn.close(1u32.into(), b"unknown ALPN");
            return;
        }
    };
    let labels = QuicLabels {
        direction: INBOUND,
        alpn: alpn_label,
    };
    // No connection outlives the peer's certificate: close it at expiry
    // (the peer's pool moves new streams to a fresh connection before that).
    let _ = weft_transport::pool::close_at_peer_expiry(&conn);
    ctx.metrics.quic_connections.get_or_create(&labels).inc();
    let active = ctx.metrics.quic_active.get_or_create(&labels).clone();
    active.inc();
    ctx.inbound_connections.fetch_add(1, Ordering::Relaxed);
    let _busy = ctx.activity.inbound_connections.enter();
    let streams = ctx.metrics.quic_peers.track(INBOUND, peer.as_str(), &conn);
    tracing::debug!(%peer, remote = %conn.remote_address(), alpn = alpn_label, "peer connected");
    if alpn_label == "h3" {
        h3_connection(&ctx, conn, peer, streams, handshake).await;
    } else {
        l4_connection(&ctx, conn, peer, streams, handshake).await;
    }
    ctx.inbound_connections.fetch_sub(1, Ordering::Relaxed);
    active.dec();
}

async fn h3_connection(
    ctx: &Arc<Ctx>,
    conn: quinn::Connection,
    peer: SpiffeId,
    streams: StreamCount,
    handshake: Option<Handshake>,
) {
    let mut h3conn = match h3::server::builder()
        .max_field_section_size(ctx.limits.max_header_bytes as u64)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "HTTP/3 setup failed");
            return;
        }
    };
    let peer = Arc::new(peer);
    // This connection's requests in progress (a drain waits for them).
    let local = Gauge::standalone();
    let mut phase = ctx.phase.clone();
    let mut goaway = false;
    loop {
        let accepted = if goaway {
            tokio::select! {
                a = h3conn.accept() => a,
                _ = drained(&conn, &local, &mut phase) => return,
            }
        } else {
            tokio::select! {
                a = h3conn.accept() => a,
                _ = crate::lifecycle::reached(&mut phase, Phase::Draining) => {
                    // GOAWAY naming the last request accepted: later ones are
                    // rejected unprocessed, and the peer stops sending here.
                    goaway = true;
                    if let Err(e) = h3conn.shutdown(0).await {
                        tracing::debug!(%peer, error = %e, "sending GOAWAY failed");
                    }
                    tracing::debug!(%peer, in_flight = local.get(), "draining HTTP/3 connection");
                    continue;
                }
            }
        };
        match accepted {
            Ok(Some(resolver)) => {
                let ctx2 = ctx.clone();
                let peer = peer.clone();
                let open = streams.open();
                let busy = (local.enter(), ctx.activity.inbound_requests.enter());
                let early = early(&handshake);
                ctx.spawn(async move {
                    let _open = (open, busy);
                    match resolver.resolve_request().await {
                        Ok((req, stream)) => h3_request(ctx2, &peer, req, stream, early).await,
                        Err(e) => {
                            ctx2.metrics.refuse("bad_request");
                            tracing::debug!(peer = %peer, error = %e, "bad HTTP/3 request");
                        }
                    }
                });
            }
            // After our GOAWAY, h3 ends `accept` once its own count of
            // requests reaches zero; ours (responses still being sent) may
            // not have: close with DRAINING only when they are done (a drop
            // here would close with H3_NO_ERROR and cut them).
            Ok(None) if goaway => {
                drained(&conn, &local, &mut phase).await;
                return;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "HTTP/3 connection ended");
                break;
            }
        }
    }
}

/// While draining: once the connection's streams in progress (`local`)
/// have ended, and the peer has had a moment to acknowledge their last
/// bytes, close it with DRAINING; at the drain deadline close it with
/// DRAIN_TIMEOUT. A peer that closes first (a Weft client closes once its
/// last response is done) ends this too.
async fn drained(
    conn: &quinn::Connection,
    local: &Gauge,
    phase: &mut tokio::sync::watch::Receiver<Phase>,
) {
    let graceful = async {
        local.idle().await;
        tokio::time::sleep(crate::lifecycle::linger(conn.rtt())).await;
        local.idle().await;
    };
    tokio::select! {
        _ = graceful => conn.close(DRAINING.into(), b"sidecar draining"),
        _ = crate::lifecycle::reached(phase, Phase::Cutting) => {
            // TCP streams cut now end with a FIN: let those reach the peer
            // before the close frame discards what is unacknowledged.
            let flushed = async {
                local.idle().await;
                tokio::time::sleep(crate::lifecycle::linger(conn.rtt())).await;
            };
            let _ = tokio::time::timeout(CUT_LINGER, flushed).await;
            conn.close(DRAIN_TIMEOUT.into(), b"sidecar drain deadline passed")
        }
        _ = conn.closed() => {}
    }
}

type ServerStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

async fn h3_request(
    ctx: Arc<Ctx>,
    peer: &SpiffeId,
    req: Request<()>,
    stream: ServerStream,
    early: bool,
) {
    let start = Instant::now();
    let service = req.uri().host().map(str::to_string).unwrap_or_default();
    let mut req = req;
    let mut span = ctx.tracer.server(&service, peer.as_str(), &mut req);
    if let Some(n) = req
        .headers()
        .get(headers::ATTEMPT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
    {
        span.attr("weft.attempt", n);
    }
    let access = ctx.tracer.http_log(INBOUND, &service, &req);
    let (mut send, recv) = stream.split();
    if early {
        ctx.metrics
            .early_data
            .get_or_create(&EarlyDataLabels {
                direction: INBOUND,
                alpn: "h3",
            })
            .inc();
    }
    let resp = forward_to_app(&ctx, peer, &service, req, recv, early).await;
    let status = resp.status();
    span.finish(&ctx.tracer, &resp);
    let resp = access.respond(resp, peer.as_str(), None, None);
    let m = &ctx.metrics;
    let svc_label = if ctx.state.load().service(&service).is_some() {
        service.clone()
    } else {
        // Do not let callers mint label values.
        "unknown".to_string()
    };
    let response_bytes = m.response_bytes_of(INBOUND, &svc_label);
    m.requests
        .get_or_create(&RequestLabels {
            direction: INBOUND,
            service: svc_label.clone(),
            route: String::new(),
            peer: peer.to_string(),
            status: status.as_u16(),
        })
        .inc();
    m.request_duration
        .get_or_create(&RequestDurationLabels {
            direction: INBOUND,
            service: svc_label,
            route: String::new(),
        })
        .observe(start.elapsed().as_secs_f64());
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Err(e) = send.send_response(Response::from_parts(parts, ())).await {
        tracing::debug!(%peer, error = %e, "sending response head failed");
        return;
    }
    let body = body::counted(body, response_bytes);
    if let Err(e) = body::body_to_h3(body, &mut send).await {
        tracing::debug!(%peer, error = %e, "response body ended early");
    }
}

async fn forward_to_app(
    ctx: &Arc<Ctx>,
    peer: &SpiffeId,
    service: &str,
    req: Request<()>,
    mut recv: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
    early: bool,
) -> Response<body::ProxyBody> {
    use crate::outbound::error_response;
    // An answer that does not need the request body stops the peer sending
    // it with H3_NO_ERROR (RFC 9114 §4.1), not quinn's drop-time code 0.
    if ctx.state.load().service(service).is_none() {
        recv.stop_sending(h3::error::Code::H3_NO_ERROR);
        ctx.metrics.refuse("unknown_service");
        return error_response(
            StatusCode::MISDIRECTED_REQUEST,
            format!("weft: :authority {service:?} is not a service of this mesh"),
        );
    }
    // Every request is authorized, not only the connection: the policy may
    // have changed since the peer connected.
    if let Err(denied) = authorize(ctx, peer, service) {
        recv.stop_sending(h3::error::Code::H3_NO_ERROR);
        let mut resp = error_response(
            StatusCode::FORBIDDEN,
            format!("weft: {peer} may not call {service}: {denied}"),
        );
        if let Ok(v) = http::HeaderValue::from_str(denied.reason()) {
            resp.headers_mut().insert(headers::DENIED, v);
        }
        return resp;
    }
    // Early data may be a replay: only requests that are safe to repeat
    // are let through (Weft clients send no others early; RFC 8470 §5.2).
    if early && !crate::retry::is_safe(req.method()) {
        recv.stop_sending(h3::error::Code::H3_NO_ERROR);
        ctx.metrics.refuse("too_early");
        return error_response(
            StatusCode::TOO_EARLY,
            format!(
                "weft: {} is not safe to replay, and came as 0-RTT early data",
                req.method()
            ),
        );
    }
    let Some(app) = ctx.app else {
        recv.stop_sending(h3::error::Code::H3_NO_ERROR);
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "weft: this sidecar has no --app to forward to".into(),
        );
    };
    let (mut parts, ()) = req.into_parts();
    // The caller's remaining time (read before the header is stripped).
    let deadline = parts
        .headers
        .get(headers::DEADLINE_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    headers::strip_hop_by_hop(&mut parts.headers);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = match format!("http://{app}{path}").parse() {
        Ok(u) => u,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, format!("weft: bad path: {e}")),
    };
    parts.version = http::Version::HTTP_11;
    if let Ok(host) = http::HeaderValue::from_str(service) {
        parts.headers.insert(http::header::HOST, host);
    }
    if let Ok(id) = http::HeaderValue::from_str(peer.as_str()) {
        parts.headers.insert(headers::PEER_ID, id);
    }
    if early {
        parts
            .headers
            .insert(headers::EARLY_DATA, http::HeaderValue::from_static("1"));
    }
    let (tx, chan) = ChannelBody::new();
    let pump = body::run_or_spawn(async move {
        if let Err(e) = body::h3_to_channel(recv, tx).await {
            tracing::debug!(error = %e, "request body ended early");
        }
    });
    let abort_pump = || {
        if let Some(task) = &pump {
            task.abort();
        }
    };
    let counter = ctx.metrics.request_bytes_of(INBOUND, service);
    let req = Request::from_parts(parts, body::counted(body::boxed(chan), counter));
    let call = ctx.app_client.request(req);
    let result = match deadline {
        Some(d) => match tokio::time::timeout(d, call).await {
            Ok(r) => r,
            Err(_) => {
                // Nobody waits for the answer any more: dropping the call
                // closes the app connection, so the app can stop too.
                abort_pump();
                ctx.metrics
                    .timeouts
                    .get_or_create(&crate::metrics::RouteReasonLabels {
                        service: service.to_string(),
                        route: String::new(),
                        reason: "deadline",
                    })
                    .inc();
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "weft: the caller's deadline ({} ms) passed before {app} answered",
                        d.as_millis()
                    ),
                );
            }
        },
        None => call.await,
    };
    match result {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            Response::from_parts(
                parts,
                http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
                    body,
                    |e| Box::new(e) as body::BoxError,
                )),
            )
        }
        Err(e) => {
            abort_pump();
            error_response(
                StatusCode::BAD_GATEWAY,
                format!("weft: cannot reach the app at {app}: {e}"),
            )
        }
    }
}

async fn l4_connection(
    ctx: &Arc<Ctx>,
    conn: quinn::Connection,
    peer: SpiffeId,
    streams: StreamCount,
    handshake: Option<Handshake>,
) {
    let peer = Arc::new(peer);
    // UDP flows on this connection, and the reader of its datagrams.
    let flows = Arc::new(crate::udp::FlowTable::default());
    ctx.spawn(
        flows
            .clone()
            .read(conn.clone(), ctx.metrics.clone(), INBOUND),
    );
    let local = Gauge::standalone();
    let mut phase = ctx.phase.clone();
    let mut draining = false;
    loop {
        let accepted = if draining {
            tokio::select! {
                a = conn.accept_bi() => a,
                _ = drained(&conn, &local, &mut phase) => return,
            }
        } else {
            tokio::select! {
                a = conn.accept_bi() => a,
                _ = crate::lifecycle::reached(&mut phase, Phase::Draining) => {
                    draining = true;
                    tracing::debug!(%peer, in_flight = local.get(), "draining L4 connection");
                    continue;
                }
            }
        };
        match accepted {
            Ok((mut send, mut recv)) if draining => {
                // Refused before a byte of it was read: the peer sends it
                // to another endpoint.
                ctx.metrics.refuse("draining");
                let _ = send.reset(DRAINING.into());
                let _ = recv.stop(DRAINING.into());
            }
            Ok((send, recv)) => {
                let ctx2 = ctx.clone();
                let peer = peer.clone();
                let open = streams.open();
                let busy = (local.enter(), ctx.activity.inbound_streams.enter());
                let udp = (conn.clone(), flows.clone());
                let early = early(&handshake).then(|| handshake.clone()).flatten();
                ctx.spawn(async move {
                    let _open = (open, busy);
                    l4_stream(ctx2, &peer, udp, send, recv, early).await
                });
            }
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "L4 connection ended");
                break;
            }
        }
    }
}

async fn l4_stream(
    ctx: Arc<Ctx>,
    peer: &SpiffeId,
    (conn, flows): (quinn::Connection, Arc<crate::udp::FlowTable>),
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    early: Option<Handshake>,
) {
    let req = match tokio::time::timeout(
        PREAMBLE_TIMEOUT,
        weft_transport::l4::read_request_kind(&mut recv),
    )
    .await
    {
        Ok(Ok((preamble::Kind::Udp, req))) => {
            // Datagrams are not early data: wait for the handshake.
            if let Some(h) = &early {
                if !h.done().await {
                    return;
                }
            }
            crate::udp::inbound::flow(ctx, peer, conn, flows, req, send, recv).await;
            return;
        }
        Ok(Ok((preamble::Kind::Tcp, req))) => req,
        Ok(Err(e)) => {
            ctx.metrics.refuse("malformed_preamble");
            tracing::warn!(%peer, error = %e, "refusing L4 stream: malformed preamble");
            refuse(send, recv, Status::Malformed, e.to_string()).await;
            return;
        }
        Err(_) => {
            ctx.metrics.refuse("preamble_timeout");
            refuse(send, recv, Status::Malformed, "preamble timed out".into()).await;
            return;
        }
    };
    let (idle, early_ok) = match ctx.state.load().service(&req.target) {
        Some(s) if s.protocol == crate::mesh::Protocol::Tcp => {
            (Some(s.policy.idle_timeout), s.policy.early_data)
        }
        _ => (None, false),
    };
    if let Some(h) = &early {
        if early_ok {
            ctx.metrics
                .early_data
                .get_or_create(&EarlyDataLabels {
                    direction: INBOUND,
                    alpn: "weft-l4",
                })
                .inc();
        } else {
            // Not declared safe to replay: its bytes reach the app only
            // once the handshake is done (a replayed flight never gets there).
            if !h.done().await {
                return;
            }
        }
    }
    let Some(idle) = idle else {
        ctx.metrics.refuse("unknown_service");
        let msg = format!("{} is not a TCP service of this mesh", req.target);
        refuse(send, recv, Status::UnknownTarget, msg).await;
        return;
    };
    if let Err(denied) = authorize(&ctx, peer, &req.target) {
        let msg = format!("{peer} may not call {}: {denied}", req.target);
        refuse(send, recv, Status::Unauthorized, msg).await;
        return;
    }
    let Some(app) = ctx.app else {
        refuse(
            send,
            recv,
            Status::ConnectFailed,
            "no --app configured".into(),
        )
        .await;
        return;
    };
    // The caller waits no longer than its deadline; neither do we.
    let connect_timeout = match req.deadline_ms {
        0 => APP_CONNECT_TIMEOUT,
        ms => APP_CONNECT_TIMEOUT.min(Duration::from_millis(u64::from(ms))),
    };
    let tcp = match tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(app)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            refuse(send, recv, Status::ConnectFailed, format!("app {app}: {e}")).await;
            return;
        }
        Err(_) => {
            refuse(
                send,
                recv,
                Status::ConnectFailed,
                format!("app {app}: connect timed out"),
            )
            .await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if send
        .write_all(&preamble::Response::new(Status::Ok, "").encode())
        .await
        .is_err()
    {
        return;
    }
    let labels = TcpLabels {
        direction: INBOUND,
        service: req.target.clone(),
        peer: peer.to_string(),
    };
    ctx.metrics.tcp_connections.get_or_create(&labels).inc();
    let active = ctx.metrics.tcp_active.get_or_create(&labels).clone();
    active.inc();
    let started = (std::time::SystemTime::now(), Instant::now());
    let result = crate::lifecycle::copy_until_cut(&ctx, tcp, send, recv, idle).await;
    active.dec();
    ctx.metrics
        .tcp_sent_bytes
        .get_or_create(&labels)
        .inc_by(result.from_peer);
    ctx.metrics
        .tcp_received_bytes
        .get_or_create(&labels)
        .inc_by(result.to_peer);
    let error = result.error.as_ref().map(|e| e.to_string());
    ctx.tracer.tcp_log(
        INBOUND,
        &req.target,
        peer.as_str(),
        started,
        result.from_peer,
        result.to_peer,
        error,
    );
    if let Some(e) = result.error {
        tracing::debug!(%peer, service = %req.target, error = %e, "TCP stream ended with error");
    }
}

/// Check the service's authorization policy for `peer`; a refusal is logged
/// and counted in `weft_authz_denied_total`.
pub(crate) fn authorize(
    ctx: &Ctx,
    peer: &SpiffeId,
    service: &str,
) -> Result<(), crate::mesh::Denied> {
    let state = ctx.state.load();
    let rules = state
        .service(service)
        .and_then(|s| s.authorization.as_ref());
    let result = crate::mesh::authorize(
        rules,
        state.default_authorization,
        &state.trust_domain,
        peer,
    );
    if let Err(denied) = &result {
        tracing::info!(%peer, %service, reason = denied.reason(), "request denied by authorization policy");
        ctx.metrics
            .authz_denied
            .get_or_create(&crate::metrics::AuthzLabels {
                service: service.to_string(),
                peer: peer.to_string(),
                reason: denied.reason(),
            })
            .inc();
    }
    result
}

/// Answer a stream's preamble with a refusal and end the stream.
pub(crate) async fn refuse(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    status: Status,
    msg: String,
) {
    let _ = send
        .write_all(&preamble::Response::new(status, msg).encode())
        .await;
    let _ = send.finish();
    let _ = recv.stop(0u32.into());
}
