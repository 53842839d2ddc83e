//! The HTTP/1.1 upstream pool: hyper-util's client (idle connections kept per destination up
//! to a count, closed after the idle timeout) over a connector that caps the connections
//! open at once across all destinations, so the pool cannot grow with the number of
//! destinations a node talks to.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::{BoxError, RequestBody};
use crate::options::Limits;

pub type H1Client = Client<CappedConnector, RequestBody>;

pub fn client(limits: &Limits, open: Arc<AtomicUsize>) -> H1Client {
    let mut inner = HttpConnector::new();
    inner.set_nodelay(true);
    inner.set_connect_timeout(Some(limits.upstream_connect_timeout));
    let connector = CappedConnector {
        inner,
        open,
        max: limits.max_upstream_h1_connections,
    };
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(limits.upstream_idle_timeout)
        .pool_max_idle_per_host(limits.pool_max_idle_per_host)
        // Bounds each upstream connection's read buffer (and response heads) like the
        // downstream's; hyper's default is ~400 KiB.
        .http1_max_buf_size((limits.max_header_bytes + 1024).max(8192))
        // The client's Host is forwarded as received; the URI carries the destination.
        .set_host(false)
        .build(connector)
}

/// The total cap was reached: Envoy's circuit-breaker overflow (`UO`).
#[derive(Debug)]
pub struct Overflow;

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream connection limit reached")
    }
}

impl std::error::Error for Overflow {}

#[derive(Clone)]
pub struct CappedConnector {
    inner: HttpConnector,
    open: Arc<AtomicUsize>,
    max: usize,
}

impl tower_service::Service<Uri> for CappedConnector {
    type Response = Capped;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Capped, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let max = self.max;
        let reserved = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            return Box::pin(async { Err(Box::new(Overflow) as BoxError) });
        }
        // The slot is released when the connection (or the failed attempt) is dropped.
        let slot = Slot(self.open.clone());
        let connecting = self.inner.call(dst);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(Capped { io, _slot: slot })
        })
    }
}

/// A place under the total cap, given back when dropped.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An upstream connection holding its place under the cap.
pub struct Capped {
    io: TokioIo<TcpStream>,
    _slot: Slot,
}

impl Capped {
    /// The socket and its place under the cap (an upgraded connection leaves hyper as a
    /// socket for the relay, which keeps the place while it runs).
    pub(crate) fn into_parts(self) -> (TcpStream, Slot) {
        (self.io.into_inner(), self._slot)
    }
}

impl Read for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl Connection for Capped {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}
