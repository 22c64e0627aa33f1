//! weft-transport: QUIC endpoints, SPIFFE mTLS, the connection pool and the
//! L4 stream protocol and UDP flow datagrams. No policy lives here.

pub mod datagram;
pub mod endpoint;
pub mod l4;
pub mod pool;
pub mod preamble;
pub mod spiffe;
pub mod tls;

pub use endpoint::{ConnectError, EndpointOptions, MeshEndpoint};
pub use pool::Pool;
pub use spiffe::SpiffeId;
pub use tls::{Credentials, MeshTls, ALPN_H3, ALPN_L4};
