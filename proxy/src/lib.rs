//! weft-proxy: the Weft sidecar. Config, listeners, HTTP/3 and L4
//! forwarding, telemetry and the admin server; `weft demo` lives here too.

pub mod admin;
pub mod argfile;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod cli;
pub mod cluster;
pub mod copy;
pub mod demo;
pub mod headers;
pub mod identity;
pub mod inbound;
pub mod inject;
pub mod intercept;
pub mod lifecycle;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod outbound;
pub mod reload;
pub mod replay;
pub mod resolve;
pub mod retry;
pub mod route;
pub mod sidecar;
pub mod trace;
pub mod udp;

pub use mesh::Mesh;
pub use sidecar::{CaCredential, IdentitySource, Limits, Sidecar, SidecarConfig};
pub use trace::TraceConfig;
