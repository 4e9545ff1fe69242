//! A bounded cache of classifications keyed by the exact SQL text, shared by
//! all sessions, so a repeated statement costs a hash lookup, not a parse.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quick_cache::sync::Cache;

use super::classify::{classify, Class, Classification};
use super::shape::shape_into;

thread_local! {
    /// The shape of the text being looked up, reused between lookups.
    static SHAPE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Texts longer than this are classified on every call and never stored:
/// they are rarely repeated and would crowd out the short statements that
/// are.
pub const MAX_CACHED_SQL_LEN: usize = 16 * 1024;

/// Classifications by SQL text. `Sync`: one instance serves every session.
pub struct ClassifyCache {
    entries: Cache<String, Arc<Classification>>,
    /// Classifications by shape (literals replaced), for those that do not
    /// depend on literal values.
    shapes: Cache<String, Arc<Classification>>,
    /// Lookups answered from the cache (for the hit-rate metric).
    hits: AtomicU64,
    /// Lookups that parsed, including texts too long to cache.
    misses: AtomicU64,
}

impl ClassifyCache {
    /// A cache holding at most `capacity` statement texts.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Cache::new(capacity.max(1)),
            shapes: Cache::new(capacity.max(1)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The classification of `sql`, from the cache when present. A hit
    /// borrows `sql` for the lookup and allocates nothing. `sql` is in the
    /// client's encoding: a text that is not UTF-8 is classified as a copy
    /// with U+FFFD for what is not (see [`classify`]).
    pub fn classify(&self, sql: impl AsRef<[u8]>) -> Arc<Classification> {
        self.classify_remembering(sql.as_ref(), None).0
    }

    /// [`ClassifyCache::classify`], with a session's memo of the shapes
    /// it used lately in front of the shared cache. Also says whether the
    /// classification holds for the text's shape (and is in `shapes`).
    fn classify_remembering(&self, sql: &[u8], shapes: Option<&mut Recent>) -> (Arc<Classification>, bool) {
        SHAPE.with(|buffer| {
            let mut shape = buffer.borrow_mut();
            // A shape the session used lately answers before the text is
            // checked as UTF-8, which only the shared cache's string keys
            // need: the simple protocol's statements, which differ in
            // their literals, mostly end here. The scan is not repeated.
            let mut scanned = None;
            if let Some(recent) = shapes.as_deref().filter(|recent| !recent.entries.is_empty()) {
                let shaped = shape_into(sql, &mut shape);
                if let Some(found) = self.hit((shaped == Some(true)).then(|| recent.get(&shape)).flatten()) {
                    return (found, true);
                }
                scanned = Some(shaped);
            }
            // `from_utf8` first: `from_utf8_lossy` validates in a slower loop.
            match std::str::from_utf8(sql) {
                Ok(text) => self.classify_text(text, scanned, &mut shape, shapes),
                // The lossy copy has a shape of its own.
                Err(_) => {
                    (self.classify_text(&String::from_utf8_lossy(sql), None, &mut shape, None).0, false)
                }
            }
        })
    }

    /// `scanned`: `shape_into`'s answer for `sql`, already in `buffer`,
    /// when the caller scanned it (and found it not in `shapes`).
    fn classify_text(
        &self,
        sql: &str,
        scanned: Option<Option<bool>>,
        buffer: &mut Vec<u8>,
        shapes: Option<&mut Recent>,
    ) -> (Arc<Classification>, bool) {
        let cacheable = sql.len() <= MAX_CACHED_SQL_LEN;
        // Texts with $n parameters (the extended protocol's, which repeat
        // exactly) or dollar quotes: the exact text first, a hash being
        // cheaper than the shape's scan.
        let exact_first = !cacheable || memchr::memchr(b'$', sql.as_bytes()).is_some();
        if exact_first {
            if let Some(found) = self.hit(self.entries.get(sql)) {
                return (found, false);
            }
            if !cacheable {
                return (self.miss(sql, None), false);
            }
        }
        // Statements that differ only in literals (the simple protocol's
        // interpolated parameters) share the entry of their shape, when
        // the classification does not depend on the literals.
        let replaced = scanned.unwrap_or_else(|| shape_into(sql.as_bytes(), buffer)) == Some(true);
        // A shape of UTF-8 is UTF-8 (only ASCII was cut out or put in);
        // were it not, the text would have no shape rather than a wrong one.
        let shape = if replaced { std::str::from_utf8(buffer).ok() } else { None };
        // The session's memo was looked up by the caller, if it had any.
        if let Some(shape) = shape {
            if let Some(found) = self.hit(self.shapes.get(shape)) {
                if let Some(recent) = shapes {
                    recent.keep(shape.as_bytes(), &found);
                }
                return (found, true);
            }
        }
        // Statements whose class holds for their text only (SET ...)
        // and texts without literals are kept by their exact text.
        if !exact_first {
            if let Some(found) = self.hit(self.entries.get(sql)) {
                return (found, false);
            }
        }
        let classification = self.miss(sql, shape);
        let by_shape = shape.is_some() && shareable(&classification);
        if let (Some(recent), Some(shape)) = (shapes.filter(|_| by_shape), shape) {
            recent.keep(shape.as_bytes(), &classification);
        }
        (classification, by_shape)
    }

    fn hit(&self, found: Option<Arc<Classification>>) -> Option<Arc<Classification>> {
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Parses `sql` and keeps the result by its shape (when it has one and
    /// the classification holds for all texts of that shape) or its text.
    fn miss(&self, sql: &str, shape: Option<&str>) -> Arc<Classification> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let classification = Arc::new(classify(sql));
        match shape {
            Some(shape) if shareable(&classification) => {
                self.shapes.insert(shape.to_owned(), Arc::clone(&classification));
            }
            _ if sql.len() <= MAX_CACHED_SQL_LEN => {
                self.entries.insert(sql.to_owned(), Arc::clone(&classification));
            }
            _ => {}
        }
        classification
    }

    /// Lookups answered from the cache so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Lookups that had to classify so far.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Statement texts currently cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Whether a classification holds for every text of its shape: session
/// effects carry the statement text and pgnear commands their value.
fn shareable(c: &Classification) -> bool {
    c.effects.is_empty() && c.loads.is_none() && !matches!(c.class, Class::ProxyLocal(_))
}

/// The texts and shapes one session classified lately, in front of the
/// shared cache. A client that repeats a statement (drivers send the same
/// Parse text for every execution of an unnamed statement, and an
/// application cycles through a few) gets its classification by comparing
/// bytes, without UTF-8 validation, hashing or the shared cache's lock.
/// One that repeats a statement with other literals (the simple protocol's
/// interpolated parameters) gets it after the shape's scan, by comparing
/// the shape with those it used lately. A text with such a shape is
/// remembered by its shape only, so that texts that differ in every
/// literal do not crowd out those that repeat.
#[derive(Debug, Default)]
pub struct RecentlyClassified {
    texts: Recent,
    shapes: Recent,
}

impl RecentlyClassified {
    /// Longer texts are not kept; an idle session holds at most 2 KiB of
    /// texts and 2 KiB of shapes.
    pub const MAX_TEXT: usize = 1024;

    /// [`ClassifyCache::classify`], answered here when `sql`, or its
    /// shape, was classified lately (counted as a cache hit).
    pub fn classify(&mut self, cache: &ClassifyCache, sql: &[u8]) -> Arc<Classification> {
        if let Some(classification) = cache.hit(self.texts.get(sql)) {
            return classification;
        }
        let (classification, by_shape) = cache.classify_remembering(sql, Some(&mut self.shapes));
        if !by_shape {
            self.texts.keep(sql, &classification);
        }
        classification
    }
}

/// A few keys (texts or shapes) and their classifications, the oldest
/// dropped first once [`Recent::SLOTS`] keys or [`Recent::BYTES`] bytes of
/// them are kept.
#[derive(Debug, Default)]
struct Recent {
    /// Oldest first.
    entries: Vec<(Vec<u8>, Arc<Classification>)>,
}

impl Recent {
    const SLOTS: usize = 8;
    /// At most this many bytes of keys, so that ten thousand idle sessions
    /// that each ran a few long statements stay small.
    const BYTES: usize = 2 * RecentlyClassified::MAX_TEXT;

    /// The bytes the keys' buffers hold.
    fn bytes(&self) -> usize {
        self.entries.iter().map(|(key, _)| key.capacity()).sum()
    }

    fn get(&self, key: &[u8]) -> Option<Arc<Classification>> {
        self.entries.iter().find(|(kept, _)| kept.as_slice() == key).map(|(_, c)| Arc::clone(c))
    }

    /// Keeps `key`, in the buffer of the oldest key it replaces when that
    /// one fits: a session cycling through more statements than it keeps
    /// allocates nothing per statement.
    fn keep(&mut self, key: &[u8], classification: &Arc<Classification>) {
        if key.len() > RecentlyClassified::MAX_TEXT {
            return;
        }
        let mut buffer = Vec::new();
        while self.entries.len() == Self::SLOTS || self.bytes() + key.len() > Self::BYTES {
            buffer = self.entries.remove(0).0;
        }
        if buffer.capacity() < key.len() || buffer.capacity() > Self::BYTES - self.bytes() {
            buffer = Vec::with_capacity(key.len());
        }
        buffer.clear();
        buffer.extend_from_slice(key);
        self.entries.push((buffer, Arc::clone(classification)));
    }
}

impl std::fmt::Debug for ClassifyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifyCache")
            .field("len", &self.len())
            .field("hits", &self.hits())
            .field("misses", &self.misses())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new shared cache and session memo, and `sql` classified once (a
    /// miss) through them.
    fn first_run(sql: &[u8]) -> (ClassifyCache, RecentlyClassified, Arc<Classification>) {
        let cache = ClassifyCache::new(64);
        let mut last = RecentlyClassified::default();
        let first = last.classify(&cache, sql);
        assert_eq!((cache.hits(), cache.misses()), (0, 1));
        (cache, last, first)
    }

    #[test]
    fn a_session_remembers_the_texts_it_used_lately() {
        let (cache, mut last, first) = first_run(b"SELECT v FROM t WHERE id = $1");
        let again = last.classify(&cache, b"SELECT v FROM t WHERE id = $1");
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!((cache.hits(), cache.misses()), (1, 1), "a repeat counts as a hit");
        assert_eq!(last.classify(&cache, b"UPDATE t SET v = $2 WHERE id = $1").class, Class::Write);
        // Served by the session: the shared cache no longer holds them.
        cache.entries.clear();
        assert_eq!(last.classify(&cache, b"SELECT v FROM t WHERE id = $1").class, Class::Read);
        assert_eq!(last.classify(&cache, b"UPDATE t SET v = $2 WHERE id = $1").class, Class::Write);
        assert_eq!((cache.hits(), cache.misses()), (3, 2));
        // A text that differs in its last byte is another text.
        assert_eq!(last.classify(&cache, b"SELECT v FROM t WHERE id = $2").class, Class::Read);
        assert_eq!(cache.misses(), 3);
        // Long texts are classified but not kept.
        let long = format!(
            "SELECT v FROM t WHERE id = $1{}",
            " OR v = $1".repeat(RecentlyClassified::MAX_TEXT / 10)
        );
        assert!(long.len() > RecentlyClassified::MAX_TEXT);
        assert_eq!(last.classify(&cache, long.as_bytes()).class, Class::Read);
        assert_eq!(last.texts.entries.len(), 3);
        cache.entries.clear();
        assert_eq!(last.classify(&cache, long.as_bytes()).class, Class::Read);
        assert_eq!(cache.misses(), 5, "the long text was classified again");
        // Texts up to the limit are kept within the session's budget.
        let mut near_limit = Vec::new();
        for n in 0..3 {
            let text = format!("SELECT v{n} FROM t WHERE id = $1 {}", " ".repeat(900));
            last.classify(&cache, text.as_bytes());
            near_limit.push(text);
        }
        assert!(last.texts.bytes() <= Recent::BYTES);
        assert_eq!(last.texts.entries.len(), 2, "the oldest were dropped to make room");
        assert!(last.texts.get(near_limit[2].as_bytes()).is_some());
    }

    #[test]
    fn a_session_remembers_the_shapes_it_used_lately() {
        let (cache, mut last, first) = first_run(b"SELECT v FROM t WHERE id = 1");
        assert!(last.shapes.get(b"SELECT v FROM t WHERE id = ?").is_some());
        assert!(last.texts.entries.is_empty(), "a text with a shape is remembered by its shape only");
        // Served by the session: the shared cache no longer holds the shape.
        cache.shapes.clear();
        let second = last.classify(&cache, b"SELECT v FROM t WHERE id = 2");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!((cache.hits(), cache.misses()), (1, 1), "a session's answer counts as a hit");
        // A cycle of statements, each answered by the session after its
        // first run.
        let cycle = [
            "UPDATE t SET v = {} WHERE id = 3",
            "SELECT v FROM t WHERE id = {}",
            "INSERT INTO h VALUES ({})",
        ];
        for round in 0..3 {
            for sql in cycle {
                let class = last.classify(&cache, sql.replace("{}", &round.to_string()).as_bytes());
                assert_eq!(class.class == Class::Read, sql.starts_with("SELECT"));
            }
        }
        assert_eq!(cache.misses(), 3, "the UPDATE and INSERT missed once each");
        // Once full, the oldest shape goes first.
        for n in 0..Recent::SLOTS {
            last.classify(&cache, format!("SELECT c{n} FROM t WHERE id = 1").as_bytes());
        }
        assert_eq!(last.shapes.entries.len(), Recent::SLOTS);
        assert!(last.shapes.get(b"SELECT v FROM t WHERE id = ?").is_none());
        let misses = cache.misses();
        cache.shapes.clear();
        last.classify(&cache, b"SELECT c7 FROM t WHERE id = 9");
        assert_eq!(cache.misses(), misses, "the newest shape is still remembered");
        // The next (shorter) shape takes the oldest one's buffer, room and all.
        let oldest = last.shapes.entries[0].0.capacity();
        last.classify(&cache, b"SELECT c FROM t WHERE id = 1");
        let (newest, _) = &last.shapes.entries[Recent::SLOTS - 1];
        assert_eq!((newest.as_slice(), newest.capacity()), (&b"SELECT c FROM t WHERE id = ?"[..], oldest));
        assert!(newest.capacity() > newest.len());
        assert!(last.shapes.bytes() <= Recent::BYTES);
    }

    #[test]
    fn pgbench_tpcb_is_answered_by_the_session_whatever_the_deltas_sign() {
        let cache = ClassifyCache::new(64);
        let mut last = RecentlyClassified::default();
        let script = [
            "BEGIN;",
            "UPDATE pgbench_accounts SET abalance = abalance + {d} WHERE aid = {n};",
            "SELECT abalance FROM pgbench_accounts WHERE aid = {n};",
            "UPDATE pgbench_tellers SET tbalance = tbalance + {d} WHERE tid = {n};",
            "UPDATE pgbench_branches SET bbalance = bbalance + {d} WHERE bid = {n};",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({n}, 1, {n}, {d}, CURRENT_TIMESTAMP);",
            "END;",
        ];
        for (round, delta) in ["-4143", "17", "-5", "4999"].into_iter().enumerate() {
            for sql in script {
                let sql = sql.replace("{d}", delta).replace("{n}", &(round + 1).to_string());
                last.classify(&cache, sql.as_bytes());
            }
            // From the second transaction on, the session answers every
            // statement: the shared cache is not even looked at.
            cache.entries.clear();
            cache.shapes.clear();
        }
        assert_eq!(cache.misses(), script.len() as u64, "each statement was parsed once, in the first run");
    }

    #[test]
    fn a_text_that_is_not_utf8_is_classified_as_its_lossy_copy() {
        let (cache, mut last, first) = first_run(b"SELECT v FROM t WHERE id = 1");
        // LATIN1 inside a literal: the shape the session remembers answers.
        let latin1 = last.classify(&cache, b"SELECT v FROM t WHERE id = 'caf\xe9'");
        assert!(Arc::ptr_eq(&first, &latin1));
        // Outside one: the lossy copy is parsed, and its shape is not kept.
        let shapes = last.shapes.entries.len();
        assert_eq!(last.classify(&cache, b"SELECT caf\xe9 FROM t WHERE id = 3").class, Class::Read);
        assert_eq!(last.classify(&cache, b"DELETE FROM caf\xe9 WHERE id = 3").class, Class::Write);
        assert_eq!(last.shapes.entries.len(), shapes);
        assert_eq!(cache.misses(), 3);
    }

    #[test]
    fn texts_are_remembered_exactly_when_their_class_depends_on_them() {
        let cache = ClassifyCache::new(64);
        let mut last = RecentlyClassified::default();
        for round in 0..3 {
            for value in ["'a'", "'b'"] {
                let sql = format!("SET search_path = {value}");
                let class = last.classify(&cache, sql.as_bytes());
                assert_eq!(class.effects.len(), 1);
                let effect = format!("{:?}", class.effects[0]);
                assert!(effect.contains(value), "round {round}: {sql} gave {effect}");
            }
        }
        assert!(last.shapes.entries.is_empty());
        assert_eq!(last.texts.entries.len(), 2);
        assert_eq!(cache.misses(), 2);
    }
}
