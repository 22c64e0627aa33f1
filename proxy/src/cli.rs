//! Command-line interface of the `weft` binary: `sidecar`, `check`, `demo`.
//! Every sidecar flag is also an environment variable `WEFT_<FLAG>` and can
//! come from a flag file given as `@path` (see [`crate::argfile`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::mesh::Mesh;
use crate::sidecar::{CaCredential, IdentitySource, Limits, SidecarConfig};
use crate::trace::TraceConfig;

#[derive(Debug, Parser)]
#[command(
    name = "weft",
    version,
    about = "Weft: a service mesh whose sidecars talk QUIC with mutual TLS"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a sidecar next to one service instance.
    Sidecar(Box<SidecarArgs>),
    /// Validate a mesh file; exits non-zero and lists every error.
    Check {
        #[arg(long, env = "WEFT_MESH", value_name = "FILE")]
        mesh: PathBuf,
    },
    /// Install or remove the iptables rules that send a pod's traffic through its sidecar.
    Iptables(IptablesArgs),
    /// Run a CA, three services and their sidecars on loopback, send traffic, print a summary.
    Demo {
        /// Stop after this many seconds (exit 0 only if all traffic succeeded); default: run until Ctrl-C.
        #[arg(long, value_name = "SECS")]
        duration: Option<u64>,
    },
    /// Add the Weft sidecar to the Kubernetes workloads of a YAML stream (docs/kubernetes.md).
    Inject(Box<crate::inject::InjectArgs>),
}

#[derive(Debug, Args)]
pub struct IptablesArgs {
    #[command(subcommand)]
    pub action: IptablesAction,
}

#[derive(Debug, Subcommand)]
pub enum IptablesAction {
    /// Capture the pod's TCP traffic (replaces earlier Weft rules).
    Install(IptablesInstall),
    /// Remove every Weft rule and chain.
    Uninstall,
}

#[derive(Debug, Args)]
pub struct IptablesInstall {
    /// The sidecar's outbound capture port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The UID the sidecar runs as; its own connections are not captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The GID the sidecar runs as; its own connections are not captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_gid: u32,
    /// strict: plain TCP from outside the pod to captured ports is refused; permissive: let it through.
    #[arg(long, value_enum, default_value = "strict")]
    pub inbound_mode: crate::intercept::iptables::InboundMode,
    /// Inbound ports refused to non-mesh clients in strict mode: '*' (all) or a list.
    #[arg(long, default_value = "*", value_parser = parse_port_set)]
    pub inbound_ports: PortSet,
    /// Inbound ports always open (admin and probes).
    #[arg(long, value_delimiter = ',', default_value = "15000")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports not captured.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination networks not captured (e.g. 169.254.169.254/32).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<crate::intercept::iptables::Cidr>,
    /// Print the iptables-restore input for IPv4 and IPv6 instead of applying it.
    #[arg(long)]
    pub dry_run: bool,
}

/// `*` or a comma-separated port list.
#[derive(Debug, Clone)]
pub struct PortSet(pub Option<Vec<u16>>);

fn parse_port_set(s: &str) -> Result<PortSet, String> {
    if s.trim() == "*" {
        return Ok(PortSet(None));
    }
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    format!("{p:?} is not a port (1-65535); give '*' or a list like 8080,9090")
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|v| PortSet(Some(v)))
}

impl IptablesInstall {
    pub fn rules(&self) -> crate::intercept::iptables::Rules {
        crate::intercept::iptables::Rules {
            outbound_port: self.outbound_port,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            inbound_mode: self.inbound_mode,
            inbound_ports: self.inbound_ports.0.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct SidecarArgs {
    /// Mesh file (TOML) shared by all sidecars.
    #[arg(long, env = "WEFT_MESH", value_name = "FILE")]
    pub mesh: PathBuf,
    /// Directory with cert.pem, key.pem and bundle.pem (from `weft-ca issue`, cert-manager or SPIRE).
    #[arg(long, env = "WEFT_CERT_DIR", value_name = "DIR", conflicts_with = "ca")]
    pub cert_dir: Option<PathBuf>,
    /// URL of `weft-ca serve`, to get a certificate by CSR (e.g. https://127.0.0.1:8443).
    #[arg(long, env = "WEFT_CA", value_name = "URL", requires = "ca_bundle")]
    pub ca: Option<String>,
    /// Trust bundle (PEM) that verifies the CA's HTTPS certificate.
    #[arg(long, env = "WEFT_CA_BUNDLE", value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// File holding the join token from `weft-ca token`.
    #[arg(
        long,
        env = "WEFT_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "k8s_token_file"
    )]
    pub token_file: Option<PathBuf>,
    /// File holding a projected Kubernetes service-account token (audience
    /// of `weft-ca serve --kubernetes`); re-read at every use.
    #[arg(long, env = "WEFT_K8S_TOKEN_FILE", value_name = "FILE")]
    pub k8s_token_file: Option<PathBuf>,
    /// The SPIFFE ID this sidecar expects to be issued (checked against the CA's answer).
    #[arg(long, env = "WEFT_SPIFFE_ID", value_name = "ID")]
    pub spiffe_id: Option<String>,
    /// UDP address of the inbound QUIC endpoint.
    #[arg(
        long,
        env = "WEFT_INBOUND",
        value_name = "ADDR",
        default_value = "0.0.0.0:15008"
    )]
    pub inbound: SocketAddr,
    /// Admin HTTP address (/ready /live /metrics /config /certs).
    #[arg(
        long,
        env = "WEFT_ADMIN",
        value_name = "ADDR",
        default_value = "127.0.0.1:15000"
    )]
    pub admin: SocketAddr,
    /// The local app that inbound traffic is forwarded to.
    #[arg(long, env = "WEFT_APP", value_name = "ADDR")]
    pub app: Option<SocketAddr>,
    /// SERVICE=ADDR: a local TCP listener the app uses to reach SERVICE;
    /// SERVICE=ADDR/udp: a local UDP socket for a UDP service (repeatable).
    #[arg(long = "upstream", env = "WEFT_UPSTREAM", value_name = "SERVICE=ADDR[/udp]", value_delimiter = ',', value_parser = parse_upstream)]
    pub upstreams: Vec<Upstream>,
    /// Largest header section accepted from apps and peers, in bytes.
    #[arg(long, env = "WEFT_MAX_HEADER_BYTES", default_value_t = Limits::default().max_header_bytes)]
    pub max_header_bytes: usize,
    /// Concurrent streams a peer may open on one QUIC connection.
    #[arg(long, env = "WEFT_MAX_STREAMS_PER_CONNECTION", default_value_t = Limits::default().max_streams_per_connection)]
    pub max_streams_per_connection: u32,
    /// Concurrent inbound QUIC connections.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
    /// PING a QUIC connection to a peer after this long without traffic (keeps idle
    /// connections and NAT mappings alive; below --quic-idle-timeout).
    #[arg(long, env = "WEFT_QUIC_KEEP_ALIVE", value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub quic_keep_alive: Duration,
    /// A peer silent this long is dead: its connection closes, its requests fail
    /// (or are retried) and new ones go to other endpoints until it answers a handshake.
    #[arg(long, env = "WEFT_QUIC_IDLE_TIMEOUT", value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub quic_idle_timeout: Duration,
    /// Reconnect to known peers with 0-RTT: safe HTTP requests (GET, HEAD, OPTIONS,
    /// TRACE) and TCP streams of services marked `early_data = true` go out with the
    /// first packet instead of after the handshake (docs/quic.md: replay risk).
    #[arg(long, env = "WEFT_ZERO_RTT", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub zero_rtt: bool,
    /// Runtime worker threads (the sidecar's share of CPU cores) [default: one per CPU].
    #[arg(long, env = "WEFT_WORKERS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,
    /// On SIGTERM or Ctrl-C, how long to let work in progress finish before
    /// cutting it (e.g. 20s, 500ms); a second signal exits at once.
    #[arg(long, env = "WEFT_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub tracing: TraceArgs,
    #[command(flatten)]
    pub capture: CaptureArgs,
}

/// Transparent interception flags (see `weft iptables` and docs/interception.md).
#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Listen here for connections iptables redirects (repeatable; in a pod:
    /// 127.0.0.1:15001 and [::1]:15001). Off when not given.
    #[arg(
        long = "capture-outbound",
        env = "WEFT_CAPTURE_OUTBOUND",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub capture_outbound: Vec<SocketAddr>,
    /// Intercepted connections to destinations that are no service's `addresses`: connect directly (allow) or refuse (deny).
    #[arg(
        long,
        env = "WEFT_OUTBOUND_POLICY",
        value_enum,
        default_value = "allow"
    )]
    pub outbound_policy: crate::intercept::OutboundPolicy,
    /// Destination ports whose protocols speak first from the server (never wait to detect HTTP).
    #[arg(long, env = "WEFT_SERVER_FIRST_PORTS", value_name = "PORTS", value_delimiter = ',', default_values_t = crate::intercept::CaptureConfig::default().server_first_ports)]
    pub server_first_ports: Vec<u16>,
    /// How long to wait for an intercepted connection's first bytes before treating it as opaque TCP.
    #[arg(long, env = "WEFT_PROTOCOL_DETECT_TIMEOUT", value_name = "DURATION", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub protocol_detect_timeout: Duration,
    /// How often DNS names in the mesh file (endpoints, addresses) are looked up again.
    #[arg(long, env = "WEFT_DNS_REFRESH", value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub dns_refresh: Duration,
}

/// Tracing and access log flags (see docs/tracing.md). Tracing is off unless an endpoint is given.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Send spans as OTLP/HTTP protobuf to URL (e.g. http://127.0.0.1:4318/v1/traces; Jaeger reads it).
    #[arg(long, env = "WEFT_TRACE_OTLP_ENDPOINT", value_name = "URL")]
    pub trace_otlp_endpoint: Option<String>,
    /// Send spans as Zipkin v2 JSON to URL (e.g. http://127.0.0.1:9411/api/v2/spans).
    #[arg(long, env = "WEFT_TRACE_ZIPKIN_ENDPOINT", value_name = "URL")]
    pub trace_zipkin_endpoint: Option<String>,
    /// Share of new traces recorded (0.0..=1.0); a caller's sampled flag is always followed.
    #[arg(long, env = "WEFT_TRACE_SAMPLE_RATIO", value_name = "RATIO", default_value_t = TraceConfig::default().sample_ratio)]
    pub trace_sample_ratio: f64,
    /// `service.name` of this sidecar's spans [default: the service account of its SPIFFE ID].
    #[arg(long, env = "WEFT_TRACE_SERVICE_NAME", value_name = "NAME")]
    pub trace_service_name: Option<String>,
    /// Spans waiting for export; more are dropped (weft_trace_spans_dropped_total).
    #[arg(long, env = "WEFT_TRACE_QUEUE_SPANS", value_name = "N", default_value_t = TraceConfig::default().queue_spans)]
    pub trace_queue_spans: usize,
    /// Spans per export request.
    #[arg(long, env = "WEFT_TRACE_BATCH_SPANS", value_name = "N", default_value_t = TraceConfig::default().batch_spans)]
    pub trace_batch_spans: usize,
    /// Longest a span waits for its batch (e.g. 1s, 200ms).
    #[arg(long, env = "WEFT_TRACE_BATCH_INTERVAL", value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub trace_batch_interval: Duration,
    /// Write a JSON line per HTTP request and TCP stream to `stderr` or FILE (appended).
    #[arg(long, env = "WEFT_ACCESS_LOG", value_name = "stderr|FILE")]
    pub access_log: Option<crate::trace::access_log::AccessLogTarget>,
}

impl TraceArgs {
    fn into_config(self) -> Result<TraceConfig, String> {
        let cfg = TraceConfig {
            otlp_endpoint: self.trace_otlp_endpoint,
            zipkin_endpoint: self.trace_zipkin_endpoint,
            sample_ratio: self.trace_sample_ratio,
            service_name: self.trace_service_name,
            queue_spans: self.trace_queue_spans,
            batch_spans: self.trace_batch_spans,
            batch_interval: self.trace_batch_interval,
            access_log: self.access_log,
            ..TraceConfig::default()
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

/// One `--upstream`: a local listener the app uses to reach a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub service: String,
    pub addr: SocketAddr,
    /// `ADDR/udp`: a UDP socket (for a `protocol = "udp"` service), not a TCP listener.
    pub udp: bool,
}

/// `SERVICE=ADDR` (TCP) or `SERVICE=ADDR/udp`.
pub fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let (svc, addr) = s.split_once('=').ok_or_else(|| {
        format!(
            "expected SERVICE=ADDR or SERVICE=ADDR/udp, e.g. payment=127.0.0.1:9001 or \
             dns=127.0.0.1:5353/udp, got {s:?}"
        )
    })?;
    let (addr, udp) = match addr.rsplit_once('/') {
        Some((a, "udp")) => (a, true),
        Some((a, "tcp")) => (a, false),
        Some((_, other)) => {
            return Err(format!(
                "{s:?}: unknown listener kind /{other}; write ADDR for TCP or ADDR/udp for UDP"
            ))
        }
        None => (addr, false),
    };
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an ip:port address: {e}"))?;
    Ok(Upstream {
        service: svc.to_string(),
        addr,
        udp,
    })
}

impl SidecarArgs {
    /// Read the files the flags name and build the sidecar configuration.
    pub fn into_config(self) -> Result<SidecarConfig, String> {
        let mesh = Mesh::load(&self.mesh).map_err(|e| format!("invalid mesh file:\n{e}"))?;
        let read = |p: &PathBuf, what: &str| {
            std::fs::read_to_string(p).map_err(|e| format!("reading {what} {}: {e}", p.display()))
        };
        let identity =
            match (&self.cert_dir, &self.ca) {
                (Some(dir), None) => IdentitySource::CertDir(dir.clone()),
                (None, Some(url)) => {
                    // clap's `requires` guarantees the bundle is present.
                    let bundle = self.ca_bundle.as_ref().ok_or("--ca needs --ca-bundle")?;
                    let credential =
                        match (&self.token_file, &self.k8s_token_file) {
                            (Some(t), None) => {
                                CaCredential::JoinToken(read(t, "--token-file")?.trim().to_string())
                            }
                            (None, Some(k)) => {
                                // Read once now, so a wrong path fails at start.
                                read(k, "--k8s-token-file")?;
                                CaCredential::KubernetesTokenFile(k.clone())
                            }
                            _ => return Err(
                                "--ca needs exactly one credential: --token-file (a join token) \
                             or --k8s-token-file (a projected service-account token)"
                                    .into(),
                            ),
                        };
                    IdentitySource::Ca {
                        url: url.clone(),
                        bundle_pem: read(bundle, "--ca-bundle")?,
                        credential,
                        expect_id: self.spiffe_id.clone(),
                    }
                }
                _ => return Err(
                    "give either --cert-dir DIR or --ca URL (with --ca-bundle and --token-file \
                     or --k8s-token-file)"
                        .into(),
                ),
            };
        let limits = Limits {
            max_header_bytes: self.max_header_bytes,
            max_streams_per_connection: self.max_streams_per_connection,
            max_connections: self.max_connections,
            quic_keep_alive: self.quic_keep_alive,
            quic_idle_timeout: self.quic_idle_timeout,
            zero_rtt: self.zero_rtt,
        };
        limits.validate()?;
        Ok(SidecarConfig {
            mesh,
            identity,
            inbound: self.inbound,
            admin: self.admin,
            app: self.app,
            upstreams: self
                .upstreams
                .iter()
                .filter(|u| !u.udp)
                .map(|u| (u.service.clone(), u.addr))
                .collect(),
            udp_upstreams: self
                .upstreams
                .iter()
                .filter(|u| u.udp)
                .map(|u| (u.service.clone(), u.addr))
                .collect(),
            limits,
            tracing: self.tracing.into_config()?,
            capture: crate::intercept::CaptureConfig {
                listen: self.capture.capture_outbound,
                outbound_policy: self.capture.outbound_policy,
                server_first_ports: self.capture.server_first_ports,
                detect_timeout: self.capture.protocol_detect_timeout,
                ..crate::intercept::CaptureConfig::default()
            },
            dns_refresh: self.capture.dns_refresh,
        })
    }
}

/// Wait for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The duration given to `weft demo --duration`.
pub fn demo_duration(secs: Option<u64>) -> Option<Duration> {
    secs.map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_forms() {
        let tcp = parse_upstream("payment=127.0.0.1:9001").unwrap();
        assert_eq!(
            (tcp.service.as_str(), tcp.addr.port(), tcp.udp),
            ("payment", 9001, false)
        );
        let udp = parse_upstream("dns=127.0.0.1:5353/udp").unwrap();
        assert_eq!((udp.service.as_str(), udp.udp), ("dns", true));
        assert!(!parse_upstream("echo=[::1]:7000/tcp").unwrap().udp);
        assert!(parse_upstream("dns=[::1]:53/udp").unwrap().addr.is_ipv6());
        let e = parse_upstream("dns=127.0.0.1:53/sctp").unwrap_err();
        assert!(e.contains("ADDR/udp"), "{e}");
        assert!(parse_upstream("dns127.0.0.1:53").is_err());
        assert!(parse_upstream("dns=localhost:53/udp").is_err());
    }
}
