//! Cancel keys: pgnear hands each client its own key and maps a
//! CancelRequest to the server connection running that client's query.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use crate::backend::connect::send_cancel;
use crate::cluster::Topology;
use crate::protocol::startup::CancelKey;

pub use crate::backend::ServerKey;

/// Where one client's query is running right now: written by its session
/// when that changes (a unit goes to another server connection, or, in
/// transaction pooling, the session gives its connection back and a late
/// cancel must not reach whichever session has it next), read by cancel
/// requests.
///
/// It also carries the proxy's request that the session close: set, with
/// the session woken, by [`CancelRegistry::close_all`].
#[derive(Debug, Default)]
pub struct CancelTarget {
    current: Mutex<Option<ServerKey>>,
    closing: AtomicBool,
    /// The session's task, registered once by the session.
    task: AtomicWaker,
    /// Who the client is, for the console's SHOW CLIENTS and KILL.
    pub info: std::sync::OnceLock<ClientInfo>,
}

/// A connected client, as the console shows it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// The session's id (as in its log lines); what KILL takes.
    pub id: u64,
    pub user: String,
    pub database: String,
    pub peer: String,
    pub since: std::time::SystemTime,
}

/// A client and the server its queries go to now, if any.
#[derive(Debug, Clone)]
pub struct ClientRow {
    pub info: ClientInfo,
    pub server: Option<ServerKey>,
}

impl CancelTarget {
    /// Points cancels at `server`, or nowhere.
    pub fn set(&self, server: Option<ServerKey>) {
        *self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = server;
    }

    fn get(&self) -> Option<ServerKey> {
        *self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the proxy asked the session to close; `waker` is woken
    /// when it does (the session's task waker, which does not change, so
    /// registering it once is enough).
    pub fn closing(&self, waker: Option<&std::task::Waker>) -> bool {
        if let Some(waker) = waker {
            self.task.register(waker);
        }
        self.closing.load(Ordering::Acquire)
    }
}

/// Every live session's cancel target, by the key the client was given.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    // A plain mutex: touched once per connect, disconnect and cancel,
    // never per query.
    sessions: Mutex<HashMap<CancelKey, Arc<CancelTarget>>>,
}

/// Removes a session's key from the registry when the session ends.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub key: CancelKey,
    pub target: Arc<CancelTarget>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut sessions) = self.registry.sessions.lock() {
            sessions.remove(&self.key);
        }
    }
}

impl CancelRegistry {
    /// Registers a session whose client will see process ID `pid`, with a
    /// fresh random secret.
    pub fn register(self: &Arc<Self>, pid: i32) -> Registration {
        let target = Arc::new(CancelTarget::default());
        let mut sessions = self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = loop {
            let key = CancelKey { pid, secret: rand::random() };
            if !sessions.contains_key(&key) {
                break key;
            }
        };
        sessions.insert(key, target.clone());
        Registration { registry: self.clone(), key, target }
    }

    /// Forwards a client's CancelRequest. An unknown key is ignored, as
    /// PostgreSQL does, so that keys cannot be probed.
    pub async fn cancel(&self, key: CancelKey, topology: &Topology, timeout: Duration) {
        let target = {
            let sessions = self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            sessions.get(&key).and_then(|t| t.get())
        };
        match target {
            Some(server) => match (server.node < topology.len())
                .then(|| topology.node(server.node).last_endpoint())
            {
                Some(Some(endpoint)) => send_cancel(&endpoint, server.key, timeout).await,
                Some(None) => {
                    tracing::info!(node = server.node, "cancel request ignored: the node was never reached")
                }
                None => tracing::warn!(node = server.node, "cancel request for an unknown node"),
            },
            None => tracing::info!(pid = key.pid, "cancel request ignored: unknown key, or no query running"),
        }
    }

    /// Every client that has started its session.
    pub fn clients(&self) -> Vec<ClientRow> {
        let sessions = self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut rows: Vec<ClientRow> = sessions
            .values()
            .filter_map(|t| Some(ClientRow { info: t.info.get()?.clone(), server: t.get() }))
            .collect();
        rows.sort_by_key(|r| r.info.id);
        rows
    }

    /// Asks the session with id `id` to close; false if there is none.
    pub fn kill(&self, id: u64) -> bool {
        let sessions = self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let target = sessions.values().find(|t| t.info.get().is_some_and(|i| i.id == id));
        match target {
            Some(target) => {
                target.closing.store(true, Ordering::Release);
                target.task.wake();
                true
            }
            None => false,
        }
    }

    /// Asks every registered session to close, and wakes it.
    pub fn close_all(&self) {
        let sessions = self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for target in sessions.values() {
            target.closing.store(true, Ordering::Release);
            target.task.wake();
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
