//! A bounded cache of classifications keyed by the exact SQL text, shared by
//! all sessions, so a repeated statement costs a hash lookup, not a parse.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quick_cache::sync::Cache;

use super::classify::{classify, Class, Classification};
use super::shape::shape_into;

thread_local! {
    /// The shape of the text being looked up, reused between lookups.
    static SHAPE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
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
        self.classify_remembering(sql.as_ref(), None)
    }

    /// [`ClassifyCache::classify`], with a session's memo of the shape it
    /// looked up last in front of the shared cache.
    fn classify_remembering(&self, sql: &[u8], memo: Option<&mut LastShape>) -> Arc<Classification> {
        // `from_utf8` first: `from_utf8_lossy` validates in a slower loop.
        match std::str::from_utf8(sql) {
            Ok(text) => self.classify_text(text, memo),
            Err(_) => self.classify_text(&String::from_utf8_lossy(sql), None),
        }
    }

    fn classify_text(&self, sql: &str, memo: Option<&mut LastShape>) -> Arc<Classification> {
        let cacheable = sql.len() <= MAX_CACHED_SQL_LEN;
        // Texts with $n parameters (the extended protocol's, which repeat
        // exactly) or dollar quotes: the exact text first, a hash being
        // cheaper than the shape's scan.
        let exact_first = !cacheable || memchr::memchr(b'$', sql.as_bytes()).is_some();
        if exact_first {
            if let Some(found) = self.hit(self.entries.get(sql)) {
                return found;
            }
            if !cacheable {
                return self.miss(sql, None);
            }
        }
        // Statements that differ only in literals (the simple protocol's
        // interpolated parameters) share the entry of their shape, when
        // the classification does not depend on the literals.
        SHAPE.with(|buffer| {
            let mut shape = buffer.borrow_mut();
            let replaced = shape_into(sql, &mut shape) == Some(true);
            if replaced {
                if let Some(found) = memo.as_ref().and_then(|memo| memo.get(&shape)) {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return found;
                }
                if let Some(found) = self.hit(self.shapes.get(shape.as_str())) {
                    if let Some(memo) = memo {
                        memo.keep(&shape, &found);
                    }
                    return found;
                }
            }
            // Statements whose class holds for their text only (SET ...)
            // and texts without literals are kept by their exact text.
            if !exact_first {
                if let Some(found) = self.hit(self.entries.get(sql)) {
                    return found;
                }
            }
            self.miss(sql, replaced.then_some(shape.as_str()))
        })
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
    c.effects.is_empty() && !matches!(c.class, Class::ProxyLocal(_))
}

/// One session's last classified text, in front of the shared cache: a
/// client that repeats a statement (drivers send the same Parse text for
/// every execution of an unnamed statement) gets its classification by one
/// comparison of bytes, without UTF-8 validation, hashing or the shared
/// cache's lock. A client that repeats a statement with other literals
/// (the simple protocol's interpolated parameters) gets it after the
/// shape's scan, by a comparison with the last shape found in the shared
/// cache, without hashing or the lock.
#[derive(Debug, Default)]
pub struct LastClassified {
    text: Vec<u8>,
    classification: Option<Arc<Classification>>,
    shape: LastShape,
}

/// The shape a session last found in the shared cache's shapes, and its
/// classification (which holds for every text of that shape).
#[derive(Debug, Default)]
struct LastShape {
    shape: String,
    classification: Option<Arc<Classification>>,
}

impl LastShape {
    fn get(&self, shape: &str) -> Option<Arc<Classification>> {
        self.classification.as_ref().filter(|_| self.shape == shape).cloned()
    }

    fn keep(&mut self, shape: &str, classification: &Arc<Classification>) {
        if shape.len() > LastClassified::MAX_TEXT {
            self.classification = None;
            return;
        }
        self.shape.clear();
        self.shape.push_str(shape);
        self.classification = Some(Arc::clone(classification));
    }
}

impl LastClassified {
    /// Longer texts are not kept: an idle session holds at most this much.
    pub const MAX_TEXT: usize = 1024;

    /// [`ClassifyCache::classify`], answered here when `sql` is the text
    /// classified last (counted as a cache hit).
    pub fn classify(&mut self, cache: &ClassifyCache, sql: &[u8]) -> Arc<Classification> {
        if let Some(classification) = self.classification.as_ref().filter(|_| self.text == sql) {
            cache.hits.fetch_add(1, Ordering::Relaxed);
            return Arc::clone(classification);
        }
        let classification = cache.classify_remembering(sql, Some(&mut self.shape));
        if sql.len() <= Self::MAX_TEXT {
            self.text.clear();
            self.text.extend_from_slice(sql);
            self.classification = Some(Arc::clone(&classification));
        } else {
            self.classification = None;
        }
        classification
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

    #[test]
    fn a_session_remembers_the_last_shape_it_found_shared() {
        let cache = ClassifyCache::new(64);
        let mut last = LastClassified::default();
        let first = last.classify(&cache, b"SELECT v FROM t WHERE id = 1");
        assert_eq!((cache.hits(), cache.misses()), (0, 1));
        assert!(last.shape.classification.is_none(), "a miss is not remembered by shape");
        let second = last.classify(&cache, b"SELECT v FROM t WHERE id = 2");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(last.shape.shape, "SELECT v FROM t WHERE id = ?");
        // Served by the memo: the shared cache no longer holds the shape.
        cache.shapes.clear();
        let third = last.classify(&cache, b"SELECT v FROM t WHERE id = 3");
        assert!(Arc::ptr_eq(&first, &third));
        assert_eq!((cache.hits(), cache.misses()), (2, 1), "a memo answer counts as a hit");
        // Another shape goes to the shared cache: a miss, then a hit
        // that the memo keeps in place of the first shape.
        assert_eq!(last.classify(&cache, b"UPDATE t SET v = 1 WHERE id = 3").class, Class::Write);
        assert_eq!(cache.misses(), 2);
        assert_eq!(last.classify(&cache, b"UPDATE t SET v = 2 WHERE id = 5").class, Class::Write);
        assert_eq!(last.shape.shape, "UPDATE t SET v = ? WHERE id = ?");
        assert_eq!(last.classify(&cache, b"SELECT v FROM t WHERE id = 4").class, Class::Read);
        assert_eq!(cache.misses(), 3, "the memo holds one shape");
    }

    #[test]
    fn classifications_that_depend_on_literals_are_never_remembered_by_shape() {
        let cache = ClassifyCache::new(64);
        let mut last = LastClassified::default();
        for round in 0..3 {
            for value in ["'a'", "'b'"] {
                let sql = format!("SET search_path = {value}");
                let class = last.classify(&cache, sql.as_bytes());
                assert_eq!(class.effects.len(), 1);
                let effect = format!("{:?}", class.effects[0]);
                assert!(effect.contains(value), "round {round}: {sql} gave {effect}");
            }
        }
        assert!(last.shape.classification.is_none());
    }
}
