//! Server-facing connections: opening and authenticating one
//! (`connect`), and the relay-side handle a session keeps (`connection`).

pub mod connect;
pub mod connection;
pub mod limits;
pub(crate) mod pool;
pub(crate) mod server;

pub use connect::{connect, ConnectError, ServerAuth, ServerLogin};
pub use connection::Backend;

/// A server connection a cancel can be sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerKey {
    /// The node (its index in the topology).
    pub node: usize,
    pub key: crate::protocol::startup::CancelKey,
}
