//! pgnear: a PostgreSQL wire-protocol proxy that sends writes to the
//! primary, serves reads from the nearest replica that is fresh enough,
//! and makes every session read its own writes.
//!
//! # Layout
//!
//! - [`config`]: `proxy.toml` into a typed, validated [`config::Config`].
//! - [`proxy`] and [`listener`]: a running instance; the accept loop.
//! - [`frontend`]: one task per client: handshake, session relay, cancel.
//! - [`auth`]: SCRAM-SHA-256 and md5 toward clients.
//! - [`backend`]: server connections: connect, authenticate, relay.
//! - [`router`]: pure decisions: statement classification and routes.
//! - [`cluster`]: topology and the monitor that measures each node.
//! - [`metrics`] and [`admin`]: Prometheus metrics; the admin HTTP listener.
//! - [`protocol`]: bytes to messages and back.
//! - [`error`]: proxy errors and their SQLSTATEs.
//! - [`tls`]: rustls toward clients and toward servers.
//! - [`lab`]: real PostgreSQL servers on loopback, for tests and the demo.
//! - [`cli`] and [`demo`]: the command line.

mod admin;
mod auth;
pub mod backend;
pub mod cli;
mod clock;
pub mod cluster;
pub mod config;
mod demo;
mod error;
mod frontend;
pub mod lab;
mod listener;
mod metrics;
pub mod protocol;
pub mod proxy;
pub mod router;
pub mod tls;

pub use config::Config;
pub use proxy::Proxy;
