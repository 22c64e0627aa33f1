//! Runtime state of the mesh a sidecar routes to: the checked mesh file plus,
//! per service, the state its policies keep between requests (endpoint
//! latency and ejections, the circuit breaker, the retry budget, mirror
//! limits). A mesh-file reload builds a new [`State`] that carries that
//! state over for every service and endpoint that stays, so a reload never
//! resets an ejection, a budget or the requests in flight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::balance::{EndpointSnapshot, EndpointState, LbPolicy, Outlier};
use crate::breaker::Breaker;
use crate::mesh::{in_subset, Endpoint, Mesh, Service};
use crate::retry::Budget;

/// DNS answers for the names a mesh file uses (see [`crate::resolve`]).
pub type Dns = Arc<HashMap<String, Vec<std::net::IpAddr>>>;

/// The mesh and the policy state of each of its services.
pub struct State {
    /// The mesh as given (file or API), DNS names unresolved.
    source: Arc<Mesh>,
    /// `source` with every DNS name resolved by `dns`: what traffic uses.
    mesh: Mesh,
    dns: Dns,
    /// Intercepted destination → service, from every service's `addresses`.
    by_address: HashMap<SocketAddr, String>,
    clusters: HashMap<String, Arc<Cluster>>,
}

impl Deref for State {
    type Target = Mesh;
    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

/// One service's endpoints and the state its policies keep.
pub struct Cluster {
    pub service: Service,
    /// Parallel to `service.endpoints`.
    pub states: Vec<Arc<EndpointState>>,
    pub breaker: Arc<Breaker>,
    pub budget: Arc<Budget>,
    pub outlier: Outlier,
    pub lb: LbPolicy,
    pub rr: AtomicUsize,
    /// Per route name: the mirrored requests it may have in flight.
    pub mirror_slots: HashMap<String, Arc<Semaphore>>,
}

impl State {
    /// Build the state for `mesh`, keeping what `previous` knew about every
    /// service and endpoint that is still there.
    pub fn new(mesh: Mesh, previous: Option<&State>) -> State {
        let dns = previous.map(|p| p.dns.clone()).unwrap_or_default();
        State::with_dns(Arc::new(mesh), dns, previous)
    }

    /// Like [`State::new`] for `source` with DNS names resolved by `dns`.
    pub fn with_dns(source: Arc<Mesh>, dns: Dns, previous: Option<&State>) -> State {
        let mesh = source.resolved(&dns);
        let now = Instant::now();
        let clusters = mesh
            .services
            .values()
            .map(|svc| {
                let old = previous.and_then(|p| p.clusters.get(&svc.name));
                (svc.name.clone(), Arc::new(Cluster::new(svc, old, now)))
            })
            .collect();
        let mut by_address = HashMap::new();
        for svc in mesh.services.values() {
            for addr in &svc.addresses {
                by_address.insert(*addr, svc.name.clone());
            }
        }
        State {
            source,
            mesh,
            dns,
            by_address,
            clusters,
        }
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// The mesh as given, before DNS resolution.
    pub fn source(&self) -> &Arc<Mesh> {
        &self.source
    }

    pub fn dns(&self) -> &Dns {
        &self.dns
    }

    /// The service an intercepted connection to `dst` is for.
    pub fn service_at(&self, dst: SocketAddr) -> Option<&str> {
        self.by_address.get(&dst).map(String::as_str)
    }

    pub fn cluster(&self, service: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(service)
    }

    /// Every cluster, for `/clusters` on the admin port.
    pub fn snapshot(&self) -> serde_json::Value {
        let now = Instant::now();
        let mut out = serde_json::Map::new();
        let mut names: Vec<_> = self.clusters.keys().collect();
        names.sort();
        for name in names {
            let c = &self.clusters[name];
            let endpoints: Vec<serde_json::Value> = c
                .service
                .endpoints
                .iter()
                .zip(&c.states)
                .map(|(ep, st)| endpoint_json(ep, st.snapshot(now)))
                .collect();
            out.insert(
                name.clone(),
                serde_json::json!({
                    "protocol": c.service.protocol,
                    "load_balancer": c.lb,
                    "endpoints": endpoints,
                    "circuit_breaker": {
                        "max_requests": c.breaker.config().max_requests,
                        "max_pending": c.breaker.config().max_pending,
                        "active": c.breaker.active(),
                        "pending": c.breaker.pending(),
                    },
                    "retry_budget": c.budget.snapshot(),
                    "outlier_detection": c.service.policy.outlier_detection,
                }),
            );
        }
        serde_json::Value::Object(out)
    }
}

fn endpoint_json(ep: &Endpoint, snap: EndpointSnapshot) -> serde_json::Value {
    let mut v = serde_json::to_value(snap).unwrap_or_default();
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("labels".into(), serde_json::json!(ep.labels));
        m.insert(
            "health".into(),
            serde_json::json!(
                if m.get("ejected") == Some(&serde_json::Value::Bool(true)) {
                    "ejected"
                } else {
                    "healthy"
                }
            ),
        );
    }
    v
}

impl Cluster {
    fn new(svc: &Service, old: Option<&Arc<Cluster>>, now: Instant) -> Cluster {
        let old_state = |addr: SocketAddr| {
            old.and_then(|o| o.states.iter().find(|s| s.addr() == addr).cloned())
        };
        let states = svc
            .endpoints
            .iter()
            .map(|ep| old_state(ep.addr).unwrap_or_else(|| EndpointState::new(ep.addr, now)))
            .collect();
        let p = &svc.policy;
        let breaker = match old {
            Some(o) if o.breaker.config() == p.circuit_breaker => o.breaker.clone(),
            _ => Arc::new(Breaker::new(p.circuit_breaker)),
        };
        let budget = match old {
            Some(o) if o.budget.config() == p.retry_budget => o.budget.clone(),
            _ => Arc::new(Budget::new(p.retry_budget)),
        };
        let mirror_slots = svc
            .routes
            .iter()
            .filter_map(|r| {
                let m = r.mirror.as_ref()?;
                let kept = old
                    .and_then(|o| o.mirror_slots.get(&r.name))
                    .filter(|s| o_max(old, &r.name) == Some(m.max_in_flight) && !s.is_closed())
                    .cloned();
                Some((
                    r.name.clone(),
                    kept.unwrap_or_else(|| Arc::new(Semaphore::new(m.max_in_flight))),
                ))
            })
            .collect();
        Cluster {
            service: svc.clone(),
            states,
            breaker,
            budget,
            outlier: Outlier::new(p.outlier_detection.clone()),
            lb: p.load_balancer,
            rr: AtomicUsize::new(0),
            mirror_slots,
        }
    }

    /// The endpoint states of the endpoints in `subset`.
    pub fn subset(
        &self,
        subset: &std::collections::BTreeMap<String, String>,
    ) -> Vec<Arc<EndpointState>> {
        self.service
            .endpoints
            .iter()
            .zip(&self.states)
            .filter(|(ep, _)| in_subset(ep, subset))
            .map(|(_, st)| st.clone())
            .collect()
    }
}

/// The mirror limit a route had in the old cluster.
fn o_max(old: Option<&Arc<Cluster>>, route: &str) -> Option<usize> {
    old?.service
        .routes
        .iter()
        .find(|r| r.name == route)?
        .mirror
        .as_ref()
        .map(|m| m.max_in_flight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(extra: &str) -> Mesh {
        Mesh::parse(
            &format!(
                "trust_domain = \"td\"\n[services.p]\nendpoints = [\"127.0.0.1:1\", {{ addr = \"127.0.0.1:2\", labels = {{ v = \"2\" }} }}]\n{extra}"
            ),
            "m",
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn reload_keeps_state_of_endpoints_and_policies_that_stay() {
        let one = State::new(mesh(""), None);
        let c1 = one.cluster("p").unwrap().clone();
        let _in_flight = c1.states[0].start();
        let two = State::new(mesh("[services.p.retry_budget]\nratio = 0.5\n"), Some(&one));
        let c2 = two.cluster("p").unwrap();
        assert!(
            Arc::ptr_eq(&c1.states[0], &c2.states[0]),
            "endpoint state kept"
        );
        assert_eq!(c2.states[0].in_flight(), 1);
        assert!(
            Arc::ptr_eq(&c1.breaker, &c2.breaker),
            "same limits: breaker kept"
        );
        assert!(
            !Arc::ptr_eq(&c1.budget, &c2.budget),
            "new budget config: new budget"
        );
        assert_eq!(
            c2.subset(&[("v".to_string(), "2".to_string())].into())
                .len(),
            1
        );
        assert_eq!(c2.subset(&Default::default()).len(), 2);
        assert!(two.snapshot()["p"]["endpoints"]
            .as_array()
            .is_some_and(|a| a.len() == 2));
    }
}
