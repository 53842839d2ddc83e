//! Bidirectional copy between two async byte streams (tunnel streams, upgraded HTTP, TLS)
//! with a buffer per direction that grows with the traffic: 8 KiB to start (tokio's
//! `copy_bidirectional` size, so an idle or chatty connection costs what it did), doubled
//! after reads that fill it, up to 256 KiB for bulk transfers. A bigger buffer means fewer
//! wake-ups, reads and writes per byte, and — through an HBONE tunnel — bigger HTTP/2 DATA
//! frames and TLS writes; profiling the tunnel at 8 KiB showed the relay's cost in wake-ups
//! and per-call overhead, not in encryption. Shrinks back once the traffic is small again.
//!
//! Semantics as tokio's `copy_bidirectional`: each direction copies until EOF, then shuts
//! its destination down (a half-close passed on); an error in either direction ends both.
//! Returns the bytes copied a → b and b → a.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(crate) const MIN_BUF: usize = 8 * 1024;
pub(crate) const MAX_BUF: usize = 256 * 1024;
/// Consecutive reads that fill the buffer before it doubles.
const FULL_READS_TO_GROW: u8 = 2;

/// One direction's state.
struct Half {
    buf: Vec<u8>,
    /// `buf[pos..end]` is read and not yet written.
    pos: usize,
    end: usize,
    full_reads: u8,
    read_done: bool,
    need_flush: bool,
    shut: bool,
    copied: u64,
}

impl Half {
    fn new() -> Self {
        Half {
            buf: Vec::new(),
            pos: 0,
            end: 0,
            full_reads: 0,
            read_done: false,
            need_flush: false,
            shut: false,
            copied: 0,
        }
    }

    /// Size the (empty) buffer for the next read from what the last one returned.
    fn resize_for_read(&mut self, last_read: usize) {
        let cap = self.buf.len();
        let want = if cap == 0 {
            MIN_BUF
        } else if last_read == cap {
            self.full_reads = self.full_reads.saturating_add(1);
            if self.full_reads >= FULL_READS_TO_GROW && cap < MAX_BUF {
                self.full_reads = 0;
                (cap * 2).min(MAX_BUF)
            } else {
                cap
            }
        } else {
            self.full_reads = 0;
            // Small again: give the memory back.
            if cap > MIN_BUF && last_read <= MIN_BUF / 2 {
                MIN_BUF
            } else {
                cap
            }
        };
        if want != cap {
            self.buf = vec![0; want];
        }
    }

    /// Copy until `r` reaches EOF and `w` is shut down: Ready(Ok(bytes)) then.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.end && !self.read_done {
                let last = self.end;
                self.pos = 0;
                self.end = 0;
                self.resize_for_read(last);
                let mut rb = ReadBuf::new(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.end = n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing to read now: push out what was written before waiting.
                        if self.need_flush {
                            ready!(w.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.end {
                let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write zero bytes into the destination",
                    )));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                if self.need_flush {
                    ready!(w.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                if !self.shut {
                    ready!(w.as_mut().poll_shutdown(cx))?;
                    self.shut = true;
                    // An idle half keeps no buffer.
                    self.buf = Vec::new();
                }
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

/// Copy `a` → `b` and `b` → `a` until both reached EOF (each half-close passed on) or one
/// failed; returns (a → b, b → a) bytes.
pub(crate) async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut ab, mut ba) = (Half::new(), Half::new());
    let (mut ab_done, mut ba_done) = (None, None);
    poll_fn(|cx| {
        if ab_done.is_none()
            && let Poll::Ready(r) = ab.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))
        {
            ab_done = Some(r?);
        }
        if ba_done.is_none()
            && let Poll::Ready(r) = ba.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))
        {
            ba_done = Some(r?);
        }
        match (ab_done, ba_done) {
            (Some(x), Some(y)) => Poll::Ready(Ok((x, y))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[1] ^ seed)
            .collect()
    }

    #[test]
    fn buffer_grows_with_full_reads_and_shrinks_after_small_ones() {
        let mut h = Half::new();
        h.resize_for_read(0);
        assert_eq!(h.buf.len(), MIN_BUF);
        let mut sizes = Vec::new();
        for _ in 0..20 {
            let cap = h.buf.len();
            h.resize_for_read(cap);
            sizes.push(h.buf.len());
        }
        assert_eq!(*sizes.last().unwrap(), MAX_BUF, "{sizes:?}");
        assert!(sizes.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] * 2));
        // A medium read keeps the size, a small one gives the memory back.
        h.resize_for_read(MAX_BUF / 2);
        assert_eq!(h.buf.len(), MAX_BUF);
        h.resize_for_read(100);
        assert_eq!(h.buf.len(), MIN_BUF);
    }

    /// Both directions byte-exact over in-memory pipes smaller than the transfer (so writes
    /// are partial and the copy waits on both sides), half-closes passed on, counts returned.
    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut client, mut proxy_down) = duplex(4096);
        let (mut proxy_up, mut server) = duplex(64 * 1024);
        let relay =
            tokio::spawn(async move { copy_bidirectional(&mut proxy_down, &mut proxy_up).await });
        let up = pattern(3 << 20, 0x11);
        let down = pattern(1 << 20, 0x22);
        let (up2, down2) = (up.clone(), down.clone());
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert!(got == up2, "server got different bytes");
            server.write_all(&down2).await.unwrap();
            server.shutdown().await.unwrap();
        });
        let (mut cr, mut cw) = tokio::io::split(&mut client);
        let writer = async {
            cw.write_all(&up).await.unwrap();
            cw.shutdown().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            cr.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert!(got == down, "client got different bytes");
        server_task.await.unwrap();
        let (a, b) = relay.await.unwrap().unwrap();
        assert_eq!((a, b), (up.len() as u64, down.len() as u64));
    }

    /// An error on one side ends the copy with that error.
    #[tokio::test]
    async fn an_error_ends_both_directions() {
        let (mut client, mut proxy_down) = duplex(1024);
        let (mut proxy_up, server) = duplex(1024);
        drop(server);
        client.write_all(b"hello").await.unwrap();
        let r = copy_bidirectional(&mut proxy_down, &mut proxy_up).await;
        assert!(r.is_err(), "{r:?}");
    }
}
