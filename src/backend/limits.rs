//! `max_user_connections` and `max_db_connections`: server connections
//! counted per node and server user, and per node and database, across
//! every session and pool of the proxy. A connection holds a `Slot` for
//! as long as it is open, and is listed by the console's `SHOW SERVERS`
//! from the moment it has logged in.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What is counted: connections to a node as a user, or to a database.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    User(usize, String),
    Database(usize, String),
}

/// The open server connections by key.
#[derive(Debug, Default)]
pub struct ServerLimits {
    open: Mutex<HashMap<Key, usize>>,
    /// Logged-in connections by id, for `SHOW SERVERS`.
    servers: Mutex<BTreeMap<u64, Arc<OpenServer>>>,
    next_id: AtomicU64,
}

/// One open server connection's place in the counts; given back on drop.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ServerLimits>,
    keys: [Key; 2],
    listed: Option<Arc<OpenServer>>,
}

/// A logged-in server connection as `SHOW SERVERS` lists it.
#[derive(Debug)]
pub struct OpenServer {
    pub id: u64,
    pub node: usize,
    pub user: String,
    pub database: String,
    /// The server's address (or socket path).
    pub addr: String,
    pub since: std::time::SystemTime,
    /// The server process.
    pub pid: i32,
    pub tls: bool,
    /// Transaction pooling: in its pool, no session holds it.
    pub idle: AtomicBool,
}

/// The limits that apply to one login (0: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub per_user: usize,
    pub per_database: usize,
}

impl ServerLimits {
    /// Counts a new connection to `node` as `user` to `database`, unless
    /// that would pass a limit: then the error says which.
    pub fn take(
        self: &Arc<Self>,
        node: usize,
        user: &str,
        database: &str,
        limits: Limits,
    ) -> Result<Slot, String> {
        let keys = [Key::User(node, user.to_string()), Key::Database(node, database.to_string())];
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = |key: &Key| open.get(key).copied().unwrap_or(0);
        if limits.per_user > 0 && count(&keys[0]) >= limits.per_user {
            return Err(format!(
                "too many server connections for user {user:?} (max_user_connections = {})",
                limits.per_user
            ));
        }
        if limits.per_database > 0 && count(&keys[1]) >= limits.per_database {
            return Err(format!(
                "too many server connections for database {database:?} (max_db_connections = {})",
                limits.per_database
            ));
        }
        for key in &keys {
            *open.entry(key.clone()).or_insert(0) += 1;
        }
        drop(open);
        Ok(Slot { limits: self.clone(), keys, listed: None })
    }

    /// The logged-in server connections, by id.
    pub fn servers(&self) -> Vec<Arc<OpenServer>> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}

impl Slot {
    /// The connection has logged in to `addr`, server process `pid`: it
    /// is listed from now on, until the slot drops.
    pub fn list(&mut self, addr: String, pid: i32, tls: bool) {
        let [Key::User(node, user), Key::Database(_, database)] = &self.keys else { return };
        let entry = Arc::new(OpenServer {
            id: self.limits.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            node: *node,
            user: user.clone(),
            database: database.clone(),
            addr,
            since: std::time::SystemTime::now(),
            pid,
            tls,
            idle: AtomicBool::new(false),
        });
        self.limits.servers.lock().unwrap_or_else(|p| p.into_inner()).insert(entry.id, entry.clone());
        self.listed = Some(entry);
    }

    /// Marks the connection idle in its pool (true) or held by a session.
    pub fn set_idle(&self, idle: bool) {
        if let Some(listed) = &self.listed {
            listed.idle.store(idle, Ordering::Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(listed) = &self.listed {
            self.limits.servers.lock().unwrap_or_else(|p| p.into_inner()).remove(&listed.id);
        }
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(count) = open.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    open.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly

    use super::*;

    #[test]
    fn limits_count_per_node_user_and_database_and_free_on_drop() {
        let limits = Arc::new(ServerLimits::default());
        let two = Limits { per_user: 2, per_database: 3 };
        let a = limits.take(0, "app", "db", two).unwrap();
        let _b = limits.take(0, "app", "db", two).unwrap();
        assert!(limits.take(0, "app", "db", two).unwrap_err().contains("max_user_connections = 2"));
        // Another node, another user: counted apart.
        let _c = limits.take(1, "app", "db", two).unwrap();
        let _d = limits.take(0, "other", "db", two).unwrap();
        assert!(limits.take(0, "third", "db", two).unwrap_err().contains("max_db_connections = 3"));
        drop(a);
        limits.take(0, "app", "db", two).unwrap();
        // No limits: anything goes.
        for _ in 0..10 {
            std::mem::forget(limits.take(0, "app", "db", Limits::default()).unwrap());
        }
    }
}
