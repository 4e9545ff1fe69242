//! Server-facing connections: opening and authenticating one
//! (`connect`), and the relay-side handle a session keeps (`connection`).

pub mod connect;
pub mod connection;

pub use connect::{connect, ConnectError, ServerLogin};
pub use connection::Backend;
