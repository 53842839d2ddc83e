//! The HTTP/1.1 upstream pool of one proxy thread: connections kept per destination address
//! (busy or idle, up to a count), closed after the idle timeout, and capped in total across
//! all destinations and threads, so the pool cannot grow with the number of destinations a
//! node talks to.
//!
//! It replaced hyper-util's pooled client, which cost a spawned task per request (to put a
//! connection back once its response body ended), a URI-keyed lookup and a lazy connect
//! future per checkout. Here a connection goes back to its list as soon as the response head
//! arrives; hyper's `SendRequest::is_ready` says when it can take the next request (not while
//! a body is still streaming), and a checkout takes the first ready one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Failure;
use crate::body::RequestBody;
use crate::options::Limits;

struct Pooled<B> {
    sender: http1::SendRequest<B>,
    /// When it last came back with a response head: the idle clock.
    used: Instant,
}

/// Generic over the request body for the tests; the proxy's is [`RequestBody`].
pub struct H1Pool<B = RequestBody> {
    conns: Mutex<HashMap<SocketAddr, Vec<Pooled<B>>>>,
    /// Open connections of every thread's pool (the cap is node-wide).
    open: Arc<AtomicUsize>,
    max: usize,
    per_host: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    builder: http1::Builder,
    /// The reaper task runs (started with the first connection, on this pool's thread).
    reaping: std::sync::atomic::AtomicBool,
}

impl<B> H1Pool<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(limits: &Limits, open: Arc<AtomicUsize>) -> Self {
        let mut builder = http1::Builder::new();
        // Bounds each upstream connection's read buffer (and response heads) like the
        // downstream's; hyper's default is ~400 KiB.
        builder.max_buf_size((limits.max_header_bytes + 1024).max(8192));
        Self {
            conns: Mutex::default(),
            open,
            max: limits.max_upstream_h1_connections,
            per_host: limits.pool_max_idle_per_host.max(1),
            idle_timeout: limits.upstream_idle_timeout,
            connect_timeout: limits.upstream_connect_timeout,
            builder,
            reaping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Connections to `dst` in the pool now (busy or idle).
    #[cfg(test)]
    fn pooled(&self, dst: SocketAddr) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.get(&dst).map_or(0, Vec::len)
    }

    /// One exchange with `dst`; the request's URI goes out as it is (origin form).
    pub async fn request(
        self: &Arc<Self>,
        dst: SocketAddr,
        mut req: Request<B>,
    ) -> Result<Response<Incoming>, Failure> {
        // A pooled connection the server closed meanwhile fails before the request is
        // written; the request comes back and goes to the next one, then to a new one.
        while let Some(mut sender) = self.checkout(dst) {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.checkin(dst, sender, resp)),
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(Failure::classify(&e.into_error(), false)),
                },
            }
        }
        let mut sender = self.connect(dst).await?;
        match sender.send_request(req).await {
            Ok(resp) => Ok(self.checkin(dst, sender, resp)),
            Err(e) => Err(Failure::classify(&e, false)),
        }
    }

    /// The first connection to `dst` that can take a request now; closed and expired ones
    /// leave the list on the way.
    fn checkout(&self, dst: SocketAddr) -> Option<http1::SendRequest<B>> {
        let now = Instant::now();
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(&dst)?;
        list.retain(|p| self.keeps(p, now));
        let i = list.iter().position(|p| p.sender.is_ready())?;
        Some(list.swap_remove(i).sender)
    }

    /// Back into the list with the response head: it takes the next request once its body
    /// has ended (`is_ready`). Not after a 101 (the connection becomes the tunnel), and not
    /// beyond the per-destination count (it closes after this response).
    fn checkin(
        &self,
        dst: SocketAddr,
        sender: http1::SendRequest<B>,
        resp: Response<Incoming>,
    ) -> Response<Incoming> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return resp;
        }
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.entry(dst).or_default();
        if list.len() < self.per_host {
            list.push(Pooled {
                sender,
                used: Instant::now(),
            });
        }
        resp
    }

    /// Whether a pooled connection stays: open, and used within the idle timeout.
    fn keeps(&self, p: &Pooled<B>, now: Instant) -> bool {
        !p.sender.is_closed() && now.duration_since(p.used) < self.idle_timeout
    }

    /// Every list loses its closed and expired connections (a destination no longer asked
    /// for would otherwise keep them); the reaper calls it, checkouts clean their own list.
    fn reap(&self, now: Instant) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|_, list| {
            list.retain(|p| self.keeps(p, now));
            !list.is_empty()
        });
    }

    /// Reaps until the pool is dropped (a task holding only a weak reference).
    fn start_reaper(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        crate::reaper::spawn(Arc::downgrade(self), self.idle_timeout, Self::reap);
    }

    /// A new connection under the cap, its task spawned on this thread.
    async fn connect(self: &Arc<Self>, dst: SocketAddr) -> Result<http1::SendRequest<B>, Failure> {
        self.start_reaper();
        let reserved = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            return Err(Failure::OVERFLOW);
        }
        // Given back when the connection (or this failed attempt) is dropped.
        let slot = Slot(self.open.clone());
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Failure::classify(&e, true)),
            Err(_) => return Err(Failure::CONNECT_TIMEOUT),
        };
        let _ = tcp.set_nodelay(true);
        let io = Capped {
            io: TokioIo::new(tcp),
            _slot: slot,
        };
        let (sender, conn) = self
            .builder
            .handshake(io)
            .await
            .map_err(|e| Failure::classify(&e, true))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%dst, "upstream http/1 connection: {e}");
            }
        });
        Ok(sender)
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;

    /// An HTTP/1 server answering `ok` (or streaming a slow body for `/slow`), counting
    /// the connections it accepted.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                            req.uri().to_string(),
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::builder().uri(path).body(Empty::new()).unwrap()
    }

    async fn text(resp: Response<Incoming>) -> String {
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection_concurrent_ones_open_more() {
        let (dst, accepted) = server().await;
        let open = Arc::new(AtomicUsize::new(0));
        let pool = Arc::new(H1Pool::<Empty<Bytes>>::new(
            &Limits::default(),
            open.clone(),
        ));
        for i in 0..20 {
            let r = pool.request(dst, get(&format!("/n/{i}"))).await.unwrap();
            assert_eq!(text(r).await, format!("/n/{i}"), "origin form, as sent");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A slow response in flight: the next request may not queue behind it.
        let p = pool.clone();
        let slow =
            tokio::spawn(async move { text(p.request(dst, get("/slow")).await.unwrap()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = pool.request(dst, get("/fast")).await.unwrap();
        assert_eq!(text(r).await, "/fast");
        assert_eq!(slow.await.unwrap(), "/slow");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.pooled(dst), 2);
        assert_eq!(open.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_cap_refuses_with_overflow_and_closed_connections_give_their_place_back() {
        let (dst, _) = server().await;
        let open = Arc::new(AtomicUsize::new(0));
        let limits = Limits {
            max_upstream_h1_connections: 1,
            upstream_idle_timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let pool = Arc::new(H1Pool::<Empty<Bytes>>::new(&limits, open.clone()));
        let p = pool.clone();
        let slow = tokio::spawn(async move { p.request(dst, get("/slow")).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e = pool.request(dst, get("/x")).await.unwrap_err();
        assert_eq!(e, Failure::OVERFLOW);
        slow.await.unwrap().unwrap();
        // Expired: dropped at the next checkout, its place given back once hyper closed it.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(pool.checkout(dst).is_none());
        let deadline = Instant::now() + Duration::from_secs(5);
        while open.load(Ordering::SeqCst) != 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(open.load(Ordering::SeqCst), 0);
        let r = pool.request(dst, get("/y")).await.unwrap();
        assert_eq!(text(r).await, "/y");
    }

    #[tokio::test]
    async fn refused_is_a_connect_failure() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = l.local_addr().unwrap();
        drop(l);
        let pool = Arc::new(H1Pool::<Empty<Bytes>>::new(
            &Limits::default(),
            Arc::new(AtomicUsize::new(0)),
        ));
        assert_eq!(
            pool.request(dst, get("/")).await.unwrap_err(),
            Failure::CONNECT
        );
    }
}
