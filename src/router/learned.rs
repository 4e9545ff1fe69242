//! Which transactions write: the shapes of the opening statements of
//! transactions that ran optimistically on a replica and then needed the
//! primary. Such a transaction is sent straight to the primary the next
//! times, for a while, so that a read-modify-write unit of work pays the
//! move (a rollback and a replay) at most once in that while. Shared by
//! every session of the proxy; the caller gives the time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a shape counts as writing after it last did.
pub const REMEMBER: Duration = Duration::from_secs(60);

/// How many shapes are remembered at most; past that, the expired ones go,
/// and if none has expired, all of them.
const CAPACITY: usize = 4096;

/// Opening-statement shapes (by hash) that led to a write, and when.
#[derive(Debug)]
pub struct Learned {
    entries: Mutex<HashMap<u64, Instant>>,
    /// How long a shape counts as writing after it last did.
    remember: Duration,
}

impl Learned {
    pub fn new(remember: Duration) -> Learned {
        Learned { entries: Mutex::new(HashMap::new()), remember }
    }

    /// A transaction that opened with `shape` needed the primary at `now`.
    pub fn wrote(&self, shape: u64, now: Instant) {
        let Ok(mut entries) = self.entries.lock() else { return };
        if entries.len() >= CAPACITY && !entries.contains_key(&shape) {
            let remember = self.remember;
            entries.retain(|_, at| now.saturating_duration_since(*at) < remember);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(shape, now);
    }

    /// Whether a transaction that opens with `shape` led to a write within
    /// the while before `now`.
    pub fn writes(&self, shape: u64, now: Instant) -> bool {
        let Ok(entries) = self.entries.lock() else { return false };
        entries.get(&shape).is_some_and(|at| now.saturating_duration_since(*at) < self.remember)
    }
}

/// Statements a replica refused (a view over `nextval`, which the
/// classifier cannot see through): their classifications, by identity, so
/// that a repeat goes to the primary at once. Read without a lock on every
/// read unit; written rarely. Bounded: past `CAPACITY` it starts over.
#[derive(Debug, Default)]
pub struct Refused {
    set: arc_swap::ArcSwap<HashMap<usize, std::sync::Arc<crate::router::classify::Classification>>>,
}

impl Refused {
    /// Remembers `class` as needing the primary.
    pub fn add(&self, class: &std::sync::Arc<crate::router::classify::Classification>) {
        self.set.rcu(|set| {
            let mut set = if set.len() >= CAPACITY { HashMap::new() } else { (**set).clone() };
            set.insert(std::sync::Arc::as_ptr(class) as usize, class.clone());
            set
        });
    }

    /// Whether any of `classes` was refused by a replica.
    pub fn any(&self, classes: &[std::sync::Arc<crate::router::classify::Classification>]) -> bool {
        let set = self.set.load();
        !set.is_empty() && classes.iter().any(|c| set.contains_key(&(std::sync::Arc::as_ptr(c) as usize)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_that_wrote_is_remembered_for_a_while() {
        let learned = Learned::new(Duration::from_secs(60));
        let start = Instant::now();
        assert!(!learned.writes(7, start));
        learned.wrote(7, start);
        assert!(learned.writes(7, start + Duration::from_secs(59)));
        assert!(!learned.writes(7, start + Duration::from_secs(60)));
        assert!(!learned.writes(8, start));
        // Learned again: remembered from then.
        learned.wrote(7, start + Duration::from_secs(100));
        assert!(learned.writes(7, start + Duration::from_secs(150)));
    }

    #[test]
    fn it_stays_bounded() {
        let learned = Learned::new(Duration::from_secs(60));
        let start = Instant::now();
        for shape in 0..CAPACITY as u64 {
            learned.wrote(shape, start);
        }
        // Full of live shapes: a new one clears them.
        learned.wrote(u64::MAX, start + Duration::from_secs(1));
        assert!(learned.writes(u64::MAX, start + Duration::from_secs(1)));
        assert!(!learned.writes(0, start + Duration::from_secs(1)));
        // Full of expired ones: they go, the live ones stay.
        for shape in 0..CAPACITY as u64 - 1 {
            learned.wrote(shape, start);
        }
        let later = start + Duration::from_secs(61);
        learned.wrote(u64::MAX - 1, later);
        assert!(learned.writes(u64::MAX - 1, later));
        assert!(learned.entries.lock().map(|e| e.len()).unwrap_or(0) <= 2);
    }
}
