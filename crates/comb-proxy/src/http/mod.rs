//! The HTTP side of the proxy: hyper servers on the downstream connection (HTTP/1.1 with
//! upgrades, HTTP/2 prior knowledge), per-request authorization and forwarding.

pub mod headers;
pub mod responses;
pub mod service;
pub mod upgrade;

use std::pin::pin;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::context::ProxyContext;
use service::{ConnInfo, ProxyService};

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
            served.as_mut().graceful_shutdown();
            served.await
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
