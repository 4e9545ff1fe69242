//! Timers, and tasks that need them, for code that may run on a session
//! loop.
//!
//! The session loops run without tokio's time driver: with it, every park
//! of a loop (about once per round trip) locks the timer wheel, reads the
//! clock and looks for expired entries, some 500 instructions per pgbench
//! transaction although a session's timers almost never fire. Their timers
//! live instead on the service loop (the accepting thread's runtime, which
//! also runs the monitor and the admin listener): a timer made here is
//! registered there, and its expiry wakes the session's task across
//! threads like any other waker.
//!
//! Everything that runs on a session loop makes its timers through this
//! module (`clippy.toml` forbids `tokio::time`'s constructors elsewhere).
//! A background task that uses timers it does not make here (a
//! tokio-postgres connection's connect timeout) is spawned on the service
//! loop with [`spawn_on_service`]. On a thread without a service loop
//! installed (the service loop itself, tests, a single-threaded tool) these
//! are plain tokio timers and `tokio::spawn`.

use std::cell::OnceCell;
use std::future::IntoFuture;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::{Instant, Sleep, Timeout};

thread_local! {
    /// The runtime whose time driver serves this thread's timers.
    static SERVICE: OnceCell<Handle> = const { OnceCell::new() };
}

/// Makes `service` the runtime that serves timers made on this thread.
/// Called once by each session loop's thread, before it runs anything.
pub fn serve_timers_from(service: Handle) {
    SERVICE.with(|cell| {
        let _ = cell.set(service);
    });
}

/// `make`, run with the service loop as the current runtime when this
/// thread has one: tokio registers a timer with the runtime current when
/// it is created, and polls it from any thread after that.
fn on_service<T>(make: impl FnOnce() -> T) -> T {
    SERVICE.with(|cell| match cell.get() {
        Some(service) => {
            let _entered = service.enter();
            make()
        }
        None => make(),
    })
}

/// [`tokio::spawn`] on the service loop: for tasks that outlive the
/// session asking for them or use timers made outside this module.
pub fn spawn_on_service<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    on_service(|| tokio::spawn(future))
}

/// [`tokio::time::sleep_until`], served by the service loop.
#[allow(clippy::disallowed_methods)]
pub fn sleep_until(deadline: Instant) -> Sleep {
    on_service(|| tokio::time::sleep_until(deadline))
}

/// [`tokio::time::sleep`], served by the service loop.
#[allow(clippy::disallowed_methods)]
pub fn sleep(duration: Duration) -> Sleep {
    on_service(|| tokio::time::sleep(duration))
}

/// [`tokio::time::timeout`], served by the service loop.
#[allow(clippy::disallowed_methods)]
pub fn timeout<F: IntoFuture>(duration: Duration, future: F) -> Timeout<F::IntoFuture> {
    on_service(|| tokio::time::timeout(duration, future))
}

thread_local! {
    /// The event loop this thread runs: 0 for the service loop.
    static LOOP: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The event loop the calling thread runs (0: the service loop).
pub fn current_loop() -> usize {
    LOOP.with(std::cell::Cell::get)
}

/// Records the event loop the calling thread runs, as it starts it.
pub fn set_current_loop(index: usize) {
    LOOP.with(|l| l.set(index));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop without a time driver sleeps and times out on the service
    /// loop's: nothing panics, and the deadlines hold.
    #[test]
    fn a_loop_without_a_time_driver_uses_the_service_loop() {
        let service = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build();
        let service = service.expect("service runtime");
        let handle = service.handle().clone();
        let worker = std::thread::spawn(move || {
            serve_timers_from(handle);
            let io_only = tokio::runtime::Builder::new_current_thread().enable_io().build();
            io_only.expect("io-only runtime").block_on(async {
                let started = Instant::now();
                sleep(Duration::from_millis(20)).await;
                assert!(started.elapsed() >= Duration::from_millis(20));
                let never = timeout(Duration::from_millis(20), std::future::pending::<()>()).await;
                assert!(never.is_err(), "the timeout fired");
                let quick = timeout(Duration::from_secs(5), async { 7 }).await;
                assert_eq!(quick.ok(), Some(7));
                let mut reset = Box::pin(sleep_until(Instant::now() + Duration::from_secs(3600)));
                reset.as_mut().reset(Instant::now() + Duration::from_millis(10));
                reset.await;
                // A task that makes its own tokio timers runs on the service loop.
                #[allow(clippy::disallowed_methods)]
                let spawned = spawn_on_service(async { tokio::time::sleep(Duration::from_millis(5)).await });
                assert!(spawned.await.is_ok(), "the spawned task panicked");
            });
        });
        assert!(worker.join().is_ok(), "the io-only loop panicked");
    }
}
