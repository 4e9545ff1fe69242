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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
            init_logging(cli.log_format);
            runtime().block_on(run(&cli.config))
        }
        Command::Demo { port } => {
            init_logging(cli.log_format);
            runtime().block_on(crate::demo::run(port))
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("pgnear: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            println!("{}: ok ({} nodes, {} users)", path.display(), config.nodes.len(), config.users.len());
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

async fn run(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{}: invalid configuration\n{errors}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let proxy = match crate::Proxy::start(config).await {
        Ok(proxy) => proxy,
        Err(error) => {
            tracing::error!(%error, "pgnear could not start");
            return ExitCode::FAILURE;
        }
    };
    shutdown_signal().await;
    tracing::info!("shutting down");
    proxy.shutdown().await;
    ExitCode::SUCCESS
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
