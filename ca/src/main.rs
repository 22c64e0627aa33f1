//! The `weft-ca` binary: create a CA, issue certificates and join tokens
//! from it, and serve CSR signing over HTTPS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_ca::Ca;

#[derive(Debug, Parser)]
#[command(name = "weft-ca", version, about = "The Weft certificate authority")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new CA (root certificate, key and token secret) in DIR.
    Init {
        /// Directory to create the CA in; must not already hold one.
        #[arg(long, env = "WEFT_CA_DIR")]
        dir: PathBuf,
        /// Trust domain of the identities this CA issues, e.g. example.org.
        #[arg(long, env = "WEFT_CA_TRUST_DOMAIN")]
        trust_domain: String,
    },
    /// Issue a certificate and key for one SPIFFE ID into OUT.
    Issue {
        /// Directory holding the CA.
        #[arg(long, env = "WEFT_CA_DIR")]
        dir: PathBuf,
        /// The identity, e.g. spiffe://example.org/ns/default/sa/payment.
        #[arg(long, env = "WEFT_CA_SPIFFE_ID")]
        spiffe_id: String,
        /// Directory to write cert.pem, key.pem and bundle.pem into.
        #[arg(long, env = "WEFT_CA_OUT")]
        out: PathBuf,
        /// How long the certificate is valid (e.g. 24h, 90m).
        #[arg(long, env = "WEFT_CA_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Mint a join token for one SPIFFE ID; prints only the token.
    Token {
        /// Directory holding the CA.
        #[arg(long, env = "WEFT_CA_DIR")]
        dir: PathBuf,
        /// The identity the token's bearer may get a certificate for.
        #[arg(long, env = "WEFT_CA_SPIFFE_ID")]
        spiffe_id: String,
        /// How long the token can be used.
        #[arg(long, env = "WEFT_CA_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Sign CSRs over HTTPS (POST /v1/certificate) until SIGINT/SIGTERM.
    Serve {
        /// Directory holding the CA.
        #[arg(long, env = "WEFT_CA_DIR")]
        dir: PathBuf,
        /// Address to listen on, e.g. 127.0.0.1:8443 (port 0 picks one).
        #[arg(long, env = "WEFT_CA_LISTEN")]
        listen: String,
        /// Validity of the certificates issued.
        #[arg(long, env = "WEFT_CA_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the cause chain on one line, without a backtrace.
            eprintln!("weft-ca: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Init { dir, trust_domain } => {
            Ca::init(&dir, &trust_domain)?;
            println!(
                "created a CA for trust domain {trust_domain} in {}",
                dir.display()
            );
            println!(
                "  trust bundle: {}",
                dir.join(weft_ca::CA_CERT_FILE).display()
            );
        }
        Command::Issue {
            dir,
            spiffe_id,
            out,
            ttl,
        } => {
            let ca = Ca::load(&dir)?;
            let issued = ca.issue(&spiffe_id, ttl)?;
            issued.write_to(&out)?;
            println!(
                "issued {spiffe_id} (serial {}, valid until {})",
                issued.serial_hex,
                humantime::format_rfc3339_seconds(issued.not_after)
            );
            for name in ["cert.pem", "key.pem", "bundle.pem"] {
                println!("  wrote {}", out.join(name).display());
            }
        }
        Command::Token {
            dir,
            spiffe_id,
            ttl,
        } => {
            let ca = Ca::load(&dir)?;
            println!("{}", ca.token(&spiffe_id, ttl)?);
        }
        Command::Serve { dir, listen, ttl } => {
            let ca = Arc::new(Ca::load(&dir)?);
            let runtime = tokio::runtime::Runtime::new().context("could not start the runtime")?;
            runtime.block_on(serve(ca, &listen, ttl))?;
        }
    }
    Ok(())
}

async fn serve(ca: Arc<Ca>, listen: &str, ttl: Duration) -> anyhow::Result<()> {
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen}"))?;
    let addr = listener.local_addr().context("listener has no address")?;
    tracing::info!(
        trust_domain = ca.trust_domain(),
        "weft-ca serving on https://{addr}"
    );
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {addr}")?;
        stdout.flush()?;
    }
    let mut sigterm = signal(SignalKind::terminate()).context("could not watch SIGTERM")?;
    tokio::select! {
        result = weft_ca::server::serve(ca, listener, ttl) => result?,
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    Ok(())
}
