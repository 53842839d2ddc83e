//! One outbound flow: a local mesh pod's TCP connection to a remote HBONE peer becomes a
//! CONNECT stream on a pooled mutual-TLS connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::context::ProxyContext;
use crate::relay;
use crate::telemetry::trace;
use crate::tunnel::headers;
use crate::tunnel::pool::WorkloadKey;

/// A CONNECT that fails before its `200` is tried this many times in all.
const CONNECT_ATTEMPTS: u32 = 3;

/// Serves one flow steered to the outbound listener: `peer` is the source pod, `dst` the
/// original destination (a remote pod). A flow that cannot be tunneled is reset (the client
/// sees what an unreachable peer would give it).
pub async fn serve_outbound(
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    ctx: Arc<ProxyContext>,
) {
    let _ = stream.set_nodelay(true);
    let Some(hbone) = ctx.hbone.as_ref() else {
        return reset(stream);
    };
    let table = ctx.table();
    let (Some(src_id), Some(target)) = (
        table.mesh_identity(peer.ip()).cloned(),
        table.hbone_peer(dst.ip()).cloned(),
    ) else {
        tracing::debug!(%peer, %dst, "hbone outbound: not a local mesh pod to an HBONE peer");
        return reset(stream);
    };
    let source = table.workload(peer.ip()).cloned();
    drop(table);
    let key = WorkloadKey {
        src_id,
        dst_id: target.identity,
        src: peer.ip().to_canonical(),
        dst: SocketAddr::new(dst.ip().to_canonical(), hbone.opts.peer_port),
    };
    // A CONNECT that fails before its 200 carried no byte of the client's: it is retried,
    // on a connection opened after the failure (other pooled ones to that peer may be
    // going away too), twice at most. That is what a draining peer's GOAWAY (an upgrade on
    // its node, docs/upgrades.md) or a connection that died unnoticed costs, not a reset.
    let mut retry_since: Option<std::time::Instant> = None;
    let mut attempts = 0;
    let (slot, resp) = loop {
        attempts += 1;
        let slot = match hbone.pool.stream(&key, retry_since).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%peer, %dst, "hbone outbound: {e}");
                return reset(stream);
            }
        };
        let mut sender = slot.conn.sender.clone();
        match sender
            .send_request(connect_request(peer, dst, source.as_deref(), hbone))
            .await
        {
            Ok(r) => break (slot, r),
            Err(e) => {
                slot.conn.retire();
                if attempts >= CONNECT_ATTEMPTS {
                    tracing::info!(%peer, %dst, attempts, "hbone outbound CONNECT: {e}");
                    return reset(stream);
                }
                tracing::debug!(%peer, %dst, "hbone outbound CONNECT: {e}; retrying on a fresh connection");
                retry_since = Some(std::time::Instant::now());
            }
        }
    };
    if resp.status() != StatusCode::OK {
        tracing::info!(%peer, %dst, status = %resp.status(), "hbone outbound: refused");
        return reset(stream);
    }
    let upgraded = match hyper::upgrade::on(resp).await {
        Ok(u) => u,
        Err(e) => {
            tracing::info!(%peer, %dst, "hbone outbound upgrade: {e}");
            return reset(stream);
        }
    };
    // The pooled connection's totals, and this stream's own counts for the idle clock.
    let tunnel = relay::Counted::new(TokioIo::new(upgraded), slot.conn.received.clone())
        .counting_writes(slot.conn.sent.clone());
    let (down_read, up_read) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut down = relay::Counted::new(stream, down_read.clone());
    let mut tunnel = relay::Counted::new(tunnel, up_read.clone());
    let never_spliced = AtomicBool::new(false);
    let idle = ctx.limits.tcp_idle_timeout;
    tokio::select! {
        r = crate::stream_copy::copy_bidirectional(&mut down, &mut tunnel) => {
            if let Err(e) = r {
                tracing::debug!(%peer, %dst, "hbone outbound relay: {e}");
                reset(down.into_inner());
            }
        }
        // Idle: the downstream gets FIN, the tunnel stream ends with the upgraded IO.
        _ = relay::silent_for(idle, [&down_read, &up_read], &never_spliced) => {
            tracing::debug!(%peer, %dst, "hbone outbound relay idle");
        }
    }
}

/// The CONNECT of one tunnelled stream (ztunnel's headers).
fn connect_request(
    peer: SocketAddr,
    dst: SocketAddr,
    source: Option<&comb_model::l7::Workload>,
    hbone: &crate::tunnel::Hbone,
) -> Request<Empty<Bytes>> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(
            Uri::try_from(SocketAddr::new(dst.ip().to_canonical(), dst.port()).to_string())
                .unwrap_or_default(),
        )
        .body(Empty::<Bytes>::new())
        .unwrap_or_default();
    let h = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&headers::forwarded_for(peer.ip().to_canonical())) {
        h.insert(http::header::FORWARDED, v);
    }
    if let Some(w) = source
        && let Ok(v) = HeaderValue::from_str(&headers::baggage(w, &hbone.opts.cluster_name))
    {
        h.insert("baggage", v);
    }
    if let Ok(v) = HeaderValue::from_str(&trace::incoming(None).traceparent()) {
        h.insert("traceparent", v);
    }
    req
}

/// Close with RST: the client must not read a failure as a clean end.
pub(crate) fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
