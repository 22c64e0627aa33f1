//! Unit tests of `weft inject`'s transformation (the binary and kubectl
//! validation are tested in tests/tests/kubernetes.rs).

use super::*;

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: payment
  namespace: shop
spec:
  selector:
    matchLabels:
      app: payment
  template:
    metadata:
      labels:
        app: payment
    spec:
      serviceAccountName: payment
      initContainers:
      - name: migrate
        image: busybox:1.37
        command: [\"true\"]
      containers:
      - name: app
        image: hashicorp/http-echo:1.0.0
        ports:
        - containerPort: 8080
      volumes:
      - name: data
        emptyDir: {}
";

const SERVICE: &str = "\
# The service stays exactly as written, comments and all.
apiVersion: v1
kind: Service
metadata:
  name: payment   # trailing comment
spec:
  ports: [{port: 80, targetPort: 8080}]
";

fn inject(text: &str) -> Injected {
    inject_stream(text, &InjectOptions::default()).expect("inject")
}

fn parse(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("yaml")
}

fn pod_spec(doc: &Value) -> &Value {
    &doc["spec"]["template"]["spec"]
}

fn names(list: &Value) -> Vec<&str> {
    list.as_sequence()
        .expect("list")
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect()
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|v| v.as_str().expect("string arg"))
        .collect()
}

#[test]
fn deployment_gets_iptables_then_native_sidecar_then_its_own_init_containers() {
    let out = parse(&inject(DEPLOYMENT).output);
    let spec = pod_spec(&out);
    assert_eq!(
        names(&spec["initContainers"]),
        ["weft-iptables", "weft-sidecar", "migrate"]
    );
    assert_eq!(names(&spec["containers"]), ["app"]);
    let iptables = &spec["initContainers"][0];
    assert!(iptables.get("restartPolicy").is_none(), "runs once");
    assert_eq!(iptables["securityContext"]["runAsUser"], 0);
    assert_eq!(
        iptables["securityContext"]["capabilities"],
        parse("{add: [NET_ADMIN, NET_RAW], drop: [ALL]}")
    );
    assert_eq!(
        args(iptables),
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
            "15000,15008"
        ]
    );

    let sidecar = &spec["initContainers"][1];
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(
        sidecar["startupProbe"]["httpGet"],
        parse("{path: /ready, port: 15000}")
    );
    let sc = &sidecar["securityContext"];
    assert_eq!(sc["runAsUser"], 1337);
    assert_eq!(sc["runAsGroup"], 1337);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], parse("{drop: [ALL]}"));
    for c in [iptables, sidecar] {
        for r in ["requests", "limits"] {
            assert!(c["resources"][r]["cpu"].is_string(), "{r} in {c:?}");
            assert!(c["resources"][r]["memory"].is_string(), "{r} in {c:?}");
        }
    }
    let a = args(sidecar);
    for flag in [
        "sidecar",
        "--mesh=/etc/weft/mesh/mesh.toml",
        "--ca=https://weft-ca.weft-system.svc:8443",
        "--ca-bundle=/etc/weft/ca/ca.pem",
        "--k8s-token-file=/var/run/secrets/weft/token",
        "--spiffe-id=spiffe://cluster.local/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)",
        "--admin=0.0.0.0:15000",
        "--app=127.0.0.1:8080",
        "--capture-outbound=127.0.0.1:15001",
        "--capture-outbound=[::1]:15001",
        "--outbound-policy=allow",
        "--drain-timeout=20s",
    ] {
        assert!(a.contains(&flag), "{flag} missing from {a:?}");
    }
    // The sidecar's own default list applies unless inject is told otherwise.
    assert!(!a.iter().any(|f| f.starts_with("--server-first-ports")));

    assert_eq!(
        names(&spec["volumes"]),
        [
            "data",
            "weft-token",
            "weft-ca-bundle",
            "weft-mesh",
            "weft-xtables-lock"
        ]
    );
    assert_eq!(
        spec["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "weft-ca"
    );
    assert_eq!(spec["terminationGracePeriodSeconds"], 30);
    let ann = &out["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["weft.dev/injected"], "true");
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "15000");
    assert_eq!(ann["prometheus.io/path"], "/metrics");
    // Nothing else moved.
    assert_eq!(
        out["spec"]["selector"],
        parse(DEPLOYMENT)["spec"]["selector"]
    );
}

#[test]
fn injecting_twice_changes_nothing_byte_for_byte() {
    let stream = format!("{SERVICE}---\n{DEPLOYMENT}---\n{SERVICE}");
    let once = inject(&stream);
    let twice = inject(&once.output);
    assert_eq!(once.output, twice.output);
    assert_eq!(
        twice.notes,
        ["Deployment shop/payment: already injected, unchanged"]
    );
    assert_eq!(once.notes, ["Deployment shop/payment: injected"]);
}

#[test]
fn other_documents_pass_through_exactly_and_in_order() {
    let stream = format!("{SERVICE}---\n{DEPLOYMENT}--- # a comment on the marker\n{SERVICE}");
    let out = inject(&stream).output;
    assert!(out.starts_with(SERVICE), "{out}");
    assert!(
        out.ends_with(&format!("--- # a comment on the marker\n{SERVICE}")),
        "{out}"
    );
    let docs = split_documents(&out);
    assert_eq!(docs.len(), 3);
    assert_eq!(parse(docs[1].text)["kind"], "Deployment");
    assert!(docs[1].text.starts_with("---\n"));
}

#[test]
fn reinjecting_rebuilds_what_an_older_injection_added() {
    let old = inject(DEPLOYMENT).output;
    let opts = InjectOptions {
        image: "registry.example/weft:0.2.0".into(),
        ..InjectOptions::default()
    };
    let new = parse(&inject_stream(&old, &opts).expect("inject").output);
    let spec = pod_spec(&new);
    assert_eq!(
        names(&spec["initContainers"]),
        ["weft-iptables", "weft-sidecar", "migrate"]
    );
    assert_eq!(names(&spec["volumes"]).len(), 5);
    for c in 0..2 {
        assert_eq!(
            spec["initContainers"][c]["image"],
            "registry.example/weft:0.2.0"
        );
    }
}

#[test]
fn every_workload_kind_is_injected_at_its_pod_template() {
    let pod_spec_text = "spec:\n  containers:\n  - name: app\n    image: nginx:1.27\n";
    let indent = |text: &str, n: usize| {
        text.lines()
            .map(|l| format!("{}{l}\n", " ".repeat(n)))
            .collect::<String>()
    };
    let cases = [
        ("v1", "Pod", String::new(), vec![]),
        (
            "apps/v1",
            "StatefulSet",
            "spec:\n  template:\n".into(),
            vec!["spec", "template"],
        ),
        (
            "apps/v1",
            "DaemonSet",
            "spec:\n  template:\n".into(),
            vec!["spec", "template"],
        ),
        (
            "batch/v1",
            "Job",
            "spec:\n  template:\n".into(),
            vec!["spec", "template"],
        ),
        (
            "batch/v1",
            "CronJob",
            "spec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n".into(),
            vec!["spec", "jobTemplate", "spec", "template"],
        ),
    ];
    for (api, kind, prefix, path) in cases {
        let body = indent(pod_spec_text, path.len() * 2);
        let text = format!("apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: x\n{prefix}{body}");
        let out = parse(&inject(&text).output);
        let mut pod = &out;
        for key in &path {
            pod = &pod[*key];
        }
        assert_eq!(
            names(&pod["spec"]["initContainers"]),
            ["weft-iptables", "weft-sidecar"],
            "{kind}: {out:?}"
        );
        assert_eq!(pod["metadata"]["annotations"]["weft.dev/injected"], "true");
        // No port on the container: the sidecar has no --app.
        let sidecar = args(&pod["spec"]["initContainers"][1]);
        assert!(
            !sidecar.iter().any(|a| a.starts_with("--app")),
            "{sidecar:?}"
        );
    }
}

#[test]
fn null_metadata_and_annotations_are_filled_in() {
    let text = DEPLOYMENT.replace(
        "    metadata:\n      labels:\n        app: payment\n",
        "    metadata:\n      labels:\n        app: payment\n      annotations:\n",
    );
    let out = parse(&inject(&text).output);
    assert_eq!(
        out["spec"]["template"]["metadata"]["annotations"]["weft.dev/injected"],
        "true"
    );
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\nspec:\n  containers: [{name: a, image: b}]\n";
    let out = parse(&inject(pod).output);
    assert_eq!(out["metadata"]["annotations"]["weft.dev/injected"], "true");
    let bad = "apiVersion: v1\nkind: Pod\nmetadata: {annotations: [x]}\nspec:\n  containers: [{name: a, image: b}]\n";
    let err = inject_stream(bad, &InjectOptions::default()).expect_err("list annotations");
    assert!(
        err.to_string()
            .contains("metadata.annotations is not a mapping"),
        "{err}"
    );
}

#[test]
fn list_items_are_injected() {
    let text = format!(
        "apiVersion: v1\nkind: List\nitems:\n{}",
        DEPLOYMENT
            .lines()
            .enumerate()
            .map(|(i, l)| format!("{}{l}\n", if i == 0 { "- " } else { "  " }))
            .collect::<String>()
    );
    let out = parse(&inject(&text).output);
    assert_eq!(
        names(&pod_spec(&out["items"][0])["initContainers"]),
        ["weft-iptables", "weft-sidecar", "migrate"]
    );
}

#[test]
fn unknown_kinds_and_versions_pass_through() {
    for text in [
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n",
        "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: x}\n",
        "just a string\n",
        "# only a comment\n",
        "",
    ] {
        let out = inject(text);
        assert_eq!(out.output, text);
        assert!(out.notes.is_empty(), "{:?}", out.notes);
    }
}

#[test]
fn opted_out_and_host_network_pods_are_left_alone() {
    let opted_out = DEPLOYMENT.replace(
        "      labels:\n        app: payment\n",
        "      labels:\n        app: payment\n      annotations:\n        weft.dev/inject: \"false\"\n",
    );
    let host = DEPLOYMENT.replace(
        "      serviceAccountName: payment\n",
        "      serviceAccountName: payment\n      hostNetwork: true\n",
    );
    for (text, why) in [(&opted_out, "weft.dev/inject"), (&host, "hostNetwork")] {
        let out = inject(text);
        assert_eq!(&out.output, text);
        assert_eq!(out.notes.len(), 1);
        assert!(out.notes[0].contains("not injected") && out.notes[0].contains(why));
    }
}

#[test]
fn app_port_annotation_wins_and_existing_prometheus_annotations_are_kept() {
    let text = DEPLOYMENT.replace(
        "      labels:\n        app: payment\n",
        "      labels:\n        app: payment\n      annotations:\n        weft.dev/app-port: \"9090\"\n        prometheus.io/scrape: \"true\"\n        prometheus.io/port: \"8080\"\n",
    );
    let out = parse(&inject(&text).output);
    assert!(args(&pod_spec(&out)["initContainers"][1]).contains(&"--app=127.0.0.1:9090"));
    let ann = &out["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/port"], "8080");
    assert!(ann.get("prometheus.io/path").is_none());
}

#[test]
fn user_errors_name_the_document_and_the_line() {
    let bad =
        format!("{SERVICE}---\n{DEPLOYMENT}---\nkind: Service\nmetadata:\n  name: [unclosed\n");
    let err = inject_stream(&bad, &InjectOptions::default()).expect_err("malformed");
    let msg = err.to_string();
    let start = SERVICE.lines().count() + DEPLOYMENT.lines().count() + 2;
    assert!(
        msg.starts_with(&format!(
            "document 3 (starting at line {start}): line {}, column 1: did not find expected",
            start + 4
        )) && msg.ends_with(&format!("at line {} column 9", start + 3)),
        "{msg}"
    );

    for (text, part) in [
        (
            DEPLOYMENT.replace("containerPort: 8080", "containerPort: 15000"),
            "uses port 15000",
        ),
        (
            DEPLOYMENT.replace("- name: app", "- name: weft-sidecar"),
            "reserved for weft",
        ),
        (
            DEPLOYMENT.replace(
                "      volumes:\n      - name: data\n        emptyDir: {}\n",
                "      volumes: 3\n",
            ),
            "spec.volumes is not a list",
        ),
        (
            DEPLOYMENT.replace(
                "        - containerPort: 8080\n",
                "        - containerPort: 8080\n        securityContext: {runAsUser: 1337}\n",
            ),
            "container \"app\" runs as UID 1337",
        ),
        (
            DEPLOYMENT.replace(
                "      serviceAccountName: payment\n",
                "      serviceAccountName: payment\n      securityContext: {runAsUser: 1337}\n",
            ),
            "the pod runs as UID 1337",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n".into(),
            "Deployment x: spec.template is missing",
        ),
    ] {
        let err = inject_stream(&text, &InjectOptions::default()).expect_err(part);
        assert!(err.to_string().contains(part), "{err} should say {part}");
        assert!(err.to_string().starts_with("document 1 "), "{err}");
    }
}

#[test]
fn bad_options_are_refused_before_any_document() {
    for (opts, part) in [
        (
            InjectOptions {
                ca_url: "http://ca:80".into(),
                ..InjectOptions::default()
            },
            "https://",
        ),
        (
            InjectOptions {
                trust_domain: "Not Valid".into(),
                ..InjectOptions::default()
            },
            "--trust-domain",
        ),
        (
            InjectOptions {
                mesh_configmap: "Mesh_Config".into(),
                ..InjectOptions::default()
            },
            "--mesh-configmap",
        ),
        (
            InjectOptions {
                server_first_ports: Some("25,smtp".into()),
                ..InjectOptions::default()
            },
            "--server-first-ports",
        ),
    ] {
        let err = inject_stream(DEPLOYMENT, &opts).expect_err(part);
        assert!(err.to_string().contains(part), "{err}");
    }
}

#[test]
fn documents_split_only_at_markers() {
    let text = "a: |\n  ---\n  not a marker\n---\nb: 1\n---x: not a marker either\n--- \nc: 2\n";
    let docs = split_documents(text);
    let texts: Vec<&str> = docs.iter().map(|d| d.text).collect();
    assert_eq!(
        texts,
        [
            "a: |\n  ---\n  not a marker\n",
            "---\nb: 1\n---x: not a marker either\n",
            "--- \nc: 2\n"
        ]
    );
    assert_eq!(docs.iter().map(|d| d.line).collect::<Vec<_>>(), [1, 4, 7]);
    assert_eq!(texts.concat(), text);
}

#[test]
fn ports_of_the_apps_probes_stay_open_to_kubelet() {
    let text = DEPLOYMENT.replace(
        "        - containerPort: 8080\n",
        "        - containerPort: 8080\n          name: http\n        - containerPort: 9090\n\
         \x20       readinessProbe: {httpGet: {path: /healthz, port: http}}\n\
         \x20       livenessProbe: {tcpSocket: {port: 9090}}\n\
         \x20       startupProbe: {httpGet: {host: example.org, port: 80}}\n",
    );
    let out = parse(&inject(&text).output);
    let a = args(&pod_spec(&out)["initContainers"][0]);
    assert_eq!(
        a[a.len() - 2..],
        ["--exclude-inbound-ports", "15000,15008,8080,9090"]
    );
}

#[test]
fn injected_commands_parse_as_the_weft_cli() {
    use clap::Parser;
    let out = parse(&inject(DEPLOYMENT).output);
    for c in pod_spec(&out)["initContainers"]
        .as_sequence()
        .expect("init containers")
        .iter()
        .take(2)
    {
        assert_eq!(c["command"], parse("[weft]"));
        let argv = std::iter::once("weft").chain(args(c));
        if let Err(e) = crate::cli::Cli::try_parse_from(argv) {
            panic!(
                "{}: `weft {}` does not parse: {e}",
                c["name"].as_str().unwrap_or("?"),
                args(c).join(" ")
            );
        }
    }
}
