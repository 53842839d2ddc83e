//! The HTTP side of the proxy: hyper servers on the downstream connection (HTTP/1.1 with
//! upgrades, HTTP/2 prior knowledge), per-request authorization and forwarding.

pub mod headers;
pub mod responses;
pub mod service;
pub mod upgrade;

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::context::ProxyContext;
use service::{ConnInfo, ProxyService};

/// How long a draining proxy lets an HTTP/1 keep-alive connection stay idle before closing
/// it (a busy one closes sooner, after its next response).
const H1_DRAIN_IDLE: Duration = Duration::from_secs(5);

/// Serves one HTTP/1.1 connection until the client, an error or shutdown ends it. hyper
/// answers malformed requests with 400, oversized heads with 431, and closes a connection
/// whose head does not arrive within `header_read_timeout`.
pub async fn serve_h1<IO>(stream: IO, conn: ConnInfo, ctx: Arc<ProxyContext>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut stop = ctx.stopping();
    let svc = ProxyService {
        ctx: ctx.clone(),
        conn: Arc::new(conn),
    };
    let mut served = pin!(
        ctx.h1
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades()
    );
    let r = tokio::select! {
        r = served.as_mut() => r,
        _ = stop.changed() => {
            // Draining: every response now says `Connection: close` (ProxyService), so a
            // client's next request ends the connection at a request boundary. Closing an
            // idle keep-alive connection at once would race a request the client is sending;
            // only one idle for H1_DRAIN_IDLE is closed.
            match tokio::time::timeout(H1_DRAIN_IDLE, served.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            }
        }
    };
    if let Err(e) = r {
        tracing::debug!("downstream http/1 connection: {e}");
    }
}

/// Serves one HTTP/2 (prior knowledge) connection.
pub async fn serve_h2<IO>(stream: IO, conn: ConnInfo, ctx: Arc<ProxyContext>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut stop = ctx.stopping();
    let svc = ProxyService {
        ctx: ctx.clone(),
        conn: Arc::new(conn),
    };
    let mut served = pin!(ctx.h2.serve_connection(TokioIo::new(stream), svc));
    let r = tokio::select! {
        r = served.as_mut() => r,
        _ = stop.changed() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = r {
        tracing::debug!("downstream http/2 connection: {e}");
    }
}
