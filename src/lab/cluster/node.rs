//! One PostgreSQL server of the lab: its directories and port, starting, stopping and
//! promoting it with pg_ctl, and querying it through its unix socket.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::{sleep, timeout, Instant};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::pg_bin::{run, run_blocking, PgBin};
use super::{quote_literal, ClusterBuilder, LabError, LOOPBACK, READY_TIMEOUT, SUPERUSER};

/// `pg_ctl -t`: seconds pg_ctl waits for start and promote.
const PG_CTL_WAIT_SECS: &str = "60";
/// How often polled conditions are re-checked (Cluster.pm uses 100 ms).
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long [`PgNode::stream_from`] waits for the WAL receiver to stream from its new source.
const STREAM_SWITCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting a node on a fresh port when another process took the one we picked.
const PORT_ATTEMPTS: usize = 3;
/// How much of a node's log a start failure carries.
const LOG_TAIL_BYTES: u64 = 4096;

/// One PostgreSQL server of a [`Cluster`](super::Cluster).
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
    pub(super) fn new(name: String, base: &Path, bin: PgBin, apply_delay: Option<Duration>) -> PgNode {
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

    /// The directory of the node's Unix socket (`.s.PGSQL.<port>`), where
    /// every login is trusted.
    pub fn socket_dir(&self) -> &Path {
        &self.node_dir
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
    pub(super) async fn query_scalar_opt(&self, sql: &str) -> Result<Option<String>, LabError> {
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

    /// Points this replica's WAL receiver at `addr`, e.g. a [`Relay`](crate::lab::relay::Relay)
    /// in front of the primary so that WAL crosses the same simulated WAN as the clients.
    ///
    /// Sets `primary_conninfo` (as the superuser, over the trusted replication line of
    /// pg_hba.conf, like the conninfo pg_basebackup wrote) with `ALTER SYSTEM`, reloads, and
    /// waits until `pg_stat_wal_receiver` shows a receiver streaming from `addr`'s port. The
    /// receiver restarts on the change; the startup process may wait up to
    /// `wal_retrieve_retry_interval` (5 s) before starting the next one. It does not wait for
    /// the replica to catch up: see [`Cluster::wait_for_catchup`](super::Cluster::wait_for_catchup).
    /// Call it again with [`Cluster::primary`](super::Cluster::primary)'s address to undo it.
    pub async fn stream_from(&self, addr: SocketAddr) -> Result<(), LabError> {
        let conninfo = format!(
            "host={} port={} user={SUPERUSER} application_name={}",
            addr.ip(),
            addr.port(),
            self.name
        );
        let client = self.connect().await?;
        let set = format!("ALTER SYSTEM SET primary_conninfo = {}", quote_literal(&conninfo));
        client.simple_query(&set).await.map_err(|e| self.pg_err(e))?;
        client.simple_query("SELECT pg_reload_conf()").await.map_err(|e| self.pg_err(e))?;
        let source = "SELECT status || ' ' || sender_host || ':' || sender_port FROM pg_stat_wal_receiver";
        let expected = format!("streaming {}:{}", addr.ip(), addr.port());
        self.poll_query_until(source, &expected, STREAM_SWITCH_TIMEOUT).await
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
    pub(super) async fn init(&self, spec: &ClusterBuilder) -> Result<(), LabError> {
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
    pub(super) async fn clone_from(&self, primary: &PgNode) -> Result<(), LabError> {
        let port = primary.port.to_string();
        let conninfo = format!("application_name={}", self.name);
        let mut basebackup = self.bin.command("pg_basebackup");
        basebackup.args(["-h", LOOPBACK, "-p", &port, "-U", SUPERUSER, "-d", &conninfo, "-D"]);
        basebackup.arg(&self.data_dir).args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"]);
        run(basebackup).await.map(drop)
    }

    /// First start: picks a free port and starts, trying another port if ours was taken
    /// between probing and binding, then waits until the node answers.
    pub(super) async fn launch(&mut self) -> Result<(), LabError> {
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

    pub(super) fn pg_ctl_stop(&self, mode: &str) -> Command {
        self.pg_ctl(&["-m", mode, "-w", "stop"])
    }

    /// Whether a postmaster claims the data directory.
    pub(super) fn is_running(&self) -> bool {
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
