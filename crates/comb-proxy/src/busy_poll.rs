//! Busy polling (off unless `--proxy-busy-poll-us` is set): after a wake-up a proxy thread
//! keeps checking for events for a short window before it sleeps again, so the reply to what
//! it just forwarded (a response from the pod, a tunnel's next frame) finds it awake. On a VM
//! a thread that slept is woken through an inter-processor interrupt and a halted virtual
//! CPU; haproxy's `busy-polling` option exists for the same reason (always polling there).
//!
//! Measured (docs/benchmarks.md, 2026-12-06): with a 150 µs window, HBONE's connection rate
//! rose by 18 % (`comb bench mtls`), but the node proxy's requests per CPU-second at
//! saturation fell by 9 % (`comb bench l7`), because polling turns idle time into the
//! proxy's CPU time. Hence off by default.
//!
//! The window adapts like the kernel's guest halt-polling (cpuidle-haltpoll): it doubles when
//! the thread's last sleep was shorter than the maximum (a longer poll would have caught the
//! event that ended it) and halves when it was longer, so a thread whose events come far
//! apart stops polling. Each round the thread first yields its CPU (`sched_yield`); if another
//! thread ran meanwhile the CPU is busy and polling stops, so polling does not delay other
//! threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A yield that took longer than this let another thread run: the CPU is busy.
const CONTENDED: Duration = Duration::from_micros(5);

/// The first window after a short sleep when polling had stopped.
const GROW_START: Duration = Duration::from_micros(10);

/// The current window of one thread.
#[derive(Debug)]
struct Window {
    max: Duration,
    now: Duration,
}

impl Window {
    fn new(max: Duration) -> Self {
        Self { max, now: max }
    }

    /// The window to poll after a sleep of `slept`.
    fn after_sleep(&mut self, slept: Duration) -> Duration {
        if slept <= self.max {
            self.now = (self.now * 2).max(GROW_START).min(self.max);
        } else {
            self.now /= 2;
            if self.now < GROW_START {
                self.now = Duration::ZERO;
            }
        }
        self.now
    }
}

/// Whether to poll another round: within the window, and the last yield found no other
/// thread wanting this CPU.
fn keep_polling(polled: Duration, window: Duration, last_yield: Duration) -> bool {
    polled < window && last_yield <= CONTENDED
}

/// Runs on a proxy thread for its life: `woke` is notified each time the thread wakes from
/// a sleep (the runtime's unpark hook). Each round yields to the runtime, which then checks
/// for events without blocking (epoll with no timeout) and runs what became ready.
pub(crate) async fn poll_after_wake_ups(woke: Arc<Notify>, max: Duration) {
    let mut window = Window::new(max);
    let mut stopped = Instant::now();
    loop {
        woke.notified().await;
        let start = Instant::now();
        let w = window.after_sleep(start.saturating_duration_since(stopped));
        // A window shrunk to nothing costs no `sched_yield`.
        while start.elapsed() < w {
            let y = Instant::now();
            std::thread::yield_now();
            if !keep_polling(start.elapsed(), w, y.elapsed()) {
                break;
            }
            tokio::task::yield_now().await;
        }
        stopped = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(150);

    #[test]
    fn short_sleeps_keep_the_full_window_long_ones_end_polling() {
        let ns = Duration::from_nanos;
        let mut w = Window::new(MAX);
        assert_eq!(w.after_sleep(Duration::from_micros(40)), MAX);
        // Events far apart: halved down to nothing.
        let far: Vec<_> = (0..5)
            .map(|_| w.after_sleep(Duration::from_millis(5)))
            .collect();
        assert_eq!(far, [ns(75_000), ns(37_500), ns(18_750), ns(0), ns(0)]);
        // Short sleeps again: back from the first step to the maximum.
        let near: Vec<_> = (0..6)
            .map(|_| w.after_sleep(Duration::from_micros(20)))
            .collect();
        let want = [10, 20, 40, 80, 150, 150].map(Duration::from_micros);
        assert_eq!(near, want);
    }

    #[test]
    fn polling_stops_at_the_window_or_when_another_thread_ran() {
        let us = Duration::from_micros;
        assert!(keep_polling(us(10), MAX, us(1)));
        assert!(!keep_polling(us(150), MAX, us(1)));
        assert!(!keep_polling(us(10), MAX, us(40)));
        assert!(!keep_polling(us(0), Duration::ZERO, us(0)));
    }
}
