//! `weft-bench compare`: set every scenario up, run the same tests against
//! each in alternating order (A B C … A B C …) for several rounds, and
//! report medians, ratios to direct, CPU per request and memory per proxy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::load::{run_http, run_tcp, HttpMode, HttpOpts, HttpReport, TcpOpts, TcpReport};
use crate::procs::which;
use crate::scenarios::{self, HaproxyMode, ProxySetup, Scenario};
use crate::stats::{median, Latency};

/// The scenarios besides `direct` (which always runs: everything is compared with it).
pub const PROXY_SCENARIOS: [&str; 6] = [
    "weft-http",
    "weft-http-policy",
    "weft-tcp",
    "haproxy-h1",
    "haproxy-h2",
    "haproxy-tcp",
];

/// Settings of one comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub rounds: usize,
    pub duration_s: f64,
    pub connections: usize,
    pub body_size: usize,
    pub rates: Vec<f64>,
    pub bulk_streams: usize,
    pub workers: usize,
    pub client_threads: usize,
    pub backend_threads: usize,
    pub quick: bool,
    pub weft: Option<PathBuf>,
    /// Another weft binary, run as the `weft-http-baseline` and
    /// `weft-tcp-baseline` scenarios beside `weft-http` and `weft-tcp`, to
    /// measure a change as a ratio in one run.
    #[serde(default)]
    pub weft_baseline: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    /// nginx as the backend instead of the built-in one (HTTP tests only:
    /// nginx has no bulk sink).
    #[serde(default)]
    pub nginx: Option<PathBuf>,
    /// Only these proxy scenarios (empty: all).
    pub scenarios: Vec<String>,
}

/// One test of a round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Test {
    /// Closed loop: as many requests as answers allow.
    Closed,
    /// Open loop at this many requests per second.
    Rate { rate: f64 },
    /// TCP bulk throughput.
    Bulk,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub round: usize,
    pub scenario: String,
    pub test: Test,
    pub http: Option<HttpReport>,
    pub bulk: Option<TcpReport>,
    /// CPU seconds each proxy used during the run (client side first).
    pub proxy_cpu_s: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proxy {
    pub role: String,
    pub pid: u32,
    /// Resident memory after start-up and one warm-up exchange, MiB.
    pub idle_rss_mib: f64,
    /// The anonymous part of it (heap, stacks), MiB; the rest is file-backed
    /// (the binary's and libraries' pages, shared by every process that maps them).
    pub idle_rss_anon_mib: f64,
    /// Peak resident memory over the whole comparison (VmHWM), MiB.
    pub peak_rss_mib: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateSummary {
    pub rate: f64,
    pub achieved_rps: f64,
    pub latency: Latency,
    /// Median over rounds of (this p50/p99 − direct's in the same round), ms.
    pub added_p50_ms: Option<f64>,
    pub added_p99_ms: Option<f64>,
    /// CPU seconds per 1,000 requests, per proxy (client side first).
    pub cpu_s_per_1k: Vec<f64>,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub description: String,
    pub skipped: Option<String>,
    pub proxies: Vec<Proxy>,
    pub closed_rps: Option<f64>,
    /// Median over rounds of this scenario's req/s ÷ direct's.
    pub closed_vs_direct: Option<f64>,
    pub closed_latency: Option<Latency>,
    pub closed_cpu_s_per_1k: Vec<f64>,
    pub rates: Vec<RateSummary>,
    pub bulk_gbit_per_s: Option<f64>,
    pub bulk_vs_direct: Option<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub what: String,
    pub goal: String,
    pub measured: Option<String>,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub date_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    pub settings: Settings,
    pub scenarios: Vec<Summary>,
    pub targets: Vec<Target>,
    pub runs: Vec<Run>,
}

/// Set up, measure, tear down. Output files go to `out`.
pub fn run(settings: Settings, quiet: bool) -> anyhow::Result<Report> {
    let loadavg_before = loadavg();
    let work = tempfile::Builder::new()
        .prefix("weft-bench-")
        .tempdir()
        .context("creating a work directory")?;
    let exe = std::env::current_exe().context("finding weft-bench itself")?;
    let certs = scenarios::make_certs(work.path())?;
    let (backend_proc, backend) = match &settings.nginx {
        Some(nginx) => scenarios::start_nginx(nginx, settings.body_size, work.path())?,
        None => scenarios::start_backend(
            &exe,
            settings.body_size,
            settings.backend_threads,
            work.path(),
        )?,
    };
    let setup = ProxySetup {
        work: work.path(),
        certs: &certs,
        backend,
        workers: settings.workers,
    };
    let weft = settings.weft.as_deref();
    let haproxy = settings.haproxy.as_deref();
    let mut scenarios = vec![scenarios::direct(backend)];
    for name in PROXY_SCENARIOS {
        if !settings.scenarios.is_empty() && !settings.scenarios.iter().any(|s| s == name) {
            continue;
        }
        let start = || match name {
            "weft-http" => scenarios::weft_pair(&setup, weft, false),
            "weft-http-policy" => scenarios::weft_policy_pair(&setup, weft),
            "weft-tcp" => scenarios::weft_pair(&setup, weft, true),
            "haproxy-h1" => scenarios::haproxy_pair(&setup, haproxy, HaproxyMode::Http1),
            "haproxy-h2" => scenarios::haproxy_pair(&setup, haproxy, HaproxyMode::Http2),
            _ => scenarios::haproxy_pair(&setup, haproxy, HaproxyMode::Tcp),
        };
        // Ports are picked free and then bound by the child: another process
        // may take one in between, so a failed start gets a second try.
        let sc = start().or_else(|_| start());
        scenarios.push(sc.with_context(|| format!("setting up {name}"))?);
        let baseline = match name {
            "weft-http" => Some((
                BASELINE,
                "weft-http with the --weft-baseline binary (the build a change is measured against)",
            )),
            "weft-tcp" => Some((
                BASELINE_TCP,
                "weft-tcp with the --weft-baseline binary (the build a change is measured against)",
            )),
            _ => None,
        };
        if let (Some(base), Some(rename)) = (settings.weft_baseline.as_deref(), baseline) {
            let tcp = name == "weft-tcp";
            let start = || scenarios::weft_pair_as(&setup, Some(base), tcp, Some(rename), "");
            let sc = start().or_else(|_| start());
            scenarios.push(sc.with_context(|| format!("setting up {}", rename.0))?);
        }
    }
    if settings.nginx.is_some() {
        // nginx cannot swallow a raw byte stream: no bulk test.
        for sc in &mut scenarios {
            sc.bulk = None;
        }
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads.max(1))
        .enable_all()
        .build()?;

    // Warm up (and check) every scenario; then note idle memory.
    for sc in scenarios.iter_mut().filter(|s| s.skipped.is_none()) {
        if let Err(e) = rt.block_on(warm_up(sc, settings.body_size)) {
            let logs: Vec<String> = sc
                .procs
                .iter()
                .map(|(_, p)| format!("{}:\n{}", p.name, p.log_tail()))
                .collect();
            anyhow::bail!("{} does not work: {e:#}\n{}", sc.name, logs.join("\n"));
        }
    }
    let idle: Vec<Vec<(f64, f64)>> = scenarios
        .iter()
        .map(|s| {
            s.procs
                .iter()
                .map(|(_, p)| (mib(p.rss_kib()), mib(p.rss_anon_kib())))
                .collect()
        })
        .collect();

    let mut tests = vec![Test::Closed];
    tests.extend(settings.rates.iter().map(|&rate| Test::Rate { rate }));
    tests.push(Test::Bulk);
    let applicable = |sc: &Scenario, t: &Test| {
        sc.skipped.is_none()
            && match t {
                Test::Bulk => sc.bulk.is_some(),
                _ => sc.http.is_some(),
            }
    };
    let per_round: usize = tests
        .iter()
        .map(|t| scenarios.iter().filter(|s| applicable(s, t)).count())
        .sum();
    let bar = overall_bar((per_round * settings.rounds) as u64, quiet);
    let hidden = ProgressBar::hidden();
    let duration = Duration::from_secs_f64(settings.duration_s);
    let mut runs = Vec::new();
    for round in 1..=settings.rounds {
        for test in &tests {
            for sc in scenarios.iter().filter(|s| applicable(s, test)) {
                bar.set_message(format!("round {round}: {} {}", sc.name, test_label(test)));
                let before: Vec<f64> = sc.procs.iter().map(|(_, p)| p.cpu_seconds()).collect();
                let (http, bulk) = match test {
                    Test::Bulk => {
                        let opts = TcpOpts {
                            addr: sc.bulk.context("bulk address")?,
                            streams: settings.bulk_streams,
                            duration,
                            chunk: 64 * 1024,
                            prefix: Some(crate::backend::SINK),
                        };
                        (None, Some(rt.block_on(run_tcp(&opts, &hidden))?))
                    }
                    _ => {
                        let opts = HttpOpts {
                            target: sc.http.clone().context("http target")?,
                            mode: HttpMode::Http1,
                            connections: settings.connections,
                            concurrency: 1,
                            duration,
                            rate: match test {
                                Test::Rate { rate } => Some(*rate),
                                _ => None,
                            },
                            req_body: 0,
                        };
                        (Some(rt.block_on(run_http(&opts, &hidden))?), None)
                    }
                };
                let proxy_cpu_s = sc
                    .procs
                    .iter()
                    .zip(before)
                    .map(|((_, p), b)| p.cpu_seconds() - b)
                    .collect();
                runs.push(Run {
                    round,
                    scenario: sc.name.to_string(),
                    test: *test,
                    http,
                    bulk,
                    proxy_cpu_s,
                });
                bar.inc(1);
                // Let sockets and queues settle before the next scenario.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    bar.finish_and_clear();

    let summaries = scenarios
        .iter()
        .zip(idle)
        .map(|(sc, idle)| summarize(sc, idle, &runs, &settings))
        .collect::<Vec<_>>();
    let targets = targets(&summaries, &runs, &settings);
    drop(scenarios);
    drop(backend_proc);
    Ok(Report {
        machine: Machine {
            cpu: cpu_model(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            loadavg_before,
            loadavg_after: loadavg(),
            date_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        },
        settings,
        scenarios: summaries,
        targets,
        runs,
    })
}

/// A few requests (and a short bulk stream) through the scenario; retried
/// for a few seconds while connections come up.
async fn warm_up(sc: &Scenario, body_size: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let hidden = ProgressBar::hidden();
    loop {
        let r: anyhow::Result<()> = async {
            if let Some(target) = &sc.http {
                let opts = HttpOpts {
                    target: target.clone(),
                    mode: HttpMode::Http1,
                    connections: 2,
                    concurrency: 1,
                    duration: Duration::from_millis(100),
                    rate: None,
                    req_body: 0,
                };
                let r = run_http(&opts, &hidden).await?;
                if r.errors > 0 || r.requests == 0 {
                    anyhow::bail!(
                        "{} of {} warm-up requests failed: {}",
                        r.errors,
                        r.errors + r.requests,
                        r.first_error.unwrap_or_default()
                    );
                }
                if r.response_bytes != r.requests * body_size as u64 {
                    anyhow::bail!("responses are not {body_size} bytes each");
                }
            }
            if let Some(addr) = sc.bulk {
                let opts = TcpOpts {
                    addr,
                    streams: 1,
                    duration: Duration::from_millis(50),
                    chunk: 64 * 1024,
                    prefix: Some(crate::backend::SINK),
                };
                let r = run_tcp(&opts, &hidden).await?;
                if r.errors > 0 || r.bytes == 0 {
                    anyhow::bail!("bulk stream failed: {}", r.first_error.unwrap_or_default());
                }
            }
            Ok(())
        }
        .await;
        match r {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn test_label(t: &Test) -> String {
    match t {
        Test::Closed => "closed loop".into(),
        Test::Rate { rate } => format!("{rate} req/s"),
        Test::Bulk => "bulk".into(),
    }
}

fn overall_bar(len: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} runs  {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn same_test(a: &Test, b: &Test) -> bool {
    match (a, b) {
        (Test::Rate { rate: x }, Test::Rate { rate: y }) => (x - y).abs() < 1e-9,
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

/// This scenario's runs of one test, in round order.
fn runs_of<'a>(runs: &'a [Run], scenario: &str, test: &Test) -> Vec<&'a Run> {
    runs.iter()
        .filter(|r| r.scenario == scenario && same_test(&r.test, test))
        .collect()
}

/// Median over rounds of f(this scenario's run) compared by `cmp` with f(direct's run of the same round).
fn paired(
    runs: &[Run],
    scenario: &str,
    other: &str,
    test: &Test,
    f: impl Fn(&Run) -> Option<f64>,
    cmp: impl Fn(f64, f64) -> f64,
) -> Option<f64> {
    let mine = runs_of(runs, scenario, test);
    let theirs = runs_of(runs, other, test);
    let values: Vec<f64> = mine
        .iter()
        .filter_map(|r| {
            let o = theirs.iter().find(|o| o.round == r.round)?;
            Some(cmp(f(r)?, f(o)?))
        })
        .collect();
    (!values.is_empty()).then(|| median(values))
}

fn http_of(r: &Run) -> Option<&HttpReport> {
    r.http.as_ref()
}

/// Per proxy, median CPU seconds per 1,000 requests.
fn cpu_per_1k(runs: &[&Run], proxies: usize) -> Vec<f64> {
    (0..proxies)
        .map(|i| {
            median(runs.iter().filter_map(|r| {
                let n = http_of(r)?.requests;
                (n > 0)
                    .then(|| r.proxy_cpu_s.get(i).copied().unwrap_or(f64::NAN) * 1000.0 / n as f64)
            }))
        })
        .collect()
}

fn summarize(sc: &Scenario, idle: Vec<(f64, f64)>, runs: &[Run], settings: &Settings) -> Summary {
    let closed = runs_of(runs, sc.name, &Test::Closed);
    let all: Vec<&Run> = runs.iter().filter(|r| r.scenario == sc.name).collect();
    let errors = all
        .iter()
        .map(|r| r.http.as_ref().map_or(0, |h| h.errors) + r.bulk.as_ref().map_or(0, |b| b.errors))
        .sum();
    let first_error = all.iter().find_map(|r| {
        r.http
            .as_ref()
            .and_then(|h| h.first_error.clone())
            .or_else(|| r.bulk.as_ref().and_then(|b| b.first_error.clone()))
    });
    let has_http = !closed.is_empty();
    let rates = settings
        .rates
        .iter()
        .map(|&rate| {
            let test = Test::Rate { rate };
            let rr = runs_of(runs, sc.name, &test);
            let lat: Vec<Latency> = rr
                .iter()
                .filter_map(|r| Some(http_of(r)?.latency))
                .collect();
            let p = |f: fn(&Latency) -> f64| {
                paired(
                    runs,
                    sc.name,
                    "direct",
                    &test,
                    |r| Some(f(&http_of(r)?.latency)),
                    |a, b| a - b,
                )
            };
            RateSummary {
                rate,
                achieved_rps: median(rr.iter().filter_map(|r| Some(http_of(r)?.rps))),
                latency: Latency::median_of(&lat),
                added_p50_ms: p(|l| l.p50_ms),
                added_p99_ms: p(|l| l.p99_ms),
                cpu_s_per_1k: cpu_per_1k(&rr, sc.procs.len()),
                errors: rr.iter().filter_map(|r| Some(http_of(r)?.errors)).sum(),
            }
        })
        .filter(|_| has_http)
        .collect();
    let bulk = runs_of(runs, sc.name, &Test::Bulk);
    Summary {
        name: sc.name.to_string(),
        description: sc.description.to_string(),
        skipped: sc.skipped.clone(),
        proxies: sc
            .procs
            .iter()
            .zip(idle)
            .map(|((role, p), (idle, anon))| Proxy {
                role: role.to_string(),
                pid: p.pid(),
                idle_rss_mib: idle,
                idle_rss_anon_mib: anon,
                peak_rss_mib: mib(p.peak_rss_kib()),
            })
            .collect(),
        closed_rps: has_http.then(|| median(closed.iter().filter_map(|r| Some(http_of(r)?.rps)))),
        closed_vs_direct: paired(
            runs,
            sc.name,
            "direct",
            &Test::Closed,
            |r| Some(http_of(r)?.rps),
            |a, b| a / b,
        ),
        closed_latency: has_http.then(|| {
            Latency::median_of(
                &closed
                    .iter()
                    .filter_map(|r| Some(http_of(r)?.latency))
                    .collect::<Vec<_>>(),
            )
        }),
        closed_cpu_s_per_1k: cpu_per_1k(&closed, sc.procs.len()),
        rates,
        bulk_gbit_per_s: (!bulk.is_empty()).then(|| {
            median(
                bulk.iter()
                    .filter_map(|r| Some(r.bulk.as_ref()?.gbit_per_s)),
            )
        }),
        bulk_vs_direct: paired(
            runs,
            sc.name,
            "direct",
            &Test::Bulk,
            |r| Some(r.bulk.as_ref()?.gbit_per_s),
            |a, b| a / b,
        ),
        errors,
        first_error,
    }
}

/// The scenarios of `--weft-baseline`, beside weft-http and weft-tcp.
pub const BASELINE: &str = "weft-http-baseline";
pub const BASELINE_TCP: &str = "weft-tcp-baseline";

/// The targets, as ratios measured in this run.
fn targets(summaries: &[Summary], runs: &[Run], settings: &Settings) -> Vec<Target> {
    let get = |n: &str| {
        summaries
            .iter()
            .find(|s| s.name == n && s.skipped.is_none())
    };
    // Medians of per-round ratios: closed-loop req/s and bulk Gbit/s.
    let rps_ratio = |a: &str, b: &str| {
        paired(
            runs,
            a,
            b,
            &Test::Closed,
            |r| Some(http_of(r)?.rps),
            |x, y| x / y,
        )
    };
    let bulk_ratio = |a: &str, b: &str| {
        paired(
            runs,
            a,
            b,
            &Test::Bulk,
            |r| Some(r.bulk.as_ref()?.gbit_per_s),
            |x, y| x / y,
        )
    };
    let times = |ratio: Option<f64>| ratio.map(|r| format!("{r:.2}×"));
    let mut out = Vec::new();
    // Not targets of the issue: a change measured against the build before it.
    let helps = |what: &str, ratio: Option<f64>| Target {
        what: what.into(),
        goal: "> 1.0× (the change helps)".into(),
        measured: times(ratio),
        met: ratio.map(|r| r > 1.0),
    };
    if get(BASELINE).is_some() {
        out.push(helps(
            "weft-http req/s vs the baseline build (closed loop)",
            rps_ratio("weft-http", BASELINE),
        ));
    }
    if get(BASELINE_TCP).is_some() {
        out.push(helps(
            "weft-tcp bulk Gbit/s vs the baseline build",
            bulk_ratio("weft-tcp", BASELINE_TCP),
        ));
    }
    if get("weft-http-policy").is_some() {
        // Not a target of the issue: what the traffic policies cost.
        out.push(Target {
            what: "weft-http-policy req/s vs weft-http (what the policies cost)".into(),
            goal: "– (measured, no target)".into(),
            measured: times(rps_ratio("weft-http-policy", "weft-http")),
            met: None,
        });
    }
    for (other, goal) in [("haproxy-h1", 1.5), ("haproxy-h2", 1.0)] {
        let ratio = rps_ratio("weft-http", other);
        out.push(Target {
            what: format!(
                "weft-http req/s vs {other} ({} connections, {} B responses)",
                settings.connections, settings.body_size
            ),
            goal: format!("≥ {goal:.1}×"),
            measured: times(ratio),
            met: ratio.map(|r| r >= goal),
        });
    }
    if let Some(&rate) = settings.rates.first() {
        let added = get("weft-http").and_then(|s| s.rates.first()?.added_p99_ms);
        let haproxy = get("haproxy-h1").and_then(|s| s.rates.first()?.added_p99_ms);
        out.push(Target {
            what: format!("weft-http added p99 over direct at {rate} req/s"),
            goal: "≤ 0.4 ms".into(),
            measured: added.map(|a| {
                format!(
                    "{a:+.3} ms{}",
                    haproxy
                        .map(|h| format!(" (haproxy-h1: {h:+.3} ms)"))
                        .unwrap_or_default()
                )
            }),
            met: added.map(|a| a <= 0.4),
        });
    }
    let ratio = bulk_ratio("weft-tcp", "haproxy-tcp");
    out.push(Target {
        what: "weft-tcp bulk Gbit/s vs haproxy-tcp".into(),
        goal: "≥ 1.0×".into(),
        measured: times(ratio),
        met: ratio.map(|r| r >= 1.0),
    });
    if let Some(s) = get("weft-http") {
        if let Some(r) = s.rates.first() {
            let worst = r.cpu_s_per_1k.iter().copied().fold(f64::NAN, f64::max);
            out.push(Target {
                what: format!("CPU per sidecar at {} req/s (weft-http)", r.rate),
                goal: "≤ 0.05 core per 1,000 req/s".into(),
                measured: (!worst.is_nan()).then(|| {
                    format!(
                        "{} core per 1,000 req/s (client, server)",
                        r.cpu_s_per_1k
                            .iter()
                            .map(|c| format!("{c:.3}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
                met: (!worst.is_nan()).then_some(worst <= 0.05),
            });
        }
        let worst = s.proxies.iter().map(|p| p.idle_rss_mib).fold(0.0, f64::max);
        out.push(Target {
            what: "idle RSS per sidecar (weft-http)".into(),
            goal: "≤ 12 MiB".into(),
            measured: Some(
                s.proxies
                    .iter()
                    .map(|p| {
                        format!(
                            "{:.1} MiB ({:.1} anonymous)",
                            p.idle_rss_mib, p.idle_rss_anon_mib
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            met: Some(worst <= 12.0),
        });
    }
    out
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split(':')
                .nth(1)
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The weft binary beside this one (target/{debug,release}/weft), if built.
pub fn find_weft() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Tests run from target/debug/deps; binaries live one level up.
    [dir.join("weft"), dir.parent()?.join("weft")]
        .into_iter()
        .find(|p| p.is_file())
}

pub fn find_haproxy() -> Option<PathBuf> {
    which("haproxy")
}

/// nginx on PATH (or in /usr/sbin), if installed.
pub fn find_nginx() -> Option<PathBuf> {
    which("nginx")
}

/// Write results.json, results.md and the charts into `out`.
pub fn write_outputs(report: &Report, markdown: &str, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    let json = out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)?;
    written.push(json);
    let md = out.join("results.md");
    std::fs::write(&md, markdown)?;
    written.push(md);
    written.extend(crate::charts::draw_all(report, out)?);
    Ok(written)
}
