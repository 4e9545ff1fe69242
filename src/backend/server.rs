//! One server connection as a session holds it (what it has of the
//! session's state, what the session has in flight there), and opening
//! one.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::pool::Pool;
use super::{connect, Backend, ServerKey, ServerLogin};

use crate::metrics::NodeMetrics;
use crate::protocol::Frame;
use crate::router::classify::Classification;

/// Maps keyed by client-chosen names: ahash is quick on short keys and,
/// randomly seeded, resists collision floods.
pub type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

/// A server connection, the key a cancel should use, and what it has of
/// the session state.
/// The startup parameter transaction pooling sets per session instead of
/// keying pools by it.
pub(crate) const APPLICATION_NAME: &str = "application_name";

pub(crate) struct Server {
    pub(crate) backend: Backend,
    pub(crate) node: usize,
    pub(crate) cancel_key: ServerKey,
    pub(crate) state: ServerState,
    /// When each complete unit in flight was sent, for the latency metric.
    pub(crate) started: std::collections::VecDeque<Instant>,
    /// This connection's share of the node's outstanding units.
    pub(crate) load: Load,
    /// Session effects (SET, DISCARD ...) of each complete unit in flight,
    /// applied when the unit succeeds.
    pub(crate) effects: std::collections::VecDeque<Vec<Arc<Classification>>>,
    /// Effects of units sent ahead of their Sync (after a Flush).
    pub(crate) carry: Vec<Arc<Classification>>,
    /// The unit now answering has reported an error.
    pub(crate) unit_failed: bool,
    /// Whether a transaction block is expected to be open once everything
    /// sent so far has run (`None`: cannot tell), from the transaction
    /// control of each unit sent since the last ReadyForQuery.
    pub(crate) expect_block: Option<bool>,
    /// Messages were sent ahead of their Sync (after a Flush) since the
    /// last complete unit: the transaction status no longer says where the
    /// server is.
    pub(crate) sent_partial: bool,
    /// Of those messages, some executed a statement: the client's implicit
    /// transaction is open until its Sync.
    pub(crate) ran_partial: bool,
    /// The COPY FROM STDIN of a simple Query that leaves no block open
    /// still to end: a probe may follow the last one's CopyDone (or a
    /// CopyFail, which skips the rest of the Query).
    pub(crate) copies_left: u8,
    /// This connection's metric children (and its place in the gauge of
    /// open server connections).
    pub(crate) metrics: NodeMetrics,
    /// Transaction pooling: the pool it goes back to, and its place among
    /// the pool's connections in use while a session holds it.
    pub(crate) pool: Option<Arc<Pool>>,
    /// Transaction pooling: the session holding the connection, or that
    /// held it last (its `SessionState::owner`); 0 before any.
    pub(crate) holder: u64,
    /// How many times sessions have taken it from the pool.
    pub(crate) turns: u64,
    /// The turn since which `holder` has taken it every time.
    pub(crate) held_since: u64,
    pub(crate) permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Its place in the per-user and per-database counts, while open.
    pub(crate) slot: super::limits::Slot,
    /// Counted among the proxy's open transactions while inside a block.
    open_tx: Option<OpenTransaction>,
    /// Acknowledgements (ParseComplete, BindComplete, RowDescription ...)
    /// of a read that may still run elsewhere, held until its first result.
    pub(crate) held: bytes::BytesMut,
    transactions: Arc<std::sync::atomic::AtomicUsize>,
    /// The event loop whose reactor watches its socket (`clock::current_loop`).
    pub(crate) home: usize,
}

impl Server {
    /// Notes a unit sent (`complete`: up to its Sync or Query) with these
    /// classifications. Returns whether it leaves the server outside a
    /// transaction block for sure, with nothing of the client's left
    /// half-sent: only then may a probe follow it.
    /// A simple Query's `COPY ... FROM STDIN` commits with the CopyDone
    /// that ends the last of them: `copies_left` counts them down.
    pub(crate) fn expect_after(
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
    pub(crate) fn copy_ended(&mut self, failed: bool) -> bool {
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

    /// A ReadyForQuery said `status`: the connection counts among the
    /// proxy's open transactions while it is inside a block.
    pub(crate) fn note_status(&mut self, status: crate::protocol::backend::TxStatus) {
        match (status.in_block(), self.open_tx.is_some()) {
            (true, false) => {
                let counts = [self.transactions.clone(), self.load.transactions.clone()];
                for count in &counts {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                self.open_tx = Some(OpenTransaction(counts));
            }
            (false, true) => self.open_tx = None,
            _ => {}
        }
    }

    /// Transaction pooling: session `holder` takes the connection.
    pub(crate) fn hand_to(&mut self, holder: u64) {
        self.slot.set_idle(false);
        self.turns += 1;
        if self.holder != holder {
            self.holder = holder;
            self.held_since = self.turns;
        }
    }

    /// Whether session `holder` has held the connection, and no other
    /// session, since its turn `turn`.
    pub(crate) fn held_by_since(&self, holder: u64, turn: u64) -> bool {
        self.holder == holder && self.held_since <= turn
    }

    /// Whether the connection can go back to its pool: idle outside a
    /// transaction, with nothing in flight, queued or left to swallow.
    pub(crate) fn reusable(&self) -> bool {
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
pub(crate) struct Load {
    node: Arc<AtomicU32>,
    held: u32,
    /// The node's count of connections inside a transaction block.
    transactions: Arc<std::sync::atomic::AtomicUsize>,
}

impl Load {
    pub(crate) fn add(&mut self) {
        self.held += 1;
        self.node.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn done(&mut self) {
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

/// The settings of the moment a connection is opened under.
#[derive(Debug, Clone, Copy)]
pub struct DialSettings {
    pub connect_timeout: std::time::Duration,
    pub max_message_bytes: usize,
    pub max_user_connections: usize,
    pub max_db_connections: usize,
}

impl DialSettings {
    pub fn of(proxy: &crate::config::ProxySettings) -> DialSettings {
        DialSettings {
            connect_timeout: proxy.connect_timeout,
            max_message_bytes: proxy.max_message_bytes,
            max_user_connections: proxy.max_user_connections,
            max_db_connections: proxy.max_db_connections,
        }
    }
}

/// What opening a server connection needs of the proxy.
#[derive(Clone, Copy)]
pub struct Dial<'a> {
    pub topology: &'a crate::cluster::Topology,
    pub settings: DialSettings,
    /// One per node.
    pub metrics: &'a crate::metrics::Metrics,
    /// Server connections counted for `max_user_connections` and
    /// `max_db_connections`.
    pub limits: &'a Arc<super::limits::ServerLimits>,
    /// Server connections inside a transaction block, proxy-wide.
    pub transactions: &'a Arc<std::sync::atomic::AtomicUsize>,
}

/// Opens a connection to `node` and logs in.
pub(crate) async fn open(
    dial: Dial<'_>,
    node: usize,
    login: &ServerLogin,
) -> Result<Box<Server>, super::ConnectError> {
    let endpoint = dial.topology.node(node).endpoint().await.map_err(super::ConnectError::Resolve)?;
    let endpoint = &endpoint;
    let proxy = dial.settings;
    let limits = super::limits::Limits {
        per_user: login.max_connections.unwrap_or(proxy.max_user_connections),
        per_database: proxy.max_db_connections,
    };
    let database = login.param("database").unwrap_or(&login.user);
    let mut slot =
        dial.limits.take(node, &login.user, database, limits).map_err(super::ConnectError::Limit)?;
    let tls = &dial.topology.node(node).tls;
    let backend = connect(endpoint, tls, login, proxy.connect_timeout, proxy.max_message_bytes).await?;
    let cancel_key = ServerKey { node, key: backend.key };
    slot.list(endpoint.to_string(), backend.key.pid, backend.tls);
    let metrics = dial.metrics.node(&dial.topology.node(node).config.name);
    // Boxed: in transaction pooling connections move between sessions
    // and the pool on every transaction.
    let app_name = login.param(APPLICATION_NAME).unwrap_or_default().to_string();
    let state = ServerState { app_name: Some(app_name), ..ServerState::default() };
    Ok(Box::new(Server {
        home: crate::clock::current_loop(),
        backend,
        node,
        cancel_key,
        state,
        started: std::collections::VecDeque::new(),
        load: Load {
            node: dial.topology.node(node).outstanding.clone(),
            held: 0,
            transactions: dial.topology.node(node).transactions.clone(),
        },
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
        slot,
        open_tx: None,
        held: bytes::BytesMut::new(),
        transactions: dial.transactions.clone(),
    }))
}

/// One server connection inside a transaction block, counted in the
/// proxy's open transactions (`PAUSE` waits for none) until dropped.
#[derive(Debug)]
struct OpenTransaction([Arc<std::sync::atomic::AtomicUsize>; 2]);

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        for count in &self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Which settings a server connection has: those of session `owner` at
/// `version`, or (the default) none beyond its startup parameters. In
/// transaction pooling a connection serves many sessions, so a version
/// alone would not say whose.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SettingsKey {
    owner: u64,
    version: u64,
}

impl SettingsKey {
    /// Session `owner`'s settings at `version`.
    pub fn new(owner: u64, version: u64) -> SettingsKey {
        SettingsKey { owner, version }
    }
}

/// A named statement that exists on a server connection.
#[derive(Debug)]
pub struct OnServer {
    /// The Parse that made it: in transaction pooling another session may
    /// have made one of the same name.
    pub parse: Frame,
    /// When a unit last used it, in `ServerState::clock` ticks.
    used: u64,
}

/// What one server connection already has of the session state.
#[derive(Debug, Default)]
pub struct ServerState {
    pub settings: SettingsKey,
    /// Named statements that exist on this server.
    pub statements: HashMap<String, OnServer>,
    /// Counts statement uses, for the least-recently-used eviction.
    clock: u64,
    /// Statements the client closed elsewhere that still exist here.
    pub stale: Vec<String>,
    /// SQL-level prepared statements here, by name: the PREPARE text that
    /// made each. Kept after the client deallocates one elsewhere, so that
    /// a replay of a new statement of that name deallocates this one first.
    pub sql_prepared: HashMap<String, Arc<str>>,
    /// The `application_name` beneath the session's own SETs: the one the
    /// connection was opened with or a replay set. `None` once a RESET may
    /// have brought back the startup value. Pools are not keyed by it.
    pub app_name: Option<String>,
}

impl ServerState {
    /// Records that `name` now exists here, made by `parse`.
    pub fn add_statement(&mut self, name: String, parse: Frame) {
        self.clock += 1;
        self.statements.insert(name, OnServer { parse, used: self.clock });
    }

    /// The Parse behind statement `name` here, marking it used; `None` if
    /// there is none or it is about to be closed.
    pub fn use_statement(&mut self, name: &str) -> Option<&Frame> {
        if self.stale.iter().any(|s| s == name) {
            return None;
        }
        self.clock += 1;
        let on_server = self.statements.get_mut(name)?;
        on_server.used = self.clock;
        Some(&on_server.parse)
    }

    /// Leaves the `keep` most recently used statements: the others are
    /// closed before the connection's next extended-protocol unit, and a
    /// session that needs one again prepares it again.
    pub fn evict_statements(&mut self, keep: usize) {
        let Some(excess) = self.statements.len().checked_sub(keep).filter(|&n| n > 0) else { return };
        let mut by_use: Vec<(u64, &String)> = self.statements.iter().map(|(n, s)| (s.used, n)).collect();
        by_use.select_nth_unstable(excess - 1);
        let evicted: Vec<String> = by_use[..excess].iter().map(|(_, n)| (*n).clone()).collect();
        for name in &evicted {
            self.statements.remove(name);
        }
        self.stale.extend(evicted);
    }
}
