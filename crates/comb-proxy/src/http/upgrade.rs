//! Upgraded connections (WebSocket): after the upstream's 101 both sides are raw byte streams;
//! handed to the relay as sockets (so they can be spliced), or copied here if hyper's IO
//! cannot be unwrapped to a socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn_clock::Clocked;
use crate::context::ProxyContext;
use crate::relay::{Counted, relay, silent_for};
use crate::upstream::{Capped, Slot};

/// One side of the tunnel: a socket (with what hyper had read ahead, and the upstream's place
/// under the connection cap, held while the tunnel runs), or an IO hyper keeps.
enum Side {
    Socket(TcpStream, Bytes, Option<Slot>),
    Other(TokioIo<Upgraded>),
}

fn unwrap(u: Upgraded) -> Side {
    // Upstream connections are capped sockets; downstream ones carry the connection's clocks.
    let u = match u.downcast::<Capped>() {
        Ok(parts) => {
            let (tcp, slot) = parts.io.into_parts();
            return Side::Socket(tcp, parts.read_buf, Some(slot));
        }
        Err(u) => u,
    };
    let u = match u.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return Side::Socket(parts.io.into_inner(), parts.read_buf, None),
        Err(u) => u,
    };
    match u.downcast::<TokioIo<Clocked<TcpStream>>>() {
        Ok(parts) => Side::Socket(parts.io.into_inner().into_inner(), parts.read_buf, None),
        Err(u) => Side::Other(TokioIo::new(u)),
    }
}

pub async fn tunnel(down: OnUpgrade, up: OnUpgrade, ctx: Arc<ProxyContext>) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            return;
        }
    };
    match (unwrap(down), unwrap(up)) {
        (Side::Socket(d, db, _), Side::Socket(u, ub, _slot)) => {
            let idle = Some(ctx.limits.tcp_idle_timeout);
            relay(d, db, u, ub, ctx.splice.as_deref(), idle).await;
        }
        (d, u) => copy(d, u, ctx.limits.tcp_idle_timeout).await,
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Userspace fallback: what either side had buffered goes to the other first; closed after
/// `idle` without a byte either way, like the relay.
async fn copy(down: Side, up: Side, idle: Duration) {
    let split = |s: Side| -> (Box<dyn Io>, Bytes, Option<Slot>) {
        match s {
            Side::Socket(t, b, slot) => (Box::new(t), b, slot),
            Side::Other(o) => (Box::new(o), Bytes::new(), None),
        }
    };
    let (mut d, db, _) = split(down);
    let (mut u, ub, _slot) = split(up);
    if (!db.is_empty() && u.write_all(&db).await.is_err())
        || (!ub.is_empty() && d.write_all(&ub).await.is_err())
    {
        return;
    }
    let (d_read, u_read) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut d = Counted::new(d, d_read.clone());
    let mut u = Counted::new(u, u_read.clone());
    let never_spliced = AtomicBool::new(false);
    tokio::select! {
        r = crate::stream_copy::copy_bidirectional(&mut d, &mut u) => {
            if let Err(e) = r {
                tracing::debug!("upgraded tunnel: {e}");
            }
        }
        _ = silent_for(idle, [&d_read, &u_read], &never_spliced) => {
            tracing::debug!("upgraded tunnel idle");
        }
    }
}
