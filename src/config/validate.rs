//! From TOML text to a typed [`Config`], reporting every fault at once,
//! each with its key path.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::{Table, Value};

use super::file::*;
use super::*;

/// One fault in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `nodes[1].port`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

/// Every fault found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub(super) fn single(path: &str, message: String) -> ConfigErrors {
        ConfigErrors(vec![ConfigError { path: path.into(), message }])
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects faults while a file is checked.
#[derive(Default)]
struct Faults(Vec<ConfigError>);

impl Faults {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError { path: path.into(), message: message.into() });
    }
}

const SECTIONS: &[&str] =
    &["proxy", "nodes", "users", "routing", "consistency", "monitor", "rules", "tls", "tenants"];

pub(super) fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let mut table: Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigErrors::single("", format!("not valid TOML: {}", e.message().trim()))
    })?;
    let mut faults = Faults::default();
    for (key, value) in table.iter_mut() {
        expand_env(value, key, env, &mut faults);
        if !SECTIONS.contains(&key.as_str()) {
            faults.add(key.clone(), format!("unknown section; expected one of {}", SECTIONS.join(", ")));
        }
    }
    let raw = RawConfig::read(&table, &mut faults);
    let config = build(raw, &mut faults);
    if faults.0.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(faults.0))
    }
}

/// Replaces `${VAR}` in every string value; `$$` stands for a literal `$`.
fn expand_env(value: &mut Value, path: &str, env: &dyn Fn(&str) -> Option<String>, faults: &mut Faults) {
    match value {
        Value::String(s) => match expand_str(s, env) {
            Ok(expanded) => *s = expanded,
            Err(message) => faults.add(path, message),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_env(item, &format!("{path}[{i}]"), env, faults);
            }
        }
        Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                expand_env(v, &format!("{path}.{k}"), env, faults);
            }
        }
        _ => {}
    }
}

fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after.find('}').ok_or("unterminated ${ in value")?;
            let name = &after[..end];
            let value = env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The file's sections, each deserialized on its own so that one bad
/// section does not hide faults in another.
#[derive(Default)]
struct RawConfig {
    proxy: ProxyFile,
    nodes: Vec<NodeFile>,
    users: Vec<UserFile>,
    routing: RoutingFile,
    consistency: ConsistencyFile,
    monitor: MonitorFile,
    rules: Vec<RuleFile>,
    tls: TlsFile,
    tenants: Vec<TenantFile>,
}

impl RawConfig {
    fn read(table: &Table, faults: &mut Faults) -> RawConfig {
        RawConfig {
            proxy: section(table, "proxy", faults).unwrap_or_default(),
            nodes: array(table, "nodes", faults),
            users: array(table, "users", faults),
            routing: section(table, "routing", faults).unwrap_or_default(),
            consistency: section(table, "consistency", faults).unwrap_or_default(),
            monitor: section(table, "monitor", faults).unwrap_or_default(),
            rules: array(table, "rules", faults),
            tls: section(table, "tls", faults).unwrap_or_default(),
            tenants: array(table, "tenants", faults),
        }
    }
}

fn decode<T: DeserializeOwned>(value: &Value, path: &str, faults: &mut Faults) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let full =
                if inner == "." || inner.is_empty() { path.to_string() } else { format!("{path}.{inner}") };
            faults.add(full, e.into_inner().message().trim().to_string());
            None
        }
    }
}

fn section<T: DeserializeOwned>(table: &Table, key: &str, faults: &mut Faults) -> Option<T> {
    table.get(key).and_then(|v| decode(v, key, faults))
}

fn array<T: DeserializeOwned>(table: &Table, key: &str, faults: &mut Faults) -> Vec<T> {
    match table.get(key) {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| decode(item, &format!("{key}[{i}]"), faults))
            .collect(),
        Some(_) => {
            faults.add(key, format!("expected an array of tables ([[{key}]])"));
            Vec::new()
        }
    }
}

fn build(raw: RawConfig, faults: &mut Faults) -> Config {
    let proxy = proxy(raw.proxy, faults);
    let nodes: Vec<NodeConfig> =
        raw.nodes.into_iter().enumerate().map(|(i, n)| node(n, i, &proxy.region, faults)).collect();
    let users: Vec<UserConfig> = raw.users.into_iter().enumerate().map(|(i, u)| user(u, i, faults)).collect();
    let rules = raw.rules.into_iter().enumerate().filter_map(|(i, r)| rule(r, i, faults)).collect();
    let tenants = raw.tenants.into_iter().enumerate().filter_map(|(i, t)| tenant(t, i, faults)).collect();
    let mut config = Config {
        routing: routing(raw.routing, faults),
        consistency: consistency(raw.consistency, faults),
        monitor: monitor(raw.monitor, faults),
        tls: tls(raw.tls, faults),
        proxy,
        nodes,
        users,
        rules,
        tenants,
        source: None,
    };
    if config.monitor.password.is_none() {
        // The monitor logs in as a configured user with that user's
        // password toward servers, unless it has its own.
        let user = &config.monitor.user;
        let password =
            config.users.iter().find(|u| &u.server_user == user).and_then(|u| u.server_password.clone());
        config.monitor.password = password;
    }
    cross_checks(&config, faults);
    config
}

fn ms(value: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(value.unwrap_or(default))
}

fn socket_addr(value: &str, path: &str, faults: &mut Faults) -> Option<SocketAddr> {
    if let Ok(addr) = value.parse() {
        return Some(addr);
    }
    match value.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => Some(addr),
        _ => {
            faults.add(path, format!("{value:?} is not a host:port address"));
            None
        }
    }
}

fn proxy(p: ProxyFile, faults: &mut Faults) -> ProxySettings {
    let fallback: SocketAddr = ([127, 0, 0, 1], 6432).into();
    let listen = p.listen.as_deref().unwrap_or("127.0.0.1:6432");
    let listen = socket_addr(listen, "proxy.listen", faults).unwrap_or(fallback);
    let admin_listen = p.admin_listen.as_deref().and_then(|a| socket_addr(a, "proxy.admin_listen", faults));
    let unix_socket_dir = p.unix_socket_dir.map(std::path::PathBuf::from);
    if let Some(dir) = &unix_socket_dir {
        unix_socket_dir_fits(dir, listen.port(), "proxy.unix_socket_dir", faults);
    }
    let unix_socket_mode = octal_mode(p.unix_socket_mode.as_deref(), "proxy.unix_socket_mode", faults);
    let max_message_bytes = p.max_message_bytes.unwrap_or(256 * 1024 * 1024);
    if !(1024..=1 << 30).contains(&max_message_bytes) {
        faults.add("proxy.max_message_bytes", "must be between 1024 and 1073741824");
    }
    let max_clients = p.max_client_connections.unwrap_or(10_000);
    if max_clients == 0 {
        faults.add("proxy.max_client_connections", "must be at least 1");
    }
    let worker_threads = p.worker_threads.filter(|&n| n > 0);
    if worker_threads.is_some_and(|n| n > 1024) {
        faults.add(
            "proxy.worker_threads",
            "must be between 1 and 1024 (0 or absent: half the cores, at least one)",
        );
    }
    let pool_mode = choice(
        p.pool_mode.as_deref(),
        PoolMode::Session,
        &[("session", PoolMode::Session), ("transaction", PoolMode::Transaction)],
        "proxy.pool_mode",
        faults,
    );
    let pool_size = p.pool_size.unwrap_or(20);
    if !(1..=10_000).contains(&pool_size) {
        faults.add("proxy.pool_size", "must be between 1 and 10000");
    }
    ProxySettings {
        listen,
        admin_listen,
        unix_socket_dir,
        unix_socket_mode,
        region: p.region.unwrap_or_else(|| "local".into()),
        max_client_connections: max_clients as usize,
        max_message_bytes: max_message_bytes as usize,
        startup_timeout: ms(p.startup_timeout_ms, 10_000),
        idle_client_timeout: p.idle_client_timeout_ms.filter(|&v| v > 0).map(Duration::from_millis),
        connect_timeout: ms(p.connect_timeout_ms, 5_000),
        default_cluster: p.default_cluster.unwrap_or_else(|| "default".into()),
        require_tenant: p.require_tenant.unwrap_or(false),
        classify_cache_entries: p.classify_cache_entries.unwrap_or(10_000) as usize,
        worker_threads: worker_threads.map(|n| n as usize),
        pool_mode,
        pool_size: pool_size as usize,
        pool_timeout: ms(p.pool_timeout_ms, 30_000),
        server_idle_timeout: ms(p.server_idle_timeout_ms, 60_000),
        auth_user: p.auth_user,
        auth_query: p.auth_query.unwrap_or_else(|| DEFAULT_AUTH_QUERY.to_string()),
        auth_cache: ms(p.auth_cache_ms, 60_000),
        auth_failure_cache: ms(p.auth_failure_cache_ms, 5_000),
        max_user_connections: p.max_user_connections.unwrap_or(0) as usize,
        max_db_connections: p.max_db_connections.unwrap_or(0) as usize,
        dns_max_ttl: ms(p.dns_max_ttl_ms, 15_000),
        pause_timeout: ms(p.pause_timeout_ms, 60_000),
        admin_users: p.admin_users.unwrap_or_default(),
    }
}

/// A socket directory must be absolute, and the socket's path must fit
/// in a `sockaddr_un` (107 bytes and the terminating NUL on Linux).
fn unix_socket_dir_fits(dir: &std::path::Path, port: u16, path: &str, faults: &mut Faults) {
    if !dir.is_absolute() {
        faults.add(path, format!("{:?} is not an absolute path", dir.display()));
        return;
    }
    let socket = crate::config::unix_socket_path(dir, port);
    if socket.as_os_str().len() > UNIX_PATH_MAX {
        let message = format!("the socket path {:?} is longer than {UNIX_PATH_MAX} bytes", socket.display());
        faults.add(path, message);
    }
}

/// The longest path a Unix-domain socket address holds on Linux.
const UNIX_PATH_MAX: usize = 107;

/// Permission bits written in octal, as chmod takes them: "0777", "660".
fn octal_mode(value: Option<&str>, path: &str, faults: &mut Faults) -> u32 {
    const DEFAULT: u32 = 0o777;
    let Some(value) = value else { return DEFAULT };
    let digits = value.strip_prefix("0o").unwrap_or(value);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) && mode <= 0o777 => mode,
        _ => {
            faults.add(path, format!("{value:?} is not an octal mode between \"000\" and \"0777\""));
            DEFAULT
        }
    }
}

/// Picks a variant by name, or records a fault that lists the choices.
fn choice<T: Copy>(
    value: Option<&str>,
    default: T,
    options: &[(&str, T)],
    path: &str,
    faults: &mut Faults,
) -> T {
    let Some(value) = value else { return default };
    match options.iter().find(|(name, _)| *name == value) {
        Some((_, v)) => *v,
        None => {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            faults.add(path, format!("{value:?} is not one of {}", names.join(", ")));
            default
        }
    }
}

fn node(n: NodeFile, i: usize, default_region: &str, faults: &mut Faults) -> NodeConfig {
    let path = format!("nodes[{i}]");
    if n.name.is_empty() {
        faults.add(format!("{path}.name"), "must not be empty");
    }
    let port = n.port.unwrap_or(5432);
    if port == 0 || port > u64::from(u16::MAX) {
        faults.add(format!("{path}.port"), format!("{port} is not a TCP port"));
    }
    use RoleSetting as R;
    use SslMode as S;
    let role_opts = [("auto", R::Auto), ("primary", R::Primary), ("replica", R::Replica)];
    let ssl_opts = [
        ("disable", S::Disable),
        ("prefer", S::Prefer),
        ("require", S::Require),
        ("verify-ca", S::VerifyCa),
        ("verify-full", S::VerifyFull),
    ];
    let sslmode = choice(n.sslmode.as_deref(), S::Prefer, &ssl_opts, &format!("{path}.sslmode"), faults);
    if matches!(sslmode, S::VerifyCa | S::VerifyFull) && n.sslrootcert.is_none() {
        faults.add(format!("{path}.sslrootcert"), "is required by sslmode verify-ca and verify-full");
    }
    let node = NodeConfig {
        role: choice(n.role.as_deref(), R::Auto, &role_opts, &format!("{path}.role"), faults),
        sslmode,
        name: n.name,
        host: n.host,
        port: u16::try_from(port).unwrap_or(5432),
        region: n.region.unwrap_or_else(|| default_region.to_string()),
        cluster: n.cluster.unwrap_or_else(|| "default".into()),
        sslrootcert: n.sslrootcert.map(PathBuf::from),
    };
    if node.is_unix_socket() {
        // PostgreSQL never offers TLS on its Unix socket.
        if !matches!(sslmode, S::Disable | S::Prefer) {
            let message =
                "TLS is not used on a Unix socket (a host starting with \"/\"): use disable or prefer";
            faults.add(format!("{path}.sslmode"), message);
        }
        unix_socket_dir_fits(std::path::Path::new(&node.host), node.port, &format!("{path}.host"), faults);
    }
    node
}

fn user(u: UserFile, i: usize, faults: &mut Faults) -> UserConfig {
    let path = format!("users[{i}]");
    let password = u.password.map(Secret::new);
    // Without server_password, a plain-text password is used toward servers
    // too; a stored secret means passthrough (or a server that trusts pgnear).
    let own = password.clone().filter(|p| p.kind() == SecretKind::Plain);
    let auth = match (u.auth.as_deref().unwrap_or("scram-sha-256"), password) {
        ("trust", _) => ClientAuth::Trust,
        ("md5", Some(p)) if p.kind() == SecretKind::Scram => {
            faults.add(
                format!("{path}.password"),
                "a stored SCRAM secret cannot check md5 logins: auth = \"scram-sha-256\"",
            );
            ClientAuth::Trust
        }
        ("md5", Some(p)) => ClientAuth::Md5(p),
        ("scram-sha-256", Some(p)) if p.kind() == SecretKind::Md5 => {
            faults.add(
                format!("{path}.password"),
                "a stored md5 secret cannot check SCRAM logins: auth = \"md5\"",
            );
            ClientAuth::Trust
        }
        ("scram-sha-256", Some(p)) => ClientAuth::ScramSha256(p),
        ("md5" | "scram-sha-256", None) => {
            faults.add(format!("{path}.password"), "is required unless auth = \"trust\"");
            ClientAuth::Trust
        }
        (other, _) => {
            faults.add(format!("{path}.auth"), format!("{other:?} is not one of scram-sha-256, md5, trust"));
            ClientAuth::Trust
        }
    };
    UserConfig {
        server_user: u.server_user.unwrap_or_else(|| u.name.clone()),
        server_password: u.server_password.map(Secret::new).or(own),
        name: u.name,
        auth,
        max_user_connections: u.max_user_connections.map(|n| n as usize),
    }
}

fn routing(r: RoutingFile, faults: &mut Faults) -> RoutingConfig {
    let opts = [("auto", DefaultRoute::Auto), ("primary", DefaultRoute::Primary)];
    RoutingConfig {
        default: choice(r.default.as_deref(), DefaultRoute::Auto, &opts, "routing.default", faults),
        max_replica_lag: ms(r.max_replica_lag_ms, 10_000),
        max_replica_lag_bytes: r.max_replica_lag_bytes,
        optimistic_transactions: switch(
            r.optimistic_transactions,
            true,
            "routing.optimistic_transactions",
            faults,
        ),
    }
}

/// An on/off setting: true or false, or "on" or "off".
fn switch(value: Option<Switch>, default: bool, key: &str, faults: &mut Faults) -> bool {
    match value {
        None => default,
        Some(Switch::Bool(on)) => on,
        Some(Switch::Word(word)) => match word.to_ascii_lowercase().as_str() {
            "on" => true,
            "off" => false,
            _ => {
                faults.add(key, format!("{word:?} is not one of on, off (or true, false)"));
                default
            }
        },
    }
}

fn consistency(c: ConsistencyFile, faults: &mut Faults) -> ConsistencyConfig {
    use ReadYourWrites as R;
    let opts = [("session", R::Session), ("proxy", R::Proxy), ("off", R::Off)];
    let path = "consistency.read_your_writes";
    ConsistencyConfig {
        read_your_writes: choice(c.read_your_writes.as_deref(), R::Session, &opts, path, faults),
        replica_wait: replica_wait(c.replica_wait_ms, faults),
    }
}

fn replica_wait(value: Option<MillisOrWord>, faults: &mut Faults) -> ReplicaWait {
    match value {
        None => ReplicaWait::Auto,
        Some(MillisOrWord::Millis(ms)) => ReplicaWait::Fixed(Duration::from_millis(ms)),
        Some(MillisOrWord::Word(word)) if word == "auto" => ReplicaWait::Auto,
        Some(MillisOrWord::Word(word)) => {
            let message = format!("{word:?} is neither \"auto\" nor a number of milliseconds");
            faults.add("consistency.replica_wait_ms", message);
            ReplicaWait::Auto
        }
    }
}

fn monitor(m: MonitorFile, faults: &mut Faults) -> MonitorConfig {
    let interval = ms(m.interval_ms, 50);
    if interval < Duration::from_millis(5) {
        faults.add("monitor.interval_ms", "must be at least 5");
    }
    let count = |v: Option<u64>, d: u32, key: &str, faults: &mut Faults| match v {
        Some(0) => {
            faults.add(format!("monitor.{key}"), "must be at least 1");
            d
        }
        Some(v) => u32::try_from(v).unwrap_or(u32::MAX),
        None => d,
    };
    MonitorConfig {
        interval,
        user: m.user.unwrap_or_else(|| "postgres".into()),
        password: m.password.map(Secret::new),
        database: m.database.unwrap_or_else(|| "postgres".into()),
        failures_before_down: count(m.failures_before_down, 3, "failures_before_down", faults),
        successes_before_up: count(m.successes_before_up, 2, "successes_before_up", faults),
        function_refresh: ms(m.function_refresh_ms, 30_000),
    }
}

fn rule(r: RuleFile, i: usize, faults: &mut Faults) -> Option<RuleConfig> {
    let path = format!("rules[{i}]");
    if r.tables.is_empty() {
        faults.add(format!("{path}.tables"), "must name at least one table");
    }
    let action = match (r.route.as_deref(), r.max_staleness_ms) {
        (Some("primary"), None) => RuleAction::Primary,
        (None, Some(ms)) => RuleAction::MaxStaleness(Duration::from_millis(ms)),
        (Some(other), None) => {
            faults.add(format!("{path}.route"), format!("{other:?} is not \"primary\""));
            return None;
        }
        (Some(_), Some(_)) => {
            faults.add(path, "set either route or max_staleness_ms, not both");
            return None;
        }
        (None, None) => {
            faults.add(path, "needs route = \"primary\" or max_staleness_ms");
            return None;
        }
    };
    Some(RuleConfig { tables: r.tables.iter().map(|t| t.to_lowercase()).collect(), action })
}

fn tls(t: TlsFile, faults: &mut Faults) -> TlsConfig {
    let opts = [("disable", TlsMode::Disable), ("prefer", TlsMode::Prefer), ("require", TlsMode::Require)];
    let mode = choice(t.mode.as_deref(), TlsMode::Disable, &opts, "tls.mode", faults);
    if mode != TlsMode::Disable && (t.cert.is_none() || t.key.is_none()) {
        faults.add("tls", "mode prefer or require needs both cert and key");
    }
    TlsConfig { mode, cert: t.cert.map(PathBuf::from), key: t.key.map(PathBuf::from) }
}

fn tenant(t: TenantFile, i: usize, faults: &mut Faults) -> Option<TenantConfig> {
    if t.database.is_none() && t.user.is_none() {
        faults.add(format!("tenants[{i}]"), "needs database, user or both");
        return None;
    }
    Some(TenantConfig { database: t.database, user: t.user, cluster: t.cluster })
}

fn cross_checks(config: &Config, faults: &mut Faults) {
    if config.nodes.is_empty() {
        faults.add("nodes", "at least one [[nodes]] entry is required");
    }
    for (i, n) in config.nodes.iter().enumerate() {
        if config.nodes[..i].iter().any(|m| m.name == n.name) {
            faults.add(format!("nodes[{i}].name"), format!("{:?} is used by an earlier node", n.name));
        }
    }
    for (i, u) in config.users.iter().enumerate() {
        if config.users[..i].iter().any(|m| m.name == u.name) {
            faults.add(format!("users[{i}].name"), format!("{:?} is used by an earlier user", u.name));
        }
    }
    let known = |cluster: &str| config.nodes.iter().any(|n| n.cluster == cluster);
    for (i, t) in config.tenants.iter().enumerate() {
        if !known(&t.cluster) {
            faults
                .add(format!("tenants[{i}].cluster"), format!("no node belongs to cluster {:?}", t.cluster));
        }
    }
    if !config.nodes.is_empty() && !config.proxy.require_tenant && !known(&config.proxy.default_cluster) {
        let message = format!("no node belongs to cluster {:?}", config.proxy.default_cluster);
        faults.add("proxy.default_cluster", message);
    }
    if let Some(name) = &config.proxy.auth_user {
        match config.user(name) {
            None => faults.add("proxy.auth_user", format!("{name:?} is not a [[users]] entry")),
            Some(u) if u.server_password.is_none() && u.auth != ClientAuth::Trust => faults.add(
                "proxy.auth_user",
                format!(
                    "{name:?} has only a stored secret: the lookup logs in with a password \
                     (a plain-text password or server_password)"
                ),
            ),
            Some(_) => {}
        }
        let query = &config.proxy.auth_query;
        if !query.contains("$1") {
            faults.add("proxy.auth_query", "must take the user name as $1");
        }
    }
}
