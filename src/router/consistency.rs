//! Read-your-writes: the write watermark.
//!
//! Behind a unit that may have written and leaves the session outside a
//! transaction block, the session pipelines a hidden
//! `pg_current_wal_insert_lsn()` on the same connection, in the same
//! socket write (a *probe*). It runs after the unit's commit, so its
//! answer is at or past the commit: an exact watermark that costs no round
//! trip. While a probe's answer is on its way the watermark is unknown
//! (reads wait for it: it arrives right behind the client's
//! ReadyForQuery).
//!
//! A commit no probe covers (the probe failed, the unit's end could not be
//! predicted) falls back to the monitor: pgnear notes the instant the
//! commit's ReadyForQuery arrived and waits for the monitor's next primary
//! probe *sent after that instant*, whose insert LSN is past the commit.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
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
    /// Probes sent behind this session's commits whose answer has not
    /// come back yet.
    probing: u32,
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

    /// A probe was sent behind a commit.
    pub fn probe_sent(&mut self) {
        self.probing += 1;
    }

    /// A probe came back at `at` with the primary's insert LSN, or without
    /// one (it failed): then the commit it followed falls back to the
    /// monitor.
    pub fn probe_answered(&mut self, lsn: Option<Lsn>, at: Instant) {
        self.probing = self.probing.saturating_sub(1);
        match lsn {
            Some(lsn) => self.floor = Some(self.floor.map_or(lsn, |f| f.max(lsn))),
            None => self.wrote(at),
        }
    }

    /// Whether a probe's answer is on its way.
    pub fn is_probing(&self) -> bool {
        self.probing > 0
    }

    pub fn is_pending(&self) -> bool {
        self.pending_since.is_some() || self.probing > 0
    }

    /// Whether a commit waits for the monitor (not for a probe).
    pub fn waits_for_monitor(&self) -> bool {
        self.pending_since.is_some()
    }

    /// The resolved watermark, if any.
    pub fn lsn(&self) -> Option<Lsn> {
        self.floor
    }

    /// The freshness a read needs, given this watermark and any
    /// client-supplied `pgnear.min_lsn`.
    pub fn freshness(&self, min_lsn: Option<Lsn>) -> Freshness {
        if self.is_pending() {
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
            probing: self.probing + other.probing,
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
    /// Probes on their way back, over all sessions.
    probing: AtomicU32,
}

impl SharedWatermark {
    pub fn new(base: Instant) -> SharedWatermark {
        SharedWatermark {
            base,
            floor: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            probing: AtomicU32::new(0),
        }
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
            probing: self.probing.load(Ordering::Acquire),
        }
    }

    /// The watermark a new session starts from, at `now`: other sessions'
    /// probes on their way are not its to count down, so a commit they
    /// cover waits for the monitor instead.
    pub fn inherited(&self, now: Instant) -> Watermark {
        let mut watermark = self.get();
        if std::mem::take(&mut watermark.probing) > 0 {
            watermark.wrote(now);
        }
        watermark
    }

    /// Counts a probe on its way until it is answered (or dropped).
    pub fn probe(self: &Arc<Self>) -> Probe {
        self.probing.fetch_add(1, Ordering::AcqRel);
        Probe { shared: self.clone(), answered: false }
    }
}

/// The schema watermark of each cluster: the LSN past the last DDL that
/// committed through this pgnear, which every session's reads respect
/// whatever the read-your-writes scope (a table a migration created must
/// not be missing where another client reads). By cluster: LSNs of two
/// clusters do not compare.
#[derive(Debug)]
pub struct SchemaWatermarks {
    base: Instant,
    clusters: std::sync::Mutex<std::collections::HashMap<String, Arc<SharedWatermark>>>,
}

impl SchemaWatermarks {
    pub fn new(base: Instant) -> SchemaWatermarks {
        SchemaWatermarks { base, clusters: std::sync::Mutex::default() }
    }

    /// `cluster`'s schema watermark, made on first use. Looked up once
    /// per session.
    pub fn of(&self, cluster: &str) -> Arc<SharedWatermark> {
        let mut clusters = self.clusters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(found) = clusters.get(cluster) {
            return found.clone();
        }
        let made = Arc::new(SharedWatermark::new(self.base));
        clusters.insert(cluster.to_string(), made.clone());
        made
    }
}

/// A probe on its way, as the proxy-wide watermark counts it. Dropped
/// unanswered (the session ended first), the commit it followed is handed
/// to the monitor, so that no read of another session misses it.
#[derive(Debug)]
pub struct Probe {
    shared: Arc<SharedWatermark>,
    answered: bool,
}

impl Probe {
    /// The probe came back at `at`, with the insert LSN or without one.
    pub fn answered(mut self, lsn: Option<Lsn>, at: Instant) {
        self.settle(lsn, at);
    }

    fn settle(&mut self, lsn: Option<Lsn>, at: Instant) {
        if std::mem::replace(&mut self.answered, true) {
            return;
        }
        match lsn {
            // The floor first: a reader that sees the count fall sees it.
            Some(lsn) => self.shared.floor.fetch_max(lsn.0, Ordering::AcqRel),
            None => self.shared.pending.fetch_max(self.shared.nanos(at), Ordering::AcqRel),
        };
        self.shared.probing.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.settle(None, Instant::now());
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

    #[test]
    fn a_probe_resolves_its_commit_at_once() {
        let t0 = Instant::now();
        let mut w = Watermark::default();
        w.probe_sent();
        assert_eq!(w.freshness(None), Freshness::Unknown);
        assert!(w.is_probing() && !w.waits_for_monitor());
        w.probe_answered(Some(Lsn(500)), t0);
        assert_eq!(w.freshness(None), Freshness::AtLeast(Lsn(500)));
        // A lower answer never lowers the floor.
        w.probe_sent();
        w.probe_answered(Some(Lsn(400)), t0);
        assert_eq!(w.lsn(), Some(Lsn(500)));
    }

    #[test]
    fn a_failed_probe_hands_its_commit_to_the_monitor() {
        let t0 = Instant::now();
        let mut w = Watermark::default();
        w.probe_sent();
        w.probe_answered(None, t0 + Duration::from_millis(3));
        assert!(w.waits_for_monitor());
        assert_eq!(w.freshness(None), Freshness::Unknown);
        let before = PrimarySample { sent_at: t0 + Duration::from_millis(2), lsn: Lsn(10) };
        assert!(!w.resolve(Some(before)));
        let after = PrimarySample { sent_at: t0 + Duration::from_millis(4), lsn: Lsn(20) };
        assert!(w.resolve(Some(after)));
        assert_eq!(w.freshness(None), Freshness::AtLeast(Lsn(20)));
    }

    #[test]
    fn each_cluster_has_one_schema_watermark() {
        let schema = SchemaWatermarks::new(Instant::now());
        let (a, b) = (schema.of("a"), schema.of("b"));
        assert!(Arc::ptr_eq(&a, &schema.of("a")));
        assert!(!Arc::ptr_eq(&a, &b));
        let probe = a.probe();
        assert_eq!(schema.of("a").get().freshness(None), Freshness::Unknown);
        assert_eq!(b.get().freshness(None), Freshness::Any, "another cluster's DDL");
        probe.answered(Some(Lsn(90)), Instant::now());
        assert_eq!(schema.of("a").get().freshness(None), Freshness::AtLeast(Lsn(90)));
    }

    #[test]
    fn shared_probes_count_until_answered_or_dropped() {
        let base = Instant::now();
        let shared = Arc::new(SharedWatermark::new(base));
        let first = shared.probe();
        let second = shared.probe();
        assert_eq!(shared.get().freshness(None), Freshness::Unknown);
        // A new session does not inherit the count: it waits for the monitor.
        let start = base + Duration::from_millis(1);
        let inherited = shared.inherited(start);
        assert!(!inherited.is_probing() && inherited.waits_for_monitor());
        first.answered(Some(Lsn(70)), base);
        assert_eq!(shared.get().freshness(None), Freshness::Unknown);
        drop(second);
        let now = shared.get();
        assert!(!now.is_probing() && now.waits_for_monitor());
        assert_eq!(now.lsn(), Some(Lsn(70)));
        shared.resolve(Some(PrimarySample {
            sent_at: Instant::now() + Duration::from_millis(1),
            lsn: Lsn(80),
        }));
        assert_eq!(shared.get().freshness(None), Freshness::AtLeast(Lsn(80)));
    }
}
