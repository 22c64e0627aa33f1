//! Logging set-up for the `weft` binary, with a log filter that can be
//! changed while it runs (`/logging` on the admin port, as Envoy's admin
//! `/logging`): turn on `debug` for a live problem without a restart.
//!
//! The filter is process-wide (one subscriber per process); in-process
//! sidecars of tests and `weft demo` without [`init`] have no handle, and
//! `/logging` says so.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

type Handle = reload::Handle<EnvFilter, Registry>;

static HANDLE: OnceLock<(Handle, std::sync::Mutex<String>)> = OnceLock::new();

/// Install the stderr subscriber: `RUST_LOG` if set, else `default`.
pub fn init(default: &str) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_string());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new(default));
    let (layer, handle) = reload::Layer::new(filter);
    let installed = tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init();
    if installed.is_ok() {
        let _ = HANDLE.set((handle, std::sync::Mutex::new(spec)));
    }
}

/// Why the filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    #[error("this process has no adjustable log filter (only the weft binary has one)")]
    Unavailable,
    #[error("{0:?} is not a log filter: {1}; use a level (error, warn, info, debug, trace) or directives like \"info,weft_proxy=debug\"")]
    Invalid(String, String),
    #[error("applying the filter: {0}")]
    Reload(String),
}

/// The filter in force, if this process can change it.
pub fn current() -> Option<String> {
    let (_, spec) = HANDLE.get()?;
    Some(spec.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Replace the filter (`debug`, `info,weft_proxy::outbound=trace`, …).
pub fn set(spec: &str) -> Result<(), LevelError> {
    let (handle, current) = HANDLE.get().ok_or(LevelError::Unavailable)?;
    let filter =
        EnvFilter::try_new(spec).map_err(|e| LevelError::Invalid(spec.into(), e.to_string()))?;
    handle
        .reload(filter)
        .map_err(|e| LevelError::Reload(e.to_string()))?;
    *current.lock().unwrap_or_else(|e| e.into_inner()) = spec.to_string();
    tracing::warn!(filter = spec, "log filter changed from the admin port");
    Ok(())
}
