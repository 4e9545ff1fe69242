//! Read-your-writes: the write watermark.
//!
//! After a write commits, pgnear does not ask the primary for the commit's
//! LSN (that would cost the client a round trip). It notes the instant the
//! commit's ReadyForQuery arrived, and waits for the monitor's next primary
//! probe *sent after that instant*. That probe's
//! `pg_current_wal_insert_lsn()` ran after the commit record was inserted,
//! so it is at or past the commit: a safe watermark. Until such a sample
//! exists, the watermark is unknown and reads stay on the primary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::Freshness;
use crate::cluster::Lsn;

/// A primary WAL position and when the probe that read it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimarySample {
    pub sent_at: Instant,
    pub lsn: Lsn,
}

/// One session's watermark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watermark {
    /// The highest resolved watermark.
    floor: Option<Lsn>,
    /// A commit seen at this instant is not resolved to an LSN yet.
    pending_since: Option<Instant>,
}

impl Watermark {
    /// Records a commit whose ReadyForQuery arrived at `at`.
    pub fn wrote(&mut self, at: Instant) {
        self.pending_since = Some(self.pending_since.map_or(at, |p| p.max(at)));
    }

    /// Resolves a pending commit with a primary sample taken after it.
    /// Returns whether the watermark changed.
    pub fn resolve(&mut self, sample: Option<PrimarySample>) -> bool {
        match (self.pending_since, sample) {
            (Some(since), Some(sample)) if sample.sent_at > since => {
                self.floor = Some(self.floor.map_or(sample.lsn, |f| f.max(sample.lsn)));
                self.pending_since = None;
                true
            }
            _ => false,
        }
    }

    pub fn is_pending(&self) -> bool {
        self.pending_since.is_some()
    }

    /// The resolved watermark, if any.
    pub fn lsn(&self) -> Option<Lsn> {
        self.floor
    }

    /// The freshness a read needs, given this watermark and any
    /// client-supplied `pgnear.min_lsn`.
    pub fn freshness(&self, min_lsn: Option<Lsn>) -> Freshness {
        if self.pending_since.is_some() {
            return Freshness::Unknown;
        }
        match self.floor.max(min_lsn) {
            Some(lsn) => Freshness::AtLeast(lsn),
            None => Freshness::Any,
        }
    }

    /// The stricter of two watermarks.
    pub fn merge(self, other: Watermark) -> Watermark {
        Watermark {
            floor: self.floor.max(other.floor),
            pending_since: match (self.pending_since, other.pending_since) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// The watermark of every session of this pgnear (`read_your_writes =
/// "proxy"`), in atomics so that sessions share it without a lock.
#[derive(Debug)]
pub struct SharedWatermark {
    base: Instant,
    floor: AtomicU64,
    /// Nanoseconds after `base` of the newest unresolved commit; 0 if none.
    pending: AtomicU64,
}

impl SharedWatermark {
    pub fn new(base: Instant) -> SharedWatermark {
        SharedWatermark { base, floor: AtomicU64::new(0), pending: AtomicU64::new(0) }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    pub fn wrote(&self, at: Instant) {
        self.pending.fetch_max(self.nanos(at), Ordering::AcqRel);
    }

    pub fn resolve(&self, sample: Option<PrimarySample>) {
        let Some(sample) = sample else { return };
        let pending = self.pending.load(Ordering::Acquire);
        if pending != 0 && self.nanos(sample.sent_at) > pending {
            self.floor.fetch_max(sample.lsn.0, Ordering::AcqRel);
            // Only clear what this sample covers; a newer commit stays.
            let _ = self.pending.compare_exchange(pending, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// The shared watermark as a value.
    pub fn get(&self) -> Watermark {
        let floor = self.floor.load(Ordering::Acquire);
        let pending = self.pending.load(Ordering::Acquire);
        Watermark {
            floor: (floor != 0).then_some(Lsn(floor)),
            pending_since: (pending != 0).then(|| self.base + std::time::Duration::from_nanos(pending)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_commit_is_resolved_only_by_a_later_sample() {
        let t0 = Instant::now();
        let mut w = Watermark::default();
        assert_eq!(w.freshness(None), Freshness::Any);
        w.wrote(t0 + Duration::from_millis(10));
        assert_eq!(w.freshness(None), Freshness::Unknown);
        let early = PrimarySample { sent_at: t0 + Duration::from_millis(5), lsn: Lsn(100) };
        assert!(!w.resolve(Some(early)));
        assert_eq!(w.freshness(None), Freshness::Unknown);
        let late = PrimarySample { sent_at: t0 + Duration::from_millis(11), lsn: Lsn(200) };
        assert!(w.resolve(Some(late)));
        assert_eq!(w.freshness(None), Freshness::AtLeast(Lsn(200)));
        assert_eq!(w.freshness(Some(Lsn(300))), Freshness::AtLeast(Lsn(300)));
        // A later, lower sample never lowers the floor.
        w.wrote(t0 + Duration::from_millis(20));
        assert!(w.resolve(Some(PrimarySample { sent_at: t0 + Duration::from_millis(21), lsn: Lsn(150) })));
        assert_eq!(w.lsn(), Some(Lsn(200)));
    }

    #[test]
    fn shared_watermark_keeps_newer_commits_pending() {
        let base = Instant::now();
        let shared = SharedWatermark::new(base);
        shared.wrote(base + Duration::from_millis(10));
        shared.resolve(Some(PrimarySample { sent_at: base + Duration::from_millis(9), lsn: Lsn(50) }));
        assert_eq!(shared.get().freshness(None), Freshness::Unknown);
        shared.resolve(Some(PrimarySample { sent_at: base + Duration::from_millis(12), lsn: Lsn(60) }));
        assert_eq!(shared.get().freshness(None), Freshness::AtLeast(Lsn(60)));
        let merged = Watermark::default().merge(shared.get());
        assert_eq!(merged.lsn(), Some(Lsn(60)));
    }
}
