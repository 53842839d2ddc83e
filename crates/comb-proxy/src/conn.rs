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
            };
            http::serve_h1(stream, conn, ctx).await
        }
        Protocol::Http2 => {
            let conn = ConnInfo {
                peer,
                dst: original_dst,
                h2: true,
                tunnel: None,
            };
            http::serve_h2(stream, conn, ctx).await
        }
        Protocol::Opaque => serve_opaque(stream, peer, original_dst, ctx).await,
    }
}

/// Serves one stream delivered through an HBONE tunnel: the same pipeline as an accepted
/// connection (protocol detection, then HTTP with the destination's L7 policy, or opaque
/// TCP), with the tunnel client's certificate identity as the source. `up` is the
/// connection already opened to `original_dst` (from the original source's address): the
/// opaque relay uses it; HTTP goes over the proxy's upstream pools.
pub async fn serve_tunneled<IO>(
    mut io: IO,
    up: TcpStream,
    peer: SocketAddr,
    original_dst: SocketAddr,
    tunnel: Arc<TunnelPeer>,
    ctx: Arc<ProxyContext>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (proto, prefix) = detect_read(&mut io, ctx.detect_timeout).await;
    let io = Prefixed::new(prefix, io);
    let conn = |h2| ConnInfo {
        peer,
        dst: original_dst,
        h2,
        tunnel: Some(tunnel.clone()),
    };
    match proto {
        Protocol::Http1 => {
            drop(up);
            http::serve_h1(io, conn(false), ctx).await
        }
        Protocol::Http2 => {
            drop(up);
            http::serve_h2(io, conn(true), ctx).await
        }
        Protocol::Opaque => serve_opaque_tunneled(io, up, peer, original_dst, &tunnel, ctx).await,
    }
}
