//! The proxy's threads: one single-threaded tokio runtime per worker ("shard"). A connection
//! is accepted once and then lives on one shard with everything its requests touch: its
//! tasks, its upstream connections (each shard has its own pools) and their timers. So a
//! request wakes no other thread inside the proxy. With one work-stealing runtime the
//! downstream task, the pooled upstream connection's task and the response often ran on
//! different threads: measured with `comb bench l7`, 1 worker served 36,053 requests per
//! CPU-second against 19,921 for 2 work-stealing workers (docs/benchmarks.md).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::runtime::Handle;
use tokio::sync::watch;

thread_local! {
    /// This thread's shard; None outside the proxy's threads (tests, the agent).
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The shard of the calling thread (0 outside the proxy's threads).
pub(crate) fn current() -> usize {
    SHARD.with(Cell::get).unwrap_or(0)
}

struct Shard {
    handle: Handle,
    /// Connections this shard serves now (the dispatcher picks the least busy).
    active: AtomicUsize,
}

pub(crate) struct Shards {
    shards: Vec<Shard>,
    stop: watch::Sender<bool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next: AtomicUsize,
}

impl Shards {
    /// Starts `n` threads (named `comb-proxy`), each running its own runtime until
    /// [`Self::shutdown`].
    /// `busy_poll`: the longest window a thread keeps polling after a wake-up
    /// ([`crate::busy_poll`]); zero = never.
    pub(crate) fn start(n: usize, busy_poll: Duration) -> Result<Self> {
        let (stop, stopped) = watch::channel(false);
        let mut shards = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            // Told of every wake-up when busy polling is on.
            let woke = (!busy_poll.is_zero()).then(|| Arc::new(tokio::sync::Notify::new()));
            let mut rt = tokio::runtime::Builder::new_current_thread();
            // IO and timers only: the proxy spawns no process and handles no signal, and
            // the process driver looks for orphans at every park (0.24 % of the proxy's
            // samples in a connection-rate profile).
            rt.enable_io().enable_time();
            if let Some(woke) = woke.clone() {
                rt.on_thread_unpark(move || woke.notify_one());
            }
            let rt = rt.build().context("proxy runtime")?;
            shards.push(Shard {
                handle: rt.handle().clone(),
                active: AtomicUsize::new(0),
            });
            let mut stopped = stopped.clone();
            let t = std::thread::Builder::new()
                .name("comb-proxy".into())
                .spawn(move || {
                    SHARD.with(|s| s.set(Some(i)));
                    rt.block_on(async {
                        if let Some(woke) = woke {
                            tokio::spawn(crate::busy_poll::poll_after_wake_ups(woke, busy_poll));
                        }
                        let _ = stopped.wait_for(|s| *s).await;
                    });
                    // Connections still open are dropped with their tasks.
                    rt.shutdown_timeout(Duration::from_millis(100));
                })
                .context("proxy thread")?;
            threads.push(t);
        }
        Ok(Self {
            shards,
            stop,
            threads: Mutex::new(threads),
            next: AtomicUsize::new(0),
        })
    }

    /// Shard 0's runtime: the accept loops, listeners and shared background tasks run there.
    pub(crate) fn first(&self) -> &Handle {
        &self.shards[0].handle
    }

    /// Runs `serve` for one accepted connection on the least busy shard (ties in turn). The
    /// stream moves as a std socket: a tokio socket is bound to the runtime that registered it.
    pub(crate) fn dispatch<F, Fut>(self: &Arc<Self>, stream: tokio::net::TcpStream, serve: F)
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let i = self.pick();
        let here = SHARD.with(Cell::get) == Some(i);
        let shards = self.clone();
        shards.shards[i].active.fetch_add(1, Ordering::Relaxed);
        let done = move || {
            shards.shards[i].active.fetch_sub(1, Ordering::Relaxed);
        };
        if here {
            tokio::spawn(async move {
                serve(stream).await;
                done();
            });
            return;
        }
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("proxy: handing a connection to its thread: {e}");
                done();
                return;
            }
        };
        self.shards[i].handle.spawn(async move {
            match tokio::net::TcpStream::from_std(std) {
                Ok(s) => serve(s).await,
                Err(e) => tracing::warn!("proxy: registering a connection: {e}"),
            }
            done();
        });
    }

    /// The least busy shard; on a tie the calling thread's own (it is awake already, and a
    /// hand-over to another thread costs a wake-up before the connection's first byte), then
    /// the others in turn.
    fn pick(&self) -> usize {
        let n = self.shards.len();
        let here = SHARD.with(Cell::get);
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| {
                (
                    self.shards[i].active.load(Ordering::Relaxed),
                    Some(i) != here,
                )
            })
            .unwrap_or(0)
    }

    /// Asks every runtime to stop, without waiting.
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Stops every runtime and waits for its thread (call it from outside the shards).
    pub(crate) fn shutdown(&self) {
        self.stop.send_replace(true);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        // Not joined: dropping must not block (the threads end on their own).
        self.stop.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// With busy polling on, connections handed to the threads are served (round trips
    /// byte-exact), and the threads still stop when asked.
    #[test]
    fn busy_polling_threads_serve_and_stop() {
        let shards = Arc::new(Shards::start(2, Duration::from_micros(150)).unwrap());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let s2 = shards.clone();
        shards.first().spawn(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            while let Ok((s, _)) = l.accept().await {
                s2.dispatch(s, |mut s| async move {
                    let mut b = [0u8; 8];
                    while s.read_exact(&mut b).await.is_ok() {
                        if s.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        for c in 0..4u64 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            // A thread stuck polling fails the test instead of hanging it.
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for i in 0..200u64 {
                let sent = (c << 32 | i).to_be_bytes();
                s.write_all(&sent).unwrap();
                let mut back = [0u8; 8];
                s.read_exact(&mut back).unwrap();
                assert_eq!(back, sent);
            }
        }
        let t0 = std::time::Instant::now();
        shards.shutdown();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
}
