//! The mesh file: the one TOML file, shared by every sidecar, that names the
//! mesh's trust domain and its services with their endpoints.
//!
//! Parsing is pure and I/O-free ([`Mesh::parse`]) apart from [`Mesh::load`],
//! which only reads the file. Text is first deserialized into `Raw*` structs
//! that keep byte spans (`toml::Spanned`), then checked into [`Mesh`]. The
//! check collects *every* semantic error with its `file:line:col`, so a bad
//! edit is reported in one go and the last good config can stay in force.
//!
//! ```toml
//! trust_domain = "example.org"
//! [services.payment]
//! protocol = "http"
//! endpoints = ["127.0.0.1:15108", { addr = "127.0.0.1:15208", labels = { version = "v2" } }]
//! [services.echo]
//! protocol = "tcp"
//! port = 7000
//! endpoints = ["[::1]:15308"]
//! # Connections the sidecar intercepts to these addresses go to this service.
//! addresses = ["10.96.0.30:7000", "echo.default.svc.cluster.local:7000"]
//! [services.dns]
//! # Datagrams, carried as QUIC DATAGRAM frames; one flow per app address.
//! protocol = "udp"
//! port = 5353
//! endpoints = ["127.0.0.1:15408"]
//! [services.search]
//! # A DNS name (e.g. a Kubernetes headless Service) stands for every address
//! # it resolves to, re-resolved while the sidecar runs.
//! endpoints = ["search.default.svc.cluster.local:15008"]
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;

mod authz;
pub(crate) mod policy;
pub use authz::{check as authorize, Authorization, DefaultAuthorization, Denied, IdPattern};
pub use policy::{
    Backend, Fault, FaultAbort, FaultDelay, HeaderMatch, Mirror, PathMatch, Pattern, RetryPolicy,
    Route, RouteMatch, ServicePolicy,
};

/// The longest service name we accept (the longest DNS name).
const MAX_SERVICE_NAME_LEN: usize = 253;
/// The longest label key or value we accept (as Kubernetes labels).
const MAX_LABEL_LEN: usize = 63;

/// A checked mesh file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mesh {
    /// The SPIFFE trust domain every sidecar of this mesh belongs to.
    pub trust_domain: String,
    /// Who may call services without an `authorization` table.
    pub default_authorization: DefaultAuthorization,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
}

/// One service: where its sidecars are and how to talk to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    pub name: String,
    pub protocol: Protocol,
    /// The app port on the peer for this service; 0 means the peer's default
    /// app. A UDP service's flows go to this port on the peer's `--app` host
    /// (127.0.0.1 without `--app`).
    pub port: u16,
    /// No duplicate addresses. Never empty in a checked mesh file unless
    /// `endpoint_names` has entries; those are resolved into more endpoints
    /// here (see [`Mesh::resolved`]).
    pub endpoints: Vec<Endpoint>,
    /// Endpoints given by DNS name: each stands for every address it resolves to.
    pub endpoint_names: Vec<NamedEndpoint>,
    /// Addresses apps dial for this service (a ClusterIP and port, say): a
    /// connection the sidecar intercepts ([`crate::intercept`]) to one of
    /// them goes to this service.
    pub addresses: Vec<SocketAddr>,
    /// Like `addresses`, by DNS name; resolved into `addresses`.
    pub address_names: Vec<HostPort>,
    /// Never empty: tried in order, first match wins; a request no route
    /// matches uses [`Route::default_for`] (all endpoints, default policies).
    pub routes: Vec<Route>,
    #[serde(flatten)]
    pub policy: ServicePolicy,
    /// Who may call the service; `None`: the mesh's `default_authorization`.
    pub authorization: Option<Authorization>,
}

impl Service {
    /// A service with default routes and policies and no endpoints yet.
    pub fn new(name: &str, protocol: Protocol) -> Service {
        Service {
            name: name.to_string(),
            protocol,
            port: 0,
            endpoints: Vec::new(),
            endpoint_names: Vec::new(),
            addresses: Vec::new(),
            address_names: Vec::new(),
            routes: vec![Route::default_for(name)],
            policy: ServicePolicy::default(),
            authorization: None,
        }
    }
}

/// Whether `ep` carries every label of `subset` (an empty subset selects all).
pub fn in_subset(ep: &Endpoint, subset: &BTreeMap<String, String>) -> bool {
    subset.iter().all(|(k, v)| ep.labels.get(k) == Some(v))
}

/// How a service's traffic is carried between sidecars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP requests, carried as HTTP/3 requests.
    Http,
    /// Opaque bytes, carried on a raw QUIC stream.
    Tcp,
    /// Datagrams, carried as QUIC DATAGRAM frames, one flow per app
    /// address (see `docs/udp.md`).
    Udp,
}

/// One peer sidecar serving a service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoint {
    /// The peer sidecar's inbound (QUIC) address.
    pub addr: SocketAddr,
    /// Labels used to pick subsets (e.g. `version = "v2"` for a canary).
    pub labels: BTreeMap<String, String>,
}

/// A DNS name and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl HostPort {
    /// `name:port` where name is a DNS name (not an IP address).
    pub fn parse(text: &str) -> Result<HostPort, String> {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} has no port; write name:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?}: port {port:?} is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(format!("{text:?} has port 0"));
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(format!(
                "{text:?} is neither ip:port nor a DNS name:port \
                 (e.g. \"10.96.0.20:80\" or \"payment.default.svc.cluster.local:80\")"
            ));
        }
        Ok(HostPort { host, port })
    }
}

/// An endpoint given by DNS name, with the labels of every address it resolves to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedEndpoint {
    pub name: HostPort,
    pub labels: BTreeMap<String, String>,
}

/// One problem in a mesh file.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshError {
    /// The file name (or other origin) the text came from.
    pub origin: String,
    /// 1-based line, when the problem has a position.
    pub line: Option<usize>,
    /// 1-based column (in characters), when the problem has a position.
    pub col: Option<usize>,
    pub message: String,
}

/// Every problem found in a mesh file, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshErrors(pub Vec<MeshError>);

impl fmt::Display for MeshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.col) {
            (Some(line), Some(col)) => write!(f, "{}:{line}:{col}: {}", self.origin, self.message),
            (Some(line), None) => write!(f, "{}:{line}: {}", self.origin, self.message),
            _ => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for MeshError {}

impl fmt::Display for MeshErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for MeshErrors {}

impl Mesh {
    /// A mesh with no services and default settings.
    pub fn new(trust_domain: &str) -> Mesh {
        Mesh {
            trust_domain: trust_domain.to_string(),
            default_authorization: DefaultAuthorization::default(),
            services: BTreeMap::new(),
        }
    }

    /// Parse and check mesh-file text. `origin` names the file in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Mesh, MeshErrors> {
        let mut check = Checker {
            text,
            origin,
            errors: Vec::new(),
        };
        let raw: RawMesh = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                check.error(e.span(), toml_message(&e));
                return Err(MeshErrors(check.errors));
            }
        };
        let mesh = check.mesh(raw);
        if check.errors.is_empty() {
            Ok(mesh)
        } else {
            // Stable sort: errors without a position first, then file order.
            check.errors.sort_by_key(|e| (e.line, e.col));
            Err(MeshErrors(check.errors))
        }
    }

    /// Read and check a mesh file; a read failure is reported as a `MeshErrors` too.
    pub fn load(path: &Path) -> Result<Mesh, MeshErrors> {
        let origin = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Mesh::parse(&text, &origin),
            Err(e) => Err(MeshErrors(vec![MeshError {
                message: format!(
                    "cannot read the mesh file: {e}; check that the path is right and the file is readable"
                ),
                origin,
                line: None,
                col: None,
            }])),
        }
    }

    /// The service called `name`, if the mesh has one.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    /// Every DNS name the mesh file uses (endpoints and addresses).
    pub fn dns_names(&self) -> std::collections::BTreeSet<String> {
        self.services
            .values()
            .flat_map(|s| {
                s.endpoint_names
                    .iter()
                    .map(|n| n.name.host.clone())
                    .chain(s.address_names.iter().map(|n| n.host.clone()))
            })
            .collect()
    }

    /// This mesh with every DNS name replaced by the addresses `dns` knows
    /// for it (a name it does not know contributes nothing yet). Endpoints
    /// listed by address come first; duplicates are dropped.
    pub fn resolved(&self, dns: &std::collections::HashMap<String, Vec<std::net::IpAddr>>) -> Mesh {
        let mut mesh = self.clone();
        for svc in mesh.services.values_mut() {
            for named in &svc.endpoint_names {
                for ip in dns.get(&named.name.host).into_iter().flatten() {
                    let addr = SocketAddr::new(*ip, named.name.port);
                    if !svc.endpoints.iter().any(|e| e.addr == addr) {
                        svc.endpoints.push(Endpoint {
                            addr,
                            labels: named.labels.clone(),
                        });
                    }
                }
            }
            for name in &svc.address_names {
                for ip in dns.get(&name.host).into_iter().flatten() {
                    let addr = SocketAddr::new(*ip, name.port);
                    if !svc.addresses.contains(&addr) {
                        svc.addresses.push(addr);
                    }
                }
            }
        }
        mesh
    }
}

// ---- raw, span-keeping shapes ------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMesh {
    // Optional here only so that a missing trust domain is reported together
    // with every other error; `Checker` requires it.
    #[serde(default)]
    trust_domain: Option<Spanned<String>>,
    // Default: any workload of the trust domain (see authz.rs).
    #[serde(default)]
    default_authorization: Option<Spanned<String>>,
    // Default: no services. A sidecar that only accepts inbound traffic needs
    // none, and an empty mesh file is a valid starting point.
    #[serde(default)]
    services: BTreeMap<Spanned<String>, RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    // Default (when `None`): HTTP. Most service traffic is HTTP, and HTTP gets
    // per-request routing, retries and metrics; opaque TCP and UDP must be
    // asked for.
    #[serde(default)]
    protocol: Option<Spanned<String>>,
    // Default: 0, "the peer's default app". Most pods run one app, so the
    // peer sidecar already knows where to send the traffic.
    #[serde(default)]
    port: u16,
    // Optional here only so that a missing list is reported like an empty one;
    // `Checker` requires at least one endpoint.
    #[serde(default)]
    endpoints: Option<Spanned<Vec<Spanned<RawEndpoint>>>>,
    // Policies; each has a documented default in `policy.rs`.
    #[serde(default)]
    routes: Option<Vec<Spanned<policy::RawRoute>>>,
    #[serde(default)]
    circuit_breaker: Option<Spanned<policy::RawCircuitBreaker>>,
    #[serde(default)]
    outlier_detection: Option<Spanned<policy::RawOutlier>>,
    #[serde(default)]
    load_balancer: Option<Spanned<String>>,
    #[serde(default)]
    retry_budget: Option<Spanned<policy::RawBudget>>,
    #[serde(default)]
    connect_timeout: Option<Spanned<String>>,
    #[serde(default)]
    idle_timeout: Option<Spanned<String>>,
    // UDP only. Default: none, a flow ends when idle (see policy.rs).
    #[serde(default)]
    replies_per_flow: Option<Spanned<u32>>,
    // TCP only. Default: false, streams wait for the handshake.
    #[serde(default)]
    early_data: Option<Spanned<bool>>,
    // Default: the mesh's default_authorization.
    #[serde(default)]
    authorization: Option<Spanned<authz::RawAuthorization>>,
    // Default: none; the service is reached through `--upstream` listeners only.
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
}

/// An endpoint entry: `"ip:port"` or `{ addr = "ip:port", labels = { … } }`.
struct RawEndpoint {
    /// `Err(text)` for the plain-string form, whose span is the entry's span.
    addr: Result<Spanned<String>, String>,
    labels: BTreeMap<Spanned<String>, Spanned<String>>,
}

impl<'de> Deserialize<'de> for RawEndpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawEndpointVisitor)
    }
}

struct RawEndpointVisitor;

impl<'de> Visitor<'de> for RawEndpointVisitor {
    type Value = RawEndpoint;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "an endpoint: an address string like \"127.0.0.1:15008\" \
             or a table like { addr = \"127.0.0.1:15008\", labels = { version = \"v2\" } }",
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawEndpoint, E> {
        Ok(RawEndpoint {
            addr: Err(v.to_string()),
            labels: BTreeMap::new(),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEndpoint, A::Error> {
        const FIELDS: &[&str] = &["addr", "labels"];
        let mut addr = None;
        // Default: no labels. Labels only matter to routes that pick subsets.
        let mut labels = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "addr" => addr = Some(map.next_value::<Spanned<String>>()?),
                "labels" => labels = map.next_value()?,
                other => return Err(de::Error::unknown_field(other, FIELDS)),
            }
        }
        let addr = addr.ok_or_else(|| {
            de::Error::custom(
                "endpoint table has no `addr`: add one, e.g. { addr = \"127.0.0.1:15008\" }",
            )
        })?;
        Ok(RawEndpoint {
            addr: Ok(addr),
            labels,
        })
    }
}

// ---- checking ----------------------------------------------------------------

struct Checker<'a> {
    text: &'a str,
    origin: &'a str,
    errors: Vec<MeshError>,
}

impl Checker<'_> {
    fn error(&mut self, span: Option<Range<usize>>, message: String) {
        let (line, col) = match span {
            Some(span) => {
                let (line, col) = line_col(self.text, span.start);
                (Some(line), Some(col))
            }
            None => (None, None),
        };
        self.errors.push(MeshError {
            origin: self.origin.to_string(),
            line,
            col,
            message,
        });
    }

    fn mesh(&mut self, raw: RawMesh) -> Mesh {
        let trust_domain = match raw.trust_domain {
            Some(td) => {
                if let Err(e) = weft_transport::spiffe::validate_trust_domain(td.get_ref()) {
                    self.error(
                        Some(td.span()),
                        format!(
                            "trust_domain {:?} is not valid: {e}; use the trust domain your CA \
                             issues certificates for, a lowercase name like \"example.org\"",
                            td.get_ref()
                        ),
                    );
                }
                td.into_inner()
            }
            None => {
                self.error(
                    None,
                    "trust_domain is missing: add a line like `trust_domain = \"example.org\"` \
                     at the top, naming the trust domain your CA issues certificates for"
                        .to_string(),
                );
                String::new()
            }
        };
        let mut services = BTreeMap::new();
        let mut refs = Vec::new();
        for (name, raw) in raw.services {
            let service = self.service(name.get_ref(), name.span(), raw, &trust_domain, &mut refs);
            services.insert(name.into_inner(), service);
        }
        self.references(&services, refs);
        self.unique_addresses(&services);
        let default_authorization = self.default_authorization(raw.default_authorization);
        Mesh {
            trust_domain,
            default_authorization,
            services,
        }
    }

    fn service(
        &mut self,
        name: &str,
        name_span: Range<usize>,
        raw: RawService,
        trust_domain: &str,
        refs: &mut Vec<policy::Reference>,
    ) -> Service {
        if let Err(why) = check_service_name(name) {
            self.error(
                Some(name_span.clone()),
                format!(
                    "service name {name:?} is not valid: {why}; use 1 to {MAX_SERVICE_NAME_LEN} \
                     lowercase letters, digits, '.', '-' or '_', starting with a letter or digit \
                     (e.g. \"payment\")"
                ),
            );
        }
        let protocol = match raw.protocol {
            None => Protocol::Http,
            Some(p) => match p.get_ref().as_str() {
                "http" => Protocol::Http,
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                other => {
                    self.error(
                        Some(p.span()),
                        format!(
                            "service {name:?}: unknown protocol {other:?}; use \"http\", \"tcp\" \
                             or \"udp\""
                        ),
                    );
                    Protocol::Http
                }
            },
        };
        let (list_span, entries) = match raw.endpoints {
            Some(list) => (list.span(), list.into_inner()),
            None => (name_span.clone(), Vec::new()),
        };
        if entries.is_empty() {
            self.error(
                Some(list_span),
                format!(
                    "service {name:?} has no endpoints: add at least one peer sidecar address, \
                     e.g. endpoints = [\"127.0.0.1:15008\"]"
                ),
            );
        }
        let mut endpoints: Vec<Endpoint> = Vec::new();
        let mut endpoint_names: Vec<NamedEndpoint> = Vec::new();
        let mut first_seen: BTreeMap<String, usize> = BTreeMap::new();
        for entry in entries {
            let entry_span = entry.span();
            let raw = entry.into_inner();
            let (addr_text, addr_span) = match raw.addr {
                Ok(addr) => (addr.get_ref().clone(), addr.span()),
                Err(text) => (text, entry_span),
            };
            let labels = self.labels(name, raw.labels);
            let Some(addr) = self.endpoint_addr(name, &addr_text, addr_span.clone()) else {
                continue;
            };
            let key = match &addr {
                Ok(a) => a.to_string(),
                Err(n) => n.to_string(),
            };
            if let Some(first_line) = first_seen.get(&key) {
                self.error(
                    Some(addr_span),
                    format!(
                        "service {name:?}: endpoint {key} is listed twice (first on line \
                         {first_line}); remove one of them"
                    ),
                );
                continue;
            }
            first_seen.insert(key, line_col(self.text, addr_span.start).0);
            match addr {
                Ok(addr) => endpoints.push(Endpoint { addr, labels }),
                Err(name) => endpoint_names.push(NamedEndpoint { name, labels }),
            }
        }
        let mut addresses = Vec::new();
        let mut address_names = Vec::new();
        if protocol == Protocol::Udp {
            if let Some(a) = raw.addresses.first() {
                self.error(
                    Some(a.span()),
                    format!(
                        "service {name:?} is UDP: addresses are for intercepted TCP connections; \
                         apps reach a UDP service through a `--upstream {name}=ADDR/udp` listener, \
                         remove addresses"
                    ),
                );
            }
        }
        for a in raw.addresses {
            let text = a.get_ref();
            if let Ok(addr) = text.parse::<SocketAddr>() {
                if addr.port() == 0 {
                    self.error(
                        Some(a.span()),
                        format!("service {name:?}: address {text:?} has port 0; give the port apps dial"),
                    );
                } else if !addresses.contains(&addr) {
                    addresses.push(addr);
                }
                continue;
            }
            match HostPort::parse(text) {
                Ok(hp) => {
                    if !address_names.contains(&hp) {
                        address_names.push(hp)
                    }
                }
                Err(why) => self.error(Some(a.span()), format!("service {name:?}: address {why}")),
            }
        }
        let raw_policy = policy::RawServicePolicy {
            routes: raw.routes,
            circuit_breaker: raw.circuit_breaker,
            outlier_detection: raw.outlier_detection,
            load_balancer: raw.load_balancer,
            retry_budget: raw.retry_budget,
            connect_timeout: raw.connect_timeout,
            idle_timeout: raw.idle_timeout,
            replies_per_flow: raw.replies_per_flow,
            early_data: raw.early_data,
        };
        let (routes, policy) = self.policy(name, name_span, protocol, raw_policy, refs);
        let authorization = raw
            .authorization
            .map(|a| self.authorization(name, trust_domain, a.into_inner()));
        Service {
            authorization,
            name: name.to_string(),
            protocol,
            port: raw.port,
            endpoints,
            endpoint_names,
            addresses,
            address_names,
            routes,
            policy,
        }
    }

    /// An intercepted connection must map to exactly one service.
    fn unique_addresses(&mut self, services: &BTreeMap<String, Service>) {
        let mut claimed: BTreeMap<String, &str> = BTreeMap::new();
        for svc in services.values() {
            let texts = svc
                .addresses
                .iter()
                .map(|a| a.to_string())
                .chain(svc.address_names.iter().map(|n| n.to_string()));
            for text in texts {
                if let Some(first) = claimed.insert(text.clone(), &svc.name) {
                    self.error(
                        None,
                        format!(
                            "address {text} is listed by services {first:?} and {:?}; an \
                             intercepted connection must map to one service, remove one",
                            svc.name
                        ),
                    );
                }
            }
        }
    }

    fn endpoint_addr(
        &mut self,
        service: &str,
        text: &str,
        span: Range<usize>,
    ) -> Option<Result<SocketAddr, HostPort>> {
        match text.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => {
                self.error(
                    Some(span),
                    format!(
                        "service {service:?}: endpoint {text:?} has port 0; give the peer \
                         sidecar's inbound port (15008 unless it was changed)"
                    ),
                );
                None
            }
            Ok(addr) => Some(Ok(addr)),
            Err(_) => match HostPort::parse(text) {
                Ok(name) => Some(Err(name)),
                Err(_) => {
                    self.error(
                        Some(span),
                        format!(
                            "service {service:?}: endpoint {text:?} is not an ip:port address \
                             (e.g. \"127.0.0.1:15008\" or \"[::1]:15008\") nor a DNS name:port \
                             (e.g. \"payment.default.svc.cluster.local:15008\")"
                        ),
                    );
                    None
                }
            },
        }
    }

    fn labels(
        &mut self,
        service: &str,
        raw: BTreeMap<Spanned<String>, Spanned<String>>,
    ) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        for (key, value) in raw {
            for (what, item) in [("key", &key), ("value", &value)] {
                if let Err(why) = check_label(item.get_ref()) {
                    self.error(
                        Some(item.span()),
                        format!(
                            "service {service:?}: label {what} {:?} is not valid: {why}; use 1 to \
                             {MAX_LABEL_LEN} letters, digits, '.', '-' or '_'",
                            item.get_ref()
                        ),
                    );
                }
            }
            labels.insert(key.into_inner(), value.into_inner());
        }
        labels
    }
}

/// Why `name` is not a valid service name, if it is not.
fn check_service_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".to_string());
    }
    if name.len() > MAX_SERVICE_NAME_LEN {
        return Err(format!("it is {} characters long", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!("it contains {c:?}"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("it does not start with a letter or digit".to_string());
    }
    Ok(())
}

/// Why `s` is not a valid label key or value, if it is not.
fn check_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("it is empty".to_string());
    }
    if s.len() > MAX_LABEL_LEN {
        return Err(format!("it is {} characters long", s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!("it contains {c:?}"));
    }
    Ok(())
}

/// toml's own message, without its source snippet, on one line.
fn toml_message(e: &toml::de::Error) -> String {
    let lines: Vec<&str> = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "the file is not valid TOML".to_string()
    } else {
        lines.join("; ")
    }
}

/// 1-based (line, column in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"trust_domain = "example.org"
[services.payment]
protocol = "http"          # or "tcp"; default "http"
endpoints = ["127.0.0.1:15108", { addr = "127.0.0.1:15208", labels = { version = "v2" } }]
[services.echo]
protocol = "tcp"
port = 7000
endpoints = ["[::1]:15308"]
"#;

    fn errors(text: &str) -> Vec<MeshError> {
        match Mesh::parse(text, "mesh.toml") {
            Ok(mesh) => panic!("expected errors, got {mesh:?}"),
            Err(MeshErrors(errors)) => errors,
        }
    }

    fn one_error(text: &str) -> MeshError {
        let mut errors = errors(text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        errors.remove(0)
    }

    #[test]
    fn parses_the_example() {
        let mesh = Mesh::parse(EXAMPLE, "mesh.toml").unwrap();
        let payment = Service {
            endpoints: vec![
                Endpoint {
                    addr: "127.0.0.1:15108".parse().unwrap(),
                    labels: BTreeMap::new(),
                },
                Endpoint {
                    addr: "127.0.0.1:15208".parse().unwrap(),
                    labels: BTreeMap::from([("version".into(), "v2".into())]),
                },
            ],
            ..Service::new("payment", Protocol::Http)
        };
        let echo = Service {
            port: 7000,
            endpoints: vec![Endpoint {
                addr: "[::1]:15308".parse().unwrap(),
                labels: BTreeMap::new(),
            }],
            ..Service::new("echo", Protocol::Tcp)
        };
        let want = Mesh {
            trust_domain: "example.org".into(),
            default_authorization: DefaultAuthorization::TrustDomain,
            services: BTreeMap::from([("echo".into(), echo), ("payment".into(), payment)]),
        };
        assert_eq!(mesh, want);
        assert_eq!(mesh.service("echo").map(|s| s.port), Some(7000));
        assert!(mesh.service("nope").is_none());
    }

    #[test]
    fn defaults_and_serialization() {
        let mesh = Mesh::parse(
            "trust_domain = \"td\"\n[services.a]\nendpoints = [\"10.0.0.1:15008\"]\n",
            "m",
        )
        .unwrap();
        let a = mesh.service("a").unwrap();
        assert_eq!((a.protocol, a.port), (Protocol::Http, 0));
        let json = serde_json::to_value(&mesh).unwrap();
        assert_eq!(json["services"]["a"]["protocol"], "http");
        assert_eq!(
            json["services"]["a"]["endpoints"][0]["addr"],
            "10.0.0.1:15008"
        );
        // No services at all is fine: an inbound-only mesh.
        let empty = Mesh::parse("trust_domain = \"td\"\n", "m").unwrap();
        assert!(empty.services.is_empty());
    }

    #[test]
    fn reports_every_semantic_error_with_its_line() {
        let text = r#"trust_domain = "Example.org"
[services.payment]
protocol = "sctp"
endpoints = ["127.0.0.1:15108", "local host:80"]
"#;
        let errors = errors(text);
        let lines: Vec<_> = errors.iter().map(|e| (e.line, e.col)).collect();
        assert_eq!(
            lines,
            [
                (Some(1), Some(16)),
                (Some(3), Some(12)),
                (Some(4), Some(33))
            ],
            "{errors:#?}"
        );
        assert!(errors[0].message.contains("trust_domain \"Example.org\""));
        assert!(errors[1].message.contains("\"http\", \"tcp\" or \"udp\""));
        assert_eq!(
            errors[2].message,
            "service \"payment\": endpoint \"local host:80\" is not an ip:port address \
             (e.g. \"127.0.0.1:15008\" or \"[::1]:15008\") nor a DNS name:port \
             (e.g. \"payment.default.svc.cluster.local:15008\")"
        );
        let shown = MeshErrors(errors).to_string();
        assert_eq!(shown.lines().count(), 3);
        assert!(shown.starts_with("mesh.toml:1:16: trust_domain"), "{shown}");
    }

    #[test]
    fn unknown_field_is_one_error_with_its_line() {
        let e = one_error(
            "trust_domain = \"td\"\n[services.a]\nendpoints = [\"10.0.0.1:1\"]\nprotocl = \"tcp\"\n",
        );
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("unknown field `protocl`"), "{e}");
        assert!(!e.message.contains('\n'), "{e}");
        // Inside an endpoint table too.
        let e = one_error(
            "trust_domain = \"td\"\n[services.a]\nendpoints = [\n  { addr = \"10.0.0.1:1\", lables = {} },\n]\n",
        );
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("lables"), "{e}");
    }

    #[test]
    fn bad_toml_syntax_has_a_line() {
        let e = one_error("trust_domain = \"td\"\n\n[services.a\nendpoints = []\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(!e.message.contains('\n'), "{e}");
        assert!(e.to_string().starts_with("mesh.toml:3:"), "{e}");
        // Wrong types are structure errors too.
        let e = one_error(
            "trust_domain = \"td\"\n[services.a]\nport = 70000\nendpoints = [\"10.0.0.1:1\"]\n",
        );
        assert_eq!(e.line, Some(3), "{e}");
        let e = one_error("trust_domain = \"td\"\n[services.a]\nendpoints = [5]\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("an address string like"), "{e}");
        let e = one_error("trust_domain = \"td\"\n[services.a]\nendpoints = [{ labels = {} }]\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("has no `addr`"), "{e}");
    }

    #[test]
    fn empty_or_missing_endpoints() {
        let e = one_error("trust_domain = \"td\"\n[services.a]\nendpoints = []\n");
        assert_eq!((e.line, e.col), (Some(3), Some(13)), "{e}");
        assert!(e.message.contains("has no endpoints"), "{e}");
        let e = one_error("trust_domain = \"td\"\n[services.a]\nprotocol = \"tcp\"\n");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("has no endpoints"), "{e}");
    }

    #[test]
    fn addresses_and_dns_names() {
        let text = "trust_domain = \"td\"\n[services.a]\n\
            endpoints = [\"10.0.0.1:15008\", { addr = \"A-v2.NS.svc.cluster.local.:15008\", labels = { version = \"v2\" } }]\n\
            addresses = [\"10.96.0.20:80\", \"a.ns.svc.cluster.local:80\", \"[fd00::20]:80\"]\n";
        let mesh = Mesh::parse(text, "m").unwrap();
        let a = mesh.service("a").unwrap();
        assert_eq!(a.endpoints.len(), 1);
        assert_eq!(a.endpoint_names.len(), 1);
        assert_eq!(
            a.endpoint_names[0].name.to_string(),
            "a-v2.ns.svc.cluster.local:15008"
        );
        assert_eq!(
            a.addresses,
            vec![
                "10.96.0.20:80".parse::<SocketAddr>().unwrap(),
                "[fd00::20]:80".parse().unwrap()
            ]
        );
        assert_eq!(a.address_names[0].to_string(), "a.ns.svc.cluster.local:80");
        let names: Vec<String> = mesh.dns_names().into_iter().collect();
        assert_eq!(
            names,
            vec!["a-v2.ns.svc.cluster.local", "a.ns.svc.cluster.local"]
        );
        // Resolved: the name's addresses join, with its labels; unknown names add nothing.
        let dns = std::collections::HashMap::from([(
            "a-v2.ns.svc.cluster.local".to_string(),
            vec!["10.0.0.7".parse().unwrap(), "10.0.0.1".parse().unwrap()],
        )]);
        let r = mesh.resolved(&dns);
        let a = r.service("a").unwrap();
        let eps: Vec<String> = a.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(eps, vec!["10.0.0.1:15008", "10.0.0.7:15008"]);
        assert!(a.endpoints[0].labels.is_empty(), "listed by address first");
        assert_eq!(a.endpoints[1].labels["version"], "v2");
        assert_eq!(a.addresses.len(), 2);
        // Only names count as endpoints: a service of DNS names alone is valid.
        assert!(Mesh::parse(
            "trust_domain = \"td\"\n[services.b]\nendpoints = [\"b.ns:15008\"]\n",
            "m"
        )
        .is_ok());
    }

    #[test]
    fn bad_and_duplicate_addresses() {
        let e = one_error(
            "trust_domain = \"td\"\n[services.a]\nendpoints = [\"10.0.0.1:15008\"]\naddresses = [\"not a name:80\"]\n",
        );
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("neither ip:port nor a DNS name"), "{e}");
        let e = one_error(
            "trust_domain = \"td\"\n[services.a]\nendpoints = [\"10.0.0.1:15008\"]\naddresses = [\"a.ns:0\"]\n",
        );
        assert!(e.message.contains("port 0"), "{e}");
        let e = one_error(
            "trust_domain = \"td\"\n[services.a]\nendpoints = [\"10.0.0.1:15008\"]\naddresses = [\"10.96.0.1:80\"]\n\
             [services.b]\nendpoints = [\"10.0.0.2:15008\"]\naddresses = [\"10.96.0.1:80\"]\n",
        );
        assert!(
            e.message.contains("listed by services \"a\" and \"b\""),
            "{e}"
        );
        let e = one_error(
            "trust_domain = \"td\"\n[services.a]\nendpoints = [\"a.ns:15008\", \"A.ns:15008\"]\n",
        );
        assert!(e.message.contains("listed twice"), "{e}");
        let e =
            one_error("trust_domain = \"td\"\n[services.a]\nendpoints = [\"bad_name!:15008\"]\n");
        assert!(e.message.contains("nor a DNS name:port"), "{e}");
    }

    #[test]
    fn duplicate_endpoints() {
        let text = "trust_domain = \"td\"\n[services.a]\nendpoints = [\n  \"[::1]:15008\",\n  { addr = \"[0::1]:15008\" },\n]\n";
        let e = one_error(text);
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("listed twice (first on line 4)"), "{e}");
    }

    #[test]
    fn bad_trust_domain_and_missing_trust_domain() {
        let e = one_error("trust_domain = \"spiffe://x\"\n");
        assert_eq!((e.line, e.col), (Some(1), Some(16)), "{e}");
        assert!(e.message.contains("not valid"), "{e}");
        let e = one_error("[services.a]\nendpoints = [\"10.0.0.1:1\"]\n");
        assert_eq!(e.line, None);
        assert!(e.message.contains("trust_domain is missing"), "{e}");
        assert_eq!(e.to_string(), format!("mesh.toml: {}", e.message));
    }

    #[test]
    fn bad_names_ports_and_labels() {
        let text = r#"trust_domain = "td"
[services."-bad"]
endpoints = ["10.0.0.1:0"]
[services.ok]
endpoints = [{ addr = "10.0.0.1:1", labels = { "" = "v", k = "a b" } }]
"#;
        let errors = errors(text);
        let got: Vec<_> = errors.iter().map(|e| e.line.unwrap()).collect();
        assert_eq!(got, [2, 3, 5, 5], "{errors:#?}");
        assert!(errors[0].message.contains("start with a letter or digit"));
        assert!(errors[1].message.contains("port 0"));
        assert!(errors[2].message.contains("label key \"\""));
        assert!(errors[3].message.contains("label value \"a b\""));
    }

    #[test]
    fn load_missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.toml");
        let errors = Mesh::load(&path).unwrap_err();
        let shown = errors.to_string();
        assert_eq!(errors.0.len(), 1);
        assert!(shown.starts_with(&path.display().to_string()), "{shown}");
        assert!(shown.contains("cannot read the mesh file"), "{shown}");
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.toml");
        std::fs::write(&path, EXAMPLE).unwrap();
        assert_eq!(
            Mesh::load(&path).unwrap(),
            Mesh::parse(EXAMPLE, "x").unwrap()
        );
    }

    #[test]
    fn line_col_counts_characters() {
        // Byte 6 is `=`: the third character of line 2 (é is two bytes).
        assert_eq!(line_col("ab\ncé=x", 6), (2, 3));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
