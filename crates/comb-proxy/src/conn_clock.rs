//! The two clocks of one downstream HTTP connection: the idle timeout (no request in flight)
//! and, for HTTP/1, the request-head timeout (from a head's first byte to its end).
//!
//! hyper's own HTTP/1 header timer starts whenever the connection waits for a head, so it
//! also closes a keep-alive connection that is merely silent between requests: one knob for
//! two jobs. Envoy keeps them apart (`request_headers_timeout` from the first byte,
//! `idle_timeout` between requests), and so do we: hyper's timer is off, the connection's
//! IO marks when a head starts, the service marks when requests begin and end.
//!
//! The marks are plain atomic stores, nothing is woken per request: the clock's task sleeps
//! on one timer and, when it fires, reads the marks and sets the next one. It never sleeps
//! past a deadline: while requests run, it looks again one timeout later (the earliest a
//! clock started after a look can run out); on an idle connection it sleeps until the idle
//! deadline and says so (`parked`), and the first byte of the next head wakes it. So a busy
//! connection costs a timer firing per head timeout, an idle one nothing until its deadline,
//! and no request costs a notification or a new timer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
// tokio's clock, so tests can run it paused.
use tokio::time::Instant;

/// Why the connection's clocks ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// No request in flight for the idle timeout: close at the request boundary.
    Idle,
    /// A request head started and did not complete in time (slowloris): cut.
    Head,
}

/// Shared by the connection's IO, its service and the task serving it.
pub struct ConnClock {
    epoch: Instant,
    /// Requests whose response has not finished (or been dropped).
    active: AtomicUsize,
    /// When the last request ended (or the connection started), ms since `epoch`.
    last_end: AtomicU64,
    /// When the current head's first byte arrived, ms since `epoch` + 1; 0 = no head pending.
    head_start: AtomicU64,
    /// The clock sleeps until the idle deadline and must hear of a head starting.
    parked: AtomicBool,
    head_started: Notify,
}

impl ConnClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            active: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            head_start: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            head_started: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A request head is complete and the request starts; the guard ends it when dropped
    /// (with the response body, i.e. once the response went out or was abandoned).
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.head_start.store(0, Ordering::Release);
        RequestGuard(self.clone())
    }

    /// Bytes arrived: with no request in flight they start a head.
    fn read_some(&self) {
        if self.active.load(Ordering::Acquire) == 0
            && self.head_start.load(Ordering::Acquire) == 0
            && self
                .head_start
                .compare_exchange(0, self.now_ms() + 1, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            && self.parked.swap(false, Ordering::SeqCst)
        {
            self.head_started.notify_one();
        }
    }

    /// Resolves when a clock runs out. `head`: None for HTTP/2 (its frames are not heads).
    pub async fn expired(&self, idle: Duration, head: Option<Duration>) -> Expired {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let head_ms = head.map(|h| u64::try_from(h.as_millis()).unwrap_or(u64::MAX));
        // The soonest a clock that starts after a look can run out.
        let soonest_new = head_ms.map_or(idle_ms, |h| h.min(idle_ms));
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        loop {
            let now = self.now_ms();
            let mut parked = false;
            let wait = if self.active.load(Ordering::Acquire) > 0 {
                // A request in flight: nothing runs out until it ends.
                soonest_new
            } else {
                let started = self.head_start.load(Ordering::Acquire);
                match head_ms {
                    Some(limit) if started > 0 => {
                        let deadline = (started - 1).saturating_add(limit);
                        if now >= deadline {
                            return Expired::Head;
                        }
                        deadline - now
                    }
                    _ => {
                        let deadline = self
                            .last_end
                            .load(Ordering::Acquire)
                            .saturating_add(idle_ms);
                        if now >= deadline {
                            return Expired::Idle;
                        }
                        if head_ms.is_some() {
                            // A head may start before the idle deadline: it wakes us. Parked
                            // first, then the head looked at again, so a head that starts in
                            // between is seen here or by `read_some`.
                            self.parked.store(true, Ordering::SeqCst);
                            if self.head_start.load(Ordering::SeqCst) != 0 {
                                self.parked.store(false, Ordering::SeqCst);
                                continue;
                            }
                            parked = true;
                        }
                        deadline - now
                    }
                }
            };
            // Whole milliseconds, like the marks: a deadline is never missed by a fraction.
            let at = self.epoch + Duration::from_millis(now.saturating_add(wait).max(now + 1));
            sleep.as_mut().reset(at);
            if parked {
                tokio::select! {
                    biased;
                    _ = self.head_started.notified() => {}
                    _ = sleep.as_mut() => {}
                }
                self.parked.store(false, Ordering::SeqCst);
            } else {
                sleep.as_mut().await;
            }
        }
    }
}

/// One request in flight (see [`ConnClock::begin`]).
pub struct RequestGuard(Arc<ConnClock>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let c = &self.0;
        c.last_end.store(c.now_ms(), Ordering::Release);
        c.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The downstream IO, telling the clock when bytes arrive.
pub struct Clocked<IO> {
    io: IO,
    clock: Arc<ConnClock>,
}

impl<IO> Clocked<IO> {
    pub fn new(io: IO, clock: Arc<ConnClock>) -> Self {
        Self { io, clock }
    }

    /// The socket back (an upgraded connection leaves HTTP and its clocks).
    pub fn into_inner(self) -> IO {
        self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Clocked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read_some();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Clocked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_to_end_and_heads_have_their_own_clock() {
        let c = ConnClock::new();
        let idle = Duration::from_secs(60);
        let head = Some(Duration::from_secs(10));
        // A request in flight keeps the connection, however long it takes.
        let g = c.begin();
        let r = tokio::time::timeout(Duration::from_secs(600), c.expired(idle, head)).await;
        assert!(r.is_err(), "expired with a request in flight");
        drop(g);
        let t0 = tokio::time::Instant::now();
        assert_eq!(c.expired(idle, head).await, Expired::Idle);
        assert!(t0.elapsed() >= idle);
        // A head that started and never ends is cut by the head clock, not the idle one.
        let c = ConnClock::new();
        drop(c.begin());
        c.read_some();
        let t0 = tokio::time::Instant::now();
        assert_eq!(c.expired(idle, head).await, Expired::Head);
        assert!(t0.elapsed() < idle);
        // An idle connection's clock sleeps until the idle deadline; a head starting wakes it,
        // so the head clock still cuts on time.
        let c = ConnClock::new();
        let t0 = tokio::time::Instant::now();
        let clock = {
            let c = c.clone();
            tokio::spawn(async move { c.expired(idle, head).await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(c.parked.load(Ordering::SeqCst), "an idle clock parks");
        c.read_some();
        assert_eq!(clock.await.unwrap(), Expired::Head);
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(15) && took < Duration::from_secs(16),
            "{took:?}"
        );
        // Requests back to back for longer than the idle timeout: the connection stays.
        let c = ConnClock::new();
        let clock = {
            let c = c.clone();
            tokio::spawn(async move { c.expired(idle, head).await })
        };
        for _ in 0..200 {
            c.read_some();
            let g = c.begin();
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(g);
        }
        assert!(!clock.is_finished());
        clock.abort();
        // The largest timeouts mean never.
        let c = ConnClock::new();
        let r = tokio::time::timeout(
            Duration::from_secs(3600),
            c.expired(Duration::MAX, Some(Duration::MAX)),
        )
        .await;
        assert!(r.is_err());
        // HTTP/2 has no head clock: bytes do not count, only requests.
        let c = ConnClock::new();
        c.read_some();
        assert_eq!(c.expired(idle, None).await, Expired::Idle);
    }
}
