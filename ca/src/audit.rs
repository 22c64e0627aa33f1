//! The audit trail: one structured event per issuance and per refusal,
//! with target [`AUDIT_TARGET`] so it can be routed on its own (the
//! `weft-ca` binary writes these as JSON lines whatever `RUST_LOG` says).
//!
//! Fields: `event` (issued|refused), `credential` (join-token|certificate|
//! kubernetes|none), `identity`, `serial`, `not_after`, `status`, `reason`,
//! `remote`. Never a token, a key or a CSR: callers pass only these.

use std::net::SocketAddr;
use std::time::SystemTime;

/// The `tracing` target of audit events.
pub const AUDIT_TARGET: &str = "weft_ca::audit";

/// Which kind of credential a request presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credential {
    JoinToken,
    Certificate,
    Kubernetes,
    /// None, or one we could not classify.
    None,
}

impl Credential {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Credential::JoinToken => "join-token",
            Credential::Certificate => "certificate",
            Credential::Kubernetes => "kubernetes",
            Credential::None => "none",
        }
    }
}

/// A certificate was issued.
pub(crate) fn issued(
    credential: Credential,
    identity: &str,
    serial: &str,
    not_after: SystemTime,
    remote: SocketAddr,
) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "issued",
        credential = credential.as_str(),
        identity,
        serial,
        not_after = %humantime::format_rfc3339_seconds(not_after),
        remote = %remote,
        "issued a certificate"
    );
}

/// A request was refused. `identity` is set once the credential verified.
pub(crate) fn refused(
    credential: Credential,
    identity: Option<&str>,
    status: u16,
    reason: &str,
    remote: SocketAddr,
) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "refused",
        credential = credential.as_str(),
        identity = identity.unwrap_or(""),
        status,
        reason,
        remote = %remote,
        "refused a certificate request"
    );
}
