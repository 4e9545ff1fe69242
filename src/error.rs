//! Proxy errors and their client-safe form: one exhaustive match decides
//! each error's SQLSTATE and severity. Server errors never pass through
//! here: they are relayed verbatim.

use crate::backend::ConnectError;
use crate::cluster::NoPrimary;
use crate::protocol::backend::{error_response, Severity};
use crate::protocol::startup::StartupError;
use crate::protocol::{Frame, ProtocolError, SqlState};

/// Everything that can end or fail a client session inside pgnear.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client broke the protocol; the session ends.
    #[error("protocol violation: {0}")]
    ClientProtocol(#[from] ProtocolError),
    #[error("{0}")]
    Startup(#[from] StartupError),
    /// The client's I/O failed or it hung up; nothing can be sent.
    #[error("client connection lost: {0}")]
    ClientGone(std::io::Error),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("password authentication failed for user {0:?}")]
    BadPassword(String),
    /// `proxy.auth_query` could not run; the cause names no secret.
    #[error("cannot look up user {user:?}: {cause}")]
    Lookup { user: String, cause: String },
    #[error("too many logins are waiting for user lookups (proxy.auth_query): try again")]
    LookupBusy,
    #[error("SCRAM authentication failed: {0}")]
    Scram(crate::auth::ScramError),
    #[error("the connection matches no tenant and pgnear requires one")]
    NoTenant,
    #[error("too many client connections (max_client_connections = {0})")]
    TooManyClients(usize),
    /// `tls.mode = "require"` and the client did not encrypt.
    #[error("SSL required: pgnear accepts only TLS connections (connect with sslmode=require)")]
    TlsRequired,
    /// The TLS handshake with the client failed; nothing can be sent.
    #[error("TLS handshake with the client failed: {0}")]
    ClientTls(std::io::Error),
    #[error("{0}")]
    TlsNegotiation(&'static str),
    #[error("timed out waiting for the startup packet and authentication")]
    StartupTimeout,
    #[error("terminating connection: idle for longer than idle_client_timeout")]
    IdleTimeout,
    #[error("{0}")]
    NoPrimary(#[from] NoPrimary),
    /// A server refused the login; the server's own frame is relayed.
    #[error("cannot open a server connection: {0}")]
    Connect(#[from] ConnectError),
    #[error("server connection to {node} was lost")]
    BackendLost { node: String },
    #[error("terminating connection: the session's settings could not be restored on a server: {0}")]
    SettingsLost(String),
    #[error("terminating connection: the primary is now {node}; reconnect")]
    PrimaryMoved { node: String },
    #[error("server {node} broke the protocol: {source}")]
    BackendProtocol { node: String, source: ProtocolError },
    #[error("{0}")]
    Unsupported(String),
    #[error("no server connection came free within proxy.pool_timeout ({} ms)", .0.as_millis())]
    PoolExhausted(std::time::Duration),
    /// A second shutdown signal closes every session.
    #[error("terminating connection due to administrator command: pgnear is shutting down")]
    Shutdown,
}

impl ProxyError {
    /// The ErrorResponse the client gets, or `None` if it cannot get one.
    pub fn to_frame(&self) -> Option<Frame> {
        use ProxyError as E;
        use Severity::Fatal;
        use SqlState as S;
        let (severity, code) = match self {
            E::ClientGone(_)
            | E::ClientTls(_)
            | E::ClientProtocol(ProtocolError::Truncated | ProtocolError::Io(_))
            | E::Startup(StartupError::Protocol(ProtocolError::Truncated | ProtocolError::Io(_)))
            // As PostgreSQL: a first packet whose length is no length (a
            // Terminate from a client that gave up while connecting, bytes
            // of another protocol) is logged and the connection closed,
            // without a message the client may not be ready to read.
            | E::Startup(StartupError::BadLength) => return None,
            E::Connect(ConnectError::Server { frame, .. }) => return Some(frame.clone()),
            E::ClientProtocol(_) => (Fatal, S::ProtocolViolation),
            E::Startup(StartupError::UnsupportedVersion { .. }) => (Fatal, S::FeatureNotSupported),
            E::Startup(_) => (Fatal, S::ProtocolViolation),
            E::NoUser | E::NoTenant => (Fatal, S::InvalidAuthorizationSpecification),
            E::BadPassword(_) => (Fatal, S::InvalidPassword),
            E::Lookup { .. } => (Fatal, S::SqlclientUnableToEstablishSqlconnection),
            E::LookupBusy => (Fatal, S::TooManyConnections),
            E::TlsRequired => (Fatal, S::InvalidAuthorizationSpecification),
            E::TlsNegotiation(_) => (Fatal, S::ProtocolViolation),
            E::Scram(crate::auth::ScramError::BadProof) => (Fatal, S::InvalidPassword),
            E::Scram(_) => (Fatal, S::ProtocolViolation),
            E::TooManyClients(_) => (Fatal, S::TooManyConnections),
            E::StartupTimeout => (Fatal, S::ProtocolViolation),
            E::IdleTimeout => (Fatal, S::IdleSessionTimeout),
            E::NoPrimary(_) => (Fatal, S::SqlclientUnableToEstablishSqlconnection),
            E::Connect(ConnectError::Limit(_)) => (Fatal, S::TooManyConnections),
            E::Connect(_) => (Fatal, S::SqlclientUnableToEstablishSqlconnection),
            E::BackendLost { .. } | E::BackendProtocol { .. } => (Fatal, S::ConnectionFailure),
            E::PrimaryMoved { .. } => (Fatal, S::AdminShutdown),
            E::SettingsLost(_) => (Fatal, S::ConnectionFailure),
            E::Unsupported(_) => (Fatal, S::FeatureNotSupported),
            E::PoolExhausted(_) => (Fatal, S::TooManyConnections),
            E::Shutdown => (Fatal, S::AdminShutdown),
        };
        Some(error_response(severity, code, &self.to_string()))
    }

    /// The error class, for logs and metrics.
    pub fn class(&self) -> &'static str {
        use ProxyError as E;
        match self {
            E::ClientProtocol(_) | E::Startup(_) | E::Unsupported(_) => "client_protocol",
            E::ClientTls(_) | E::TlsNegotiation(_) => "client_protocol",
            E::ClientGone(_) => "client_gone",
            E::NoUser | E::BadPassword(_) | E::Scram(_) | E::NoTenant | E::Lookup { .. } => "auth",
            E::TlsRequired => "auth",
            E::TooManyClients(_) | E::PoolExhausted(_) | E::Connect(ConnectError::Limit(_)) => "limit",
            E::LookupBusy => "limit",
            E::StartupTimeout | E::IdleTimeout => "timeout",
            E::NoPrimary(_) | E::Connect(_) => "backend_connect",
            E::BackendLost { .. }
            | E::BackendProtocol { .. }
            | E::PrimaryMoved { .. }
            | E::SettingsLost(_) => "backend_error",
            E::Shutdown => "shutdown",
        }
    }
}
