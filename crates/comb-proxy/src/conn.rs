//! The per-connection entry point: detect the protocol, then serve it as HTTP or relay it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::context::ProxyContext;
use crate::detect::{Protocol, detect};
use crate::http::{self, service::ConnInfo};
use crate::tcp::serve_opaque;

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
            };
            http::serve_h1(stream, conn, ctx).await
        }
        Protocol::Http2 => {
            let conn = ConnInfo {
                peer,
                dst: original_dst,
                h2: true,
            };
            http::serve_h2(stream, conn, ctx).await
        }
        Protocol::Opaque => serve_opaque(stream, peer, original_dst, ctx).await,
    }
}
