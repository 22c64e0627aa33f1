//! The `weft` binary.

use std::process::ExitCode;

use clap::Parser;
use weft_proxy::cli::{Cli, Command};
use weft_proxy::{Mesh, Sidecar};

/// mimalloc instead of glibc malloc: malloc/free were 7–11 % of a sidecar's
/// samples (BENCHMARKS.md). `weft-bench compare --weft-baseline` measured,
/// in one run of 5 rounds against the glibc build: 1.10× closed-loop req/s,
/// CPU per 1,000 requests 0.037/0.035 s instead of 0.042/0.042 (client /
/// server), p99 at 1,000 req/s 0.76 ms instead of 1.02, idle RSS +0.7 MiB.
/// Built without transparent huge pages (`no_thp`): with THP on (as on this
/// machine and many nodes) mimalloc's segments became huge pages and idle
/// anonymous memory went from 1.6 to 21 MiB per sidecar.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = match weft_proxy::argfile::expand(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("weft: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let default_level = match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info",
    };
    weft_proxy::logging::init(default_level);
    let rt = match runtime(&cli.command) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(cli.command))
}

/// The tokio runtime: `weft sidecar --workers N` sets its worker threads
/// (so benchmarks can give every proxy the same cores); otherwise one per CPU.
/// One worker is a current-thread runtime: everything runs on the main
/// thread, with no work-stealing queues, cross-thread wake-ups or atomics
/// on every wake (the usual sidecar has one core's share).
fn runtime(cmd: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = match cmd {
        Command::Sidecar(args) => args.workers,
        _ => None,
    };
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(n));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    builder.build()
}

async fn run(cmd: Command) -> ExitCode {
    match cmd {
        Command::Check { mesh } => match Mesh::load(&mesh) {
            Ok(m) => {
                println!(
                    "{}: ok ({} services, trust domain {})",
                    mesh.display(),
                    m.services.len(),
                    m.trust_domain
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Iptables(args) => iptables(args),
        Command::Demo { duration } => {
            match weft_proxy::demo::run(weft_proxy::cli::demo_duration(duration)).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("weft demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Inject(args) => weft_proxy::inject::run(*args),
        Command::Sidecar(args) => {
            let mesh_path = args.mesh.clone();
            let drain_timeout = args.drain_timeout;
            let cfg = match (*args).into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("weft sidecar: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut sidecar = match Sidecar::start(cfg).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("weft sidecar: {e}");
                    return ExitCode::FAILURE;
                }
            };
            sidecar.watch_mesh_file(mesh_path, weft_proxy::reload::RELOAD_INTERVAL);
            let upstreams: Vec<String> = sidecar
                .upstream_addrs
                .iter()
                .map(|(s, a)| format!("{s}={a}"))
                .chain(
                    sidecar
                        .udp_upstream_addrs
                        .iter()
                        .map(|(s, a)| format!("{s}={a}/udp")),
                )
                .collect();
            println!(
                "weft sidecar ready: identity={} inbound={} admin={} upstreams=[{}]",
                sidecar.identity(),
                sidecar.inbound_addr,
                sidecar.admin_addr,
                upstreams.join(",")
            );
            weft_proxy::cli::shutdown_signal().await;
            // Listen for a second signal before draining: it cuts the drain short.
            let again = weft_proxy::cli::shutdown_signal();
            tokio::select! {
                report = sidecar.drain(drain_timeout) => {
                    if !report.clean() {
                        tracing::warn!(cut = %report.cut, "drain deadline cut work in progress");
                    }
                }
                _ = again => {
                    tracing::warn!("second signal: exiting without finishing the drain");
                    return ExitCode::FAILURE;
                }
            }
            tracing::info!("shutting down");
            sidecar.shutdown().await;
            ExitCode::SUCCESS
        }
    }
}

/// `weft iptables install|uninstall`.
fn iptables(args: weft_proxy::cli::IptablesArgs) -> ExitCode {
    use weft_proxy::cli::IptablesAction;
    use weft_proxy::intercept::iptables::{self, Family};
    let result = match args.action {
        IptablesAction::Install(opts) if opts.dry_run => {
            let rules = opts.rules();
            println!("# IPv4 (iptables-restore --noflush)\n{}", rules.script(Family::V4));
            println!("# IPv6 (ip6tables-restore --noflush)\n{}", rules.script(Family::V6));
            Ok(())
        }
        IptablesAction::Install(opts) => iptables::install(&opts.rules()).map(|()| {
            println!(
                "weft iptables: installed (outbound TCP -> port {}, UID {} / GID {} excluded, inbound {:?})",
                opts.outbound_port, opts.proxy_uid, opts.proxy_gid, opts.inbound_mode
            )
        }),
        IptablesAction::Uninstall => {
            iptables::uninstall().map(|()| println!("weft iptables: removed"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft iptables: {e}");
            ExitCode::FAILURE
        }
    }
}
