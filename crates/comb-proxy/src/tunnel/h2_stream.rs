//! One HBONE CONNECT stream as a byte stream, straight on the `h2` crate's stream handles,
//! and the keep-alive of an HBONE connection.
//!
//! Why not hyper's upgraded CONNECT stream: hyper 1.x sends every write of an upgraded
//! HTTP/2 stream through a one-slot channel to a task of its own, copying it into a new
//! buffer, and its client ignores a CONNECT body, so a tunnel's first bytes waited for the
//! peer's `200`. Here a write is one `send_data` on the stream (the connection's task writes
//! the frames), and the outbound side can send the client's first bytes with the CONNECT.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The two halves of an open CONNECT stream.
pub(crate) struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The unread rest of the last DATA frame.
    buf: Bytes,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            buf: Bytes::new(),
        }
    }
}

/// A stream error as the relay sees it: a peer's clean end (NO_ERROR, CANCEL) is a broken
/// pipe on write and an end of stream on read; any other reset or a connection error is a
/// reset, so the relay resets the TCP side too.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    match e.reason() {
        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) | Some(Reason::STREAM_CLOSED) => {
            io::Error::new(io::ErrorKind::BrokenPipe, e)
        }
        _ => io::Error::new(io::ErrorKind::ConnectionReset, e),
    }
}

/// What a read returns for a stream error: a peer's clean end (NO_ERROR, CANCEL) is the end
/// of the stream, anything else an error.
fn read_end(e: h2::Error) -> io::Result<()> {
    match e.reason() {
        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Ok(()),
        _ => Err(io_error(e)),
    }
}

impl AsyncRead for H2Stream {
    /// Fills `out` from as many DATA frames as are already here, as a socket read returns
    /// all it has queued: one frame per read made the relay's writes (and the wake-ups of
    /// the pod reading them) as small as the sender's frames, and a frame's small tail
    /// shrank the relay's buffer again and again.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = out.filled().len();
        while out.remaining() > 0 {
            if self.buf.is_empty() {
                let got = out.filled().len() > start;
                match self.recv.poll_data(cx) {
                    // Nothing more now: return what was taken (the waker stays registered).
                    Poll::Pending if got => break,
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => break,
                    Poll::Ready(Some(Ok(b))) => {
                        // The window reopens as soon as a frame is taken: `buf` holds one
                        // frame at most, so memory stays bounded by the frame size.
                        let _ = self.recv.flow_control().release_capacity(b.len());
                        self.buf = b;
                        continue;
                    }
                    // Bytes already taken go first: h2 keeps the error in the stream's
                    // state and returns it again on the next read.
                    Poll::Ready(Some(Err(_))) if got => break,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(read_end(e)),
                }
            }
            let n = out.remaining().min(self.buf.len());
            out.put_slice(&self.buf[..n]);
            self.buf.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // A reset from the peer ends the writes at once (no waiting for window).
        if let Poll::Ready(r) = self.send.poll_reset(cx) {
            return Poll::Ready(Err(match r {
                Ok(reason) => io_error(h2::Error::from(reason)),
                Err(e) => io_error(e),
            }));
        }
        self.send.reserve_capacity(data.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let n = cap.min(data.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&data[..n]), false)
                        .map_err(io_error)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes and flushes the frames.
        Poll::Ready(Ok(()))
    }

    /// Half-close: END_STREAM; reading goes on.
    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // Not an I/O error: the stream already ended or was reset, nothing left to
            // close (a reset shows on the read side).
            Err(e) if !e.is_io() => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }
}

/// HBONE keep-alive (ztunnel's and, before, hyper's settings here): a PING every `interval`;
/// returns when a PONG has not come back within `timeout`, or the connection is gone. The
/// caller then drops the connection, which closes its socket.
pub(crate) async fn keep_alive(mut pings: PingPong, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!("hbone keep-alive: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("hbone keep-alive: no PONG within {timeout:?}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client and a server over an in-memory pipe; returns the client's stream and the
    /// server's, both open (the server answered 200).
    async fn pair(window: u32) -> (H2Stream, H2Stream) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(window)
                .handshake::<_, Bytes>(b)
                .await
                .unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Stream::new(send, req.into_body())
        });
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(window)
            .handshake::<_, Bytes>(a)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (resp, send) = client.send_request(req, false).unwrap();
        let theirs = server.await.unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        (H2Stream::new(send, resp.into_body()), theirs)
    }

    #[tokio::test]
    async fn bytes_cross_beyond_the_window_and_half_close_is_kept() {
        // A 64 KiB window and 1 MiB each way: writes must wait for window updates.
        let (c, mut s) = pair(64 * 1024).await;
        let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let d2 = data.clone();
        let echo = tokio::spawn(async move {
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            assert!(got == d2, "server got other bytes");
            s.write_all(&got).await.unwrap();
            s.shutdown().await.unwrap();
        });
        // The server echoes only after our END_STREAM: half-close must keep our read side.
        let (mut r, mut w) = tokio::io::split(c);
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
            data
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        let data = writer.await.unwrap();
        echo.await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data);
    }

    #[tokio::test]
    async fn one_read_takes_every_frame_already_here() {
        let (mut c, mut s) = pair(1024 * 1024).await;
        for i in 0..3u8 {
            // One write, one DATA frame.
            s.write_all(&[i; 1000]).await.unwrap();
        }
        s.shutdown().await.unwrap();
        // Let the connections' tasks move all three frames to the client's stream.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut b = vec![0u8; 64 * 1024];
        let n = c.read(&mut b).await.unwrap();
        assert_eq!(n, 3000, "one read, three frames");
        assert!(b[..1000].iter().all(|&x| x == 0) && b[2000..3000].iter().all(|&x| x == 2));
        assert_eq!(
            c.read(&mut b).await.unwrap(),
            0,
            "then the end of the stream"
        );
    }

    #[tokio::test]
    async fn a_reset_stream_is_a_reset_for_the_relay() {
        let (mut c, s) = pair(1024 * 1024).await;
        let H2Stream { mut send, .. } = s;
        send.send_reset(Reason::INTERNAL_ERROR);
        let mut b = [0u8; 16];
        let e = c.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        let e = c.write_all(b"more").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
}
