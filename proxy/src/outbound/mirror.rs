//! Traffic mirroring: a share of a route's requests is copied to another
//! service (marked `x-weft-mirror: 1`), fire-and-forget. The copy's body
//! follows the primary's (it never reads ahead of it), its response is
//! discarded, and each route has a bound on copies in flight: when a mirror
//! is slow or dead, copies are dropped and counted, and the primary request
//! never waits for one.

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use tokio::time::Instant;

use crate::balance;
use crate::cluster::State;
use crate::mesh::{Mirror, Route};
use crate::metrics::MirrorLabels;
use crate::replay::ReplayBody;
use crate::route;
use crate::sidecar::Ctx;

/// How long a mirrored request may take when its route sets no timeout: it
/// holds one of the route's mirror slots meanwhile.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// Copy this request to the route's mirror, if the dice say so and a slot is free.
pub(super) fn spawn(
    ctx: &Arc<Ctx>,
    state: &Arc<State>,
    service: &str,
    route: &Route,
    m: &Mirror,
    parts: &Parts,
    body: &ReplayBody,
) {
    if !route::roll(m.percent, &mut rand::rng()) {
        return;
    }
    let labels = |result| MirrorLabels {
        service: service.to_string(),
        route: route.name.clone(),
        target: m.service.clone(),
        result,
    };
    let count = |result| ctx.metrics.mirrored.get_or_create(&labels(result)).inc();
    let slots = state
        .cluster(service)
        .and_then(|c| c.mirror_slots.get(&route.name).cloned());
    let Some(Ok(slot)) = slots.map(|s| s.try_acquire_owned()) else {
        count("dropped");
        return;
    };
    let Some(body) = body.follower() else {
        count("skipped");
        return;
    };
    let Some(cluster) = state.cluster(&m.service).cloned() else {
        count("failed");
        return;
    };
    let endpoints = cluster.subset(&m.subset);
    let Some(ep) = balance::choose(
        cluster.lb,
        &endpoints,
        &[],
        &cluster.rr,
        &mut rand::rng(),
        Instant::now(),
    ) else {
        count("failed");
        return;
    };
    let timeout = route.timeout.unwrap_or(MIRROR_TIMEOUT);
    let deadline = Instant::now() + timeout;
    let ctx = ctx.clone();
    let parts = parts.clone();
    let target = m.service.clone();
    let labels_sent = labels("sent");
    let labels_failed = labels("failed");
    tokio::spawn(async move {
        let _slot = slot;
        let _in_flight = ep.start();
        let connect_timeout = cluster.service.policy.connect_timeout;
        let sent = tokio::time::timeout_at(
            deadline,
            super::request::send(
                &ctx,
                &target,
                ep.addr(),
                &parts,
                body,
                Some(deadline),
                connect_timeout,
                true,
                1,
                // A mirror waits for the handshake: a rejected early copy
                // would only be lost, and its response is dropped anyway.
                false,
            ),
        )
        .await;
        let ok = matches!(sent, Ok(Ok(_)));
        let l = if ok { labels_sent } else { labels_failed };
        ctx.metrics.mirrored.get_or_create(&l).inc();
        // The response (and its body) is dropped here: nobody reads it.
    });
}
