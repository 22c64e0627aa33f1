//! One outbound HTTP request, in the order the policies apply: route match →
//! fault injection → backend by weight → circuit breaker → mirror → tries
//! (load balancer, per-try timeout, outlier detection) with retries under
//! the service's budget, all inside the route's request timeout. The
//! remaining time travels to the peer in `x-weft-deadline-ms`.
//!
//! A try the peer refused because it drains (see [`super::drain`]) was
//! never processed: it is sent once more to another endpoint even when
//! the route has no retry policy (`weft_retries_total{reason="drain"}`).
//!
//! Safe requests (GET, HEAD, OPTIONS, TRACE) to a peer we hold a session
//! ticket from go out as 0-RTT early data while the connection's handshake
//! is still going on. If the peer rejects the early data (it restarted and
//! lost the session) or answers `425 Too Early`, the request was not
//! processed and is sent once more after the handshake, whatever the retry
//! policy (`weft_retries_total{reason="early-data"}`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::drain::Alpn;
use super::{earliest, error_response, within};
use crate::balance::{self, AttemptResult, EndpointState};
use crate::body::{self, ChannelBody, ProxyBody};
use crate::breaker::BreakerPermit;
use crate::cluster::Cluster;
use crate::headers;
use crate::mesh::Route;
use crate::metrics::{
    EarlyDataLabels, RequestDurationLabels, RequestLabels, RouteLabels, RouteReasonLabels,
    ServiceReasonLabels, OUTBOUND,
};
use crate::replay::ReplayBody;
use crate::retry::{self, Failure};
use crate::route;
use crate::sidecar::Ctx;
use weft_transport::pool::{drained, Drained, Early, Pooled};

type ClientRecv = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;

/// Request bodies up to this size are kept for a retry even when the route
/// has none, so a request refused by a draining peer can go elsewhere
/// (linkerd2-proxy keeps 64 KiB for its retries too).
const DRAIN_REPLAY_BYTES: usize = 64 << 10;

/// What the app gets back, and what the metrics say about it.
struct Handled {
    resp: Response<ProxyBody>,
    peer: String,
    route: String,
    /// Tries sent to peers (0: answered before any, e.g. an injected fault).
    attempts: u32,
}

pub(super) async fn request(
    ctx: Arc<Ctx>,
    service: String,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = StdInstant::now();
    let _busy = ctx.activity.outbound_requests.enter();
    let version = req.version();
    let mut req = req;
    let span = ctx.tracer.client(&service, &mut req);
    let access = ctx.tracer.http_log(OUTBOUND, &service, &req);
    let Handled {
        mut resp,
        peer,
        route,
        attempts,
    } = handle(&ctx, &service, req).await;
    // The response goes back on the app's connection, in the app's HTTP version.
    *resp.version_mut() = version;
    crate::trace::client_done(span, &ctx.tracer, &resp, &route, &peer, attempts);
    let resp = access.respond(resp, &peer, Some(&route), Some(attempts));

    let m = &ctx.metrics;
    let resp = resp.map(|b| body::counted(b, m.response_bytes_of(OUTBOUND, &service)));
    m.requests
        .get_or_create(&RequestLabels {
            direction: OUTBOUND,
            service: service.clone(),
            route: route.clone(),
            peer,
            status: resp.status().as_u16(),
        })
        .inc();
    m.request_duration
        .get_or_create(&RequestDurationLabels {
            direction: OUTBOUND,
            service,
            route,
        })
        .observe(start.elapsed().as_secs_f64());
    resp
}

async fn handle(ctx: &Arc<Ctx>, service: &str, req: Request<Incoming>) -> Handled {
    let state = ctx.state.load_full();
    let answer = |resp, route: &str| Handled {
        resp,
        peer: String::new(),
        route: route.to_string(),
        attempts: 0,
    };
    let Some(svc) = state.service(service) else {
        let msg = format!("weft: service {service} is no longer in the mesh");
        return answer(error_response(StatusCode::SERVICE_UNAVAILABLE, msg), "");
    };
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::strip_host(&mut parts.headers);
    let fallback;
    let route = match route::select(&svc.routes, &parts.method, parts.uri.path(), &parts.headers) {
        Some(r) => r,
        None => {
            fallback = Route::default_for(service);
            &fallback
        }
    };
    let labels = RouteLabels {
        service: service.to_string(),
        route: route.name.clone(),
    };

    // Fault injection, before anything else: an injected failure must look
    // like the service failing, not cost it any work.
    if let Some(fault) = &route.fault {
        let action = route::fault_action(fault, Some(&parts.headers), &mut rand::rng());
        if let Some(delay) = action.delay {
            count(&ctx.metrics.faults, &labels, "delay");
            tokio::time::sleep(delay).await;
        }
        if let Some(status) = action.abort {
            count(&ctx.metrics.faults, &labels, "abort");
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut resp = error_response(status, "weft: fault injected".into());
            resp.headers_mut()
                .insert(headers::FAULT, http::HeaderValue::from_static("abort"));
            return answer(resp, &route.name);
        }
    }

    let deadline = route.timeout.map(|t| Instant::now() + t);
    let Some(backend) = route::pick_backend(&route.backends, &mut rand::rng()) else {
        let msg = format!("weft: route {} of {service} has no backends", route.name);
        return answer(
            error_response(StatusCode::SERVICE_UNAVAILABLE, msg),
            &route.name,
        );
    };
    let Some(cluster) = state.cluster(&backend.service).cloned() else {
        let msg = format!(
            "weft: backend service {} is not in the mesh",
            backend.service
        );
        return answer(
            error_response(StatusCode::SERVICE_UNAVAILABLE, msg),
            &route.name,
        );
    };
    let endpoints = cluster.subset(&backend.subset);
    if endpoints.is_empty() {
        let msg = format!(
            "weft: service {} has no endpoints in subset {:?}",
            backend.service, backend.subset
        );
        return answer(
            error_response(StatusCode::SERVICE_UNAVAILABLE, msg),
            &route.name,
        );
    }

    let permit = match within(deadline, cluster.breaker.acquire()).await {
        Some(Ok(p)) => p,
        Some(Err(overflow)) => {
            ctx.metrics
                .overflows
                .get_or_create(&ServiceReasonLabels {
                    service: backend.service.clone(),
                    reason: "requests",
                })
                .inc();
            let mut resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("weft: {} overflow: {overflow}", backend.service),
            );
            resp.headers_mut()
                .insert(headers::OVERFLOW, http::HeaderValue::from_static("1"));
            return answer(resp, &route.name);
        }
        None => {
            count(&ctx.metrics.timeouts, &labels, "request");
            let msg = format!(
                "weft: request timeout ({}) while queued for {}",
                humantime::format_duration(route.timeout.unwrap_or_default()),
                backend.service
            );
            return answer(
                error_response(StatusCode::GATEWAY_TIMEOUT, msg),
                &route.name,
            );
        }
    };
    cluster.budget.deposit();

    // Keep the body for replay only if something may send it again.
    let keep = if route.retries.attempts > 0 || route.mirror.is_some() {
        route.retries.max_body_bytes
    } else {
        0
    }
    .max(DRAIN_REPLAY_BYTES);
    let root = ReplayBody::new(
        body::counted(
            http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(body, |e| {
                Box::new(e) as body::BoxError
            })),
            ctx.metrics.request_bytes_of(OUTBOUND, service),
        ),
        keep,
    );
    if let Some(m) = &route.mirror {
        super::mirror::spawn(ctx, &state, service, route, m, &parts, &root);
    }

    let tries = Tries {
        ctx,
        cluster: &cluster,
        endpoints: &endpoints,
        route,
        labels: &labels,
        authority: &backend.service,
        parts: &parts,
        root: &root,
        deadline,
        attempts: AtomicU32::new(0),
    };
    let (resp, peer) = tries.run(permit).await;
    Handled {
        resp,
        peer,
        route: route.name.clone(),
        attempts: tries.attempts.load(Ordering::Relaxed),
    }
}

fn count(
    family: &prometheus_client::metrics::family::Family<
        RouteReasonLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    l: &RouteLabels,
    reason: &'static str,
) {
    family
        .get_or_create(&RouteReasonLabels {
            service: l.service.clone(),
            route: l.route.clone(),
            reason,
        })
        .inc();
}

/// Everything one request's tries share.
struct Tries<'a> {
    ctx: &'a Arc<Ctx>,
    cluster: &'a Arc<Cluster>,
    endpoints: &'a [Arc<EndpointState>],
    route: &'a Route,
    labels: &'a RouteLabels,
    authority: &'a str,
    parts: &'a Parts,
    root: &'a ReplayBody,
    deadline: Option<Instant>,
    /// Tries started so far (for the request's span).
    attempts: AtomicU32,
}

/// Why a try ended without a response to return or retry.
pub(super) enum TryError {
    /// Something a retry may fix.
    Failed(Failure, String),
    /// An answer to give the app as is (e.g. 431: headers too big for the peer).
    Answer(Response<ProxyBody>),
}

/// A response head from a peer, its body still to come.
pub(super) struct Sent {
    pub head: Response<()>,
    pub recv: ClientRecv,
    pub peer: String,
    pub upload: Upload,
    /// Keeps the HTTP/3 connection open until this response is done: h3
    /// closes a connection when its last `SendRequest` is dropped, and the
    /// pool drops its own when it replaces the connection (certificate
    /// rotation), which would cut this response's body short.
    pub sender: crate::sidecar::H3Sender,
}

/// The task sending the request body (none if it was sent at once);
/// dropping this stops it, so a response that is not used (retried, or a
/// mirror's) stops the upload too.
pub(super) struct Upload(Option<JoinHandle<()>>);

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

impl Tries<'_> {
    async fn run(&self, permit: BreakerPermit) -> (Response<ProxyBody>, String) {
        let policy = &self.route.retries;
        let idempotent = retry::is_idempotent(&self.parts.method);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retries = 0u32;
        // The one transparent retry of a try a draining peer refused.
        let mut drain_retried = false;
        // The one transparent retry of early data the peer did not process.
        let mut early_retried = false;
        let safe = retry::is_safe(&self.parts.method);
        loop {
            let now = Instant::now();
            let Some(ep) = balance::choose(
                self.cluster.lb,
                self.endpoints,
                &tried,
                &self.cluster.rr,
                &mut rand::rng(),
                now,
            ) else {
                let msg = format!("weft: {} has no endpoints", self.authority);
                return (
                    error_response(StatusCode::SERVICE_UNAVAILABLE, msg),
                    String::new(),
                );
            };
            tried.push(ep.addr());
            self.attempts.fetch_add(1, Ordering::Relaxed);
            let try_deadline = earliest(self.deadline, policy.per_try_timeout.map(|t| now + t));
            let in_flight = ep.start();
            let Some(body) = self.root.replay() else {
                // Only reachable on a retry, which checks `replayable` first.
                let msg = "weft: request body can no longer be replayed".to_string();
                return (error_response(StatusCode::BAD_GATEWAY, msg), String::new());
            };
            let connect_timeout = self.cluster.service.policy.connect_timeout;
            let result = within(
                try_deadline,
                send(
                    self.ctx,
                    self.authority,
                    ep.addr(),
                    self.parts,
                    body,
                    try_deadline,
                    connect_timeout,
                    false,
                    tried.len() as u32,
                    safe && !early_retried,
                ),
            )
            .await;
            // The peer answers 504 itself once the deadline we told it has
            // passed. Its clock never runs out before ours (`send` rounds
            // the header up), so that answer can only arrive after our own
            // deadline, racing our timer: it is our timeout, not a status.
            let result = match result {
                Some(Ok(sent))
                    if is_peer_deadline(&sent.head)
                        && try_deadline.is_some_and(|d| Instant::now() >= d) =>
                {
                    None
                }
                r => r,
            };
            let elapsed = now.elapsed();
            let (failure, last) = match result {
                Some(Ok(sent)) => {
                    let status = sent.head.status().as_u16();
                    ep.observe_latency(elapsed, Instant::now());
                    self.record(&ep, AttemptResult::Status(status));
                    if status < 500 && !policy.on.contains(&retry::RetryOn::Status(status)) {
                        return self.respond(sent, permit, in_flight);
                    }
                    (Failure::Status(status), Last::Response(Box::new(sent)))
                }
                Some(Err(TryError::Answer(resp))) => return (resp, String::new()),
                // Not the endpoint's fault: no latency sample, no outlier count.
                Some(Err(TryError::Failed(f @ (Failure::Draining | Failure::EarlyData), msg))) => {
                    (f, Last::Error(StatusCode::SERVICE_UNAVAILABLE, msg))
                }
                Some(Err(TryError::Failed(f, msg))) => {
                    // A failed try cost the caller this long too; without it
                    // an endpoint that never answers keeps its initial
                    // estimate, which decays toward zero, and P2C prefers it.
                    ep.observe_latency(elapsed, Instant::now());
                    let (r, status) = match f {
                        Failure::ConnectFailure => (
                            AttemptResult::ConnectFailure,
                            StatusCode::SERVICE_UNAVAILABLE,
                        ),
                        Failure::RefusedStream => {
                            (AttemptResult::Reset, StatusCode::SERVICE_UNAVAILABLE)
                        }
                        _ => (AttemptResult::Reset, StatusCode::BAD_GATEWAY),
                    };
                    self.record(&ep, r);
                    (f, Last::Error(status, msg))
                }
                None => {
                    ep.observe_latency(elapsed, Instant::now());
                    if self.deadline.is_some_and(|d| Instant::now() >= d) {
                        count(&self.ctx.metrics.timeouts, self.labels, "request");
                        return (self.timeout_response(), String::new());
                    }
                    count(&self.ctx.metrics.timeouts, self.labels, "per_try");
                    self.record(&ep, AttemptResult::Reset);
                    let msg = format!(
                        "weft: per-try timeout ({}) waiting for {}",
                        humantime::format_duration(policy.per_try_timeout.unwrap_or_default()),
                        ep.addr()
                    );
                    (Failure::PerTryTimeout, Last::Timeout(msg))
                }
            };
            drop(in_flight);

            // Refused by a draining peer, so never processed: once, to
            // another endpoint, whatever the route's policy says.
            if failure == Failure::Draining
                && !drain_retried
                && self.root.replayable()
                && self.endpoints.iter().any(|e| !tried.contains(&e.addr()))
            {
                drain_retried = true;
                count(&self.ctx.metrics.retries, self.labels, failure.label());
                tracing::debug!(service = %self.authority, endpoint = %ep.addr(), "peer draining; trying another endpoint");
                continue;
            }

            // Early data the peer did not process: once more, after the
            // handshake, to the same endpoint or another.
            if failure == Failure::EarlyData && !early_retried && self.root.replayable() {
                early_retried = true;
                tried.retain(|a| *a != ep.addr());
                count(&self.ctx.metrics.retries, self.labels, failure.label());
                tracing::debug!(service = %self.authority, endpoint = %ep.addr(), "early data not processed; sending again after the handshake");
                continue;
            }

            // May this failure be tried again? A connect failure is only
            // retried on another endpoint: the same one just failed to answer
            // within the connect timeout, and would again.
            let elsewhere = failure != Failure::ConnectFailure
                || self.endpoints.iter().any(|e| !tried.contains(&e.addr()));
            let allowed = retry::retryable(&policy.on, failure).is_some()
                && elsewhere
                && retries < policy.attempts
                && (idempotent || policy.non_idempotent || retry::never_processed(failure))
                && self.root.replayable();
            if !allowed {
                return last.into_response(permit);
            }
            if !self.cluster.budget.withdraw() {
                self.ctx
                    .metrics
                    .retry_budget_exhausted
                    .get_or_create(self.labels)
                    .inc();
                return last.into_response(permit);
            }
            drop(last);
            retries += 1;
            count(&self.ctx.metrics.retries, self.labels, failure.label());
            let pause = retry::backoff(
                retries,
                policy.backoff_base,
                policy.backoff_max,
                &mut rand::rng(),
            );
            if within(self.deadline, tokio::time::sleep(pause))
                .await
                .is_none()
            {
                count(&self.ctx.metrics.timeouts, self.labels, "request");
                return (self.timeout_response(), String::new());
            }
        }
    }

    fn record(&self, ep: &EndpointState, result: AttemptResult) {
        if let Some(reason) =
            self.cluster
                .outlier
                .record(ep, &self.cluster.states, result, Instant::now())
        {
            tracing::warn!(service = %self.cluster.service.name, endpoint = %ep.addr(), reason, "endpoint ejected");
            self.ctx
                .metrics
                .ejections
                .get_or_create(&ServiceReasonLabels {
                    service: self.cluster.service.name.clone(),
                    reason,
                })
                .inc();
        }
    }

    fn respond(
        &self,
        sent: Sent,
        permit: BreakerPermit,
        in_flight: balance::InFlight,
    ) -> (Response<ProxyBody>, String) {
        stream_response(sent, (permit, Some(in_flight)))
    }

    fn timeout_response(&self) -> Response<ProxyBody> {
        let t = self.route.timeout.unwrap_or_default();
        error_response(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "weft: request timeout ({}) calling {}",
                humantime::format_duration(t),
                self.authority
            ),
        )
    }
}

/// A 504 the peer sidecar made itself: the deadline we sent it passed
/// before its app answered.
fn is_peer_deadline(head: &Response<()>) -> bool {
    head.status() == StatusCode::GATEWAY_TIMEOUT && head.headers().contains_key(headers::ERROR)
}

/// The last try's outcome, returned when no retry follows.
enum Last {
    Response(Box<Sent>),
    Error(StatusCode, String),
    Timeout(String),
}

impl Last {
    fn into_response(self, permit: BreakerPermit) -> (Response<ProxyBody>, String) {
        match self {
            Last::Response(sent) => stream_response(*sent, permit),
            Last::Error(status, msg) => (error_response(status, msg), String::new()),
            Last::Timeout(msg) => (
                error_response(StatusCode::GATEWAY_TIMEOUT, msg),
                String::new(),
            ),
        }
    }
}

/// Turn a response head into the app's response; its body streams from the
/// peer, and `hold` (breaker slot, in-flight count) lasts until it ends.
fn stream_response<H: Send + 'static>(sent: Sent, hold: H) -> (Response<ProxyBody>, String) {
    let (tx, chan) = ChannelBody::new();
    let Sent {
        head,
        recv,
        peer,
        upload,
        sender,
    } = sent;
    body::run_or_spawn(async move {
        // The upload may still be running (the peer answered early); it,
        // `hold` and the connection handle end with the response body.
        let _hold = (hold, upload, sender);
        if let Err(e) = body::h3_to_channel(recv, tx).await {
            tracing::debug!(error = %e, "response body ended early");
        }
    });
    let (mut rparts, ()) = head.into_parts();
    headers::strip_hop_by_hop(&mut rparts.headers);
    (Response::from_parts(rparts, body::boxed(chan)), peer)
}

/// [`super::drain::early_failure`] as the failure of a try. Only safe
/// requests are sent early, so sending one again after a failed handshake
/// is harmless even if the peer did process it.
async fn early_failure(ctx: &Arc<Ctx>, addr: SocketAddr, early: Option<&Early>) -> Option<Failure> {
    use super::drain::EarlyFailure;
    Some(
        match super::drain::early_failure(ctx, addr, Alpn::H3, early).await? {
            // Nothing of it reached the peer's app: again, after the handshake.
            EarlyFailure::Rejected => Failure::EarlyData,
            EarlyFailure::Draining(_) => Failure::Draining,
            EarlyFailure::Failed(_) => Failure::ConnectFailure,
        },
    )
}

/// The peer at `addr` drains: new requests go to a new connection (once it
/// answers a handshake again) and the load balancer avoids it meanwhile.
fn peer_gone(ctx: &Arc<Ctx>, addr: SocketAddr, conn: &quinn::Connection) {
    ctx.h3_pool.evict(addr, conn);
    super::drain::peer_draining(ctx, addr, Alpn::H3);
}

/// One try: send the request to the peer sidecar at `addr` and wait for the
/// response head. `deadline` (if any) is told to the peer.
#[allow(clippy::too_many_arguments)]
pub(super) async fn send(
    ctx: &Arc<Ctx>,
    authority: &str,
    addr: SocketAddr,
    parts: &Parts,
    body: ReplayBody,
    deadline: Option<Instant>,
    connect_timeout: std::time::Duration,
    mirror: bool,
    attempt: u32,
    early_ok: bool,
) -> Result<Sent, TryError> {
    let pooled =
        tokio::time::timeout(connect_timeout, ctx.h3_pool.get_pooled(addr, early_ok)).await;
    let Pooled {
        conn,
        t: (mut sender, peer),
        early,
    } = match pooled {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let failure = if e.is_refused() {
                super::drain::peer_draining(ctx, addr, Alpn::H3);
                Failure::Draining
            } else {
                if e.is_unanswered() {
                    super::drain::peer_unreachable(ctx, addr, Alpn::H3);
                }
                Failure::ConnectFailure
            };
            return Err(TryError::Failed(
                failure,
                format!("weft: upstream connect error: {e}"),
            ));
        }
        Err(_) => {
            // The handshake goes on in the pool; the prober's wait for
            // it clears the mark if the peer was only slow.
            super::drain::peer_unreachable(ctx, addr, Alpn::H3);
            return Err(TryError::Failed(
                Failure::ConnectFailure,
                format!(
                    "weft: upstream connect timeout ({}) to {addr}",
                    humantime::format_duration(connect_timeout)
                ),
            ));
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri = http::Uri::builder()
        .scheme("https")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| {
            TryError::Answer(error_response(
                StatusCode::BAD_REQUEST,
                format!("weft: bad request target: {e}"),
            ))
        })?;
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = parts.headers.clone();
    if let Some(d) = deadline {
        // Rounded up, so the peer's deadline never passes before ours (see
        // `is_peer_deadline`); at least 1 ms: 0 would read as "already late".
        let ms = d
            .saturating_duration_since(Instant::now())
            .as_nanos()
            .div_ceil(1_000_000)
            .max(1);
        req.headers_mut()
            .insert(headers::DEADLINE_MS, http::HeaderValue::from(ms as u64));
    }
    if mirror {
        req.headers_mut()
            .insert(headers::MIRROR, http::HeaderValue::from_static("1"));
    }
    // Which try this is (1-based), for the peer's span and logs.
    req.headers_mut()
        .insert(headers::ATTEMPT, http::HeaderValue::from(attempt));
    // Sent as early data if the handshake is still going on. Whether or
    // not it still is, a failure on a connection whose early data was
    // rejected means nothing of this request was processed (the pool
    // closes such a connection at once).
    let sent_early = early.as_ref().is_some_and(Early::pending);
    let stream = match sender.send_request(req).await {
        Ok(s) => s,
        Err(e) => {
            if let Some(f) = early_failure(ctx, addr, early.as_ref()).await {
                return Err(TryError::Failed(
                    f,
                    format!("weft: {addr} did not take 0-RTT early data: {e}"),
                ));
            }
            return Err(send_failed(ctx, addr, &conn, e));
        }
    };
    let (mut send, mut recv) = stream.split();
    // Upload the body while waiting for the response: the peer may answer
    // before the body ends (e.g. 413), and big bodies must stream.
    let upload = Upload(body::run_or_spawn(async move {
        if let Err(e) = body::body_to_h3(body, &mut send).await {
            tracing::debug!(error = %e, "request body upload ended early");
        }
    }));
    if sent_early {
        ctx.metrics
            .early_data
            .get_or_create(&EarlyDataLabels {
                direction: OUTBOUND,
                alpn: "h3",
            })
            .inc();
    }
    match recv.recv_response().await {
        // RFC 8470 §5.2: the peer (or its app) would not risk a replay;
        // it did not process the request, which goes again after the handshake.
        Ok(head) if sent_early && head.status() == StatusCode::TOO_EARLY => Err(TryError::Failed(
            Failure::EarlyData,
            format!("weft: {addr} answered 425 Too Early to 0-RTT early data"),
        )),
        Ok(head) => Ok(Sent {
            head,
            recv,
            peer: peer.to_string(),
            upload,
            sender,
        }),
        Err(e) => {
            if let Some(f) = early_failure(ctx, addr, early.as_ref()).await {
                return Err(TryError::Failed(
                    f,
                    format!("weft: {addr} did not take 0-RTT early data: {e}"),
                ));
            }
            // REQUEST_REJECTED comes from a peer that sent GOAWAY; a
            // DRAINING close means nothing accepted was still running.
            let rejected = matches!(
                e,
                h3::error::StreamError::RemoteTerminate { code, .. }
                    if code == h3::error::Code::H3_REQUEST_REJECTED
            );
            let drain = drained(&conn);
            if rejected || drain.is_some() {
                peer_gone(ctx, addr, &conn);
            }
            let f = if rejected || drain == Some(Drained::Graceful) {
                Failure::Draining
            } else {
                Failure::Reset
            };
            Err(TryError::Failed(
                f,
                format!("weft: no response from {addr}: {e}"),
            ))
        }
    }
}

/// The request head did not go out: the peer never saw it.
fn send_failed(
    ctx: &Arc<Ctx>,
    addr: SocketAddr,
    conn: &quinn::Connection,
    e: h3::error::StreamError,
) -> TryError {
    match e {
        h3::error::StreamError::HeaderTooBig { .. } => TryError::Answer(error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("weft: sending request to {addr}: {e}"),
        )),
        e => {
            // RemoteClosing: the peer sent GOAWAY.
            let draining = matches!(e, h3::error::StreamError::RemoteClosing { .. })
                || drained(conn).is_some();
            let failure = if draining {
                peer_gone(ctx, addr, conn);
                Failure::Draining
            } else {
                Failure::RefusedStream
            };
            TryError::Failed(failure, format!("weft: sending request to {addr}: {e}"))
        }
    }
}
