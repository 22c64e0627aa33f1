//! `weft-bench`: load generator (`http`, `churn`, `tcp`), the built-in
//! backend (`backend`) and the side-by-side scenario runner (`compare`).
//! See bench/README.md and BENCHMARKS.md.

mod backend;
mod charts;
mod compare;
mod load;
mod procs;
mod report;
mod scale;
mod scenarios;
mod stats;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Parser)]
#[command(
    name = "weft-bench",
    version,
    about = "Load generator and side-by-side benchmarks for Weft"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// HTTP load: HTTP/1.1 keep-alive or HTTP/2, open loop (--rate) or closed loop.
    Http(HttpArgs),
    /// HTTP/1.1 with a new TCP connection for every request.
    Churn(HttpArgs),
    /// TCP bulk throughput over N streams (to `weft-bench backend` or any sink that closes after EOF).
    Tcp(TcpArgs),
    /// The built-in backend: HTTP/1.1 + h2c with a fixed-size body; SINK/ECHO bulk streams.
    Backend(BackendArgs),
    /// Set up direct, Weft and HAProxy scenarios on loopback and compare them in alternating rounds.
    Compare(CompareArgs),
    /// Memory per stream (N streams over one QUIC connection) and per peer connection (P peers).
    Scale(ScaleArgs),
    /// Redraw the markdown and SVG charts of a `compare` run from its results.json.
    Charts {
        /// results.json written by `compare`.
        results: PathBuf,
        /// Where to write [default: beside results.json].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// How long to send load (e.g. 10s, 500ms).
    #[arg(short, long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(short, long)]
    quiet: bool,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Debug, Args)]
struct HttpArgs {
    /// Target, e.g. http://127.0.0.1:8080/
    url: String,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1 (ignored by churn).
    #[arg(long)]
    http2: bool,
    /// TCP connections (churn: concurrent workers).
    #[arg(short, long, default_value_t = 32)]
    connections: usize,
    /// Requests in flight per connection (HTTP/2 streams; HTTP/1.1 is always 1).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Total requests per second, open loop (latency from the scheduled send); omit for closed loop.
    #[arg(short, long)]
    rate: Option<f64>,
    /// Request body bytes (0: GET; more: POST).
    #[arg(long, default_value_t = 0)]
    req_body: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct TcpArgs {
    /// Address of the sink, e.g. 127.0.0.1:8080
    addr: SocketAddr,
    /// Parallel TCP streams.
    #[arg(short, long, default_value_t = 4)]
    streams: usize,
    /// Bytes per write.
    #[arg(long, default_value_t = 65536)]
    chunk: usize,
    /// Do not send the `SINK` marker the built-in backend expects (for other sinks).
    #[arg(long)]
    no_marker: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct ScaleArgs {
    /// Concurrent TCP streams over the pair's one QUIC connection.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Peer connections to the server sidecar.
    #[arg(long, default_value_t = 200)]
    peers: usize,
    /// Worker threads of each sidecar.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The weft binary [default: beside weft-bench].
    #[arg(long)]
    weft: Option<PathBuf>,
    /// Print the report as JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct BackendArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Response body bytes.
    #[arg(long, default_value_t = 1024)]
    body_size: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Rounds; every round runs every test against every scenario, alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Length of each run.
    #[arg(short, long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Where results.json, results.md and the SVG charts go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// A seconds-long smoke run: 1 round, 300 ms runs, 4 connections, 100 and 300 req/s.
    #[arg(long)]
    quick: bool,
    /// Worker threads of every proxy (HAProxy nbthread, weft --workers).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// HTTP/1.1 client connections (closed loop and fixed rates).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Response body bytes.
    #[arg(long, default_value_t = 1024)]
    body_size: usize,
    /// Fixed rates for the latency tests, requests per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rates: Vec<f64>,
    /// Streams of the bulk test.
    #[arg(long, default_value_t = 4)]
    bulk_streams: usize,
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Runtime worker threads of the backend.
    #[arg(long, default_value_t = 1)]
    backend_threads: usize,
    /// The weft binary [default: beside weft-bench, i.e. target/{debug,release}/weft].
    #[arg(long)]
    weft: Option<PathBuf>,
    /// Another weft binary to run beside weft-http and weft-tcp as
    /// `weft-http-baseline` and `weft-tcp-baseline` (measure a change
    /// against the build before it, in one run).
    #[arg(long)]
    weft_baseline: Option<PathBuf>,
    /// The haproxy binary [default: haproxy on PATH; its scenarios are skipped without one].
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// The backend every scenario shares: the built-in one (HTTP and the
    /// bulk sink), or nginx (HTTP tests only; no bulk test).
    #[arg(long, value_enum, default_value_t = BackendKind::Builtin)]
    backend: BackendKind,
    /// The nginx binary for `--backend nginx` [default: nginx on PATH].
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Only these scenarios besides direct (comma-separated; default: all):
    /// weft-http, weft-http-policy, weft-tcp, haproxy-h1, haproxy-h2, haproxy-tcp.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Print the JSON report on stdout instead of the markdown table.
    #[arg(long)]
    json: bool,
    #[arg(short, long)]
    quiet: bool,
}

/// Which backend `compare` puts behind every scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BackendKind {
    Builtin,
    Nginx,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}

fn timed_bar(d: Duration, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(d.as_millis() as u64);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Http(a) => http(a, false),
        Cmd::Churn(a) => http(a, true),
        Cmd::Tcp(a) => {
            let opts = load::TcpOpts {
                addr: a.addr,
                streams: a.streams,
                duration: a.common.duration,
                chunk: a.chunk,
                prefix: (!a.no_marker).then_some(backend::SINK.as_slice()),
            };
            let bar = timed_bar(a.common.duration, a.common.quiet);
            let r = runtime(a.common.threads)?.block_on(load::run_tcp(&opts, &bar))?;
            bar.finish_and_clear();
            if a.common.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", report::tcp_text(&r));
            }
            Ok(if r.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Backend(a) => {
            let rt = runtime(a.threads)?;
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(a.listen)
                    .await
                    .with_context(|| format!("binding {}", a.listen))?;
                println!(
                    "{}",
                    backend::ready_line(listener.local_addr()?, a.body_size)
                );
                backend::serve(listener, a.body_size).await;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Compare(a) => compare(a),
        Cmd::Scale(a) => {
            let weft = match a.weft {
                Some(p) if p.is_file() => p,
                Some(p) => bail!("--weft {}: no such file", p.display()),
                None => compare::find_weft()
                    .context("no weft binary beside weft-bench: build it or pass --weft PATH")?,
            };
            let work = tempfile::tempdir()?;
            if std::env::var_os("WEFT_BENCH_KEEP").is_some() {
                eprintln!("weft-bench scale: keeping {}", work.path().display());
            }
            let exe = std::env::current_exe()?;
            let opts = scale::ScaleOpts {
                streams: a.streams,
                peers: a.peers,
                workers: a.workers.max(1),
                weft,
                work: work.path().to_path_buf(),
            };
            let r = runtime(2)?.block_on(scale::run(&opts, &exe));
            if std::env::var_os("WEFT_BENCH_KEEP").is_some() {
                let _ = work.keep();
            }
            let r = r?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", scale::markdown(&r));
            }
            Ok(
                if r.streams_live == r.streams && r.peers_connected == r.peers {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        Cmd::Charts { results, out } => {
            let text = std::fs::read_to_string(&results)
                .with_context(|| format!("reading {}", results.display()))?;
            let report: compare::Report = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a compare report", results.display()))?;
            let out = out.unwrap_or_else(|| {
                results
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
            });
            let markdown = report::compare_markdown(&report);
            for f in compare::write_outputs(&report, &markdown, &out)? {
                println!("wrote {}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn http(a: HttpArgs, churn: bool) -> anyhow::Result<ExitCode> {
    let mode = match (churn, a.http2) {
        (true, _) => load::HttpMode::Churn,
        (false, true) => load::HttpMode::Http2,
        (false, false) => load::HttpMode::Http1,
    };
    let opts = load::HttpOpts {
        target: load::HttpTarget::parse(&a.url)?,
        mode,
        connections: a.connections,
        concurrency: a.concurrency,
        duration: a.common.duration,
        rate: a.rate,
        req_body: a.req_body,
    };
    let bar = timed_bar(a.common.duration, a.common.quiet);
    let r = runtime(a.common.threads)?.block_on(load::run_http(&opts, &bar))?;
    bar.finish_and_clear();
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", report::http_text(&r));
    }
    Ok(if r.errors == 0 && r.requests > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn compare(a: CompareArgs) -> anyhow::Result<ExitCode> {
    let (rounds, duration, connections, rates) = if a.quick {
        (1, Duration::from_millis(300), 4, vec![100.0, 300.0])
    } else {
        (a.rounds, a.duration, a.connections, a.rates.clone())
    };
    if rounds == 0 || rates.iter().any(|r| !(*r > 0.0 && r.is_finite())) {
        bail!("--rounds must be at least 1 and every --rates value positive");
    }
    if let Some(bad) = a
        .scenarios
        .iter()
        .find(|s| !compare::PROXY_SCENARIOS.contains(&s.as_str()))
    {
        bail!(
            "--scenarios: unknown scenario {bad:?}; known: {}",
            compare::PROXY_SCENARIOS.join(", ")
        );
    }
    let weft = match a.weft {
        Some(p) if p.is_file() => Some(p),
        Some(p) => bail!("--weft {}: no such file", p.display()),
        None => compare::find_weft(),
    };
    let haproxy = match a.haproxy {
        Some(p) if p.is_file() => Some(p),
        Some(p) => bail!("--haproxy {}: no such file", p.display()),
        None => compare::find_haproxy(),
    };
    let nginx = match (a.backend, a.nginx) {
        (BackendKind::Builtin, _) => None,
        (BackendKind::Nginx, Some(p)) if p.is_file() => Some(p),
        (BackendKind::Nginx, Some(p)) => bail!("--nginx {}: no such file", p.display()),
        (BackendKind::Nginx, None) => Some(compare::find_nginx().context(
            "--backend nginx: nginx not found on PATH (Debian: apt-get install nginx-light)",
        )?),
    };
    let settings = compare::Settings {
        rounds,
        duration_s: duration.as_secs_f64(),
        connections,
        body_size: a.body_size,
        rates,
        bulk_streams: a.bulk_streams,
        workers: a.workers.max(1),
        client_threads: a.client_threads,
        backend_threads: a.backend_threads,
        quick: a.quick,
        weft,
        weft_baseline: a.weft_baseline,
        haproxy,
        nginx,
        scenarios: a.scenarios,
    };
    let report = compare::run(settings, a.quiet)?;
    let markdown = report::compare_markdown(&report);
    let files = compare::write_outputs(&report, &markdown, &a.out)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{markdown}");
        println!(
            "\nWrote {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let failed = report.scenarios.iter().any(|s| s.errors > 0);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
