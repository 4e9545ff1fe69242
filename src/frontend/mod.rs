//! Client-facing work: one task per client connection, from the startup
//! packet (`handshake`) through the relay loop (`session`), plus cancel
//! keys (`cancel`).

pub(crate) mod cancel;
pub mod console;
pub(crate) mod handshake;
pub mod paused;
pub mod reload;
mod session;

use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::Instrument;

use crate::auth::Directory;
use crate::cluster::catalog::Catalogs;
use crate::cluster::Topology;
use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::{ClientState, Metrics};
use crate::router::cache::ClassifyCache;
use crate::router::consistency::SharedWatermark;
use crate::tls::{Stream, Tls};
use cancel::CancelRegistry;
use handshake::{handshake, Handshake, Login};
use session::Session;

/// What every session shares. Built once at startup; a reload swaps the
/// configuration and credentials whole and adds or retires nodes.
pub struct Shared {
    /// The configuration in force: swapped whole by a reload.
    pub config: arc_swap::ArcSwap<Config>,
    pub topology: Arc<Topology>,
    /// Configured users' credentials: swapped whole by a reload.
    pub directory: arc_swap::ArcSwap<Directory>,
    pub cancels: Arc<CancelRegistry>,
    /// Classification results by statement text, shared by all sessions so
    /// that a statement is parsed once per proxy, not once per client.
    pub classifier: ClassifyCache,
    /// User-defined volatile functions per database.
    pub catalogs: Arc<Catalogs>,
    /// The proxy-wide watermark for `read_your_writes = "proxy"`.
    pub watermark: Arc<SharedWatermark>,
    /// Each cluster's schema watermark: DDL that committed through this
    /// pgnear, which every session's reads must see.
    pub schema: crate::router::consistency::SchemaWatermarks,
    pub metrics: Arc<Metrics>,
    /// Transaction pooling's shared server connections.
    pub pools: crate::backend::pool::Pools,
    /// The client-facing acceptor (reloaded on SIGHUP) and one connector
    /// per node.
    pub tls: Tls,
    /// Opening statements of transactions that led to a write lately
    /// (`routing.optimistic_transactions`).
    pub learned: crate::router::learned::Learned,
    /// Server connections per node and user, and per node and database.
    pub limits: Arc<crate::backend::limits::ServerLimits>,
    /// Statements replicas refused: the primary runs them.
    pub refused: crate::router::learned::Refused,
    /// Users looked up with `proxy.auth_query`.
    pub lookups: crate::auth::lookup::Lookups,
    /// `PAUSE`: new units wait until `RESUME`.
    pub paused: paused::Paused,
    /// Server connections inside a transaction block: `PAUSE` waits for
    /// none to be left.
    pub transactions: Arc<std::sync::atomic::AtomicUsize>,
    /// The monitor's loops, one per live node.
    pub monitor: crate::cluster::monitor::Monitor,
}

impl Shared {
    /// The configuration in force now.
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// The configured users' credentials now.
    pub fn directory(&self) -> arc_swap::Guard<Arc<Directory>> {
        self.directory.load()
    }

    /// What opening a server connection needs.
    pub fn dial(&self) -> crate::backend::server::Dial<'_> {
        crate::backend::server::Dial {
            topology: &self.topology,
            settings: crate::backend::server::DialSettings::of(&self.config().proxy),
            metrics: &self.metrics,
            limits: &self.limits,
            transactions: &self.transactions,
        }
    }

    /// The state a metrics scrape reports now.
    pub fn scrape(&self) -> crate::metrics::Scrape<'_> {
        crate::metrics::Scrape {
            topology: &self.topology,
            pools: self.pools.stats(),
            cache_hits: self.classifier.hits(),
            cache_misses: self.classifier.misses(),
        }
    }
}

/// Where a client connected from.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    /// The Unix-domain socket (its clients have no address).
    Unix,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => addr.fmt(f),
            Peer::Unix => f.write_str("unix socket"),
        }
    }
}

/// Serves one client connection to its end. Never panics on bad input;
/// every failure the client can be told about is sent as ErrorResponse.
pub async fn serve(stream: Stream, peer: Peer, shared: Arc<Shared>, session_id: u64) {
    let span = tracing::info_span!("session", id = session_id, %peer, user = tracing::field::Empty, database = tracing::field::Empty);
    let handshake_gauge = shared.metrics.client_connection(ClientState::Handshake);
    let Some(mut session) = open_session(stream, &shared, span.clone()).instrument(span.clone()).await else {
        return;
    };
    drop(handshake_gauge);
    session.describe(session_id, peer.to_string());
    let _active_gauge = shared.metrics.client_connection(ClientState::Active);
    // The relay loop is not instrumented: entering and leaving a span on
    // every poll would cost more than the rest of a round trip's
    // bookkeeping. The session's events name the span as their parent.
    // Boxed: the session's futures are large, and a connection still in
    // its handshake (maybe one of thousands that never speak) should not
    // carry their space.
    match Box::pin(session.run()).await {
        Ok(()) => tracing::debug!(parent: &span, "session ended"),
        Err(error) => {
            shared.metrics.error(error.class());
            tracing::info!(parent: &span, class = error.class(), %error, "session ended with an error");
        }
    }
}

/// The handshake and the session's start: authentication, the tenant's
/// cluster, the first server connection. `None` when the connection ends
/// here (refused, cancelled, closed).
async fn open_session(
    mut stream: Stream,
    shared: &Arc<Shared>,
    span: tracing::Span,
) -> Option<Session<Stream>> {
    let startup = shared.config().proxy.startup_timeout;
    let outcome = match crate::clock::timeout(startup, handshake(&mut stream, shared)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(ProxyError::StartupTimeout),
    };
    let login = match outcome {
        Ok(Handshake::Authenticated(login)) => *login,
        Ok(Handshake::Cancelled | Handshake::Closed) => return None,
        Err(error) => {
            shared.metrics.error(error.class());
            refuse(&mut stream, &error).await;
            return None;
        }
    };
    span.record("user", login.user.name.as_str());
    span.record("database", login.param("database").unwrap_or(""));
    if login.param("database") == Some(console::DATABASE) {
        let admin = shared.config().proxy.admin_users.contains(&login.user.name);
        if !admin {
            let message = format!(
                "permission denied: only proxy.admin_users may open the pgnear console, not {:?}",
                login.user.name
            );
            let frame = crate::protocol::backend::error_response(
                crate::protocol::backend::Severity::Fatal,
                crate::protocol::SqlState::InsufficientPrivilege,
                &message,
            );
            let _ = stream.write_all(frame.raw()).await;
            return None;
        }
        if let Err(error) = console::serve(&mut stream, login.buffered, shared).await {
            tracing::debug!(%error, "console connection ended");
        }
        return None;
    }
    let cluster = match tenant_cluster(&shared.config(), &login) {
        Ok(cluster) => cluster,
        Err(error) => {
            shared.metrics.error(error.class());
            refuse(&mut stream, &error).await;
            return None;
        }
    };
    match Box::pin(Session::start(shared.clone(), stream, login, cluster, span)).await {
        Ok(session) => Some(session),
        Err(error) => {
            // The client was told, and `refuse` logged it.
            shared.metrics.error(error.class());
            tracing::debug!(class = error.class(), %error, "session could not start");
            None
        }
    }
}

/// Sends a startup failure to the client and closes.
pub(crate) async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, error: &ProxyError) {
    tracing::info!(class = error.class(), %error, "connection refused");
    if let Some(frame) = error.to_frame() {
        let _ = stream.write_all(frame.raw()).await;
    }
    let _ = stream.shutdown().await;
}

/// The cluster a connection belongs to, from the `[[tenants]]` rules.
pub fn tenant_cluster(config: &Config, login: &Login) -> Result<String, ProxyError> {
    let database = login.param("database").unwrap_or(&login.user.name);
    cluster_for(config, database, &login.user.name).map(str::to_string)
}

/// The cluster of a connection to `database` as `user`.
pub(crate) fn cluster_for<'c>(config: &'c Config, database: &str, user: &str) -> Result<&'c str, ProxyError> {
    let rule = config.tenants.iter().find(|t| {
        t.database.as_deref().is_none_or(|d| d == database) && t.user.as_deref().is_none_or(|u| u == user)
    });
    match rule {
        Some(rule) => Ok(&rule.cluster),
        None if config.proxy.require_tenant => Err(ProxyError::NoTenant),
        None => Ok(&config.proxy.default_cluster),
    }
}
