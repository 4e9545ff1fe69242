//! Cancel keys: pgnear hands each client its own key and maps a
//! CancelRequest to the server connection running that client's query.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::backend::connect::send_cancel;
use crate::protocol::startup::CancelKey;

/// A server connection a cancel can be sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerKey {
    pub addr: SocketAddr,
    pub key: CancelKey,
}

/// Where one client's query is running right now. Written by its session
/// at the start of each unit of work, read by cancel requests.
#[derive(Debug, Default)]
pub struct CancelTarget {
    current: ArcSwapOption<ServerKey>,
    /// The session holds that server now. In transaction pooling it gives
    /// the connection back between units, and a late cancel must not
    /// reach whichever session has it next.
    engaged: AtomicBool,
}

impl CancelTarget {
    /// Points cancels at `server`. Called for every unit, so it stores
    /// only when the server changed: an ArcSwap store waits for readers.
    pub fn set(&self, server: &Arc<ServerKey>) {
        let same = self.current.load().as_ref().is_some_and(|current| Arc::ptr_eq(current, server));
        if !same {
            self.current.store(Some(server.clone()));
        }
        self.engaged.store(true, Ordering::Relaxed);
    }

    /// The session gave its server connection back: cancels are ignored
    /// until its next unit.
    pub fn disengage(&self) {
        self.engaged.store(false, Ordering::Relaxed);
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
    pub async fn cancel(&self, key: CancelKey, timeout: Duration) {
        let target = {
            let sessions = self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            sessions
                .get(&key)
                .filter(|t| t.engaged.load(Ordering::Relaxed))
                .and_then(|t| t.current.load_full())
        };
        match target {
            Some(server) => send_cancel(server.addr, server.key, timeout).await,
            None => tracing::info!(pid = key.pid, "cancel request with an unknown key ignored"),
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
