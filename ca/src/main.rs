//! The `weft-ca` binary: create a root or intermediate CA, issue
//! certificates and join tokens from it, edit its trust bundle, and serve
//! CSR signing over HTTPS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_ca::k8s::{self, KubernetesConfig};
use weft_ca::ratelimit::RateLimit;
use weft_ca::server::ServeOptions;
use weft_ca::Ca;

#[derive(Debug, Parser)]
#[command(name = "weft-ca", version, about = "The Weft certificate authority")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new root CA (root certificate, key and token secret) in DIR.
    Init {
        /// Directory to create the CA in; must not already hold one.
        #[arg(long, env = "WEFT_CA_DIR")]
        dir: PathBuf,
        /// Trust domain of the identities this CA issues, e.g. example.org.
        #[arg(long, env = "WEFT_CA_TRUST_DOMAIN")]
        trust_domain: String,
    },
    /// Create an intermediate CA in DIR, signed by the root in ROOT_DIR, so
    /// the root key can stay offline. Serve from DIR.
    Intermediate {
        /// Directory holding the root CA (its key is used once, here).
        #[arg(long, env = "WEFT_CA_ROOT_DIR")]
        root_dir: PathBuf,
        /// Directory to create the intermediate CA in.
        #[arg(long, env = "WEFT_CA_DIR")]
        dir: PathBuf,
        /// How long the intermediate is valid (default one year).
        #[arg(long, default_value = "8760h", value_parser = humantime::parse_duration)]
        ttl: Duration,
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
        /// The token buys one certificate only. Default: usable until it
        /// expires, so a sidecar that restarts before it could renew with
        /// its certificate (which it keeps in memory) can start again
        /// without a new token; the TTL bounds the exposure.
        #[arg(long, env = "WEFT_CA_SINGLE_USE")]
        single_use: bool,
    },
    /// Edit the trust bundle handed out with every certificate (root
    /// rotation); a running `weft-ca serve` applies the change at once.
    Trust {
        #[command(subcommand)]
        action: TrustAction,
    },
    /// Sign CSRs over HTTPS (POST /v1/certificate) until SIGINT/SIGTERM.
    Serve(Box<ServeArgs>),
}

#[derive(Debug, Subcommand)]
enum TrustAction {
    /// Trust the root(s) in CERT as well.
    Add {
        #[arg(long, env = "WEFT_CA_DIR")]
        dir: PathBuf,
        /// PEM file with one or more root certificates (another CA's ca.pem).
        #[arg(long)]
        cert: PathBuf,
    },
    /// Stop trusting the root(s) in CERT; the CA's own root cannot be removed.
    Remove {
        #[arg(long, env = "WEFT_CA_DIR")]
        dir: PathBuf,
        /// PEM file with the root certificate(s) to remove.
        #[arg(long)]
        cert: PathBuf,
    },
    /// Print the roots in the bundle.
    List {
        #[arg(long, env = "WEFT_CA_DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Directory holding the CA (root or intermediate).
    #[arg(long, env = "WEFT_CA_DIR")]
    dir: PathBuf,
    /// Address to listen on, e.g. 127.0.0.1:8443 (port 0 picks one).
    #[arg(long, env = "WEFT_CA_LISTEN")]
    listen: String,
    /// Validity of the certificates issued.
    #[arg(long, env = "WEFT_CA_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Extra DNS name or IP address on the serving certificate (repeatable),
    /// e.g. weft-ca.weft-system.svc.
    #[arg(long = "san", env = "WEFT_CA_SAN", value_delimiter = ',')]
    sans: Vec<String>,
    /// Requests one credential may make back to back.
    #[arg(long, env = "WEFT_CA_RATE_LIMIT_BURST", default_value_t = RateLimit::default().burst)]
    rate_limit_burst: u32,
    /// Requests per second a credential regains.
    #[arg(long, env = "WEFT_CA_RATE_LIMIT_PER_SECOND", default_value_t = RateLimit::default().per_second)]
    rate_limit_per_second: f64,
    /// Accept Kubernetes projected service-account tokens (checked with the
    /// TokenReview API) as credentials.
    #[arg(long, env = "WEFT_CA_KUBERNETES")]
    kubernetes: bool,
    /// The Kubernetes API server.
    #[arg(long, env = "WEFT_CA_K8S_API_URL", default_value = k8s::DEFAULT_API_URL)]
    k8s_api_url: String,
    /// CA certificate(s) that verify the API server.
    #[arg(long, env = "WEFT_CA_K8S_CA_FILE", default_value = k8s::DEFAULT_CA_FILE)]
    k8s_ca_file: PathBuf,
    /// The CA's own service-account token, re-read on each use.
    #[arg(long, env = "WEFT_CA_K8S_TOKEN_FILE", default_value = k8s::DEFAULT_TOKEN_FILE)]
    k8s_token_file: PathBuf,
    /// The audience sidecars' tokens must carry.
    #[arg(long, env = "WEFT_CA_K8S_AUDIENCE", default_value = k8s::DEFAULT_AUDIENCE)]
    k8s_audience: String,
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

/// Logs to stderr: audit events as JSON lines, always (whatever RUST_LOG
/// says: an audit trail that a log level can switch off is not one), the
/// rest as text filtered by RUST_LOG (default info).
fn init_logging() {
    use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt};
    use tracing_subscriber::prelude::*;

    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_filter(filter_fn(|m| m.target() != weft_ca::AUDIT_TARGET).and(env));
    let audit = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(std::io::stderr)
        .with_filter(filter_fn(|m| m.target() == weft_ca::AUDIT_TARGET));
    tracing_subscriber::registry().with(text).with(audit).init();
}

fn run() -> anyhow::Result<()> {
    init_logging();
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
        Command::Intermediate { root_dir, dir, ttl } => {
            let root = Ca::load(&root_dir)?;
            let ca = root.create_intermediate(&dir, ttl)?;
            println!(
                "created an intermediate CA for trust domain {} in {}, signed by the root in {}",
                ca.trust_domain(),
                dir.display(),
                root_dir.display()
            );
            println!(
                "  trust bundle: {} (the root key is not in it; keep {} offline)",
                dir.join(weft_ca::BUNDLE_FILE).display(),
                root_dir.join(weft_ca::CA_KEY_FILE).display()
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
            single_use,
        } => {
            let ca = Ca::load(&dir)?;
            println!("{}", ca.token_with(&spiffe_id, ttl, single_use)?);
        }
        Command::Trust { action } => trust(action)?,
        Command::Serve(args) => {
            let ca = Arc::new(Ca::load(&args.dir)?);
            let runtime = tokio::runtime::Runtime::new().context("could not start the runtime")?;
            runtime.block_on(serve(ca, *args))?;
        }
    }
    Ok(())
}

fn trust(action: TrustAction) -> anyhow::Result<()> {
    let read = |cert: &PathBuf| {
        std::fs::read_to_string(cert).with_context(|| format!("could not read {}", cert.display()))
    };
    match action {
        TrustAction::Add { dir, cert } => {
            let ca = Ca::load(&dir)?;
            let added = ca.trust_add(&read(&cert)?)?;
            println!(
                "added {added} root(s) from {}; the bundle now holds {}",
                cert.display(),
                ca.bundle_certs().len()
            );
        }
        TrustAction::Remove { dir, cert } => {
            let ca = Ca::load(&dir)?;
            let removed = ca.trust_remove(&read(&cert)?)?;
            println!(
                "removed {removed} root(s) of {}; the bundle now holds {}",
                cert.display(),
                ca.bundle_certs().len()
            );
        }
        TrustAction::List { dir } => {
            let ca = Ca::load(&dir)?;
            for cert in ca.bundle_certs() {
                println!("{}", weft_ca::describe_certificate(&cert));
            }
        }
    }
    Ok(())
}

async fn serve(ca: Arc<Ca>, args: ServeArgs) -> anyhow::Result<()> {
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};

    let opts = ServeOptions {
        leaf_ttl: args.ttl,
        extra_sans: args.sans,
        rate_limit: RateLimit {
            burst: args.rate_limit_burst,
            per_second: args.rate_limit_per_second,
        },
        kubernetes: args.kubernetes.then_some(KubernetesConfig {
            api_url: args.k8s_api_url,
            ca_file: args.k8s_ca_file,
            token_file: args.k8s_token_file,
            audience: args.k8s_audience,
        }),
    };
    let listen = &args.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen}"))?;
    let addr = listener.local_addr().context("listener has no address")?;
    tracing::info!(
        trust_domain = ca.trust_domain(),
        kind = ?ca.kind(),
        kubernetes = opts.kubernetes.is_some(),
        "weft-ca serving on https://{addr}"
    );
    // Report invalid options before claiming to listen.
    opts.validate()?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {addr}")?;
        stdout.flush()?;
    }
    let mut sigterm = signal(SignalKind::terminate()).context("could not watch SIGTERM")?;
    tokio::select! {
        result = weft_ca::server::serve_with(ca, listener, opts) => result?,
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    Ok(())
}
