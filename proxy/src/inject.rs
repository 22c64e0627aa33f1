//! `weft inject`: add the Weft sidecar to the Kubernetes workloads of a YAML
//! stream (what `kubectl apply -f` reads), as `linkerd inject` and
//! `istioctl kube-inject` do, without a webhook.
//!
//! The pod (template) of every Pod, Deployment, StatefulSet, DaemonSet,
//! ReplicaSet, ReplicationController, Job and CronJob, and of the items of a
//! `List`, gets:
//! - `weft-iptables`, an init container running `weft iptables install` as
//!   root with only NET_ADMIN and NET_RAW, so the app's traffic goes through
//!   the sidecar;
//! - `weft-sidecar`, a *native sidecar* (an init container with
//!   `restartPolicy: Always`, Kubernetes ≥ 1.29) whose startup probe on
//!   `/ready` holds the app containers back until it has its certificate;
//! - volumes: a projected service-account token for `weft-ca`, the CA
//!   bundle and mesh ConfigMaps, an emptyDir for iptables' lock file;
//! - annotations: `weft.dev/injected: "true"` and Prometheus scrape
//!   annotations for the admin port (unless the pod already has its own).
//!
//! Injection is a pure function of the document: whatever an earlier
//! injection added is taken out and built again (so re-injecting upgrades an
//! old injection), and a document that comes out equal to what went in is
//! written back byte for byte, comments included. Injecting twice therefore
//! changes nothing. Other documents pass through untouched, in order.
//! `deploy/k8s/overlays/demo` is this module's output, checked by
//! `tests/tests/kubernetes.rs`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use serde_yaml_ng::{Mapping, Value};

#[path = "inject/spec.rs"]
mod spec;
use spec::{iptables_container, our_volumes, sidecar_container};

/// The YAML library inject reads and writes with, for tests and tools that
/// look at the same manifests.
pub use serde_yaml_ng as yaml;

/// Name of the iptables init container.
pub const IPTABLES_CONTAINER: &str = "weft-iptables";
/// Name of the native sidecar (an init container with `restartPolicy: Always`).
pub const SIDECAR_CONTAINER: &str = "weft-sidecar";
/// Set to `"true"` on every injected pod.
pub const INJECTED_ANNOTATION: &str = "weft.dev/injected";
/// `"false"` on a pod (template) opts it out of injection.
pub const INJECT_ANNOTATION: &str = "weft.dev/inject";
/// The app port inbound traffic goes to, when the first container's first
/// TCP port is not it.
pub const APP_PORT_ANNOTATION: &str = "weft.dev/app-port";

/// The UID and GID the sidecar runs as; the iptables rules exempt its traffic.
pub const PROXY_UID: u32 = 1337;
/// Admin HTTP (probes, metrics): excluded from interception so kubelet and
/// Prometheus reach it.
pub const ADMIN_PORT: u16 = 15000;
/// Where iptables redirects the app's outbound TCP connections.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound QUIC (UDP) from peer sidecars.
pub const INBOUND_PORT: u16 = 15008;

const TOKEN_VOLUME: &str = "weft-token";
const CA_BUNDLE_VOLUME: &str = "weft-ca-bundle";
const MESH_VOLUME: &str = "weft-mesh";
const XTABLES_VOLUME: &str = "weft-xtables-lock";
const OUR_VOLUMES: [&str; 4] = [TOKEN_VOLUME, CA_BUNDLE_VOLUME, MESH_VOLUME, XTABLES_VOLUME];
const MESH_DIR: &str = "/etc/weft/mesh";
const CA_DIR: &str = "/etc/weft/ca";
const TOKEN_DIR: &str = "/var/run/secrets/weft";

/// Defaults, matching `deploy/k8s/base`.
pub const DEFAULT_IMAGE: &str = "weft:latest";
pub const DEFAULT_CA_URL: &str = "https://weft-ca.weft-system.svc:8443";
pub const DEFAULT_CA_AUDIENCE: &str = "weft-ca";
pub const DEFAULT_CA_BUNDLE_CONFIGMAP: &str = "weft-ca-bundle";
pub const DEFAULT_MESH_CONFIGMAP: &str = "weft-mesh";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// What the injected containers look like. The defaults match `deploy/k8s/base`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectOptions {
    /// Image holding `weft` (sidecar and iptables init container).
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// imagePullPolicy of the injected containers (IfNotPresent suits `weft:latest` loaded into kind).
    #[arg(long, value_name = "POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    pub image_pull_policy: String,
    /// URL of `weft-ca serve` as seen from the pods.
    #[arg(long, value_name = "URL", default_value = DEFAULT_CA_URL)]
    pub ca_url: String,
    /// Audience of the projected service-account token (`weft-ca serve --k8s-audience`).
    #[arg(long, value_name = "AUDIENCE", default_value = DEFAULT_CA_AUDIENCE)]
    pub ca_audience: String,
    /// ConfigMap (in the workload's namespace) whose `ca.pem` verifies the CA.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_CA_BUNDLE_CONFIGMAP)]
    pub ca_bundle_configmap: String,
    /// ConfigMap (in the workload's namespace) whose `mesh.toml` is the mesh file.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_MESH_CONFIGMAP)]
    pub mesh_configmap: String,
    /// SPIFFE trust domain of the CA; the sidecar expects spiffe://TD/ns/NS/sa/SA.
    #[arg(long, value_name = "TD", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// What the sidecar does with intercepted connections to no mesh service.
    #[arg(long, value_name = "POLICY", default_value = "allow", value_parser = ["allow", "deny"])]
    pub outbound_policy: String,
    /// Ports whose protocol talks first from the server (no protocol sniffing)
    /// [default: the sidecar's own default list].
    #[arg(long, value_name = "LIST")]
    pub server_first_ports: Option<String>,
    /// How long the sidecar drains at shutdown; the pod's grace period is set above it.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: DEFAULT_IMAGE.to_string(),
            image_pull_policy: "IfNotPresent".to_string(),
            ca_url: DEFAULT_CA_URL.to_string(),
            ca_audience: DEFAULT_CA_AUDIENCE.to_string(),
            ca_bundle_configmap: DEFAULT_CA_BUNDLE_CONFIGMAP.to_string(),
            mesh_configmap: DEFAULT_MESH_CONFIGMAP.to_string(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            outbound_policy: "allow".to_string(),
            server_first_ports: None,
            drain_timeout: Duration::from_secs(20),
        }
    }
}

impl InjectOptions {
    /// Check the options before touching any document.
    pub fn validate(&self) -> Result<(), InjectError> {
        let bad = |what: String| Err(InjectError::Option(what));
        if self.image.is_empty() || self.image.chars().any(char::is_whitespace) {
            return bad(format!(
                "--image {:?} is not an image reference",
                self.image
            ));
        }
        if !self.ca_url.starts_with("https://") {
            return bad(format!(
                "--ca-url {:?} must be an https:// URL (weft-ca serves HTTPS only)",
                self.ca_url
            ));
        }
        for (flag, name) in [
            ("--ca-bundle-configmap", &self.ca_bundle_configmap),
            ("--mesh-configmap", &self.mesh_configmap),
        ] {
            if !is_dns_subdomain(name) {
                return bad(format!(
                    "{flag} {name:?} is not a Kubernetes object name (lowercase letters, \
                     digits, '-' and '.')"
                ));
            }
        }
        if self.ca_audience.is_empty() {
            return bad("--ca-audience must not be empty".into());
        }
        if let Err(e) = weft_transport::spiffe::validate_trust_domain(&self.trust_domain) {
            return bad(format!("--trust-domain {:?}: {e}", self.trust_domain));
        }
        if let Some(list) = &self.server_first_ports {
            for p in list.split(',') {
                if !matches!(p.trim().parse::<u16>(), Ok(n) if n > 0) {
                    return bad(format!(
                        "--server-first-ports {list:?}: {p:?} is not a port number"
                    ));
                }
            }
        }
        if self.drain_timeout.is_zero() {
            return bad("--drain-timeout must be more than 0s".into());
        }
        Ok(())
    }

    /// The pod's `terminationGracePeriodSeconds`: the drain plus 10 s for the app.
    fn grace_seconds(&self) -> u64 {
        (self.drain_timeout.as_secs_f64().ceil() as u64).saturating_add(10)
    }
}

/// `weft inject` arguments.
#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// YAML to read, one or more documents (`-` for stdin).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: String,
    /// Write the result to OUT (replaced atomically) instead of stdout.
    #[arg(
        short = 'o',
        long = "output",
        value_name = "OUT",
        conflicts_with = "dry_run"
    )]
    pub output: Option<PathBuf>,
    /// Print a unified diff of what injection would change instead of the result.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub options: InjectOptions,
}

/// Why a stream could not be injected. Nothing is written when this happens.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {index} (starting at line {line}): {reason}")]
    Document {
        /// 1-based position of the document in the stream.
        index: usize,
        /// 1-based line where the document starts.
        line: usize,
        reason: String,
    },
    #[error("{0}")]
    Option(String),
}

/// The result of injecting a stream.
#[derive(Debug, Default)]
pub struct Injected {
    /// The new stream.
    pub output: String,
    /// One line per workload: injected, unchanged or skipped (and why).
    pub notes: Vec<String>,
}

/// Inject every workload of a multi-document YAML stream.
pub fn inject_stream(input: &str, opts: &InjectOptions) -> Result<Injected, InjectError> {
    opts.validate()?;
    let mut out = Injected::default();
    for (i, doc) in split_documents(input).into_iter().enumerate() {
        let fail = |reason: String| InjectError::Document {
            index: i + 1,
            line: doc.line,
            reason,
        };
        let original: Value = serde_yaml_ng::from_str(doc.text).map_err(|e| {
            let msg = rebase_lines(&e.to_string(), doc.line - 1);
            fail(match e.location() {
                Some(loc) => format!(
                    "line {}, column {}: {}",
                    doc.line + loc.line() - 1,
                    loc.column(),
                    msg.replace(
                        &format!(
                            " at line {} column {}",
                            doc.line + loc.line() - 1,
                            loc.column()
                        ),
                        ""
                    )
                ),
                None => msg,
            })
        })?;
        let mut value = original.clone();
        let mut notes = Vec::new();
        transform(&mut value, opts, &mut notes).map_err(fail)?;
        if value == original {
            out.output.push_str(doc.text);
        } else {
            if is_marker(doc.text) {
                out.output.push_str("---\n");
            }
            let text = serde_yaml_ng::to_string(&value).map_err(|e| fail(e.to_string()))?;
            out.output.push_str(&text);
        }
        out.notes.extend(notes);
    }
    Ok(out)
}

/// Every document of a stream, parsed (empty ones as `Value::Null`).
pub fn parse_stream(input: &str) -> Result<Vec<Value>, InjectError> {
    split_documents(input)
        .into_iter()
        .enumerate()
        .map(|(i, doc)| {
            serde_yaml_ng::from_str(doc.text).map_err(|e| InjectError::Document {
                index: i + 1,
                line: doc.line,
                reason: rebase_lines(&e.to_string(), doc.line - 1),
            })
        })
        .collect()
}

/// Run `weft inject`: read, inject, then write everything or nothing.
pub fn run(args: InjectArgs) -> ExitCode {
    match run_inner(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft inject: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: &InjectArgs) -> Result<(), String> {
    let (input, origin) = if args.file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("reading stdin: {e}"))?;
        (text, "stdin".to_string())
    } else {
        let text = std::fs::read_to_string(&args.file)
            .map_err(|e| format!("reading {}: {e}", args.file))?;
        (text, args.file.clone())
    };
    let injected = inject_stream(&input, &args.options).map_err(|e| match e {
        InjectError::Option(_) => e.to_string(),
        _ => format!("{origin}: {e}; nothing was written"),
    })?;
    for note in &injected.notes {
        eprintln!("weft inject: {note}");
    }
    if args.dry_run {
        let diff = similar::TextDiff::from_lines(&input, &injected.output)
            .unified_diff()
            .context_radius(3)
            .header(&origin, &format!("{origin} (injected)"))
            .to_string();
        return write_stdout(&diff);
    }
    match &args.output {
        None => write_stdout(&injected.output),
        Some(path) => write_atomically(path, &injected.output),
    }
}

fn write_stdout(text: &str) -> Result<(), String> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("writing stdout: {e}"))
}

fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{name}.weft-inject.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("writing {}: {e}", path.display())
        })
}

// ---- the stream ---------------------------------------------------------------

/// One document of a stream: its exact text (with the `---` line opening it,
/// if any) and the 1-based line it starts on.
struct Doc<'a> {
    text: &'a str,
    line: usize,
}

/// Split at `---` lines. YAML forbids such a line inside any scalar (it is a
/// "c-forbidden" document marker), so this split is exact.
fn split_documents(input: &str) -> Vec<Doc<'_>> {
    let mut docs = Vec::new();
    let (mut start, mut start_line, mut pos) = (0, 1, 0);
    for (i, line) in input.split_inclusive('\n').enumerate() {
        if pos > 0 && is_marker(line) {
            docs.push(Doc {
                text: &input[start..pos],
                line: start_line,
            });
            start = pos;
            start_line = i + 1;
        }
        pos += line.len();
    }
    docs.push(Doc {
        text: &input[start..],
        line: start_line,
    });
    docs
}

/// libyaml counts lines from the document's start: make every "at line N"
/// in `msg` a line of the whole stream.
fn rebase_lines(msg: &str, offset: usize) -> String {
    const AT: &str = " at line ";
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(AT) {
        let (head, tail) = rest.split_at(i + AT.len());
        out.push_str(head);
        let digits = tail.len() - tail.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// Whether `text` starts with a `---` document marker.
fn is_marker(text: &str) -> bool {
    text.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

// ---- documents ----------------------------------------------------------------

/// Inject the workload in `doc`, if it is one (or a List of them).
fn transform(doc: &mut Value, opts: &InjectOptions, notes: &mut Vec<String>) -> Result<(), String> {
    let Value::Mapping(map) = doc else {
        return Ok(());
    };
    let api = str_at(map, "apiVersion").unwrap_or_default().to_string();
    let kind = str_at(map, "kind").unwrap_or_default().to_string();
    let who = describe(map, &kind);
    let path: &[&str] = match (api.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let Some(Value::Sequence(items)) = map.get_mut("items") else {
                return Ok(());
            };
            for (i, item) in items.iter_mut().enumerate() {
                transform(item, opts, notes).map_err(|e| format!("items[{i}]: {e}"))?;
            }
            return Ok(());
        }
        ("v1", "Pod") => &[],
        ("v1", "ReplicationController")
        | ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch/v1", "Job") => &["spec", "template"],
        ("batch/v1", "CronJob") => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(()),
    };
    let before = map.clone();
    let pod = mapping_at(map, path).map_err(|e| format!("{who}: {e}"))?;
    match inject_pod(pod, opts).map_err(|e| format!("{who}: {e}"))? {
        Some(skipped) => notes.push(format!("{who}: not injected: {skipped}")),
        None if *map == before => notes.push(format!("{who}: already injected, unchanged")),
        None => notes.push(format!("{who}: injected")),
    }
    Ok(())
}

/// `Kind namespace/name` for messages.
fn describe(map: &Mapping, kind: &str) -> String {
    let meta = map.get("metadata");
    let field = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    let name = field("name").unwrap_or("(no name)");
    match field("namespace") {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn str_at<'a>(map: &'a Mapping, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str)
}

/// The mapping at `path` below `map`, or what is wrong with it.
fn mapping_at<'a>(map: &'a mut Mapping, path: &[&str]) -> Result<&'a mut Mapping, String> {
    let mut cur = map;
    for (i, key) in path.iter().enumerate() {
        cur = match cur.get_mut(*key) {
            Some(Value::Mapping(m)) => m,
            Some(_) => return Err(format!("{} is not a mapping", path[..=i].join("."))),
            None => return Err(format!("{} is missing", path[..=i].join("."))),
        };
    }
    Ok(cur)
}

/// A list field of `spec` (absent or null: empty), as owned values.
fn list(spec: &Mapping, key: &str) -> Result<Vec<Value>, String> {
    match spec.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Sequence(s)) => Ok(s.clone()),
        Some(_) => Err(format!("spec.{key} is not a list")),
    }
}

fn name_of(item: &Value) -> Option<&str> {
    item.get("name").and_then(Value::as_str)
}

/// Inject one pod (or pod template: `metadata` and `spec`). `Ok(Some(why))`
/// when the pod must not be injected; it is then left as it was.
fn inject_pod(pod: &mut Mapping, opts: &InjectOptions) -> Result<Option<String>, String> {
    let annotations = pod.get("metadata").and_then(|m| m.get("annotations"));
    let annotation = |k: &str| annotations.and_then(|a| a.get(k)).and_then(Value::as_str);
    if let Some(v @ ("false" | "disabled")) = annotation(INJECT_ANNOTATION) {
        return Ok(Some(format!("annotation {INJECT_ANNOTATION}: {v:?}")));
    }
    let app_port_annotation = annotation(APP_PORT_ANNOTATION).map(str::to_string);
    let spec = mapping_at(pod, &["spec"])?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Some(
            "hostNetwork: true (iptables rules would apply to the node itself)".into(),
        ));
    }

    let containers = list(spec, "containers")?;
    if containers.is_empty() {
        return Err("spec.containers is empty or missing".into());
    }
    let mut first_port = None;
    // kubelet probes come from the node as plain TCP: strict mode must let them in.
    let mut probe_ports = std::collections::BTreeSet::new();
    for c in &containers {
        let name = name_of(c).ok_or("a container in spec.containers has no name")?;
        if name == SIDECAR_CONTAINER || name == IPTABLES_CONTAINER {
            return Err(format!(
                "container name {name:?} is reserved for weft; rename the container"
            ));
        }
        for p in c
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let Some(port) = p.get("containerPort").and_then(Value::as_u64) else {
                continue;
            };
            if [ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT]
                .iter()
                .any(|r| u64::from(*r) == port)
            {
                return Err(format!(
                    "container {name:?} uses port {port}, which the sidecar needs \
                     ({ADMIN_PORT} admin, {OUTBOUND_PORT} outbound, {INBOUND_PORT} inbound \
                     QUIC); move the app to another port"
                ));
            }
            let tcp = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP";
            if first_port.is_none() && tcp {
                first_port = u16::try_from(port).ok();
            }
        }
        probe_ports.extend(probe_ports_of(c));
    }
    // Traffic of the sidecar's UID bypasses the iptables rules.
    let uid = |v: Option<&Value>| v.and_then(|s| s.get("runAsUser")).and_then(Value::as_u64);
    let user_init = list(spec, "initContainers")?;
    let bypass = containers
        .iter()
        .chain(user_init.iter().filter(|c| {
            !name_of(c).is_some_and(|n| n == IPTABLES_CONTAINER || n == SIDECAR_CONTAINER)
        }))
        .find(|c| uid(c.get("securityContext")) == Some(PROXY_UID.into()))
        .map(|c| format!("container {:?}", name_of(c).unwrap_or_default()))
        .or_else(|| {
            (uid(spec.get("securityContext")) == Some(PROXY_UID.into()))
                .then(|| "the pod".to_string())
        });
    if let Some(who) = bypass {
        return Err(format!(
            "{who} runs as UID {PROXY_UID}, the sidecar's: its traffic would bypass the \
             mesh; run it as another user"
        ));
    }
    let app_port = match app_port_annotation {
        Some(text) => Some(match text.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(format!(
                    "annotation {APP_PORT_ANNOTATION}: {text:?} is not a port number"
                ))
            }
        }),
        None => first_port,
    };

    // What an earlier injection added goes; ours come first (so the app's own
    // init containers already run with the mesh) and are built fresh.
    let theirs = |v: &Value, ours: &[&str]| !name_of(v).is_some_and(|n| ours.contains(&n));
    let mut init = vec![
        to_value(&iptables_container(opts, &probe_ports))?,
        to_value(&sidecar_container(opts, app_port))?,
    ];
    init.extend(
        list(spec, "initContainers")?
            .into_iter()
            .filter(|c| theirs(c, &[IPTABLES_CONTAINER, SIDECAR_CONTAINER])),
    );
    let mut volumes: Vec<Value> = list(spec, "volumes")?
        .into_iter()
        .filter(|v| theirs(v, &OUR_VOLUMES))
        .collect();
    for v in our_volumes(opts) {
        volumes.push(to_value(&v)?);
    }
    // `insert` keeps an existing key where it is, so a re-injected document
    // keeps its layout.
    spec.insert("initContainers".into(), Value::Sequence(init));
    spec.insert("volumes".into(), Value::Sequence(volumes));
    if !spec.contains_key("terminationGracePeriodSeconds") {
        spec.insert(
            "terminationGracePeriodSeconds".into(),
            Value::Number(opts.grace_seconds().into()),
        );
    }

    let metadata = child_mapping(pod, "metadata")?;
    let annotations =
        child_mapping(metadata, "annotations").map_err(|e| format!("metadata.{e}"))?;
    // A pod that already tells Prometheus where its metrics are keeps that.
    if !annotations.contains_key("prometheus.io/scrape") {
        for (k, v) in [
            ("prometheus.io/scrape", "true".to_string()),
            ("prometheus.io/port", ADMIN_PORT.to_string()),
            ("prometheus.io/path", "/metrics".to_string()),
        ] {
            annotations.insert(k.into(), v.into());
        }
    }
    annotations.insert(INJECTED_ANNOTATION.into(), "true".into());
    Ok(None)
}

/// The TCP ports a container's probes use (named ports resolved).
fn probe_ports_of(c: &Value) -> Vec<u16> {
    let named = |name: &str| {
        c.get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| p.get("containerPort"))
            .and_then(Value::as_u64)
    };
    let mut ports = Vec::new();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        for kind in ["httpGet", "tcpSocket", "grpc"] {
            let Some(action) = c.get(probe).and_then(|p| p.get(kind)) else {
                continue;
            };
            // A probe of another host does not come into this pod.
            if action.get("host").is_some() {
                continue;
            }
            let port = match action.get("port") {
                Some(Value::Number(n)) => n.as_u64(),
                Some(Value::String(s)) => s.parse().ok().or_else(|| named(s)),
                _ => None,
            };
            if let Some(p) = port.and_then(|p| u16::try_from(p).ok()) {
                ports.push(p);
            }
        }
    }
    ports
}

/// The mapping under `key`, created when absent or null (`annotations:`).
fn child_mapping<'a>(map: &'a mut Mapping, key: &str) -> Result<&'a mut Mapping, String> {
    let slot = map
        .entry(key.into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if slot.is_null() {
        *slot = Value::Mapping(Mapping::new());
    }
    match slot {
        Value::Mapping(m) => Ok(m),
        _ => Err(format!("{key} is not a mapping")),
    }
}

fn to_value<T: Serialize>(v: &T) -> Result<Value, String> {
    serde_yaml_ng::to_value(v).map_err(|e| format!("building the sidecar: {e}"))
}

/// RFC 1123 subdomain, as Kubernetes object names.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
#[path = "inject/tests.rs"]
mod tests;
