//! DNS names in the mesh file (endpoints such as a Kubernetes headless
//! Service, `addresses` such as a ClusterIP Service name) are resolved here
//! and re-resolved every `interval` while the sidecar runs, and right away
//! when a new mesh names something new. The system resolver does not report
//! TTLs, so the interval stands in for them (Kubernetes' CoreDNS answers
//! with a 5 s TTL by default for services, 30 s with caching).
//!
//! A failed lookup keeps the last answer for that name (like Envoy's
//! strict DNS clusters): a DNS hiccup must not empty a service.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::State;
use crate::metrics::ResultLabels;
use crate::sidecar::Ctx;

/// How often names are looked up again.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// A lookup slower than this counts as failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Every address `host` has, sorted (so equal answers compare equal).
pub async fn lookup(host: &str) -> std::io::Result<Vec<IpAddr>> {
    let found = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host, 0)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS lookup timed out"))??;
    let mut ips: Vec<IpAddr> = found.map(|a| a.ip()).collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// Re-resolve every `interval`, or at once when woken; runs until the
/// sidecar drains. The sidecar does the first pass itself before it is ready.
pub(crate) async fn maintain(ctx: Arc<Ctx>, interval: Duration) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = ctx.resolve_now.notified() => {}
        }
        refresh(&ctx).await;
    }
}

/// Resolve the names of the mesh in force once; put a new state in force
/// when an answer changed.
pub(crate) async fn refresh(ctx: &Ctx) {
    let state = ctx.state.load_full();
    let names = state.source().dns_names();
    if names.is_empty() {
        return;
    }
    let answers = futures::future::join_all(
        names
            .iter()
            .map(|n| async move { (n.clone(), lookup(n).await) }),
    )
    .await;
    let mut dns: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for (name, answer) in answers {
        let result = match answer {
            Ok(ips) => {
                dns.insert(name, ips);
                "success"
            }
            Err(e) => {
                let kept = state.dns().get(&name).cloned();
                tracing::warn!(%name, error = %e, kept = ?kept, "DNS lookup failed; keeping the last answer");
                if let Some(ips) = kept {
                    dns.insert(name, ips);
                }
                "failure"
            }
        };
        ctx.metrics
            .dns_resolutions
            .get_or_create(&ResultLabels { result })
            .inc();
    }
    if dns != **state.dns() {
        let dns = Arc::new(dns);
        // Against the state in force now: a reload may have landed meanwhile.
        ctx.state.rcu(|cur| {
            Arc::new(State::with_dns(
                cur.source().clone(),
                dns.clone(),
                Some(cur),
            ))
        });
        tracing::info!(
            names = names.len(),
            "DNS answers changed; endpoints updated"
        );
    }
}
