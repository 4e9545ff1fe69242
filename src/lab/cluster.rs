//! Real PostgreSQL clusters on loopback: one primary and its streaming replicas.
//!
//! Modelled on PostgreSQL's `src/test/perl/PostgreSQL/Test/Cluster.pm`. Every node gets a free
//! port on 127.0.0.1 (never a fixed one), its own directory inside one temporary base directory,
//! and its server log in that directory. Conditions are polled until they hold, with a timeout
//! ([`PgNode::poll_query_until`], [`Cluster::wait_for_catchup`]), never slept on. Dropping a
//! [`Cluster`] stops every node and removes the base directory; if the thread is panicking, the
//! server logs are printed to stderr first.
//!
//! Layout of the base directory:
//!
//! ```text
//! <tmp>/pgnear-lab-XXXXXX/   0755, owned by `postgres` when running as root
//!   primary/                 unix socket directory and `postgres.log`
//!     data/                  PGDATA; postgresql.conf ends with `include 'node.conf'`
//!   standby1/ ...            replicas, cloned with pg_basebackup
//! ```
//!
//! PostgreSQL refuses to run as root, so when the effective uid is 0 every server tool is run
//! through `runuser -u postgres --`.
//!
//! Code layout: this file holds the builder and the [`Cluster`]; `node` one server
//! ([`PgNode`]), `pg_bin` finding and running the PostgreSQL tools, `error` the [`LabError`].

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use self::pg_bin::PgBin;

pub use self::error::LabError;
pub use self::node::PgNode;

mod error;
mod node;
mod pg_bin;
#[cfg(test)]
mod tests;

/// Environment variable naming the PostgreSQL bin directory (default `/usr/lib/postgresql/15/bin`).
pub const PG_BIN_ENV: &str = "PGNEAR_PG_BIN";
/// The bootstrap superuser created by initdb; also the OS user servers run as under root.
pub const SUPERUSER: &str = "postgres";
/// Every node listens here and nowhere else.
const LOOPBACK: &str = "127.0.0.1";
/// How long a started node may take to answer `SELECT 1`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fresh replica may take to replay what the primary had written.
const FIRST_CATCHUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How non-replication TCP connections from 127.0.0.1 authenticate (pg_hba.conf).
///
/// Unix-socket and replication connections always use `trust`, so [`PgNode::connect`] and
/// pg_basebackup work whatever is chosen here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuthMethod {
    /// No password.
    #[default]
    Trust,
    /// MD5 challenge; passwords are stored as MD5 (`password_encryption = md5`).
    Md5,
    /// SCRAM-SHA-256; passwords are stored as SCRAM verifiers.
    Scram,
}

impl AuthMethod {
    fn hba_method(self) -> &'static str {
        match self {
            AuthMethod::Trust => "trust",
            AuthMethod::Md5 => "md5",
            AuthMethod::Scram => "scram-sha-256",
        }
    }

    fn password_encryption(self) -> &'static str {
        match self {
            AuthMethod::Md5 => "md5",
            AuthMethod::Trust | AuthMethod::Scram => "scram-sha-256",
        }
    }
}

/// One streaming replica to create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// `recovery_min_apply_delay`: commits become visible this long after the primary made them.
    pub apply_delay: Option<Duration>,
}

/// Describes a cluster before it is started; see [`Cluster::builder`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ClusterBuilder {
    replicas: Vec<ReplicaSpec>,
    /// Extra postgresql.conf lines, after the defaults so they win.
    settings: Vec<(String, String)>,
    auth: AuthMethod,
    /// Login roles created on the primary before any replica is cloned.
    users: Vec<(String, String)>,
}

impl ClusterBuilder {
    /// Adds a streaming replica.
    pub fn replica(self) -> Self {
        self.replica_with(ReplicaSpec::default())
    }

    /// Adds a streaming replica that applies commits `delay` late (`recovery_min_apply_delay`).
    pub fn delayed_replica(self, delay: Duration) -> Self {
        self.replica_with(ReplicaSpec { apply_delay: Some(delay) })
    }

    /// Adds a replica described by `spec`.
    pub fn replica_with(mut self, spec: ReplicaSpec) -> Self {
        self.replicas.push(spec);
        self
    }

    /// Adds `name = 'value'` to postgresql.conf on every node, overriding the lab defaults.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Chooses how TCP clients other than replication authenticate (default: trust).
    pub fn auth(mut self, method: AuthMethod) -> Self {
        self.auth = method;
        self
    }

    /// Creates a `LOGIN` role with this password (hashed per [`AuthMethod`]) on every node.
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push((name.to_owned(), password.to_owned()));
        self
    }

    /// Starts the primary, then clones and starts each replica in turn, and returns once every
    /// replica has replayed what the primary had written (a delayed replica takes its delay).
    ///
    /// On error, every node already started is stopped and the directory is removed.
    pub async fn start(self) -> Result<Cluster, LabError> {
        let bin = PgBin::detect().await?;
        let dir = bin.base_dir(1 + self.replicas.len()).await?;
        let mut primary = PgNode::new(node_name(0), dir.path(), bin.clone(), None);
        primary.init(&self).await?;
        primary.launch().await?;
        self.create_users(&primary).await?;
        let mut replicas = Vec::with_capacity(self.replicas.len());
        for (i, spec) in self.replicas.iter().enumerate() {
            let name = node_name(i + 1);
            let mut node = PgNode::new(name, dir.path(), bin.clone(), spec.apply_delay);
            node.clone_from(&primary).await?;
            node.launch().await?;
            node.poll_query_until("SELECT pg_is_in_recovery()", "t", READY_TIMEOUT).await?;
            replicas.push(node);
        }
        let max_delay = self.replicas.iter().filter_map(|r| r.apply_delay).max();
        let cluster = Cluster { replicas, primary, dir };
        let catchup = FIRST_CATCHUP_TIMEOUT + max_delay.unwrap_or_default();
        cluster.wait_for_catchup(catchup).await?;
        Ok(cluster)
    }

    async fn create_users(&self, primary: &PgNode) -> Result<(), LabError> {
        for (name, password) in &self.users {
            let sql = format!("CREATE ROLE {} LOGIN PASSWORD {}", quote_ident(name), quote_literal(password));
            primary.query_scalar_opt(&sql).await?;
        }
        Ok(())
    }

    /// The common postgresql.conf block, appended on the primary and inherited by replicas.
    fn postgresql_conf(&self) -> String {
        let defaults = [
            ("listen_addresses", LOOPBACK),
            ("wal_level", "replica"),
            ("max_wal_senders", "10"),
            ("wal_keep_size", "256MB"),
            ("hot_standby", "on"),
            ("hot_standby_feedback", "on"),
            ("fsync", "off"),
            ("shared_buffers", "32MB"),
            ("max_connections", "200"),
            ("max_prepared_transactions", "10"),
            ("logging_collector", "off"),
            ("log_line_prefix", "%m [%p] %q%a "),
            ("password_encryption", self.auth.password_encryption()),
        ];
        let extra = self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let mut conf = String::from("\n# pgnear lab\n");
        for (name, value) in defaults.into_iter().chain(extra) {
            conf.push_str(&format!("{name} = {}\n", quote_literal(value)));
        }
        conf.push_str("include 'node.conf'\n");
        conf
    }

    fn pg_hba_conf(&self) -> String {
        format!(
            "local all all trust\n\
             local replication all trust\n\
             host replication all 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 {}\n",
            self.auth.hba_method()
        )
    }
}

/// A running primary and its streaming replicas, stopped and deleted on drop.
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order: replicas stop before the primary, both before `dir` goes.
    replicas: Vec<PgNode>,
    primary: PgNode,
    /// Holds every node's directory; removed after the nodes have stopped.
    dir: TempDir,
}

// === impl Cluster ===

impl Cluster {
    /// Describes a new cluster: a primary alone until replicas are added.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// The primary.
    pub fn primary(&self) -> &PgNode {
        &self.primary
    }

    /// Replica `i`, counted from 0 in the order they were added (named `standby{i+1}`).
    ///
    /// # Panics
    /// If there are not that many replicas.
    pub fn replica(&self, i: usize) -> &PgNode {
        &self.replicas[i]
    }

    /// Every replica, in the order they were added.
    pub fn replicas(&self) -> &[PgNode] {
        &self.replicas
    }

    /// The temporary base directory holding every node; gone once the cluster is dropped.
    pub fn base_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until every replica still in recovery has replayed the primary's
    /// `pg_current_wal_lsn()` as of this call (promoted replicas are skipped).
    ///
    /// A delayed replica takes at least its delay whenever the primary committed recently.
    pub async fn wait_for_catchup(&self, timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        let target = self.primary.query_scalar("SELECT pg_current_wal_lsn()").await?;
        let caught_up =
            format!("SELECT NOT pg_is_in_recovery() OR pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
        for replica in &self.replicas {
            let left = deadline.saturating_duration_since(Instant::now());
            replica.poll_query_until(&caught_up, "t", left).await?;
        }
        Ok(())
    }

    /// Every node's server log, each under a header naming the node.
    pub fn dump_logs(&self) -> String {
        self.nodes()
            .map(|node| {
                let log =
                    fs::read_to_string(node.log_file()).unwrap_or_else(|e| format!("(cannot read: {e})\n"));
                format!("=== {} ({}) ===\n{log}", node.name(), node.log_file().display())
            })
            .collect()
    }

    fn nodes(&self) -> impl Iterator<Item = &PgNode> {
        std::iter::once(&self.primary).chain(&self.replicas)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump_logs());
        }
        // Stop all nodes at once rather than one after another; each PgNode's own Drop then
        // finds nothing left to stop.
        let stops: Vec<_> = self
            .nodes()
            .filter(|node| node.is_running())
            .filter_map(|node| {
                let mut stop = node.pg_ctl_stop("immediate");
                stop.stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
            })
            .collect();
        for mut stop in stops {
            let _ = stop.wait();
        }
    }
}

/// Node 0 is `primary`; replica `i` (from 0) is node `i + 1`, `standby{i+1}`.
fn node_name(index: usize) -> String {
    match index {
        0 => "primary".to_owned(),
        i => format!("standby{i}"),
    }
}

/// A single-quoted SQL / postgresql.conf literal.
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A double-quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
