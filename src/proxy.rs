//! A running pgnear: the client listener, the admin listener, the monitor
//! and what they share.
//! Tests start one in-process on port 0; `pgnear run` starts one from the
//! config file.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Directory;
use crate::backend::pool::Pools;
use crate::cluster::catalog::Catalogs;
use crate::cluster::{monitor, Topology};
use crate::config::{Config, PoolMode};
use crate::frontend::cancel::CancelRegistry;
pub use crate::frontend::reload::Reloaded;
use crate::frontend::Shared;
use crate::listener::UnixSocket;
use crate::metrics::Metrics;
use crate::router::cache::ClassifyCache;
use crate::router::consistency::SharedWatermark;

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen on {}: {source}", path.display())]
    ListenUnix { path: std::path::PathBuf, source: std::io::Error },
    #[error("invalid user credential: {0}")]
    Credential(#[from] crate::auth::ScramError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A running proxy. Dropping it stops accepting; [`Proxy::shutdown`]
/// also waits for sessions to drain, [`Proxy::shutdown_now`] closes them.
pub struct Proxy {
    addr: SocketAddr,
    /// The Unix socket's path, when `proxy.unix_socket_dir` is set.
    unix_socket: Option<std::path::PathBuf>,
    shared: Arc<Shared>,
    /// Turns true to stop accepting clients and let sessions end.
    shutdown: watch::Sender<bool>,
    /// Turns true to close every remaining session at once.
    close_now: watch::Sender<bool>,
    server: JoinHandle<()>,
    /// The admin listener's address and task, when `proxy.admin_listen` is
    /// set.
    admin: Option<(SocketAddr, JoinHandle<()>)>,
}

impl Proxy {
    /// Binds `proxy.listen` (port 0 picks a free port), probes every node
    /// once, then starts the monitor and the listener.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        let config = Arc::new(config);
        let addr = config.proxy.listen;
        let listener = client_listener(addr).map_err(|source| StartError::Listen { addr, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr, source })?;
        let unix_socket = match &config.proxy.unix_socket_dir {
            Some(dir) => {
                let path = crate::config::unix_socket_path(dir, addr.port());
                let bound = UnixSocket::bind(&path, config.proxy.unix_socket_mode);
                Some(bound.map_err(|source| StartError::ListenUnix { path, source })?)
            }
            None => None,
        };
        let admin_listener = match config.proxy.admin_listen {
            Some(addr) => {
                let admin =
                    TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
                let addr = admin.local_addr().map_err(|source| StartError::Listen { addr, source })?;
                Some((admin, addr))
            }
            None => None,
        };
        let topology = Topology::new(&config.nodes, config.proxy.dns_max_ttl)?;
        let tls = crate::tls::Tls::load(&config)?;
        let directory = {
            let config = config.clone();
            // PBKDF2 for every SCRAM user: keep it off the reactor.
            tokio::task::spawn_blocking(move || Directory::build(&config))
                .await
                .unwrap_or_else(|_| Ok(Directory::default()))?
        };
        monitor::probe_all(&topology, &config.monitor, config.proxy.connect_timeout).await;
        let monitor =
            monitor::Monitor::spawn(topology.clone(), config.monitor.clone(), config.proxy.connect_timeout);
        let catalogs =
            Arc::new(Catalogs::new(topology.clone(), config.monitor.clone(), config.proxy.connect_timeout));
        let pool_mode = config.proxy.pool_mode;
        let pools = Pools::new(&config.proxy);
        let lookups =
            crate::auth::lookup::Lookups::new(config.proxy.auth_cache, config.proxy.auth_failure_cache);
        let shared = Arc::new(Shared {
            classifier: ClassifyCache::new(config.proxy.classify_cache_entries),
            catalogs,
            watermark: Arc::new(SharedWatermark::new(std::time::Instant::now())),
            schema: crate::router::consistency::SchemaWatermarks::new(std::time::Instant::now()),
            metrics: Arc::new(Metrics::new()),
            config: arc_swap::ArcSwap::new(config),
            topology,
            directory: arc_swap::ArcSwap::from_pointee(directory),
            cancels: Arc::new(CancelRegistry::default()),
            pools,
            tls,
            learned: crate::router::learned::Learned::new(crate::router::learned::REMEMBER),
            limits: Arc::default(),
            lookups,
            refused: Default::default(),
            paused: crate::frontend::paused::Paused::default(),
            transactions: Arc::default(),
            monitor,
        });
        if pool_mode == PoolMode::Transaction {
            tokio::spawn(reap_pools(Arc::downgrade(&shared)));
        }
        let (shutdown, watch) = watch::channel(false);
        let (close_now, closing) = watch::channel(false);
        let admin = admin_listener.map(|(listener, admin_addr)| {
            tracing::info!(addr = %admin_addr, "admin listener is up");
            (admin_addr, tokio::spawn(crate::admin::run(listener, shared.clone(), watch.clone())))
        });
        let unix_path = unix_socket.as_ref().map(|socket| socket.path().to_path_buf());
        if let Some(path) = &unix_path {
            tracing::info!(path = %path.display(), "pgnear is listening on a Unix socket");
        }
        let server =
            tokio::spawn(crate::listener::run(listener, unix_socket, shared.clone(), watch, closing));
        tracing::info!(%addr, "pgnear is listening");
        Ok(Proxy { addr, unix_socket: unix_path, shared, shutdown, close_now, server, admin })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Unix socket clients may connect to, when
    /// `proxy.unix_socket_dir` is set.
    pub fn unix_socket(&self) -> Option<&std::path::Path> {
        self.unix_socket.as_deref()
    }

    /// Reads the configuration file again and applies it, as SIGHUP does.
    pub async fn reload(&self) -> Reloaded {
        crate::frontend::reload::reload(&self.shared).await
    }

    /// The admin HTTP address (`/metrics`, `/health`, `/ready`), when
    /// `proxy.admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(addr, _)| *addr)
    }

    /// What sessions share: the config and the live topology.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting and waits for every session to end.
    pub async fn shutdown(mut self) {
        self.drain();
        self.wait().await;
    }

    /// Stops accepting, closes every session at once and waits for them
    /// to be gone.
    pub async fn shutdown_now(mut self) {
        self.close_now();
        self.wait().await;
    }

    /// Stops accepting clients; running sessions go on until their
    /// clients leave (see [`Proxy::wait`]).
    pub fn drain(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Stops accepting clients and closes every session: each tells its
    /// client (FATAL 57P01, as PostgreSQL's fast shutdown does) and closes
    /// its server connections, cancelling a running query. A session
    /// that has not closed within two seconds (one still in its handshake
    /// or waiting on a server) is dropped.
    pub fn close_now(&self) {
        let _ = self.shutdown.send(true);
        let _ = self.close_now.send(true);
    }

    /// Runs until the listener task ends: after [`Proxy::drain`], once
    /// every session has ended. Cancel safe.
    pub async fn wait(&mut self) {
        let _ = (&mut self.server).await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.monitor.stop();
        self.server.abort();
        if let Some((_, admin)) = &self.admin {
            admin.abort();
        }
    }
}

/// Closes pooled server connections idle past `proxy.server_idle_timeout`,
/// until the proxy is gone.
async fn reap_pools(shared: std::sync::Weak<Shared>) {
    let every = match shared.upgrade() {
        Some(shared) => (shared.config().proxy.server_idle_timeout / 4)
            .clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(15)),
        None => return,
    };
    loop {
        crate::clock::sleep(every).await;
        let Some(shared) = shared.upgrade() else { return };
        shared.pools.reap();
    }
}

/// The client listener, with a deep accept backlog so that a burst of
/// connections on a loaded host is queued rather than dropped.
fn client_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
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
