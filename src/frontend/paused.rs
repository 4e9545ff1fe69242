//! `PAUSE` and `RESUME` (the admin console): while paused, units of work
//! that would start on a server wait, so that the operator can move the
//! primary; transactions already open run to their end. A unit waits at
//! most `proxy.pause_timeout_ms`, then fails with a clear error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Whether pgnear is paused, and the units waiting for it to resume.
#[derive(Debug, Default)]
pub struct Paused {
    on: AtomicBool,
    changed: Notify,
}

impl Paused {
    /// Whether new units wait.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Pauses (`true`) or resumes; waiting units go on at a resume.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Wakes the units waiting (a node was paused or resumed).
    pub fn notify(&self) {
        self.changed.notify_waiters();
    }

    /// Waits until resumed (and `nodes_paused` says no node is), for
    /// `limit` at most; false if still paused.
    pub async fn resumed(&self, limit: Duration, nodes_paused: impl Fn() -> bool) -> bool {
        let until = Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            if !self.is_on() && !nodes_paused() {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || crate::clock::timeout(left, changed).await.is_err() {
                return !self.is_on() && !nodes_paused();
            }
        }
    }
}
