//! pgnear's metrics, on its own prometheus Registry. Labels are node
//! names and enums only: never SQL text, never client addresses.
//!
//! (Skeleton: the observability work fills in the prometheus collectors;
//! the call sites in the session and server are final.)

use std::time::Duration;

use crate::router::Reason;

/// The role label of a routed query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleLabel {
    Primary,
    Replica,
}

/// Client connection states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Startup and authentication.
    Handshake,
    /// Authenticated, with a session running.
    Active,
}

/// Direction of relayed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

/// Every metric pgnear exports.
#[derive(Debug, Default)]
pub struct Metrics {}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard {}

impl Drop for GaugeGuard {
    fn drop(&mut self) {}
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {}
    }

    /// A unit of work routed to `node`.
    pub fn routed(&self, _node: &str, _role: RoleLabel, _reason: Reason) {}

    /// A unit's time from dispatch to its ReadyForQuery on `node`.
    pub fn query_latency(&self, _node: &str, _elapsed: Duration) {}

    /// A client connection in `state`, counted until the guard drops.
    pub fn client_connection(&self, _state: ClientState) -> GaugeGuard {
        GaugeGuard {}
    }

    /// A server connection to `node`, counted until the guard drops.
    pub fn backend_connection(&self, _node: &str) -> GaugeGuard {
        GaugeGuard {}
    }

    /// An error of `class` (see `ProxyError::class`).
    pub fn error(&self, _class: &str) {}

    /// Bytes relayed.
    pub fn bytes(&self, _direction: Direction, _count: usize) {}

    /// A session started being held on the primary after a write.
    pub fn pin_started(&self) {}

    /// A session's read-your-writes pin ended after `held`.
    pub fn pin_ended(&self, _held: Duration) {}
}
