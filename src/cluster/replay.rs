//! Waiting for a replica to replay a write, without waiting for the
//! monitor's next probe.
//!
//! A read right after a write needs a replica that has replayed the
//! write's commit. In a real deployment the nearby replica has it about
//! when the client's COMMIT returns, but the monitor's regular probe (every
//! `monitor.interval`, 50 ms by default) would only see it up to an
//! interval later. So while reads wait on a replica, its monitor loop
//! polls `pg_last_wal_replay_lsn()` back to back, one round trip after the
//! other (a fraction of a millisecond on a nearby replica), publishes each
//! new position, and wakes the waiting reads. With no read waiting it
//! does nothing beyond the regular probe.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

use super::{Lsn, Node, NodeStatus, Role};

/// The polls a replica's reads are waiting for.
#[derive(Debug, Default)]
pub struct ReplayWatch {
    /// Reads waiting now.
    waiting: AtomicU32,
    /// Wakes the monitor loop when the first read starts waiting.
    wanted: Notify,
    /// Wakes the waiting reads when a newer position is published.
    advanced: Notify,
}

impl ReplayWatch {
    /// Whether any read is waiting.
    pub fn is_wanted(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Resolves when a read has started waiting since the last time this
    /// resolved. Cancel safe (an unconsumed notice stays for the next
    /// call). Never ready just because reads are waiting: a loop around
    /// it would spin, and a spinning task starves its event loop's timers.
    pub async fn wanted(&self) {
        self.wanted.notified().await;
    }

    /// Wakes the waiting reads to look at the published status again.
    pub(super) fn wake(&self) {
        self.advanced.notify_waiters();
    }

    /// Counts a waiting read until the guard drops.
    fn enter(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.wanted.notify_one();
        Waiting { watch: self }
    }
}

/// One read waiting on a replica.
struct Waiting<'a> {
    watch: &'a ReplayWatch,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.watch.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Node {
    /// Waits until this replica has replayed `lsn`, as its published
    /// status says, or until `deadline`. Returns whether it has. Gives up
    /// at once when the node is down or no longer a replica.
    pub async fn replayed(&self, lsn: Lsn, deadline: Instant) -> bool {
        let _waiting = self.replay.enter();
        let mut expired = std::pin::pin!(crate::clock::sleep_until(tokio::time::Instant::from_std(deadline)));
        loop {
            // Registered before the look, so that no publication between
            // the two is missed.
            let advanced = self.replay.advanced.notified();
            let status = self.status.load();
            if status.lsn.is_some_and(|replayed| replayed >= lsn) {
                return true;
            }
            if !status.up || status.role != Role::Replica || Instant::now() >= deadline {
                return false;
            }
            tokio::select! {
                () = advanced => {}
                () = &mut expired => {}
            }
        }
    }

    /// Publishes a replay position read by a fast poll, if it is newer
    /// than the published one, and wakes the reads waiting on it.
    pub(super) fn publish_replay(&self, lsn: Lsn) {
        let old = self.status.load();
        if old.role == Role::Replica && old.lsn.is_none_or(|known| known < lsn) {
            self.publish(NodeStatus { lsn: Some(lsn), ..(**old).clone() });
        }
        self.replay.wake();
    }
}
