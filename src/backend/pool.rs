//! Transaction pooling (`proxy.pool_mode = "transaction"`): server
//! connections shared between sessions. A session takes a connection when
//! a unit of work needs one and gives it back when the connection is idle
//! outside a transaction; the session's settings and prepared statements
//! are replayed onto whichever connection it gets next.
//!
//! One pool per node, server user and startup parameters, so a pooled
//! connection always has the startup settings of the session taking it;
//! `application_name` alone is left out of the key and set on the
//! connection when a session with another one takes it.
//! Idle connections are a stack: the most recently used is taken first,
//! so a few server processes stay hot instead of all of them turning over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::server::{open, Dial, Server, APPLICATION_NAME};
use super::ServerKey;
use crate::backend::ServerLogin;
use crate::config::ProxySettings;

use crate::metrics::PoolStats;

/// Named prepared statements a pooled connection may carry.
pub(crate) const MAX_POOLED_STATEMENTS: usize = 1000;

/// Every pool of the proxy.
pub struct Pools {
    size: usize,
    timeout: Duration,
    idle_timeout: Duration,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    node: usize,
    user: String,
    /// Startup parameters but `application_name`, sorted.
    params: Vec<(String, String)>,
}

/// The connections of one node for one user and set of startup parameters.
pub(crate) struct Pool {
    node: usize,
    /// The node was retired by a reload: connections given back close.
    retired: std::sync::atomic::AtomicBool,
    size: usize,
    /// Units waiting for a connection now.
    waiting: AtomicUsize,
    /// Units that waited `proxy.pool_timeout` in vain.
    timeouts: AtomicU64,
    idle: Mutex<Vec<Idle>>,
    /// One permit per connection in use: at most `size` at once.
    permits: Arc<Semaphore>,
    timeout: Duration,
}

struct Idle {
    server: Box<Server>,
    since: Instant,
}

/// Why no pooled connection could be had.
#[derive(Debug)]
pub(crate) enum PoolError {
    /// Every connection stayed in use for `proxy.pool_timeout`.
    Exhausted(Duration),
    /// A new connection could not be opened.
    Open(super::ConnectError),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pools {
    pub fn new(proxy: &ProxySettings) -> Pools {
        Pools {
            size: proxy.pool_size,
            timeout: proxy.pool_timeout,
            idle_timeout: proxy.server_idle_timeout,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// The pool for `login` on `node`, made on first use. Sessions keep
    /// what this returns: the lookup hashes every startup parameter.
    pub(crate) fn pool(&self, node: usize, login: &ServerLogin) -> Arc<Pool> {
        let mut params: Vec<_> =
            login.params.iter().filter(|(k, _)| k != APPLICATION_NAME).cloned().collect();
        params.sort();
        let key = PoolKey { node, user: login.user.clone(), params };
        lock(&self.pools)
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Pool {
                    node,
                    retired: Default::default(),
                    size: self.size,
                    waiting: AtomicUsize::new(0),
                    timeouts: AtomicU64::new(0),
                    idle: Mutex::new(Vec::new()),
                    permits: Arc::new(Semaphore::new(self.size)),
                    timeout: self.timeout,
                })
            })
            .clone()
    }

    /// A reload retired `node`: its idle connections close, and so do
    /// those in use when they are given back.
    pub(crate) fn retire(&self, node: usize) {
        let pools: Vec<Arc<Pool>> = lock(&self.pools).values().filter(|p| p.node == node).cloned().collect();
        for pool in pools {
            pool.retired.store(true, Ordering::Relaxed);
            lock(&pool.idle).clear();
        }
    }

    /// Closes the idle connections to `node`: CREATE and DROP DATABASE
    /// fail while other sessions are connected to the database involved.
    pub(crate) fn close_idle(&self, node: usize) {
        let pools: Vec<Arc<Pool>> = lock(&self.pools).values().filter(|p| p.node == node).cloned().collect();
        for pool in pools {
            lock(&pool.idle).clear();
        }
    }

    /// Closes connections idle for longer than `proxy.server_idle_timeout`.
    /// Called periodically.
    /// Pools left empty and unused by any session are dropped, so that
    /// startup parameters that come and go (or databases that do not
    /// exist) leave nothing behind.
    pub fn reap(&self) {
        let pools: Vec<Arc<Pool>> = lock(&self.pools).values().cloned().collect();
        for pool in pools {
            let mut idle = lock(&pool.idle);
            // Oldest first: the stack's bottom has waited longest.
            let expired = idle.iter().take_while(|i| i.since.elapsed() >= self.idle_timeout).count();
            idle.drain(..expired);
        }
        lock(&self.pools).retain(|_, pool| {
            // The map's own reference only: no session holds the pool.
            let unused = Arc::strong_count(pool) == 1 && pool.permits.available_permits() == pool.size;
            !(unused && lock(&pool.idle).is_empty())
        });
    }

    /// Every pool's state now, for the metrics.
    pub fn stats(&self) -> Vec<PoolStats> {
        let pools: Vec<Arc<Pool>> = lock(&self.pools).values().cloned().collect();
        pools
            .iter()
            .map(|pool| PoolStats {
                node: pool.node,
                idle: lock(&pool.idle).len(),
                active: pool.size.saturating_sub(pool.permits.available_permits()),
                waiting: pool.waiting.load(Ordering::Relaxed),
                timeouts: pool.timeouts.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Counts a unit as waiting for `pool` while it lives.
pub(crate) struct WaitCount(Arc<Pool>);

impl WaitCount {
    pub(crate) fn new(pool: Arc<Pool>) -> WaitCount {
        pool.waiting.fetch_add(1, Ordering::Relaxed);
        WaitCount(pool)
    }

    /// The wait ran out.
    pub(crate) fn timed_out(&self) {
        self.0.timeouts.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for WaitCount {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// An idle connection, without waiting, if one is free and a
    /// connection may be used. Pooled connections keep their `pool`.
    /// `Err(true)`: every connection is in use, wait for a permit;
    /// `Err(false)`: one may be opened.
    pub(crate) fn take_now(&self, holder: u64) -> Result<Box<Server>, bool> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else { return Err(true) };
        self.take_with(permit, holder).map_err(|_| false)
    }

    /// The semaphore whose permit a session waits for when every
    /// connection is in use.
    pub(crate) fn permits(&self) -> Arc<Semaphore> {
        self.permits.clone()
    }

    /// A connection: an idle one, or a new one while fewer than the pool
    /// size are in use; otherwise waits for one to come back.
    pub(crate) async fn take(
        &self,
        dial: Dial<'_>,
        login: &ServerLogin,
        holder: u64,
    ) -> Result<Box<Server>, PoolError> {
        let permits = self.permits.clone();
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let waited = crate::clock::timeout(self.timeout, permits.acquire_owned()).await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                match waited {
                    Ok(Ok(permit)) => permit,
                    // The semaphore is never closed.
                    Ok(Err(_)) | Err(_) => {
                        self.timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(PoolError::Exhausted(self.timeout));
                    }
                }
            }
        };
        match self.take_with(permit, holder) {
            Ok(server) => Ok(server),
            Err(permit) => {
                // Boxed: the future of a connect is large, and this one's
                // is moved on every wait for a pooled connection.
                let mut server = Box::pin(open(dial, self.node, login)).await.map_err(PoolError::Open)?;
                server.permit = Some(permit);
                server.hand_to(holder);
                Ok(server)
            }
        }
    }

    /// The most recently used idle connection that is still sound, holding
    /// `permit`, for session `holder`; the permit back if there is none.
    /// With several event loops, one whose socket this loop watches comes
    /// first: another loop's would wake that loop on every response.
    pub(crate) fn take_with(
        &self,
        permit: OwnedSemaphorePermit,
        holder: u64,
    ) -> Result<Box<Server>, OwnedSemaphorePermit> {
        let mut idle = lock(&self.idle);
        let here = crate::clock::current_loop();
        match idle.iter().rposition(|i| i.server.home == here) {
            Some(at) if at + 1 < idle.len() => {
                // To the top, the rest in order (the reaper expects the
                // oldest at the bottom).
                let mine = idle.remove(at);
                idle.push(mine);
            }
            _ => {}
        }
        while let Some(Idle { mut server, .. }) = idle.pop() {
            // A server that spoke while idle is shutting down (or was
            // terminated): it cannot take work.
            if server.backend.is_quiet() {
                server.permit = Some(permit);
                server.hand_to(holder);
                return Ok(server);
            }
        }
        Err(permit)
    }

    /// The idle connection `key` if session `holder` has held it, and no
    /// other session, since its turn `turn`, and it may be used now.
    pub(crate) fn take_back(&self, key: ServerKey, holder: u64, turn: u64) -> Option<Box<Server>> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        let mut idle = lock(&self.idle);
        let at =
            idle.iter().rposition(|i| i.server.cancel_key == key && i.server.held_by_since(holder, turn))?;
        let Idle { mut server, .. } = idle.remove(at);
        if !server.backend.is_quiet() {
            return None;
        }
        server.permit = Some(permit);
        server.hand_to(holder);
        Some(server)
    }

    /// Takes back a connection that is idle, outside a transaction, with
    /// nothing in flight and nothing left to read. One that has collected
    /// more than [`MAX_POOLED_STATEMENTS`] named statements (of all the
    /// sessions it served) closes the least recently used tenth of them
    /// before its next extended-protocol unit: each costs the server
    /// memory, and sessions re-prepare theirs where they are missing.
    pub(crate) fn put(&self, mut server: Box<Server>) {
        if server.state.statements.len() > MAX_POOLED_STATEMENTS {
            server.state.evict_statements(MAX_POOLED_STATEMENTS - MAX_POOLED_STATEMENTS / 10);
        }
        let permit = server.permit.take();
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        server.slot.set_idle(true);
        lock(&self.idle).push(Idle { server, since: Instant::now() });
        // After the push: a session woken by the permit finds the connection.
        drop(permit);
    }
}
