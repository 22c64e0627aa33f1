//! `weft-impair`: the UDP impairment relay of `weft_tests::impair` as a
//! command, for benchmarks and manual runs between two sidecars (point the
//! client's mesh file at `--listen` instead of the server sidecar). Prints
//! its counters every `--report` and on Ctrl-C.
//!
//! ```sh
//! weft-impair --listen 127.0.0.1:25108 --target 127.0.0.1:15108 --drop 2 --delay 10ms --jitter 2ms --seed 7
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use weft_tests::impair::{Count, Direction, Impairment, Relay, RelayConfig};

/// Forward UDP from --listen to --target, dropping, delaying, reordering and
/// duplicating datagrams. Flags without a direction apply both ways; `--up-*`
/// (client → target) and `--down-*` (target → client) override them.
#[derive(Debug, Parser)]
#[command(name = "weft-impair", version)]
struct Args {
    /// Address to listen on (clients send here).
    #[arg(long)]
    listen: SocketAddr,
    /// Where to forward (e.g. the server sidecar's inbound address).
    #[arg(long)]
    target: SocketAddr,
    /// Percent of datagrams dropped (0-100).
    #[arg(long, default_value_t = 0.0)]
    drop: f64,
    /// One-way delay (e.g. 10ms).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Uniform extra delay 0..JITTER (order is kept).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    jitter: Duration,
    /// Percent of datagrams held back so later ones overtake them.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// How long a reordered datagram is held back.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    reorder_gap: Duration,
    /// Percent of datagrams sent twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Drop percent client → target only.
    #[arg(long)]
    up_drop: Option<f64>,
    /// Drop percent target → client only.
    #[arg(long)]
    down_drop: Option<f64>,
    /// Delay client → target only.
    #[arg(long, value_parser = humantime::parse_duration)]
    up_delay: Option<Duration>,
    /// Delay target → client only.
    #[arg(long, value_parser = humantime::parse_duration)]
    down_delay: Option<Duration>,
    /// Seed of the random decisions (same seed and traffic, same impairment).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print counters this often (0s: only at exit).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    report: Duration,
}

fn check(name: &str, p: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("--{name} {p}: give a percent between 0 and 100"))
    }
}

fn impairments(a: &Args) -> Result<(Impairment, Impairment), String> {
    let base = Impairment {
        drop_percent: check("drop", a.drop)?,
        delay: a.delay,
        jitter: a.jitter,
        reorder_percent: check("reorder", a.reorder)?,
        reorder_gap: a.reorder_gap,
        duplicate_percent: check("duplicate", a.duplicate)?,
    };
    let mut up = base;
    let mut down = base;
    if let Some(p) = a.up_drop {
        up.drop_percent = check("up-drop", p)?;
    }
    if let Some(p) = a.down_drop {
        down.drop_percent = check("down-drop", p)?;
    }
    if let Some(d) = a.up_delay {
        up.delay = d;
    }
    if let Some(d) = a.down_delay {
        down.delay = d;
    }
    Ok((up, down))
}

fn line(relay: &Relay) -> String {
    let f = |c: Count| {
        format!(
            "received {} forwarded {} dropped {} duplicated {} reordered {}",
            c.received, c.forwarded, c.dropped, c.duplicated, c.reordered
        )
    };
    format!(
        "flows {} | up: {} | down: {}",
        relay.flows().len(),
        f(relay.counts(Direction::Up)),
        f(relay.counts(Direction::Down))
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let (up, down) = match impairments(&args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("weft-impair: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let cfg = RelayConfig {
        listen: args.listen,
        target: args.target,
        up,
        down,
        seed: args.seed,
    };
    let relay = match Relay::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft-impair: binding {}: {e}", args.listen);
            return std::process::ExitCode::from(1);
        }
    };
    eprintln!(
        "weft-impair: {} -> {} (up {up:?}, down {down:?}, seed {})",
        relay.addr, relay.target, args.seed
    );
    let report = async {
        if args.report.is_zero() {
            std::future::pending::<()>().await;
        }
        let mut tick = tokio::time::interval(args.report);
        tick.tick().await;
        loop {
            tick.tick().await;
            eprintln!("{}", line(&relay));
        }
    };
    tokio::select! {
        _ = report => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("{}", line(&relay));
    std::process::ExitCode::SUCCESS
}
