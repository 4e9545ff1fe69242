//! Reload: SIGHUP reads `proxy.toml` again. A file with faults changes
//! nothing (each fault is logged with its key path); a valid one replaces
//! the configuration and the users' credentials whole, and every session
//! uses them from its next unit or connection on. Nobody is disconnected.
//! Nodes are matched by name: new ones join (the monitor probes them
//! before reads go there), removed or changed ones are retired
//! (`Topology::apply`), and sessions leave them at their next unit of
//! work, after the transaction they are in.
//! Keys that only a restart can change keep their running values, each
//! logged as such; the TLS certificate and key files are read again.

use std::sync::Arc;

use super::Shared;
use crate::auth::Directory;
use crate::config::Config;

/// What a reload came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// Applied; the keys that still need a restart, if any changed.
    Applied { needs_restart: Vec<&'static str> },
    /// The file has faults (or cannot be read): nothing changed.
    Refused(Vec<String>),
    /// The configuration was not read from a file.
    NoFile,
}

/// Reads the configuration file again and applies it.
pub async fn reload(shared: &Arc<Shared>) -> Reloaded {
    let running = shared.config.load_full();
    let Some(path) = running.source.clone() else {
        // Embedded (tests, tools): only the certificate files are read again.
        reload_certificate(shared);
        tracing::warn!("reload: the configuration was not read from a file; only the TLS certificate was");
        return Reloaded::NoFile;
    };
    let loaded = match Config::load(&path) {
        Ok(config) => config,
        Err(errors) => return refused(shared, errors.0.iter().map(ToString::to_string).collect()),
    };
    let (config, needs_restart) = keep_restart_only(&running, loaded);
    let config = Arc::new(config);
    // PBKDF2 for every plain-text SCRAM password: off the reactor.
    let for_build = config.clone();
    let directory = match tokio::task::spawn_blocking(move || Directory::build(&for_build)).await {
        Ok(Ok(directory)) => directory,
        Ok(Err(error)) => return refused(shared, vec![error.to_string()]),
        Err(error) => return refused(shared, vec![error.to_string()]),
    };
    // Last of what can fail: every new node's TLS settings are checked
    // before any node changes.
    let changes = match shared.topology.apply(&config.nodes) {
        Ok(changes) => changes,
        Err(error) => return refused(shared, vec![error.to_string()]),
    };
    for &id in &changes.retired {
        shared.pools.retire(id);
    }
    shared.monitor.follow(Some(&config.monitor));
    shared.catalogs.set_config(&config.monitor);
    for &id in &changes.added {
        let node = &shared.topology.node(id).config;
        tracing::info!(node = node.name.as_str(), region = node.region.as_str(), "node added by a reload");
    }
    reload_certificate(shared);
    shared.directory.store(Arc::new(directory));
    shared.config.store(config);
    for key in &needs_restart {
        tracing::warn!(
            key,
            "reload: this key changed but applies only after a restart; its running value stays"
        );
    }
    shared.metrics.config_reloaded(true);
    tracing::info!(file = %path.display(), "configuration reloaded");
    Reloaded::Applied { needs_restart }
}

/// New handshakes use the certificate and key as the files have them now;
/// sessions keep theirs. A file that cannot be read keeps the running one.
fn reload_certificate(shared: &Shared) {
    let Some(acceptor) = &shared.tls.acceptor else { return };
    match acceptor.reload() {
        Ok(()) => tracing::info!("TLS certificate reloaded"),
        Err(error) => {
            tracing::error!(%error, "the TLS certificate could not be read; keeping the running one")
        }
    }
}

fn refused(shared: &Shared, faults: Vec<String>) -> Reloaded {
    for fault in &faults {
        tracing::error!(fault, "reload refused: the running configuration stays");
    }
    shared.metrics.config_reloaded(false);
    Reloaded::Refused(faults)
}

/// `loaded`, with the running values of the keys only a restart can
/// change (the listeners, the event loops, the pools' shape and caches
/// sized at start), and the names of those that differ.
fn keep_restart_only(running: &Config, mut loaded: Config) -> (Config, Vec<&'static str>) {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $name:literal) => {
            // Secrets print as `***`: a changed monitor password is kept
            // for the restart too, only not named.
            if format!("{:?}", loaded.$($field).+) != format!("{:?}", running.$($field).+) {
                changed.push($name);
            }
            loaded.$($field).+ = running.$($field).+.clone();
        };
    }
    keep!(proxy.listen, "proxy.listen");
    keep!(proxy.admin_listen, "proxy.admin_listen");
    keep!(proxy.unix_socket_dir, "proxy.unix_socket_dir");
    keep!(proxy.unix_socket_mode, "proxy.unix_socket_mode");
    keep!(proxy.worker_threads, "proxy.worker_threads");
    keep!(proxy.max_client_connections, "proxy.max_client_connections");
    keep!(proxy.classify_cache_entries, "proxy.classify_cache_entries");
    keep!(proxy.pool_mode, "proxy.pool_mode");
    keep!(proxy.pool_size, "proxy.pool_size");
    keep!(proxy.pool_timeout, "proxy.pool_timeout_ms");
    keep!(proxy.server_idle_timeout, "proxy.server_idle_timeout_ms");
    keep!(proxy.auth_cache, "proxy.auth_cache_ms");
    keep!(proxy.auth_failure_cache, "proxy.auth_failure_cache_ms");
    keep!(proxy.dns_max_ttl, "proxy.dns_max_ttl_ms");
    keep!(tls.mode, "tls.mode");
    keep!(tls.cert, "tls.cert");
    keep!(tls.key, "tls.key");
    (loaded, changed)
}
