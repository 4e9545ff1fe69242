//! Test fixtures: a cluster plus an in-process pgnear in front of it.

pub mod certs;
pub mod wire;

use std::time::Duration;

use pgnear::lab::cluster::{Cluster, ClusterBuilder};
use pgnear::{Config, Proxy};
use tokio_postgres::{Client, NoTls};

/// How long any test waits for a condition before failing.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running cluster with pgnear in front of it.
pub struct Env {
    // Field order is drop order: the proxy goes before the servers.
    pub proxy: Proxy,
    pub cluster: Cluster,
}

/// Describes a pgnear config for a cluster; TOML is generated and parsed
/// through the same path as a real config file.
pub struct ProxyConfig {
    users: Vec<String>,
    sections: Vec<String>,
    monitor: String,
    proxy: String,
    /// `[[nodes]]` TOML replacing the generated ones.
    nodes: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            users: vec!["[[users]]\nname = \"postgres\"\nauth = \"trust\"\n".into()],
            sections: Vec::new(),
            monitor: "[monitor]\ninterval_ms = 20\n".into(),
            proxy: String::new(),
            nodes: None,
        }
    }
}

impl ProxyConfig {
    /// Adds a `[[users]]` block (TOML body without the header).
    pub fn user(mut self, body: &str) -> Self {
        self.users.push(format!("[[users]]\n{body}\n"));
        self
    }

    /// Adds a whole TOML section.
    #[allow(dead_code)] // not every test binary build uses every builder method
    pub fn section(mut self, toml: &str) -> Self {
        self.sections.push(format!("{toml}\n"));
        self
    }

    /// Replaces the generated `[[nodes]]` (e.g. to put relays in front).
    #[allow(dead_code)] // not every test binary build uses every builder method
    pub fn nodes(mut self, toml: &str) -> Self {
        self.nodes = Some(toml.to_string());
        self
    }

    /// Adds `key = value` lines to `[proxy]`.
    pub fn proxy(mut self, lines: &str) -> Self {
        self.proxy.push_str(lines);
        self.proxy.push('\n');
        self
    }

    /// Replaces the `[monitor]` section.
    pub fn monitor(mut self, toml: &str) -> Self {
        self.monitor = format!("[monitor]\n{toml}\n");
        self
    }

    /// The TOML text for `cluster`.
    pub fn toml(&self, cluster: &Cluster) -> String {
        let mut text = format!("[proxy]\nlisten = \"127.0.0.1:0\"\nregion = \"eu-west\"\n{}\n", self.proxy);
        let nodes = std::iter::once((cluster.primary(), "us-east"))
            .chain(cluster.replicas().iter().map(|r| (r, "eu-west")));
        for (node, region) in nodes.filter(|_| self.nodes.is_none()) {
            text.push_str(&format!(
                "[[nodes]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\nregion = \"{region}\"\n\n",
                node.name(),
                node.port()
            ));
        }
        text.push_str(self.nodes.as_deref().unwrap_or(""));
        for block in self.users.iter().chain(&self.sections) {
            text.push_str(block);
            text.push('\n');
        }
        text.push_str(&self.monitor);
        text
    }

    pub fn build(&self, cluster: &Cluster) -> Config {
        let toml = self.toml(cluster);
        Config::parse(&toml, &|_| None).unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"))
    }
}

/// Starts a cluster from `builder` and pgnear with `config` in front.
pub async fn start(builder: ClusterBuilder, config: ProxyConfig) -> Env {
    let cluster = builder.start().await.unwrap_or_else(|e| panic!("cluster did not start: {e}"));
    let proxy = Proxy::start(config.build(&cluster)).await.unwrap();
    Env { proxy, cluster }
}

/// A primary only, trust auth, pgnear in front.
pub async fn primary_only() -> Env {
    start(Cluster::builder(), ProxyConfig::default()).await
}

impl Env {
    /// A libpq-style connection string to pgnear.
    pub fn conn_string(&self, user: &str, extra: &str) -> String {
        let addr = self.proxy.addr();
        format!("host={} port={} user={user} dbname=postgres {extra}", addr.ip(), addr.port())
    }

    /// A tokio-postgres client through pgnear as `postgres`.
    pub async fn client(&self) -> Client {
        self.client_with("postgres", "").await
    }

    /// A client through pgnear, or the error connecting.
    #[allow(dead_code)] // not every test binary build uses every helper
    pub async fn client_result(&self) -> Result<Client, tokio_postgres::Error> {
        connect(&self.conn_string("postgres", "")).await
    }

    pub async fn client_with(&self, user: &str, extra: &str) -> Client {
        connect(&self.conn_string(user, extra)).await.unwrap()
    }
}

/// Connects and drives the connection in the background.
pub async fn connect(conn_string: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn_string, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The value `SHOW name` answers.
pub async fn show(client: &Client, name: &str) -> String {
    first_value(client, &format!("SHOW {name}")).await.unwrap()
}

/// The first column of the first row `sql` returns over the simple
/// protocol, if any.
pub async fn first_value(client: &Client, sql: &str) -> Option<String> {
    let messages = client.simple_query(sql).await.unwrap();
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// The `pgnear_queries_routed_total` counter for `reason`, as scraped.
pub fn routed(env: &Env, reason: &str) -> u64 {
    let shared = env.proxy.shared();
    let text = shared.metrics.render(&shared.scrape()).unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("pgnear_queries_routed_total{") && l.contains(&format!("reason=\"{reason}\""))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The SQLSTATE of a failed call.
pub fn sqlstate<T: std::fmt::Debug>(result: Result<T, tokio_postgres::Error>) -> String {
    let error = result.expect_err("expected an error");
    match error.code() {
        Some(code) => code.code().to_string(),
        None => panic!("expected a server error, got {error}"),
    }
}

/// A PostgreSQL client program (from `PGNEAR_PG_BIN`, else Debian's
/// PostgreSQL 15), with a connect timeout and no stdin.
pub fn pg_tool(program: &str) -> tokio::process::Command {
    let bin = std::env::var(pgnear::lab::cluster::PG_BIN_ENV)
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let mut command = tokio::process::Command::new(format!("{bin}/{program}"));
    command.env("PGCONNECT_TIMEOUT", "10").stdin(std::process::Stdio::null());
    command
}

/// Runs a PostgreSQL client program and returns its output; fails the
/// test on a non-zero exit.
pub async fn run_tool(program: &str, args: &[&str]) -> String {
    let output =
        pg_tool(program).args(args).output().await.unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{program} {args:?} failed:\n{text}");
    text
}
