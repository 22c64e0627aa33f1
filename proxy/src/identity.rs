//! The sidecar's certificate over time: obtained at start (files, or a CSR
//! to `weft-ca serve` — the private key is generated here and never sent),
//! then kept fresh while the sidecar runs.
//!
//! - From the CA: renewed at about half its lifetime (±10 % jitter, so a
//!   fleet started together does not renew together) with a new key, the
//!   current certificate as the credential (mTLS to the CA, as SPIRE does);
//!   if the CA refuses it (e.g. it expired meanwhile), the original
//!   credential is tried: a Kubernetes token file (re-read each time) or a
//!   multi-use join token.
//! - From a directory (cert-manager, SPIRE, `weft-ca issue`): the files are
//!   re-read every [`CERT_DIR_POLL`] and applied when they change.
//!
//! A new certificate (and trust bundle) is swapped into the TLS resolvers
//! atomically: streams in flight are untouched, new handshakes use it. If
//! the CA is unreachable, renewal retries with backoff, the sidecar keeps
//! serving on its current certificate and says so in logs and metrics
//! (`weft_cert_renewals_total{result}`, `weft_cert_expiry_timestamp_seconds`);
//! once the certificate expires, peers refuse it and `/ready` fails — it
//! fails closed, there is no plaintext fallback.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weft_transport::Credentials;

use crate::metrics::ResultLabels;
use crate::sidecar::{CaCredential, Ctx, IdentitySource, SidecarError};

/// How often a `--cert-dir` is re-read: files written by cert-manager or
/// SPIRE (or a Kubernetes Secret's symlink swap) apply within seconds.
pub const CERT_DIR_POLL: Duration = Duration::from_secs(2);
/// Renew at this share of the lifetime (Istio, SPIRE and cert-manager all
/// renew around half-life: time to retry for the other half).
const RENEW_AT: f64 = 0.5;
/// ± this share of the lifetime of jitter around [`RENEW_AT`].
const RENEW_JITTER: f64 = 0.1;
/// First retry delay after a failed renewal; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Shortest retry delay: near or past expiry, attempts come this often —
/// quick recovery when the CA is back, without hammering it meanwhile.
const RETRY_FLOOR: Duration = Duration::from_millis(500);

/// A certificate as PEM, kept to renew with (the CA wants PEM).
#[derive(Clone)]
pub(crate) struct Pem {
    pub chain: String,
    pub key: String,
    pub bundle: String,
}

/// What start-up obtained.
pub(crate) struct Obtained {
    pub creds: Credentials,
    /// What renewal starts from: the CA's PEM, or the files' bytes.
    pub kept: Kept,
}

/// What the certificate's maintenance needs to know about the start-up one.
pub(crate) enum Kept {
    None,
    /// Came from the CA: renew with it.
    Pem(Pem),
    /// Came from `--cert-dir`: these bytes are applied; watch for others.
    Files(Vec<u8>),
}

pub(crate) async fn obtain(src: &IdentitySource) -> Result<Obtained, SidecarError> {
    match src {
        IdentitySource::Static(c) => Ok(Obtained {
            creds: c.clone(),
            kept: Kept::None,
        }),
        IdentitySource::CertDir(dir) => {
            let raw = read_dir_files(dir)?;
            Ok(Obtained {
                creds: parse_files(&raw)?,
                kept: Kept::Files(raw.concat()),
            })
        }
        IdentitySource::Ca {
            url,
            bundle_pem,
            credential,
            expect_id,
        } => {
            let pem = with_credential(url, bundle_pem, credential)
                .await
                .map_err(|e| {
                    SidecarError::Identity(format!("getting a certificate from {url}: {e}"))
                })?;
            let creds = parse(&pem)?;
            if let Some(want) = expect_id {
                let got = creds
                    .chain
                    .first()
                    .and_then(|c| weft_transport::tls::spiffe_id_of(c, trust_domain_of(want)).ok());
                if got.as_ref().map(|g| g.as_str()) != Some(want.as_str()) {
                    return Err(SidecarError::Identity(format!(
                        "the CA issued {}, but --spiffe-id asks for {want}; the credential is for another identity",
                        got.map(|g| g.to_string()).unwrap_or_else(|| "an unreadable identity".into())
                    )));
                }
            }
            Ok(Obtained {
                creds,
                kept: Kept::Pem(pem),
            })
        }
    }
}

/// A certificate request that failed, and its `weft_ca_requests_total` result.
struct CaFailure {
    message: String,
    result: &'static str,
}

impl std::fmt::Display for CaFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<weft_ca::CaError> for CaFailure {
    fn from(e: weft_ca::CaError) -> Self {
        use weft_ca::CaError;
        let result = match &e {
            // The CA answered, and said no (bad credential, rate limit, …).
            CaError::Rejected { .. } => "refused",
            CaError::Connect { .. } | CaError::Timeout(_) => "unavailable",
            _ => "error",
        };
        CaFailure {
            message: e.to_string(),
            result,
        }
    }
}

/// Ask the CA for a certificate with the start-up credential.
async fn with_credential(url: &str, bundle: &str, cred: &CaCredential) -> Result<Pem, CaFailure> {
    let token = match cred {
        CaCredential::JoinToken(t) => t.trim().to_string(),
        // Projected tokens rotate: read the file each time.
        CaCredential::KubernetesTokenFile(path) => std::fs::read_to_string(path)
            .map_err(|e| CaFailure {
                message: format!("reading the Kubernetes token {}: {e}", path.display()),
                result: "error",
            })?
            .trim()
            .to_string(),
    };
    let issued = weft_ca::client::request_certificate(url, bundle, &token).await?;
    Ok(Pem {
        chain: issued.cert_chain_pem,
        key: issued.key_pem,
        bundle: issued.bundle_pem,
    })
}

fn parse(pem: &Pem) -> Result<Credentials, SidecarError> {
    Ok(Credentials::from_pem(
        pem.chain.as_bytes(),
        pem.key.as_bytes(),
        pem.bundle.as_bytes(),
    )?)
}

fn trust_domain_of(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
        .unwrap_or("")
}

/// Read `cert.pem`, `key.pem`, `bundle.pem` (in that order).
fn read_dir_files(dir: &Path) -> Result<[Vec<u8>; 3], SidecarError> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| {
            SidecarError::Identity(format!(
                "reading {}: {e} (expected cert.pem, key.pem and bundle.pem, as written by `weft-ca issue`)",
                dir.join(name).display()
            ))
        })
    };
    Ok([read("cert.pem")?, read("key.pem")?, read("bundle.pem")?])
}

fn parse_files([cert, key, bundle]: &[Vec<u8>; 3]) -> Result<Credentials, SidecarError> {
    Ok(Credentials::from_pem(cert, key, bundle)?)
}

/// When to renew a certificate we got at `since` that expires at
/// `not_after`; `jitter` in -1..=1 spreads renewals of a fleet. Measured
/// from when we got it, not from its not-before: CAs backdate that for
/// clock skew (weft-ca by 5 minutes), which would push a short-lived
/// certificate's half-life past its expiry.
pub fn renew_at(since: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after.duration_since(since).unwrap_or_default();
    let share = RENEW_AT + RENEW_JITTER * jitter.clamp(-1.0, 1.0);
    since + lifetime.mul_f64(share)
}

/// How long to wait before renewal attempt `failures + 1` when the
/// certificate has `left` until it expires: exponential, capped, and never
/// more than a tenth of what is left, so attempts speed up near expiry.
pub fn retry_delay(failures: u32, left: Duration) -> Duration {
    let exp = RETRY_FIRST.saturating_mul(1u32 << failures.min(16));
    exp.min(RETRY_MAX).min((left / 10).max(RETRY_FLOOR))
}

/// Keep the certificate fresh until the sidecar drains.
pub(crate) async fn maintain(ctx: Arc<Ctx>, src: IdentitySource, kept: Kept) {
    match (src, kept) {
        (IdentitySource::CertDir(dir), Kept::Files(raw)) => watch_dir(ctx, dir, raw).await,
        (
            IdentitySource::Ca {
                url, credential, ..
            },
            Kept::Pem(pem),
        ) => {
            // Start-up got its certificate before the metrics existed.
            count_ca(&ctx, "issued");
            renew_loop(ctx, url, credential, pem).await
        }
        _ => {}
    }
}

async fn renew_loop(ctx: Arc<Ctx>, url: String, credential: CaCredential, mut pem: Pem) {
    // When we got the current certificate (start-up obtained it just now).
    let mut since = SystemTime::now();
    loop {
        let Some(na) = ctx.tls.not_after() else {
            tracing::error!("the current certificate has no validity period; not renewing");
            return;
        };
        let at = renew_at(since, na, rand::random_range(-1.0..=1.0));
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tracing::debug!(in_s = wait.as_secs_f64(), "next certificate renewal");
        tokio::time::sleep(wait).await;
        let mut failures = 0u32;
        loop {
            match renew_once(&ctx, &url, &credential, &pem).await {
                Ok(next) => match apply(&ctx, &next) {
                    Ok(()) => {
                        pem = next;
                        since = SystemTime::now();
                        break;
                    }
                    Err(e) => {
                        count(&ctx, "failure");
                        tracing::warn!(error = %e, "the CA's certificate cannot be used");
                    }
                },
                Err(e) => {
                    count(&ctx, "failure");
                    let left = na.duration_since(SystemTime::now()).unwrap_or_default();
                    tracing::warn!(%url, error = %e, expires_in_s = left.as_secs(),
                        "certificate renewal failed; serving on the current certificate");
                }
            }
            let left = na.duration_since(SystemTime::now()).unwrap_or_default();
            if left.is_zero() {
                tracing::error!("certificate expired: peers refuse us until a renewal succeeds");
                ctx.ready.store(false, Ordering::Release);
            }
            tokio::time::sleep(retry_delay(failures, left)).await;
            failures = failures.saturating_add(1);
        }
    }
}

/// One renewal: with the current certificate, else the start-up credential.
/// Each request to the CA is counted in `weft_ca_requests_total`.
async fn renew_once(
    ctx: &Ctx,
    url: &str,
    credential: &CaCredential,
    pem: &Pem,
) -> Result<Pem, String> {
    match weft_ca::client::renew_certificate(url, &pem.bundle, &pem.chain, &pem.key).await {
        Ok(issued) => {
            count_ca(ctx, "issued");
            Ok(Pem {
                chain: issued.cert_chain_pem,
                key: issued.key_pem,
                bundle: issued.bundle_pem,
            })
        }
        Err(by_cert) => {
            let by_cert = CaFailure::from(by_cert);
            count_ca(ctx, by_cert.result);
            match with_credential(url, &pem.bundle, credential).await {
                Ok(pem) => {
                    count_ca(ctx, "issued");
                    Ok(pem)
                }
                Err(by_cred) => {
                    count_ca(ctx, by_cred.result);
                    Err(format!("with the current certificate: {by_cert}; with the start-up credential: {by_cred}"))
                }
            }
        }
    }
}

/// Swap a new certificate in; it must keep our identity.
fn apply(ctx: &Ctx, pem: &Pem) -> Result<(), String> {
    let creds = parse(pem).map_err(|e| e.to_string())?;
    apply_creds(ctx, &creds)
}

fn apply_creds(ctx: &Ctx, creds: &Credentials) -> Result<(), String> {
    let before = ctx.tls.identity();
    let got = creds
        .chain
        .first()
        .and_then(|c| weft_transport::tls::spiffe_id_of(c, ctx.tls.trust_domain()).ok());
    if got.as_ref() != Some(&before) {
        return Err(format!(
            "the new certificate is for {}, not our identity {before}; keeping the current one",
            got.map(|g| g.to_string())
                .unwrap_or_else(|| "an unreadable identity".into())
        ));
    }
    ctx.tls.update(creds).map_err(|e| e.to_string())?;
    count(ctx, "success");
    publish_expiry(ctx);
    ctx.ready.store(true, Ordering::Release);
    tracing::info!(identity = %before, serial = %ctx.tls.serial(),
        not_after = ctx.tls.not_after().map(unix).unwrap_or(0), "certificate renewed");
    Ok(())
}

/// Re-read the files every [`CERT_DIR_POLL`]; apply new content. `applied`
/// is what start-up loaded, so a change made meanwhile is not missed.
async fn watch_dir(ctx: Arc<Ctx>, dir: PathBuf, mut applied: Vec<u8>) {
    // Unusable content seen on the previous poll, and whether it was reported.
    let mut bad: Option<(Vec<u8>, bool)> = None;
    let mut tick = tokio::time::interval(CERT_DIR_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        check_dir(&ctx, &dir, &mut applied, &mut bad);
        if ctx
            .tls
            .not_after()
            .is_some_and(|na| na <= SystemTime::now())
        {
            ctx.ready.store(false, Ordering::Release);
        }
    }
}

/// One poll of a `--cert-dir`.
fn check_dir(ctx: &Ctx, dir: &Path, applied: &mut Vec<u8>, bad: &mut Option<(Vec<u8>, bool)>) {
    // A file being replaced may be missing for a moment: try next poll.
    let raw = match read_dir_files(dir) {
        Ok(raw) => raw,
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "certificate files unreadable");
            return;
        }
    };
    let joined = raw.concat();
    if joined == *applied {
        *bad = None;
        return;
    }
    let result = parse_files(&raw)
        .map_err(|e| e.to_string())
        .and_then(|creds| apply_creds(ctx, &creds));
    match result {
        Ok(()) => {
            *applied = joined;
            *bad = None;
        }
        // Files caught half-replaced fail once and are fine on the next
        // poll; content that stays unusable is reported, once.
        Err(e) => match bad {
            Some((seen, reported)) if *seen == joined => {
                if !*reported {
                    *reported = true;
                    count(ctx, "failure");
                    tracing::warn!(dir = %dir.display(), error = %e,
                        "certificate files changed but cannot be used; keeping the current certificate");
                }
            }
            _ => *bad = Some((joined, false)),
        },
    }
}

/// `weft_ca_requests_total{result}`: issued, refused, unavailable, error.
fn count_ca(ctx: &Ctx, result: &'static str) {
    ctx.metrics
        .ca_requests
        .get_or_create(&ResultLabels { result })
        .inc();
}

fn count(ctx: &Ctx, result: &'static str) {
    ctx.metrics
        .cert_renewals
        .get_or_create(&ResultLabels { result })
        .inc();
}

/// Set `weft_cert_expiry_timestamp_seconds` to the current certificate's not-after.
pub(crate) fn publish_expiry(ctx: &Ctx) {
    if let Some(na) = ctx.tls.not_after() {
        ctx.metrics.cert_expiry.set(unix(na) as i64);
    }
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_around_half_life() {
        let nb = UNIX_EPOCH + Duration::from_secs(1000);
        let na = nb + Duration::from_secs(100);
        let secs = |t: SystemTime| t.duration_since(nb).unwrap().as_secs_f64();
        assert_eq!(secs(renew_at(nb, na, 0.0)), 50.0);
        assert_eq!(secs(renew_at(nb, na, 1.0)), 60.0);
        assert_eq!(secs(renew_at(nb, na, -1.0)), 40.0);
        assert_eq!(secs(renew_at(nb, na, 7.0)), 60.0, "jitter is clamped");
        // A certificate that is already past its renewal time renews at once.
        assert!(renew_at(nb, na, 0.0) < SystemTime::now());
    }

    #[test]
    fn retries_back_off_but_speed_up_near_expiry() {
        let hour = Duration::from_secs(3600);
        assert_eq!(retry_delay(0, hour), Duration::from_secs(1));
        assert_eq!(retry_delay(3, hour), Duration::from_secs(8));
        assert_eq!(retry_delay(10, hour), RETRY_MAX);
        assert_eq!(retry_delay(u32::MAX, hour), RETRY_MAX, "no overflow");
        assert_eq!(
            retry_delay(5, Duration::from_secs(20)),
            Duration::from_secs(2)
        );
        assert_eq!(retry_delay(5, Duration::ZERO), RETRY_FLOOR);
    }
}
