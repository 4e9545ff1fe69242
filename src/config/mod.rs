//! Configuration: `proxy.toml` parsed once into typed, validated values.
//!
//! `file` mirrors the TOML with serde; `validate` checks it and builds the
//! [`Config`] below. Nothing else in pgnear reads the file or the
//! environment: the `Config` is passed explicitly.

mod file;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use validate::{ConfigError, ConfigErrors};

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxySettings,
    pub nodes: Vec<NodeConfig>,
    pub users: Vec<UserConfig>,
    pub routing: RoutingConfig,
    pub consistency: ConsistencyConfig,
    pub monitor: MonitorConfig,
    pub rules: Vec<RuleConfig>,
    pub tls: TlsConfig,
    pub tenants: Vec<TenantConfig>,
    /// The file it was read from, which a reload reads again.
    pub source: Option<std::path::PathBuf>,
}

impl Config {
    /// Reads and validates a file, expanding `${VAR}` from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::single("", format!("cannot read {}: {e}", path.display())))?;
        let mut config = Self::parse(&text, &|name| std::env::var(name).ok())?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates TOML text; `env` resolves `${VAR}`.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        validate::parse(text, env)
    }

    /// The user entry for a client-supplied user name.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}

/// The `[proxy]` table.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    /// A directory for a Unix-domain socket beside the TCP listener,
    /// named as PostgreSQL names its own (`.s.PGSQL.<port>`, with the
    /// port of `listen`), so that libpq's `host=<dir> port=<port>` finds
    /// it. A sidecar's application reaches pgnear without TCP.
    pub unix_socket_dir: Option<std::path::PathBuf>,
    /// The socket file's permission bits (`proxy.unix_socket_mode`,
    /// octal, default 0777 as PostgreSQL's and PgBouncer's).
    pub unix_socket_mode: u32,
    pub region: String,
    pub max_client_connections: usize,
    /// The largest frame accepted from a client or a server.
    pub max_message_bytes: usize,
    pub startup_timeout: Duration,
    pub idle_client_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    /// The cluster of connections that no `[[tenants]]` rule maps.
    pub default_cluster: String,
    /// Refuse connections that no `[[tenants]]` rule maps.
    pub require_tenant: bool,
    pub classify_cache_entries: usize,
    /// Event loops serving clients, one thread each; `None`: half the
    /// cores, at least one (see [`ProxySettings::workers`]).
    pub worker_threads: Option<usize>,
    /// How long a client keeps a server connection: `session` (its whole
    /// life) or `transaction` (back to a shared pool when idle).
    pub pool_mode: PoolMode,
    /// Transaction mode: server connections per node, user and startup
    /// parameters.
    pub pool_size: usize,
    /// Transaction mode: how long a unit waits for a pooled connection.
    pub pool_timeout: Duration,
    /// Transaction mode: idle pooled connections are closed after this.
    pub server_idle_timeout: Duration,
    /// The `[[users]]` entry that looks up users not listed there.
    pub auth_user: Option<String>,
    /// The lookup: one parameter (the user name), one row of name and
    /// stored secret (PgBouncer's `auth_query`).
    pub auth_query: String,
    /// How long a looked-up secret is used before it is looked up again.
    pub auth_cache: Duration,
    /// How long a lookup that found nothing (or failed) stands.
    pub auth_failure_cache: Duration,
    /// Server connections per node and server user at most (0: no limit);
    /// a user's `max_user_connections` overrides it.
    pub max_user_connections: usize,
    /// Server connections per node and database at most (0: no limit).
    pub max_db_connections: usize,
    /// How long a node's resolved address is used before its host name is
    /// looked up again (PgBouncer's `dns_max_ttl`).
    pub dns_max_ttl: Duration,
    /// How long a unit waits while pgnear is paused before it fails.
    pub pause_timeout: Duration,
    /// Users that may open the admin console (database `pgnear`).
    pub admin_users: Vec<String>,
}

/// PgBouncer's default `auth_query`.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

/// `proxy.pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// One server connection per node for each client, for the client's
    /// whole session: full PostgreSQL session semantics.
    Session,
    /// Server connections return to a shared pool whenever the client's
    /// work on them is idle (outside a transaction); session state is
    /// replayed onto whichever connection the client gets next.
    Transaction,
}

impl ProxySettings {
    /// Session loops: `proxy.worker_threads`, or half the cores (at least one),
    /// beside the service loop (even one: the service loop has a time driver,
    /// and session loops do not). Each is a single-threaded runtime that keeps
    /// its sessions, so a loop never waits for a lock or wakes another thread.
    /// Fewer loops batch more: a loop with a share of the clients finds less to
    /// do per wake-up and sleeps more often, and a sleep and a wake-up cost
    /// more CPU than relaying a round trip. On two cores shared with PostgreSQL
    /// and pgbench, one loop slept about half as often per transaction as two
    /// and used 6-29% less CPU per transaction. A sidecar shares its cores with
    /// the application, so by default it leaves half of them alone.
    pub fn workers(&self) -> usize {
        self.worker_threads.unwrap_or_else(default_workers)
    }
}

/// The socket file in `dir` for clients of `port`: `.s.PGSQL.<port>`,
/// as PostgreSQL names its own.
pub fn unix_socket_path(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// Half the cores, at least one.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// What the config says about a node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleSetting {
    /// Discovered with `pg_is_in_recovery()`.
    Auto,
    Primary,
    Replica,
}

/// libpq-style `sslmode` toward a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// One `[[nodes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    /// A host name or address, or, starting with `/`, the directory of
    /// the server's Unix socket (as libpq takes it).
    pub host: String,
    pub port: u16,
    pub region: String,
    pub role: RoleSetting,
    pub cluster: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
}

impl NodeConfig {
    /// The node is reached over a Unix socket (its host is a directory).
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }
}

/// A password or other secret: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// What a configured password is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    Plain,
    /// A stored `SCRAM-SHA-256$iter:salt$stored:server` secret.
    Scram,
    /// A stored `md5` + 32 hex digits secret.
    Md5,
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// Whether this is a password or a secret stored as PostgreSQL keeps it.
    pub fn kind(&self) -> SecretKind {
        let md5 = |h: &str| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit());
        if self.0.starts_with("SCRAM-SHA-256$") {
            SecretKind::Scram
        } else if self.0.strip_prefix("md5").is_some_and(md5) {
            SecretKind::Md5
        } else {
            SecretKind::Plain
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How a client proves who it is to pgnear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    Trust,
    Md5(Secret),
    /// A plaintext password or a stored `SCRAM-SHA-256$...` verifier.
    ScramSha256(Secret),
}

/// One `[[users]]` entry.
#[derive(Debug, Clone)]
pub struct UserConfig {
    pub name: String,
    pub auth: ClientAuth,
    pub server_user: String,
    /// The password pgnear logs in to servers with: `server_password`, or
    /// else the user's own `password` when it is plain text. `None`: SCRAM
    /// or md5 passthrough for a stored secret, or a server that trusts pgnear.
    pub server_password: Option<Secret>,
    /// Server connections per node at most for this user (0: no limit);
    /// `None`: `proxy.max_user_connections`.
    pub max_user_connections: Option<usize>,
}

impl UserConfig {
    /// How this user's clients are checked and how pgnear logs in to
    /// servers for them, in words (`pgnear check`).
    pub fn describe(&self) -> String {
        let (clients, stored) = match &self.auth {
            ClientAuth::Trust => ("trusted", None),
            ClientAuth::Md5(secret) => ("md5", Some(secret.kind())),
            ClientAuth::ScramSha256(secret) => ("scram-sha-256", Some(secret.kind())),
        };
        let servers = match (&self.server_password, stored) {
            (Some(_), Some(SecretKind::Plain)) if self.server_password_is_own() => {
                "with its own password".to_string()
            }
            (Some(_), _) => "with server_password".to_string(),
            (None, Some(SecretKind::Scram)) => {
                "by SCRAM passthrough (the stored secret must be the servers' own, from pg_authid)"
                    .to_string()
            }
            (None, Some(SecretKind::Md5)) => "by md5 passthrough (the stored md5 secret)".to_string(),
            (None, _) => "with no password (the servers must trust pgnear)".to_string(),
        };
        format!("{}: clients {clients}; servers as {:?} {servers}", self.name, self.server_user)
    }

    /// Whether the password toward servers is the user's own.
    fn server_password_is_own(&self) -> bool {
        match (&self.auth, &self.server_password) {
            (ClientAuth::Md5(own) | ClientAuth::ScramSha256(own), Some(server)) => {
                own.expose() == server.expose()
            }
            _ => false,
        }
    }
}

/// `routing.default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultRoute {
    /// Split reads and writes.
    Auto,
    /// Send everything to the primary.
    Primary,
}

/// The `[routing]` table.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub default: DefaultRoute,
    pub max_replica_lag: Duration,
    pub max_replica_lag_bytes: Option<u64>,
    /// A plain BEGIN whose first statement reads runs on a replica, and
    /// moves to the primary (replayed and checked) if it writes.
    pub optimistic_transactions: bool,
}

/// `consistency.read_your_writes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadYourWrites {
    Session,
    Proxy,
    Off,
}

/// The `[consistency]` table.
#[derive(Debug, Clone)]
pub struct ConsistencyConfig {
    pub read_your_writes: ReadYourWrites,
    pub replica_wait: ReplicaWait,
}

/// `consistency.replica_wait_ms`: how long a read after a write may wait
/// for a replica to replay it before it goes to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaWait {
    /// As long as a round trip to the primary takes (its measured RTT):
    /// waiting never costs more than going there would.
    Auto,
    /// This long; zero never waits.
    Fixed(Duration),
}

/// The `[monitor]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    pub interval: Duration,
    pub user: String,
    pub password: Option<Secret>,
    pub database: String,
    pub failures_before_down: u32,
    pub successes_before_up: u32,
    pub function_refresh: Duration,
}

/// What a `[[rules]]` entry does to the tables it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    /// All access stays on the primary.
    Primary,
    /// Reads may use a replica only while its lag is under this bound.
    MaxStaleness(Duration),
}

/// One `[[rules]]` entry.
#[derive(Debug, Clone)]
pub struct RuleConfig {
    /// Lowercased table names.
    pub tables: Vec<String>,
    pub action: RuleAction,
}

/// `tls.mode` toward clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
}

/// The `[tls]` table.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// One `[[tenants]]` entry: connections matching it belong to `cluster`.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub database: Option<String>,
    pub user: Option<String>,
    pub cluster: String,
}
