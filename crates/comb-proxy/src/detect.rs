//! Protocol detection on the first bytes of a connection, peeked (not consumed) so the HTTP
//! server or the opaque relay sees the stream from its first byte.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

/// What the client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// Prior knowledge (the connection preface).
    Http2,
    Opaque,
}

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token we take for HTTP/1 (WebDAV's `VERSION-CONTROL` is 15).
const MAX_METHOD: usize = 20;

/// Verdict on a prefix of the stream: decided, or more bytes could change it.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Is(Protocol),
    NeedMore,
}

/// Classifies the bytes seen so far. `bytes` is everything peeked (possibly partial).
pub fn classify(bytes: &[u8]) -> Verdict {
    if bytes.is_empty() {
        return Verdict::NeedMore;
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        // "PRI " alone would also look like an HTTP/1 method; the preface decides.
        return if n == H2_PREFACE.len() {
            Verdict::Is(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    // An HTTP/1 request line starts with a method token (upper case by convention, which
    // keeps text protocols like "ehlo" or lowercase commands opaque) and a space.
    for (i, &b) in bytes.iter().enumerate().take(MAX_METHOD + 1) {
        if b == b' ' {
            return Verdict::Is(if i > 0 {
                Protocol::Http1
            } else {
                Protocol::Opaque
            });
        }
        if !(b.is_ascii_uppercase() || b == b'-' || b == b'_') {
            return Verdict::Is(Protocol::Opaque);
        }
    }
    if bytes.len() > MAX_METHOD {
        Verdict::Is(Protocol::Opaque)
    } else {
        Verdict::NeedMore
    }
}

/// Peeks until the protocol is known or `timeout` passes (nothing, or only an undecided
/// prefix, by then: opaque). EOF or an error before a decision: opaque (the relay deals with
/// it, as it would for any TCP client).
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Protocol {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut last_len = 0;
    let mut backoff = Duration::from_micros(200);
    loop {
        let peeked = tokio::select! {
            r = stream.peek(&mut buf) => r,
            _ = sleep_until(deadline) => return Protocol::Opaque,
        };
        let n = match peeked {
            Ok(0) | Err(_) => return Protocol::Opaque,
            Ok(n) => n,
        };
        match classify(&buf[..n]) {
            Verdict::Is(p) => return p,
            Verdict::NeedMore => {}
        }
        // peek returns at once while unread bytes exist: a partial prefix arrived, so wait a
        // little for the rest instead of spinning (rare: request lines come in one segment).
        if n == last_len {
            backoff = (backoff * 2).min(Duration::from_millis(20));
        }
        last_len = n;
        let wake = (Instant::now() + backoff).min(deadline);
        sleep_until(wake).await;
        if Instant::now() >= deadline {
            return Protocol::Opaque;
        }
    }
}

/// [`detect`] for a stream that cannot be peeked (a tunnel): reads until the protocol is
/// known and returns what it read, to be replayed with [`Prefixed`].
pub async fn detect_read<IO: AsyncRead + Unpin>(
    io: &mut IO,
    timeout: Duration,
) -> (Protocol, Vec<u8>) {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    loop {
        let mut chunk = [0u8; H2_PREFACE.len()];
        let room = H2_PREFACE.len() - buf.len();
        let read = tokio::select! {
            r = io.read(&mut chunk[..room]) => r,
            _ = sleep_until(deadline) => return (Protocol::Opaque, buf),
        };
        match read {
            Ok(0) | Err(_) => return (Protocol::Opaque, buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        match classify(&buf) {
            Verdict::Is(p) => return (p, buf),
            Verdict::NeedMore if buf.len() >= H2_PREFACE.len() => return (Protocol::Opaque, buf),
            Verdict::NeedMore => {}
        }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<IO> {
    prefix: Vec<u8>,
    pos: usize,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Vec<u8>, inner: IO) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(
            classify(b"OPTIONS * HTTP/1.1"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
        assert_eq!(classify(H2_PREFACE), Verdict::Is(Protocol::Http2));
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(classify(b"ehlo x"), Verdict::Is(Protocol::Opaque));
        assert_eq!(classify(b" GET"), Verdict::Is(Protocol::Opaque));
        assert_eq!(
            classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(classify(b""), Verdict::NeedMore);
    }
}
