//! What `weft inject` adds to a pod: the iptables init container, the native
//! sidecar and their volumes. The one definition: `deploy/k8s/overlays/demo`
//! is its output (checked by tests/tests/kubernetes.rs), and the unit tests
//! parse the commands built here with the real `weft` CLI.

use std::collections::BTreeSet;

use serde::Serialize;

use super::{
    InjectOptions, ADMIN_PORT, CA_BUNDLE_VOLUME, CA_DIR, INBOUND_PORT, IPTABLES_CONTAINER,
    MESH_DIR, MESH_VOLUME, OUTBOUND_PORT, PROXY_UID, SIDECAR_CONTAINER, TOKEN_DIR, TOKEN_VOLUME,
    XTABLES_VOLUME,
};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Container {
    name: &'static str,
    image: String,
    image_pull_policy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_policy: Option<&'static str>,
    command: Vec<String>,
    args: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<EnvVar>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ports: Vec<Port>,
    #[serde(skip_serializing_if = "Option::is_none")]
    startup_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    readiness_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    liveness_probe: Option<Probe>,
    resources: Resources,
    security_context: SecurityContext,
    volume_mounts: Vec<Mount>,
    /// Why it stopped, in `kubectl describe`, even when it died before writing one.
    termination_message_policy: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvVar {
    name: &'static str,
    value_from: EnvSource,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvSource {
    field_ref: FieldRef,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FieldRef {
    field_path: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Port {
    name: &'static str,
    container_port: u16,
    protocol: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    http_get: HttpGet,
    period_seconds: u32,
    timeout_seconds: u32,
    failure_threshold: u32,
}

#[derive(Serialize)]
struct HttpGet {
    path: &'static str,
    port: u16,
}

#[derive(Serialize)]
struct Resources {
    requests: Quantities,
    limits: Quantities,
}

#[derive(Serialize)]
struct Quantities {
    cpu: &'static str,
    memory: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SecurityContext {
    run_as_user: u32,
    run_as_group: u32,
    run_as_non_root: bool,
    privileged: bool,
    allow_privilege_escalation: bool,
    read_only_root_filesystem: bool,
    capabilities: Capabilities,
    seccomp_profile: Seccomp,
}

#[derive(Serialize)]
struct Capabilities {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    add: Vec<&'static str>,
    drop: Vec<&'static str>,
}

#[derive(Serialize)]
struct Seccomp {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Mount {
    name: &'static str,
    mount_path: &'static str,
    read_only: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Volume {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    projected: Option<Projected>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config_map: Option<ConfigMapRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    empty_dir: Option<EmptyDir>,
}

#[derive(Serialize)]
struct Projected {
    sources: Vec<TokenSource>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenSource {
    service_account_token: Token,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Token {
    audience: String,
    expiration_seconds: u32,
    path: &'static str,
}

#[derive(Serialize)]
struct ConfigMapRef {
    name: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EmptyDir {
    medium: &'static str,
    size_limit: &'static str,
}

/// Locked down: no capabilities, no privilege escalation, read-only root.
fn security_context(uid: u32, add: Vec<&'static str>) -> SecurityContext {
    SecurityContext {
        run_as_user: uid,
        run_as_group: uid,
        run_as_non_root: uid != 0,
        privileged: false,
        allow_privilege_escalation: false,
        read_only_root_filesystem: true,
        capabilities: Capabilities {
            add,
            drop: vec!["ALL"],
        },
        seccomp_profile: Seccomp {
            kind: "RuntimeDefault",
        },
    }
}

/// Runs once before the sidecar: installs the interception rules in the
/// pod's network namespace. Root, but with NET_ADMIN and NET_RAW only.
pub(super) fn iptables_container(opts: &InjectOptions, probe_ports: &BTreeSet<u16>) -> Container {
    // Admin, so kubelet probes and Prometheus reach the sidecar (QUIC is UDP
    // anyway), and the ports of the app's own probes, which kubelet sends as
    // plain TCP from the node.
    let mut open = vec![ADMIN_PORT, INBOUND_PORT];
    open.extend(
        probe_ports
            .iter()
            .filter(|p| ![ADMIN_PORT, INBOUND_PORT].contains(p)),
    );
    let open = open
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let args = [
        "iptables",
        "install",
        "--proxy-uid",
        &PROXY_UID.to_string(),
        "--proxy-gid",
        &PROXY_UID.to_string(),
        "--outbound-port",
        &OUTBOUND_PORT.to_string(),
        "--inbound-mode",
        "strict",
        "--inbound-ports",
        "*",
        "--exclude-inbound-ports",
        &open,
    ];
    Container {
        name: IPTABLES_CONTAINER,
        image: opts.image.clone(),
        image_pull_policy: opts.image_pull_policy.clone(),
        restart_policy: None,
        command: vec!["weft".into()],
        args: args.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        ports: Vec::new(),
        startup_probe: None,
        readiness_probe: None,
        liveness_probe: None,
        resources: Resources {
            requests: Quantities {
                cpu: "10m",
                memory: "16Mi",
            },
            limits: Quantities {
                cpu: "100m",
                memory: "64Mi",
            },
        },
        security_context: security_context(0, vec!["NET_ADMIN", "NET_RAW"]),
        // iptables takes its lock in /run/xtables.lock; the root is read-only.
        termination_message_policy: "FallbackToLogsOnError",
        volume_mounts: vec![Mount {
            name: XTABLES_VOLUME,
            mount_path: "/run",
            read_only: false,
        }],
    }
}

/// The sidecar, as a native sidecar: started before the app containers,
/// which wait for its startup probe, and stopped after them.
pub(super) fn sidecar_container(opts: &InjectOptions, app_port: Option<u16>) -> Container {
    let mut args = vec![
        "sidecar".to_string(),
        format!("--mesh={MESH_DIR}/mesh.toml"),
        format!("--ca={}", opts.ca_url),
        format!("--ca-bundle={CA_DIR}/ca.pem"),
        format!("--k8s-token-file={TOKEN_DIR}/token"),
        // Kubernetes expands $(VAR) from the env below.
        format!(
            "--spiffe-id=spiffe://{}/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)",
            opts.trust_domain
        ),
        format!("--inbound=0.0.0.0:{INBOUND_PORT}"),
        // Not loopback: kubelet probes and Prometheus come from outside the pod.
        format!("--admin=0.0.0.0:{ADMIN_PORT}"),
    ];
    if let Some(port) = app_port {
        args.push(format!("--app=127.0.0.1:{port}"));
    }
    args.extend([
        format!("--capture-outbound=127.0.0.1:{OUTBOUND_PORT}"),
        format!("--capture-outbound=[::1]:{OUTBOUND_PORT}"),
        format!("--outbound-policy={}", opts.outbound_policy),
    ]);
    if let Some(list) = &opts.server_first_ports {
        args.push(format!("--server-first-ports={list}"));
    }
    args.push(format!(
        "--drain-timeout={}",
        humantime::format_duration(opts.drain_timeout)
    ));
    let probe = |path, period, failures| Probe {
        http_get: HttpGet {
            path,
            port: ADMIN_PORT,
        },
        period_seconds: period,
        timeout_seconds: 2,
        failure_threshold: failures,
    };
    let field = |name, field_path| EnvVar {
        name,
        value_from: EnvSource {
            field_ref: FieldRef { field_path },
        },
    };
    Container {
        name: SIDECAR_CONTAINER,
        image: opts.image.clone(),
        image_pull_policy: opts.image_pull_policy.clone(),
        restart_policy: Some("Always"),
        command: vec!["weft".into()],
        args,
        env: vec![
            field("POD_NAMESPACE", "metadata.namespace"),
            field("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ],
        ports: vec![
            Port {
                name: "weft-admin",
                container_port: ADMIN_PORT,
                protocol: "TCP",
            },
            Port {
                name: "weft-quic",
                container_port: INBOUND_PORT,
                protocol: "UDP",
            },
        ],
        // Up to 2 minutes to get a certificate before the app starts.
        startup_probe: Some(probe("/ready", 1, 120)),
        readiness_probe: Some(probe("/ready", 5, 3)),
        liveness_probe: Some(probe("/live", 10, 3)),
        resources: Resources {
            requests: Quantities {
                cpu: "100m",
                memory: "64Mi",
            },
            limits: Quantities {
                cpu: "1",
                memory: "256Mi",
            },
        },
        security_context: security_context(PROXY_UID, Vec::new()),
        termination_message_policy: "FallbackToLogsOnError",
        volume_mounts: vec![
            Mount {
                name: MESH_VOLUME,
                mount_path: MESH_DIR,
                read_only: true,
            },
            Mount {
                name: CA_BUNDLE_VOLUME,
                mount_path: CA_DIR,
                read_only: true,
            },
            Mount {
                name: TOKEN_VOLUME,
                mount_path: TOKEN_DIR,
                read_only: true,
            },
        ],
    }
}

pub(super) fn our_volumes(opts: &InjectOptions) -> [Volume; 4] {
    let none = || Volume {
        name: "",
        projected: None,
        config_map: None,
        empty_dir: None,
    };
    [
        Volume {
            name: TOKEN_VOLUME,
            // Only the sidecar mounts it; the kubelet refreshes it at 80 % of
            // its life and the sidecar re-reads it at every use.
            projected: Some(Projected {
                sources: vec![TokenSource {
                    service_account_token: Token {
                        audience: opts.ca_audience.clone(),
                        expiration_seconds: 3600,
                        path: "token",
                    },
                }],
            }),
            ..none()
        },
        Volume {
            name: CA_BUNDLE_VOLUME,
            config_map: Some(ConfigMapRef {
                name: opts.ca_bundle_configmap.clone(),
            }),
            ..none()
        },
        Volume {
            name: MESH_VOLUME,
            config_map: Some(ConfigMapRef {
                name: opts.mesh_configmap.clone(),
            }),
            ..none()
        },
        Volume {
            name: XTABLES_VOLUME,
            empty_dir: Some(EmptyDir {
                medium: "Memory",
                size_limit: "1Mi",
            }),
            ..none()
        },
    ]
}
