//! One server connection as the session holds it, and opening one.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::pool::{Pool, PoolError};
use super::state::ServerState;
use crate::backend::{connect, Backend, ServerLogin};
use crate::error::ProxyError;
use crate::frontend::cancel::ServerKey;
use crate::frontend::Shared;
use crate::metrics::NodeMetrics;
use crate::router::classify::Classification;

/// A server connection, the key a cancel should use, and what it has of
/// the session state.
/// The startup parameter transaction pooling sets per session instead of
/// keying pools by it.
pub(super) const APPLICATION_NAME: &str = "application_name";

pub(super) struct Server {
    pub(super) backend: Backend,
    pub(super) node: usize,
    pub(super) cancel_key: ServerKey,
    pub(super) state: ServerState,
    /// When each complete unit in flight was sent, for the latency metric.
    pub(super) started: std::collections::VecDeque<Instant>,
    /// This connection's share of the node's outstanding units.
    pub(super) load: Load,
    /// Session effects (SET, DISCARD ...) of each complete unit in flight,
    /// applied when the unit succeeds.
    pub(super) effects: std::collections::VecDeque<Vec<Arc<Classification>>>,
    /// Effects of units sent ahead of their Sync (after a Flush).
    pub(super) carry: Vec<Arc<Classification>>,
    /// The unit now answering has reported an error.
    pub(super) unit_failed: bool,
    /// Whether a transaction block is expected to be open once everything
    /// sent so far has run (`None`: cannot tell), from the transaction
    /// control of each unit sent since the last ReadyForQuery.
    pub(super) expect_block: Option<bool>,
    /// Messages were sent ahead of their Sync (after a Flush) since the
    /// last complete unit: the transaction status no longer says where the
    /// server is.
    pub(super) sent_partial: bool,
    /// Of those messages, some executed a statement: the client's implicit
    /// transaction is open until its Sync.
    pub(super) ran_partial: bool,
    /// The COPY FROM STDIN of a simple Query that leaves no block open
    /// still to end: a probe may follow the last one's CopyDone (or a
    /// CopyFail, which skips the rest of the Query).
    pub(super) copies_left: u8,
    /// This connection's metric children (and its place in the gauge of
    /// open server connections).
    pub(super) metrics: NodeMetrics,
    /// Transaction pooling: the pool it goes back to, and its place among
    /// the pool's connections in use while a session holds it.
    pub(super) pool: Option<Arc<Pool>>,
    /// Transaction pooling: the session holding the connection, or that
    /// held it last (its `SessionState::owner`); 0 before any.
    pub(super) holder: u64,
    /// How many times sessions have taken it from the pool.
    pub(super) turns: u64,
    /// The turn since which `holder` has taken it every time.
    pub(super) held_since: u64,
    pub(super) permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The event loop whose reactor watches its socket (`clock::current_loop`).
    pub(super) home: usize,
}

impl Server {
    /// Notes a unit sent (`complete`: up to its Sync or Query) with these
    /// classifications. Returns whether it leaves the server outside a
    /// transaction block for sure, with nothing of the client's left
    /// half-sent: only then may a probe follow it.
    /// A simple Query's `COPY ... FROM STDIN` commits with the CopyDone
    /// that ends the last of them: `copies_left` counts them down.
    pub(super) fn expect_after(
        &mut self,
        classes: &[Arc<Classification>],
        complete: bool,
        simple: bool,
    ) -> bool {
        let start = match self.backend.in_flight == 0 && !self.sent_partial {
            true => Some(self.backend.tx_status.in_block()),
            false => self.expect_block,
        };
        let after = classes.iter().fold(start, |in_block, c| c.block.after(in_block));
        self.expect_block = after;
        self.sent_partial = !complete;
        let outside = complete && after == Some(false) && !self.backend.copy_in;
        // Anything sent before the last CopyDone would fail a COPY.
        let copies = classes.iter().fold(0u8, |n, c| n.saturating_add(c.copies_in));
        self.copies_left = if outside && simple { copies } else { 0 };
        outside && copies == 0
    }

    /// The client ended a COPY with CopyDone, or CopyFail (`failed`).
    /// Returns whether the Query's last COPY is over, so that a probe may
    /// follow.
    pub(super) fn copy_ended(&mut self, failed: bool) -> bool {
        match (self.copies_left, failed) {
            (0, _) => false,
            (_, true) | (1, false) => {
                self.copies_left = 0;
                true
            }
            (left, false) => {
                self.copies_left = left - 1;
                false
            }
        }
    }

    /// Transaction pooling: session `holder` takes the connection.
    pub(super) fn hand_to(&mut self, holder: u64) {
        self.turns += 1;
        if self.holder != holder {
            self.holder = holder;
            self.held_since = self.turns;
        }
    }

    /// Whether session `holder` has held the connection, and no other
    /// session, since its turn `turn`.
    pub(super) fn held_by_since(&self, holder: u64, turn: u64) -> bool {
        self.holder == holder && self.held_since <= turn
    }

    /// Whether the connection can go back to its pool: idle outside a
    /// transaction, with nothing in flight, queued or left to swallow.
    pub(super) fn reusable(&self) -> bool {
        self.pool.is_some()
            && self.backend.is_idle()
            && !self.backend.copy_in
            && !self.backend.has_hidden()
            && !self.backend.has_output()
            && self.started.is_empty()
            && self.effects.is_empty()
            && self.carry.is_empty()
    }
}

/// Units a server connection adds to its node's outstanding count; given
/// back when they finish or the connection goes.
pub(super) struct Load {
    node: Arc<AtomicU32>,
    held: u32,
}

impl Load {
    pub(super) fn add(&mut self) {
        self.held += 1;
        self.node.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn done(&mut self) {
        if self.held > 0 {
            self.held -= 1;
            self.node.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.node.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// The session's first server: the primary, or, while no primary is
/// reachable, a replica so that reads keep working.
pub(super) async fn first_server(
    shared: &Shared,
    cluster: &str,
    login: &ServerLogin,
    holder: u64,
) -> Result<(Option<Box<Server>>, Option<Box<Server>>), ProxyError> {
    let view = crate::router::ClusterView::capture(&shared.topology);
    let pooling = shared.config.proxy.pool_mode == crate::config::PoolMode::Transaction;
    let pool = |node| pooling.then(|| shared.pools.pool(node, login));
    match view.primary(cluster) {
        Ok(node) => Ok((Some(acquire(shared, node, login, pool(node), holder).await?), None)),
        Err(no_primary) => match view.any_replica(cluster) {
            Some(node) => {
                tracing::warn!(error = %no_primary, "starting the session on a replica: writes will fail until a primary is back");
                Ok((None, Some(acquire(shared, node, login, pool(node), holder).await?)))
            }
            None => Err(no_primary.into()),
        },
    }
}

pub(super) async fn open(
    shared: &Shared,
    node: usize,
    login: &ServerLogin,
) -> Result<Box<Server>, ProxyError> {
    let endpoint = &shared.topology.nodes[node].endpoint;
    let proxy = &shared.config.proxy;
    let tls = &shared.tls.connectors[node];
    let backend = connect(endpoint, tls, login, proxy.connect_timeout, proxy.max_message_bytes).await?;
    let cancel_key = ServerKey { node, key: backend.key };
    let metrics = shared.metrics.node(&shared.topology.nodes[node].config.name);
    // Boxed: in transaction pooling connections move between sessions
    // and the pool on every transaction.
    let mut state = ServerState::default();
    state.app_name = Some(login.param(APPLICATION_NAME).unwrap_or_default().to_string());
    Ok(Box::new(Server {
        home: crate::clock::current_loop(),
        backend,
        node,
        cancel_key,
        state,
        started: std::collections::VecDeque::new(),
        load: Load { node: shared.topology.nodes[node].outstanding.clone(), held: 0 },
        effects: std::collections::VecDeque::new(),
        carry: Vec::new(),
        unit_failed: false,
        expect_block: None,
        sent_partial: false,
        ran_partial: false,
        copies_left: 0,
        metrics,
        pool: None,
        permit: None,
        holder: 0,
        turns: 0,
        held_since: 0,
    }))
}

/// A connection to `node` for the session: from its pool in transaction
/// pooling (`pool`, the session's pool for that node), else a new one.
pub(super) async fn acquire(
    shared: &Shared,
    node: usize,
    login: &ServerLogin,
    pool: Option<Arc<Pool>>,
    holder: u64,
) -> Result<Box<Server>, ProxyError> {
    let Some(pool) = pool else { return open(shared, node, login).await };
    match pool.take(shared, login, holder).await {
        Ok(mut server) => {
            server.pool = Some(pool);
            Ok(server)
        }
        Err(PoolError::Open(error)) => Err(error),
        Err(PoolError::Exhausted(after)) => Err(ProxyError::PoolExhausted(after)),
    }
}
