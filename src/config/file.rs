//! The serde mirror of `proxy.toml`: field names are the config contract.
//!
//! Everything here is raw: strings and integers exactly as written. The
//! `validate` module turns these into the typed [`super::Config`].

use serde::Deserialize;

/// The `[proxy]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyFile {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub unix_socket_dir: Option<String>,
    pub unix_socket_mode: Option<String>,
    pub region: Option<String>,
    pub max_client_connections: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub startup_timeout_ms: Option<u64>,
    pub idle_client_timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub default_cluster: Option<String>,
    pub require_tenant: Option<bool>,
    pub classify_cache_entries: Option<u64>,
    pub worker_threads: Option<u64>,
    pub pool_mode: Option<String>,
    pub pool_size: Option<u64>,
    pub pool_timeout_ms: Option<u64>,
    pub server_idle_timeout_ms: Option<u64>,
    pub auth_user: Option<String>,
    pub auth_query: Option<String>,
    pub auth_cache_ms: Option<u64>,
    pub auth_failure_cache_ms: Option<u64>,
    pub max_user_connections: Option<u64>,
    pub max_db_connections: Option<u64>,
    pub dns_max_ttl_ms: Option<u64>,
    pub pause_timeout_ms: Option<u64>,
    pub admin_users: Option<Vec<String>>,
}

/// One `[[nodes]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub name: String,
    pub host: String,
    pub port: Option<u64>,
    pub region: Option<String>,
    pub role: Option<String>,
    pub cluster: Option<String>,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
}

/// One `[[users]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFile {
    pub name: String,
    pub password: Option<String>,
    pub auth: Option<String>,
    pub server_user: Option<String>,
    pub server_password: Option<String>,
    pub max_user_connections: Option<u64>,
}

/// The `[routing]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    pub default: Option<String>,
    pub max_replica_lag_ms: Option<u64>,
    pub max_replica_lag_bytes: Option<u64>,
    pub optimistic_transactions: Option<Switch>,
}

/// An on/off setting: a TOML boolean, or the word `on` or `off`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Switch {
    Bool(bool),
    Word(String),
}

/// The `[consistency]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyFile {
    pub read_your_writes: Option<String>,
    pub replica_wait_ms: Option<MillisOrWord>,
}

/// A duration in milliseconds, or a word (`"auto"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MillisOrWord {
    Millis(u64),
    Word(String),
}

/// The `[monitor]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorFile {
    pub interval_ms: Option<u64>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub database: Option<String>,
    pub failures_before_down: Option<u64>,
    pub successes_before_up: Option<u64>,
    pub function_refresh_ms: Option<u64>,
}

/// One `[[rules]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub tables: Vec<String>,
    pub route: Option<String>,
    pub max_staleness_ms: Option<u64>,
}

/// The `[tls]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub mode: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// One `[[tenants]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantFile {
    pub database: Option<String>,
    pub user: Option<String>,
    pub cluster: String,
}
