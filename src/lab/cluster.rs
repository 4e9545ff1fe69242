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

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::{sleep, timeout, Instant};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

#[cfg(test)]
mod tests;

/// Where the PostgreSQL 15 server tools live unless `PGNEAR_PG_BIN` says otherwise.
const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";
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
/// `pg_ctl -t`: seconds pg_ctl waits for start and promote.
const PG_CTL_WAIT_SECS: &str = "60";
/// How often polled conditions are re-checked (Cluster.pm uses 100 ms).
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Attempts at starting a node on a fresh port when another process took the one we picked.
const PORT_ATTEMPTS: usize = 3;
/// How much of a node's log a start failure carries.
const LOG_TAIL_BYTES: u64 = 4096;

/// Everything that can go wrong while running a lab cluster.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A PostgreSQL tool (or `runuser`, `chown`, `id`) exited unsuccessfully.
    #[error("`{command}` exited with {status}: {output}")]
    Tool {
        /// The command line that was run.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr followed by its stdout, trimmed.
        output: String,
    },
    /// A node did not come up; `log_tail` is the end of its server log.
    #[error("node {node} failed to start: {reason}\n--- end of {node}'s log ---\n{log_tail}")]
    Start {
        /// The node's name.
        node: String,
        /// The underlying failure.
        reason: Box<LabError>,
        /// The last few kilobytes of the node's server log.
        log_tail: String,
    },
    /// The PostgreSQL server tools are not where we looked.
    #[error("PostgreSQL tools not found in {}; set {PG_BIN_ENV}", dir.display())]
    MissingTools {
        /// The directory that lacks `initdb`.
        dir: PathBuf,
    },
    /// A filesystem or process-spawning operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to or querying a node failed.
    #[error("node {node}: {source}")]
    Postgres {
        /// The node's name.
        node: String,
        /// The driver error (its Display includes the server's message).
        #[source]
        source: tokio_postgres::Error,
    },
    /// A query that should return a row returned none.
    #[error("node {node}: `{sql}` returned no rows")]
    NoRows {
        /// The node's name.
        node: String,
        /// The query.
        sql: String,
    },
    /// A polled condition did not hold in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// The condition, with the last result or error seen.
        what: String,
        /// The timeout that expired.
        after: Duration,
    },
}

impl LabError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let context = context.into();
        move |source| LabError::Io { context, source }
    }
}

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
                    fs::read_to_string(&node.log_file).unwrap_or_else(|e| format!("(cannot read: {e})\n"));
                format!("=== {} ({}) ===\n{log}", node.name, node.log_file.display())
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

/// The PostgreSQL tool directory and whether tools must run as the `postgres` OS user.
#[derive(Debug, Clone)]
struct PgBin {
    dir: PathBuf,
    /// True when we are root, which PostgreSQL refuses to run as.
    as_postgres: bool,
}

// === impl PgBin ===

impl PgBin {
    async fn detect() -> Result<PgBin, LabError> {
        let dir =
            std::env::var_os(PG_BIN_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN));
        if !dir.join("initdb").exists() {
            return Err(LabError::MissingTools { dir });
        }
        let mut id = Command::new("id");
        id.arg("-u");
        let uid = run(id).await?;
        let as_postgres = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        Ok(PgBin { dir, as_postgres })
    }

    /// A command running `tool` from the bin directory (as `postgres` if we are root).
    fn command(&self, tool: &str) -> Command {
        let program = self.dir.join(tool);
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", SUPERUSER, "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        };
        // The caller's working directory may be unreadable for `postgres`.
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    }

    /// Creates the 0755 base directory with one subdirectory per node, owned by `postgres`
    /// when we are root.
    async fn base_dir(&self, nodes: usize) -> Result<TempDir, LabError> {
        let dir = tempfile::Builder::new()
            .prefix("pgnear-lab-")
            .tempdir_in(std::env::temp_dir())
            .map_err(LabError::io("creating the lab directory"))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(LabError::io("chmod of the lab directory"))?;
        for i in 0..nodes {
            let path = dir.path().join(node_name(i));
            fs::create_dir(&path).map_err(LabError::io(format!("mkdir {}", path.display())))?;
        }
        if self.as_postgres {
            let owner = format!("{SUPERUSER}:{SUPERUSER}");
            let mut chown = Command::new("chown");
            chown.arg("-R").arg(owner).arg(dir.path());
            run(chown).await?;
        }
        Ok(dir)
    }
}

/// One PostgreSQL server of a [`Cluster`].
#[derive(Debug)]
pub struct PgNode {
    name: String,
    /// Fixed once the node first starts; a restart reuses it.
    port: u16,
    /// Holds the unix socket and the server log.
    node_dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    apply_delay: Option<Duration>,
    bin: PgBin,
}

// === impl PgNode ===

impl PgNode {
    fn new(name: String, base: &Path, bin: PgBin, apply_delay: Option<Duration>) -> PgNode {
        let node_dir = base.join(&name);
        PgNode {
            data_dir: node_dir.join("data"),
            log_file: node_dir.join("postgres.log"),
            node_dir,
            name,
            port: 0,
            apply_delay,
            bin,
        }
    }

    /// The node's name: `primary`, `standby1`, `standby2`, ...
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        LOOPBACK
    }

    /// `127.0.0.1:port`, e.g. to put a relay in front of the node.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// PGDATA.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log file.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// `recovery_min_apply_delay` for a delayed replica.
    pub fn apply_delay(&self) -> Option<Duration> {
        self.apply_delay
    }

    /// A libpq-style TCP connection string: `host=127.0.0.1 port=N user=U dbname=D`.
    pub fn conn_string(&self, user: &str, db: &str) -> String {
        format!("host={LOOPBACK} port={} user={user} dbname={db}", self.port)
    }

    /// Connects as the superuser to database `postgres` through the unix socket (always
    /// trusted), spawning the connection task on the current runtime.
    pub async fn connect(&self) -> Result<Client, LabError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.node_dir)
            .port(self.port)
            .user(SUPERUSER)
            .dbname("postgres")
            .application_name("pgnear-lab")
            .connect_timeout(Duration::from_secs(5));
        let (client, connection) = config.connect(NoTls).await.map_err(|e| self.pg_err(e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "lab connection ended");
            }
        });
        Ok(client)
    }

    /// Runs `sql` on a fresh connection and returns the first column of the first row as
    /// text (`""` for NULL, as `psql -At` prints it).
    pub async fn query_scalar(&self, sql: &str) -> Result<String, LabError> {
        self.query_scalar_opt(sql)
            .await?
            .ok_or_else(|| LabError::NoRows { node: self.name.clone(), sql: sql.to_owned() })
    }

    /// Like [`query_scalar`](Self::query_scalar) but `None` when no row came back.
    async fn query_scalar_opt(&self, sql: &str) -> Result<Option<String>, LabError> {
        let client = self.connect().await?;
        let messages = client.simple_query(sql).await.map_err(|e| self.pg_err(e))?;
        Ok(messages.iter().find_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or_default().to_owned()),
            _ => None,
        }))
    }

    /// Re-runs `sql` every 50 ms until [`query_scalar`](Self::query_scalar) returns
    /// `expected`; errors (e.g. the node still starting) count as "not yet".
    pub async fn poll_query_until(
        &self,
        sql: &str,
        expected: &str,
        timeout_after: Duration,
    ) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout_after;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let last = match timeout(left, self.query_scalar(sql)).await {
                Ok(Ok(value)) if value == expected => return Ok(()),
                Ok(Ok(value)) => format!("last result {value:?}"),
                Ok(Err(error)) => format!("last error: {error}"),
                Err(_) => "query still running".to_owned(),
            };
            if Instant::now() >= deadline {
                let what = format!("{}: `{sql}` to return {expected:?} ({last})", self.name);
                return Err(LabError::Timeout { what, after: timeout_after });
            }
            sleep(POLL_INTERVAL).await;
        }
    }

    /// Stops the node cleanly (`pg_ctl stop -m fast`), blocking until it has exited.
    pub fn stop(&self) -> Result<(), LabError> {
        run_blocking(self.pg_ctl_stop("fast")).map(drop)
    }

    /// Stops the node like a crash (`pg_ctl stop -m immediate`); the next start recovers.
    pub fn kill(&self) -> Result<(), LabError> {
        run_blocking(self.pg_ctl_stop("immediate")).map(drop)
    }

    /// Restarts a stopped node on its port and waits until it answers `SELECT 1`.
    pub async fn start(&self) -> Result<(), LabError> {
        self.pg_ctl_start().await?;
        self.poll_query_until("SELECT 1", "1", READY_TIMEOUT).await
    }

    /// Promotes a replica (`pg_ctl promote -w`) and waits until it accepts writes.
    pub async fn promote(&self) -> Result<(), LabError> {
        run(self.pg_ctl(&["-w", "-t", PG_CTL_WAIT_SECS, "promote"])).await?;
        self.poll_query_until("SELECT pg_is_in_recovery()", "f", READY_TIMEOUT).await
    }

    /// initdb plus the lab's postgresql.conf and pg_hba.conf.
    async fn init(&self, spec: &ClusterBuilder) -> Result<(), LabError> {
        let mut initdb = self.bin.command("initdb");
        initdb.arg("-D").arg(&self.data_dir).args(["-A", "trust", "-U", SUPERUSER, "-E", "UTF8"]);
        initdb.args(["--locale=C", "--no-sync", "--no-instructions"]);
        run(initdb).await?;
        let conf = self.data_dir.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(LabError::io(format!("opening {}", conf.display())))?;
        file.write_all(spec.postgresql_conf().as_bytes())
            .map_err(LabError::io(format!("writing {}", conf.display())))?;
        self.write_config("pg_hba.conf", &spec.pg_hba_conf())
    }

    /// Clones `primary` with pg_basebackup, which also writes `primary_conninfo` (-R).
    async fn clone_from(&self, primary: &PgNode) -> Result<(), LabError> {
        let port = primary.port.to_string();
        let conninfo = format!("application_name={}", self.name);
        let mut basebackup = self.bin.command("pg_basebackup");
        basebackup.args(["-h", LOOPBACK, "-p", &port, "-U", SUPERUSER, "-d", &conninfo, "-D"]);
        basebackup.arg(&self.data_dir).args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"]);
        run(basebackup).await.map(drop)
    }

    /// First start: picks a free port and starts, trying another port if ours was taken
    /// between probing and binding, then waits until the node answers.
    async fn launch(&mut self) -> Result<(), LabError> {
        let mut attempt = 1;
        loop {
            self.port = free_port()?;
            self.write_node_conf()?;
            let log_start = self.log_len();
            match self.pg_ctl_start().await {
                Ok(()) => break,
                Err(_) if attempt < PORT_ATTEMPTS && self.port_clash_since(log_start) => {
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
        self.poll_query_until("SELECT 1", "1", READY_TIMEOUT).await.map_err(|error| self.start_error(error))
    }

    /// Per-node settings, included at the end of postgresql.conf.
    fn write_node_conf(&self) -> Result<(), LabError> {
        let mut conf = format!(
            "port = {}\nunix_socket_directories = {}\ncluster_name = {}\n",
            self.port,
            quote_literal(&self.node_dir.to_string_lossy()),
            quote_literal(&self.name),
        );
        if let Some(delay) = self.apply_delay {
            conf.push_str(&format!("recovery_min_apply_delay = '{}ms'\n", delay.as_millis()));
        }
        self.write_config("node.conf", &conf)
    }

    /// Writes a configuration file in PGDATA, readable by the server whatever our umask.
    fn write_config(&self, file: &str, contents: &str) -> Result<(), LabError> {
        let path = self.data_dir.join(file);
        let context = format!("writing {}", path.display());
        fs::write(&path, contents).map_err(LabError::io(context.clone()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(LabError::io(context))
    }

    /// `pg_ctl -D <PGDATA> <args>`.
    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut cmd = self.bin.command("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).args(args);
        cmd
    }

    async fn pg_ctl_start(&self) -> Result<(), LabError> {
        let mut cmd = self.pg_ctl(&["-w", "-t", PG_CTL_WAIT_SECS]);
        cmd.arg("-l").arg(&self.log_file).arg("start");
        run(cmd).await.map(drop).map_err(|e| self.start_error(e))
    }

    fn pg_ctl_stop(&self, mode: &str) -> Command {
        self.pg_ctl(&["-m", mode, "-w", "stop"])
    }

    /// Whether a postmaster claims the data directory.
    fn is_running(&self) -> bool {
        self.data_dir.join("postmaster.pid").exists()
    }

    fn log_len(&self) -> u64 {
        fs::metadata(&self.log_file).map(|m| m.len()).unwrap_or(0)
    }

    fn port_clash_since(&self, offset: u64) -> bool {
        let log = read_log_from(&self.log_file, offset);
        log.contains("Address already in use") || log.contains("could not bind")
    }

    fn start_error(&self, error: LabError) -> LabError {
        if matches!(error, LabError::Start { .. }) {
            return error;
        }
        let offset = self.log_len().saturating_sub(LOG_TAIL_BYTES);
        LabError::Start {
            node: self.name.clone(),
            reason: Box::new(error),
            log_tail: read_log_from(&self.log_file, offset),
        }
    }

    fn pg_err(&self, source: tokio_postgres::Error) -> LabError {
        LabError::Postgres { node: self.name.clone(), source }
    }
}

impl Drop for PgNode {
    /// Stops the node if it still runs, so a half-built cluster does not leak servers.
    fn drop(&mut self) {
        if self.is_running() {
            let mut stop = self.pg_ctl_stop("immediate");
            let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
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

/// A port that was free a moment ago: bind port 0 on loopback, read it, release it.
fn free_port() -> Result<u16, LabError> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(LabError::io("binding 127.0.0.1:0"))?;
    let addr = listener.local_addr().map_err(LabError::io("reading a probed port"))?;
    Ok(addr.port())
}

fn read_log_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    let read = fs::File::open(path).and_then(|mut file| {
        file.seek(SeekFrom::Start(offset))?;
        file.read_to_end(&mut bytes)
    });
    match read {
        Ok(_) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

async fn run(cmd: Command) -> Result<Output, LabError> {
    let command = describe(&cmd);
    let output = tokio::process::Command::from(cmd)
        .output()
        .await
        .map_err(LabError::io(format!("running `{command}`")))?;
    checked(command, output)
}

fn run_blocking(mut cmd: Command) -> Result<Output, LabError> {
    let command = describe(&cmd);
    let output = cmd.output().map_err(LabError::io(format!("running `{command}`")))?;
    checked(command, output)
}

fn checked(command: String, output: Output) -> Result<Output, LabError> {
    if output.status.success() {
        return Ok(output);
    }
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stderr), String::from_utf8_lossy(&output.stdout));
    Err(LabError::Tool { command, status: output.status, output: text.trim().to_owned() })
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A single-quoted SQL / postgresql.conf literal.
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A double-quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
