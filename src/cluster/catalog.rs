//! The user-defined volatile functions of each database, learned from the
//! primary's `pg_proc` so that calls to them count as writes.
//!
//! Each database a session uses gets one refresh loop, every
//! `monitor.function_refresh` (30 s by default), started on first use. A
//! session that ran DDL asks for an immediate refresh and waits for it
//! before its next routing decision, so a function created a moment ago
//! is never sent to a replica. Once that DDL has committed, the catalog is
//! marked stale, and every session on the database waits for a refresh
//! before routing again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_postgres::SimpleQueryMessage;

use super::Topology;
use crate::config::MonitorConfig;

/// SQL that lists the user-defined volatile functions, one lowercased name
/// per row, for [`VolatileFunctions::new`].
///
/// Functions, aggregates and window functions are included because any of
/// them can appear in a `SELECT`; procedures (`prokind = 'p'`) are left out
/// because they run only through `CALL`, which is always a write. Extension
/// functions installed outside `pg_catalog` are included too: pgnear cannot
/// tell a volatile reader (`uuid_generate_v4`) from a writer.
pub const VOLATILE_FUNCTIONS_QUERY: &str = "SELECT DISTINCT lower(p.proname) AS name \
     FROM pg_catalog.pg_proc AS p \
     JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace \
     WHERE p.provolatile = 'v' \
     AND p.prokind <> 'p' \
     AND n.nspname NOT IN ('pg_catalog', 'information_schema')";

/// An immutable set of user-defined volatile function names (lowercased,
/// unqualified), learned from the primary's `pg_proc`.
///
/// The proxy replaces the whole set when it reloads the catalog (after DDL),
/// so readers never see a half-updated set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolatileFunctions {
    names: HashSet<String>,
}

impl VolatileFunctions {
    /// Builds the set; names are lowercased here as well, so rows from any
    /// source compare like the classifier's names.
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        let names = names.into_iter().map(|n| n.to_lowercase()).collect();
        Self { names }
    }

    /// Whether `name` (lowercased, unqualified) is a known volatile function.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// How many names the set holds.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the set is empty (nothing loaded yet, or no such functions).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// One database's function set and its refresh signal.
#[derive(Debug)]
pub struct Catalog {
    pub volatile: ArcSwap<VolatileFunctions>,
    /// DDL that may define a function has committed since the last load
    /// began.
    stale: AtomicBool,
    refresh: Notify,
    refreshed: Notify,
}

impl Catalog {
    /// Asks for a refresh and waits (at most `timeout`) until it is done.
    /// Marks the function set out of date: DDL that may define a
    /// function has committed.
    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    /// Whether sessions must refresh before their next routing decision.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    pub async fn refresh_now(&self, timeout: Duration) {
        let done = self.refreshed.notified();
        self.refresh.notify_one();
        let _ = crate::clock::timeout(timeout, done).await;
    }
}

impl Catalogs {
    async fn connect(
        &self,
        node: usize,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let node = &self.topology.node(node).config;
        let config = self.config.load();
        let mut pg = tokio_postgres::Config::new();
        pg.host(&node.host).port(node.port).user(&config.user).dbname(database);
        pg.application_name("pgnear-catalog").connect_timeout(self.timeout);
        if let Some(password) = &config.password {
            pg.password(password.expose());
        }
        crate::tls::connect_postgres(&mut pg, node).await
    }
}

/// Catalogs by (cluster, database).
#[derive(Debug)]
pub struct Catalogs {
    topology: Arc<Topology>,
    /// The monitor's user and refresh interval: swapped by a reload.
    config: ArcSwap<MonitorConfig>,
    timeout: Duration,
    by_db: Mutex<HashMap<(String, String), Arc<Catalog>>>,
}

impl Catalogs {
    pub fn new(topology: Arc<Topology>, config: MonitorConfig, timeout: Duration) -> Catalogs {
        Catalogs {
            topology,
            config: ArcSwap::from_pointee(config),
            timeout,
            by_db: Mutex::new(HashMap::new()),
        }
    }

    /// New `[monitor]` settings, used from the next load on.
    pub fn set_config(&self, config: &MonitorConfig) {
        self.config.store(Arc::new(config.clone()));
    }

    /// The catalog of `database` in `cluster`, loaded once before this
    /// returns the first time.
    pub async fn get(self: &Arc<Self>, cluster: &str, database: &str) -> Arc<Catalog> {
        let key = (cluster.to_string(), database.to_string());
        let (catalog, fresh) = {
            let mut map = self.by_db.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&key) {
                Some(c) => (c.clone(), false),
                None => {
                    let c = Arc::new(Catalog {
                        volatile: ArcSwap::from_pointee(VolatileFunctions::default()),
                        stale: AtomicBool::new(false),
                        refresh: Notify::new(),
                        refreshed: Notify::new(),
                    });
                    map.insert(key.clone(), c.clone());
                    (c, true)
                }
            }
        };
        if fresh {
            let this = self.clone();
            let weak = Arc::downgrade(&catalog);
            // On the service loop, whichever session loop asks first: the
            // refresh loop outlives the session, and tokio-postgres times
            // its connect with tokio's own timers.
            crate::clock::spawn_on_service(async move { this.refresh_loop(key, weak).await });
            catalog.refresh_now(self.timeout).await;
        }
        catalog
    }

    async fn refresh_loop(self: Arc<Self>, key: (String, String), catalog: std::sync::Weak<Catalog>) {
        loop {
            let Some(c) = catalog.upgrade() else { return };
            // Cleared before the load: DDL committed from here on marks
            // it again and gets a load of its own.
            c.stale.store(false, Ordering::Relaxed);
            // A connection per load, closed after it: one kept idle
            // between refreshes would block DROP DATABASE (and CREATE
            // DATABASE from it as a template).
            match self.load(&key.0, &key.1).await {
                Ok(set) => c.volatile.store(Arc::new(set)),
                Err(error) => tracing::warn!(database = key.1, %error, "cannot load volatile functions"),
            }
            c.refreshed.notify_waiters();
            let wait = crate::clock::sleep(self.config.load().function_refresh);
            tokio::select! {
                () = wait => {}
                () = c.refresh.notified() => {}
            }
        }
    }

    async fn load(&self, cluster: &str, database: &str) -> Result<VolatileFunctions, String> {
        let node = self.topology.primary(cluster).map_err(|e| e.to_string())?;
        let client = crate::clock::timeout(self.timeout, self.connect(node, database))
            .await
            .map_err(|_| "timed out connecting".to_string())?
            .map_err(|e| e.to_string())?;
        let rows = crate::clock::timeout(self.timeout, client.simple_query(VOLATILE_FUNCTIONS_QUERY))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(VolatileFunctions::new(rows.iter().filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })))
    }
}
