//! Hot reload of the mesh file: a change applies to new requests and streams
//! without touching open connections or in-flight requests. An invalid edit
//! is rejected with every error logged, the last good config stays, and
//! `weft_config_reloads_total{result}` counts both outcomes.
//!
//! The file is polled (content compared, not mtime): Kubernetes updates a
//! mounted ConfigMap by swapping a symlink, which inotify-style watches on
//! the file itself miss; a cheap read every interval sees it. A change is
//! applied once two polls in a row read the same new content, so an editor
//! that rewrites the file in place is never caught half-way (a file cut at
//! a line boundary can be valid TOML, and wrong).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::mesh::Mesh;
use crate::metrics::ResultLabels;
use crate::sidecar::Ctx;

/// How often the sidecar looks at the mesh file: fast enough that an edit
/// applies within a couple of seconds, rare enough to cost nothing.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// What a reload attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Applied,
    Rejected(String),
}

pub(crate) async fn watch(ctx: Arc<Ctx>, path: PathBuf, interval: Duration) {
    let mut last = std::fs::read(&path).ok();
    let mut candidate: Option<Vec<u8>> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let outcome = check(&ctx, &path, &mut last, &mut candidate);
        match &outcome {
            Outcome::Unchanged => {}
            Outcome::Applied => tracing::info!(path = %path.display(), "mesh file reloaded"),
            Outcome::Rejected(e) => tracing::error!(
                path = %path.display(),
                "mesh file change rejected; keeping the last good config:\n{e}"
            ),
        }
    }
}

/// Read the file; if its content changed and stayed the same since the
/// previous poll (`candidate`), validate and apply it.
fn check(
    ctx: &Ctx,
    path: &std::path::Path,
    last: &mut Option<Vec<u8>>,
    candidate: &mut Option<Vec<u8>>,
) -> Outcome {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        // A file being replaced may be missing for a moment; a real removal
        // is reported once, and the last good config stays.
        Err(e) => {
            if last.is_none() {
                return Outcome::Unchanged;
            }
            *last = None;
            return reject(
                ctx,
                format!("{}: cannot read the mesh file: {e}", path.display()),
            );
        }
    };
    if last.as_deref() == Some(bytes.as_slice()) {
        *candidate = None;
        return Outcome::Unchanged;
    }
    if candidate.as_deref() != Some(bytes.as_slice()) {
        // New content: wait one poll for it to settle.
        *candidate = Some(bytes);
        return Outcome::Unchanged;
    }
    *candidate = None;
    *last = Some(bytes.clone());
    let text = String::from_utf8_lossy(&bytes);
    let mesh = match Mesh::parse(&text, &path.display().to_string()) {
        Ok(m) => m,
        Err(errors) => return reject(ctx, errors.to_string()),
    };
    let current = ctx.state.load();
    if mesh.trust_domain != current.trust_domain {
        return reject(
            ctx,
            format!(
                "{}: trust_domain changed from {:?} to {:?}; that needs new certificates, so restart the sidecar instead",
                path.display(),
                current.trust_domain,
                mesh.trust_domain
            ),
        );
    }
    ctx.apply_mesh(mesh);
    count(ctx, "success");
    Outcome::Applied
}

fn reject(ctx: &Ctx, msg: String) -> Outcome {
    count(ctx, "failure");
    Outcome::Rejected(msg)
}

fn count(ctx: &Ctx, result: &'static str) {
    ctx.metrics
        .config_reloads
        .get_or_create(&ResultLabels { result })
        .inc();
}
