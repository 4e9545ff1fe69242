//! The command line: `pgnear [run]`, `pgnear check`, `pgnear demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

/// A PostgreSQL proxy that reads from the nearest fresh replica.
#[derive(Debug, Parser)]
#[command(name = "pgnear", version, about)]
pub struct Cli {
    /// The config file.
    #[arg(long, short, global = true, default_value = "proxy.toml", env = "PGNEAR_CONFIG")]
    pub config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate a config file and exit 0 (valid) or 1 (invalid).
    Check,
    /// Start a local primary and two replicas, with pgnear in front.
    Demo {
        /// The port pgnear listens on.
        #[arg(long, default_value_t = 6432)]
        port: u16,
    },
}

/// Installs the tracing subscriber; `RUST_LOG` overrides the default level.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the parsed command line.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&cli.config),
        Command::Run => {
            let config = match Config::load(&cli.config) {
                Ok(config) => config,
                Err(errors) => {
                    eprintln!("{}: invalid configuration\n{errors}", cli.config.display());
                    return ExitCode::FAILURE;
                }
            };
            init_logging(cli.log_format);
            runtime().block_on(run(config))
        }
        Command::Demo { port } => {
            init_logging(cli.log_format);
            runtime().block_on(crate::demo::run(port))
        }
    }
}

/// The service loop: the accepting thread's current-thread runtime, with
/// the time driver that serves every loop's timers. `proxy.worker_threads`
/// session loops (at least one) start beside it (`server::run`), not a
/// work-stealing pool.
fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("pgnear: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    }
}

/// Validates the config file, then loads what it points to (certificates,
/// keys, root certificates, SCRAM secrets) as `run` would.
fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            let loaded = crate::tls::Tls::load(&config)
                .map(drop)
                .map_err(|e| e.to_string())
                .and_then(|()| crate::auth::Directory::build(&config).map(drop).map_err(|e| e.to_string()));
            if let Err(error) = loaded {
                eprintln!("{}: invalid configuration\n  {error}", path.display());
                return ExitCode::FAILURE;
            }
            println!("{}: ok ({} nodes, {} users)", path.display(), config.nodes.len(), config.users.len());
            for node in config.nodes.iter().filter(|n| !n.is_unix_socket()) {
                let resolves = std::net::ToSocketAddrs::to_socket_addrs(&(node.host.as_str(), node.port))
                    .is_ok_and(|mut addresses| addresses.next().is_some());
                if !resolves {
                    println!(
                        "  warning: node {:?}: {} does not resolve now; the node stays down until it does",
                        node.name, node.host
                    );
                }
            }
            for user in &config.users {
                println!("  user {}", user.describe());
            }
            let monitor = &config.monitor;
            let passthrough_only =
                config.users.iter().any(|u| u.server_user == monitor.user && u.server_password.is_none());
            if monitor.password.is_none() && passthrough_only {
                println!(
                    "  note: the monitor logs in as {:?} with no password, so the servers must trust it: \
                     a stored secret is passed through only for a client that proved it (set monitor.password)",
                    monitor.user
                );
            }
            if let Some(auth_user) = &config.proxy.auth_user {
                println!(
                    "  users not listed: looked up with proxy.auth_query as {auth_user:?} on their \
                     cluster's primary; servers by SCRAM or md5 passthrough"
                );
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: invalid configuration", path.display());
            for error in &errors.0 {
                eprintln!("  {error}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> ExitCode {
    tracing::info!(worker_threads = config.proxy.workers(), "starting");
    let mut proxy = match crate::Proxy::start(config).await {
        Ok(proxy) => proxy,
        Err(error) => {
            tracing::error!(%error, "pgnear could not start");
            return ExitCode::FAILURE;
        }
    };
    crate::proxy::shutdown_signal().await;
    tracing::info!(
        "shutting down: no new clients; waiting for sessions to end (signal again to close them now)"
    );
    proxy.drain();
    let forced = tokio::select! {
        () = proxy.wait() => false,
        () = crate::proxy::shutdown_signal() => true,
    };
    if forced {
        proxy.close_now();
        proxy.wait().await;
    }
    ExitCode::SUCCESS
}
