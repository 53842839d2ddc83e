//! The HTTP side of the proxy: hyper servers on the downstream connection (HTTP/1.1 with
//! upgrades, HTTP/2 prior knowledge), per-request authorization and forwarding.

pub mod headers;
pub mod responses;
pub mod service;
pub mod upgrade;

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conn_clock::{Clocked, ConnClock, Expired};
use crate::context::ProxyContext;
use service::{ConnInfo, ProxyService};

/// How long a draining proxy lets an HTTP/1 keep-alive connection stay idle before closing
/// it (a busy one closes sooner, after its next response).
const H1_DRAIN_IDLE: Duration = Duration::from_secs(5);

/// Serves one HTTP/1.1 connection until the client, an error, a timeout or shutdown ends it.
/// hyper answers malformed requests with 400 and oversized heads with 431; a head that
/// does not complete within `header_read_timeout` of its first byte cuts the connection,
/// and one silent between requests for `downstream_idle_timeout` is closed.
pub async fn serve_h1<IO>(stream: IO, conn: ConnInfo, ctx: Arc<ProxyContext>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let clock = ConnClock::new();
    let svc = ProxyService {
        ctx: ctx.clone(),
        conn: Arc::new(conn),
        clock: clock.clone(),
    };
    let io = TokioIo::new(Clocked::new(stream, clock.clone()));
    let served = ctx.h1.serve_connection(io, svc).with_upgrades();
    let head = Some(ctx.limits.header_read_timeout);
    let r = drive(served, &clock, head, &ctx).await;
    if let Some(Err(e)) = r {
        tracing::debug!("downstream http/1 connection: {e}");
    }
}

/// Serves one HTTP/2 (prior knowledge) connection; with no stream for
/// `downstream_idle_timeout` it gets GOAWAY and closes.
pub async fn serve_h2<IO>(stream: IO, conn: ConnInfo, ctx: Arc<ProxyContext>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let clock = ConnClock::new();
    let svc = ProxyService {
        ctx: ctx.clone(),
        conn: Arc::new(conn),
        clock: clock.clone(),
    };
    let served = ctx.h2.serve_connection(TokioIo::new(stream), svc);
    let r = drive(served, &clock, None, &ctx).await;
    if let Some(Err(e)) = r {
        tracing::debug!("downstream http/2 connection: {e}");
    }
}

/// A hyper connection that can be asked to finish its requests and close.
trait Graceful: Future {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs the connection until it ends; on shutdown or idle expiry it finishes the requests in
/// flight and closes (HTTP/2: GOAWAY); an expired head clock cuts it at once.
async fn drive<C: Graceful>(
    served: C,
    clock: &ConnClock,
    head: Option<Duration>,
    ctx: &ProxyContext,
) -> Option<C::Output> {
    let mut stop = ctx.stopping();
    let mut served = pin!(served);
    // Biased: the connection first, and no random draw per poll (this runs per wake-up).
    let expired = tokio::select! {
        biased;
        r = served.as_mut() => return Some(r),
        _ = stop.changed() => {
            // Draining, HTTP/1 (the one with a head clock): every response now says
            // `Connection: close` (ProxyService), so a client's next request ends the
            // connection at a request boundary. Closing an idle keep-alive connection at
            // once would race a request the client is sending; only one idle for
            // H1_DRAIN_IDLE is closed.
            if head.is_some()
                && let Ok(r) = tokio::time::timeout(H1_DRAIN_IDLE, served.as_mut()).await
            {
                return Some(r);
            }
            None
        }
        e = clock.expired(ctx.limits.downstream_idle_timeout, head) => Some(e),
    };
    if expired == Some(Expired::Head) {
        // What hyper's own header timer did: the connection goes, no answer.
        tracing::debug!("downstream http/1 request head timed out");
        return None;
    }
    served.as_mut().graceful();
    Some(served.await)
}
