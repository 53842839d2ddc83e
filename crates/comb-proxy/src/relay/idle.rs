//! The idle clock of a byte relay: it runs out when no byte moved either way for the idle
//! timeout (Istio's TCP `idle_timeout`). Byte counts are the only activity a relay has, so
//! the clock samples them rather than being told about every read.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Resolves once none of `counts` moved for `idle` (sampled every eighth of it, so the end
/// comes between `idle` and `idle` × 1.125 after the last byte). Never while `in_kernel`:
/// a spliced pair's bytes are not counted here.
pub async fn silent_for(idle: Duration, counts: [&AtomicU64; 2], in_kernel: &AtomicBool) {
    let tick = (idle / 8).max(Duration::from_millis(10));
    let total = || counts[0].load(Ordering::Relaxed) + counts[1].load(Ordering::Relaxed);
    let mut last = total();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        if in_kernel.load(Ordering::Relaxed) {
            return std::future::pending().await;
        }
        let now = total();
        if now != last {
            last = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= idle {
            return;
        }
    }
}

/// An IO that counts the bytes read from it (for relays copied by `copy_bidirectional`:
/// the idle clock) and, optionally, the bytes written into it (a pooled tunnel's totals).
pub struct Counted<IO> {
    io: IO,
    read: Arc<AtomicU64>,
    written: Option<Arc<AtomicU64>>,
}

impl<IO> Counted<IO> {
    pub fn new(io: IO, read: Arc<AtomicU64>) -> Self {
        Self {
            io,
            read,
            written: None,
        }
    }

    /// Count the bytes written too.
    pub fn counting_writes(mut self, written: Arc<AtomicU64>) -> Self {
        self.written = Some(written);
        self
    }

    pub fn into_inner(self) -> IO {
        self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(w)) = (&r, &self.written) {
            w.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn clock_runs_out_only_after_silence() {
        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
        let kernel = AtomicBool::new(false);
        let idle = Duration::from_secs(80);
        // Bytes every 50 s (less than the idle time) for 400 s keep it running.
        let busy = async {
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                a.fetch_add(1, Ordering::Relaxed);
            }
        };
        let t0 = tokio::time::Instant::now();
        tokio::select! {
            _ = silent_for(idle, [&a, &b], &kernel) => panic!("ran out while busy"),
            _ = busy => {}
        }
        let quiet = tokio::time::Instant::now();
        silent_for(idle, [&a, &b], &kernel).await;
        assert!(
            quiet.elapsed() >= idle && quiet.elapsed() <= idle * 9 / 8 + Duration::from_secs(10)
        );
        assert!(t0.elapsed() >= Duration::from_secs(480));
        // Spliced: never.
        kernel.store(true, Ordering::Relaxed);
        let r = tokio::time::timeout(idle * 10, silent_for(idle, [&a, &b], &kernel)).await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn counted_counts_what_is_read() {
        let (x, mut y) = tokio::io::duplex(64);
        let n = Arc::new(AtomicU64::new(0));
        let mut c = Counted::new(x, n.clone());
        y.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(n.load(Ordering::Relaxed), 5);
    }
}
