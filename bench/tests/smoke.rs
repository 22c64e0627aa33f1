//! Smoke run of `weft-bench compare --quick`: every scenario (direct, the
//! Weft pairs and the HAProxy pairs) sets up on loopback, carries a tiny
//! load for a fraction of a second, and produces numbers; the JSON,
//! markdown and SVG files are written. No timing assertions: this checks
//! that the benchmark works, not how fast anything is.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// target/{debug,release}/weft, built on demand (as tests/src/lib.rs does).
fn weft_binary() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_weft-bench"));
    let path = bench.with_file_name("weft");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "weft-proxy", "--bin", "weft"])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building the weft binary");
    }
    path
}

/// Run a weft-bench command; its stdout, after checking it succeeded.
fn succeed(cmd: &mut Command) -> String {
    let output = cmd.output().expect("running weft-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft-bench"))
}

#[test]
fn compare_quick_produces_every_scenario_and_file() {
    let out = tempfile::tempdir().expect("temp dir");
    let stdout = succeed(
        bench()
            .args(["compare", "--quick", "--quiet", "--out"])
            .arg(out.path())
            .arg("--weft")
            .arg(weft_binary()),
    );
    assert!(stdout.contains("| weft-http |"), "{stdout}");

    let json = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    let report: Value = serde_json::from_str(&json).expect("results.json is JSON");
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scenarios
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "direct",
            "weft-http",
            "weft-http-policy",
            "weft-tcp",
            "haproxy-h1",
            "haproxy-h2",
            "haproxy-tcp"
        ]
    );
    for s in scenarios {
        let name = s["name"].as_str().unwrap_or("?");
        assert!(
            s["skipped"].is_null(),
            "{name} was skipped: {} (.ci/run installs haproxy)",
            s["skipped"]
        );
        assert!(s["closed_rps"].as_f64().unwrap_or(0.0) > 0.0, "{name}: {s}");
        let rates = s["rates"].as_array().expect("rates");
        assert_eq!(rates.len(), 2, "{name}: {s}");
        for r in rates {
            assert!(
                r["latency"]["p99_ms"].as_f64().unwrap_or(0.0) > 0.0,
                "{name}: {r}"
            );
            assert!(
                r["achieved_rps"].as_f64().unwrap_or(0.0) > 0.0,
                "{name}: {r}"
            );
        }
        let bulk = matches!(name, "direct" | "weft-tcp" | "haproxy-tcp");
        assert_eq!(
            s["bulk_gbit_per_s"].as_f64().is_some_and(|g| g > 0.0),
            bulk,
            "{name}: {s}"
        );
        let proxies = s["proxies"].as_array().expect("proxies");
        assert_eq!(
            proxies.len(),
            if name == "direct" { 0 } else { 2 },
            "{name}"
        );
        for p in proxies {
            assert!(
                p["idle_rss_mib"].as_f64().unwrap_or(0.0) > 0.0,
                "{name}: {p}"
            );
            assert!(
                p["peak_rss_mib"].as_f64().unwrap_or(0.0) > 0.0,
                "{name}: {p}"
            );
        }
        assert_eq!(s["errors"].as_u64(), Some(0), "{name}: {s}");
    }
    assert!(!report["targets"].as_array().expect("targets").is_empty());

    let md = std::fs::read_to_string(out.path().join("results.md")).expect("results.md");
    assert!(md.contains("| haproxy-h2 |"), "{md}");
    for svg in [
        "throughput.svg",
        "bulk.svg",
        "cpu.svg",
        "latency-100.svg",
        "latency-300.svg",
    ] {
        let text = std::fs::read_to_string(out.path().join(svg)).expect(svg);
        assert!(text.starts_with("<svg") && text.contains("</svg>"), "{svg}");
    }

    // The charts can be redrawn from the JSON alone.
    let again = out.path().join("again");
    succeed(
        bench()
            .arg("charts")
            .arg(out.path().join("results.json"))
            .arg("--out")
            .arg(&again),
    );
    let redrawn = std::fs::read_to_string(again.join("results.md")).expect("redrawn results.md");
    assert_eq!(redrawn, md);
    assert!(again.join("throughput.svg").is_file());
}

/// `--backend nginx`: the same comparison in front of nginx (one process,
/// generated config). The warm-up already checks that every response has
/// the configured body size, so the numbers are nginx's answers.
#[test]
fn compare_quick_with_nginx_as_the_backend() {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("nginx is not installed (.ci/run installs nginx-light)");
    let out = tempfile::tempdir().expect("temp dir");
    let stdout = succeed(
        bench()
            .args(["compare", "--quick", "--quiet", "--backend", "nginx"])
            .args(["--nginx", nginx, "--body-size", "700"])
            .args(["--scenarios", "weft-http,haproxy-h1", "--out"])
            .arg(out.path())
            .arg("--weft")
            .arg(weft_binary()),
    );
    assert!(stdout.contains("backend: nginx"), "{stdout}");
    let json = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    let report: Value = serde_json::from_str(&json).expect("results.json is JSON");
    assert_eq!(report["settings"]["nginx"], nginx, "{report}");
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scenarios
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["direct", "weft-http", "haproxy-h1"]);
    for s in scenarios {
        let name = s["name"].as_str().unwrap_or("?");
        assert!(s["skipped"].is_null(), "{name}: {s}");
        assert!(s["closed_rps"].as_f64().unwrap_or(0.0) > 0.0, "{name}: {s}");
        // nginx has no sink for raw bytes: no bulk test anywhere.
        assert!(s["bulk_gbit_per_s"].is_null(), "{name}: {s}");
        assert_eq!(s["errors"].as_u64(), Some(0), "{name}: {s}");
    }
}

#[test]
fn scale_holds_every_stream_and_peer_and_reports_memory() {
    let stdout = succeed(
        bench()
            .args([
                "scale",
                "--streams",
                "60",
                "--peers",
                "8",
                "--json",
                "--weft",
            ])
            .arg(weft_binary()),
    );
    let r: Value = serde_json::from_str(&stdout).expect("scale JSON");
    assert_eq!(r["streams_live"], 60, "{r}");
    assert_eq!(r["peers_connected"], 8, "{r}");
    for key in [
        "client_bytes_per_stream",
        "server_bytes_per_stream",
        "server_bytes_per_connection",
    ] {
        assert!(r[key].as_f64().is_some_and(f64::is_finite), "{key}: {r}");
    }
    assert!(r["server_rss_kib_with_peers"].as_u64() > Some(0), "{r}");
}
