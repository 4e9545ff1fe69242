//! Which of the session's sockets may have something to read.
//!
//! The relay loop waits on the client and on every open server connection.
//! Polling a socket that has not signalled since it last returned Pending
//! only re-registers the same interest, and in a round trip most wake-ups
//! come from one side: so each socket gets a waker of its own that marks
//! it before waking the task, and the loop polls only marked sockets. A
//! socket that returned a frame stays marked (its interest is no longer
//! registered); one the session reads elsewhere (`Sources::all`) is
//! marked again.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The primary connection's socket.
pub(super) const PRIMARY: usize = 0;
/// The replica connection's socket.
pub(super) const REPLICA: usize = 1;
/// The client's socket.
pub(super) const CLIENT: usize = 2;

struct Hub {
    task: AtomicWaker,
    marked: [AtomicBool; 3],
}

struct SourceWaker {
    hub: Arc<Hub>,
    source: usize,
}

impl Wake for SourceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.hub.marked[self.source].store(true, Ordering::SeqCst);
        self.hub.task.wake();
    }
}

/// The session's sockets as wake-up sources.
pub(super) struct Sources {
    hub: Arc<Hub>,
    wakers: [Waker; 3],
}

impl Sources {
    /// Every source marked: the first wait polls them all.
    pub(super) fn new() -> Sources {
        let hub = Arc::new(Hub {
            task: AtomicWaker::new(),
            marked: std::array::from_fn(|_| AtomicBool::new(true)),
        });
        let wakers =
            std::array::from_fn(|source| Waker::from(Arc::new(SourceWaker { hub: hub.clone(), source })));
        Sources { hub, wakers }
    }

    /// Marks `source`: its socket changed, or was read with another waker.
    pub(super) fn mark(&self, source: usize) {
        self.hub.marked[source].store(true, Ordering::SeqCst);
    }

    /// Marks every source.
    pub(super) fn mark_all(&self) {
        for marked in &self.hub.marked {
            marked.store(true, Ordering::SeqCst);
        }
    }

    /// The task to wake when any source signals. Called before polling
    /// sources, so that a signal during the polls is not lost.
    pub(super) fn register(&self, cx: &Context<'_>) {
        self.hub.task.register(cx.waker());
    }

    /// Polls `read` (a read of `source`) if the source is marked, with the
    /// source's own waker; `Pending` without polling if it is not.
    pub(super) fn poll<F: Future>(&self, source: usize, read: Pin<&mut F>) -> Poll<F::Output> {
        if !self.hub.marked[source].swap(false, Ordering::SeqCst) {
            return Poll::Pending;
        }
        let mut cx = Context::from_waker(&self.wakers[source]);
        let polled = read.poll(&mut cx);
        if polled.is_ready() {
            // Nothing is registered for it now: poll it next time.
            self.mark(source);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_marked_sources_are_polled_and_a_signal_marks_and_wakes() {
        let sources = Sources::new();
        let task = Arc::new(Counter::default());
        let waker = Waker::from(task.clone());
        sources.register(&Context::from_waker(&waker));
        let polls = std::cell::Cell::new(0);
        let mut pending = std::future::poll_fn(|_| {
            polls.set(polls.get() + 1);
            Poll::<()>::Pending
        });
        assert!(sources.poll(CLIENT, Pin::new(&mut pending)).is_pending());
        assert!(sources.poll(CLIENT, Pin::new(&mut pending)).is_pending());
        assert_eq!(polls.get(), 1, "an unmarked source is not polled");
        sources.wakers[CLIENT].wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "a signal wakes the task");
        assert!(sources.poll(CLIENT, Pin::new(&mut pending)).is_pending());
        assert_eq!(polls.get(), 2, "a signalled source is polled");
        let mut ready = std::future::ready(7);
        assert_eq!(sources.poll(PRIMARY, Pin::new(&mut ready)), Poll::Ready(7));
        assert!(sources.hub.marked[PRIMARY].load(Ordering::SeqCst), "a ready source stays marked");
        sources.mark_all();
        assert!(sources.hub.marked.iter().all(|m| m.load(Ordering::SeqCst)));
    }

    #[derive(Default)]
    struct Counter(std::sync::atomic::AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
