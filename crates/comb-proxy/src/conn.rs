//! The per-connection entry point: detect the protocol, then serve it as HTTP or relay it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::context::ProxyContext;
use crate::detect::{Prefixed, Protocol, detect, detect_read};
use crate::http::{self, service::ConnInfo};
use crate::tcp::{serve_opaque, serve_opaque_tunneled};
use crate::tunnel::TunnelPeer;
use crate::upstream::Dedicated;

/// Serves one accepted connection to its end. `peer` is the client, `original_dst` where it
/// was going (with a transparent listener, the accepted socket's local address).
pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    original_dst: SocketAddr,
    ctx: Arc<ProxyContext>,
) {
    let _ = stream.set_nodelay(true);
    match detect(&stream, ctx.detect_timeout).await {
        Protocol::Http1 => {
            let conn = ConnInfo {
                peer,
                dst: original_dst,
                h2: false,
                tunnel: None,
                upstream: None,
            };
            http::serve_h1(stream, conn, ctx).await
        }
        Protocol::Http2 => {
            let conn = ConnInfo {
                peer,
                dst: original_dst,
                h2: true,
                tunnel: None,
                upstream: None,
            };
            http::serve_h2(stream, conn, ctx).await
        }
        Protocol::Opaque => serve_opaque(stream, peer, original_dst, ctx).await,
    }
}

/// Serves one stream delivered through an HBONE tunnel: the same pipeline as an accepted
/// connection (protocol detection, then HTTP with the destination's L7 policy, or opaque
/// TCP), with the tunnel client's certificate identity as the source. `up` is the
/// connection already opened to `original_dst` from `origin` (the original source's
/// address and the delivery mark): the opaque relay uses it, and HTTP requests go over it
/// (and over new ones from the same origin when it closes), never over the shared pools.
pub async fn serve_tunneled<IO>(
    mut io: IO,
    up: TcpStream,
    origin: (Option<std::net::IpAddr>, Option<u32>),
    peer: SocketAddr,
    original_dst: SocketAddr,
    tunnel: Arc<TunnelPeer>,
    ctx: Arc<ProxyContext>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (proto, prefix) = detect_read(&mut io, ctx.detect_timeout).await;
    let io = Prefixed::new(prefix, io);
    if proto == Protocol::Opaque {
        return serve_opaque_tunneled(io, up, peer, original_dst, &tunnel, ctx).await;
    }
    let h2 = proto == Protocol::Http2;
    let conn = ConnInfo {
        peer,
        dst: original_dst,
        h2,
        tunnel: Some(tunnel.clone()),
        upstream: Some(Arc::new(Dedicated::new(
            up,
            original_dst,
            origin.0,
            origin.1,
            &ctx.limits,
        ))),
    };
    match proto {
        Protocol::Http2 => http::serve_h2(io, conn, ctx).await,
        _ => http::serve_h1(io, conn, ctx).await,
    }
}
