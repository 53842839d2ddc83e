//! One outbound flow: a local mesh pod's TCP connection to a remote HBONE peer becomes a
//! CONNECT stream on a pooled mutual-TLS connection. What the client has sent by the time the
//! stream opens goes with the CONNECT (before the peer's `200`), so a client-speaks-first
//! protocol does not pay a round trip through both proxies before its first byte moves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use tokio::net::TcpStream;

use crate::context::ProxyContext;
use crate::relay;
use crate::telemetry::{Reporter, ResponseFlags, TcpRecord, trace};
use crate::tunnel::h2_stream::H2Stream;
use crate::tunnel::headers;
use crate::tunnel::pool::WorkloadKey;

/// The most of the client's first bytes sent with the CONNECT.
const FIRST_BYTES: usize = 16 * 1024;

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
    // Reported by the source, as ztunnel's outbound does: the remote pod's workload, and
    // the identity its end must prove as its principal.
    let mut rec = TcpRecord {
        start: std::time::SystemTime::now(),
        duration: std::time::Duration::ZERO,
        downstream: peer,
        upstream: dst,
        source: source.clone(),
        destination: table.workload(dst.ip().to_canonical()).cloned(),
        // The address the client dialled is gone (the socket LB rewrote a Service's at
        // connect): the Service is the one in front of the pod's port, as the destination
        // node finds it.
        destination_service: table
            .pod_destination_service(dst.ip().to_canonical(), dst.port())
            .map(|s| s.host.clone()),
        sent_bytes: 0,
        received_bytes: 0,
        response_flags: ResponseFlags::NONE,
        spliced: false,
        authz_policy: None,
        denied: false,
        mtls: true,
        reporter: Reporter::Source,
    };
    drop(table);
    let t0 = std::time::Instant::now();
    ctx.telemetry.tcp_opened(&rec);
    let failed = |mut rec: TcpRecord, stream: TcpStream| {
        rec.response_flags.0 |= ResponseFlags::UPSTREAM_CONNECTION_FAILURE;
        rec.duration = t0.elapsed();
        ctx.telemetry.record_tcp(&rec);
        reset(stream);
    };
    let key = WorkloadKey {
        src_id,
        dst_id: target.identity,
        src: peer.ip().to_canonical(),
        dst: SocketAddr::new(dst.ip().to_canonical(), hbone.opts.peer_port),
    };
    // A CONNECT that fails before its 200 is retried, on a connection opened after the
    // failure (other pooled ones to that peer may be going away too), twice at most. That
    // is what a draining peer's GOAWAY (an upgrade on its node, docs/upgrades.md) or a
    // connection that died unnoticed costs, not a reset. With first bytes sent, only a
    // stream the peer certainly did not process (refused, or above its GOAWAY) is retried:
    // the bytes may have reached the pod otherwise.
    let mut retry_since: Option<std::time::Instant> = None;
    let mut attempts = 0;
    let mut first: Option<Bytes> = None;
    let (slot, resp, send) = loop {
        attempts += 1;
        let slot = match hbone.pool.stream(&key, retry_since).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%peer, %dst, "hbone outbound: {e}");
                return failed(rec, stream);
            }
        };
        let early = first.get_or_insert_with(|| first_bytes(&stream)).clone();
        // Whether the client's bytes were handed to this stream (a failure before that,
        // e.g. a connection already gone, sent nothing and is always retried).
        let mut sent_early = false;
        let opened = async {
            let mut sender = slot.conn.sender.clone().ready().await?;
            let (resp, mut send) =
                sender.send_request(connect_request(peer, dst, source.as_deref(), hbone), false)?;
            if !early.is_empty() {
                send.send_data(early, false)?;
                sent_early = true;
            }
            Ok::<_, h2::Error>((resp.await?, send))
        };
        let opened = opened.await;
        match opened {
            Ok((r, send)) => break (slot, r, send),
            Err(e) => {
                slot.conn.retire();
                let unprocessed = e.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (e.is_go_away() && !e.is_io());
                if attempts >= CONNECT_ATTEMPTS || (sent_early && !unprocessed) {
                    tracing::info!(%peer, %dst, attempts, "hbone outbound CONNECT: {e}");
                    return failed(rec, stream);
                }
                tracing::debug!(%peer, %dst, "hbone outbound CONNECT: {e}; retrying on a fresh connection");
                retry_since = Some(std::time::Instant::now());
            }
        }
    };
    if resp.status() != StatusCode::OK {
        tracing::info!(%peer, %dst, status = %resp.status(), "hbone outbound: refused");
        return failed(rec, stream);
    }
    let early = first.map_or(0, |b| b.len() as u64);
    slot.conn
        .sent
        .fetch_add(early, std::sync::atomic::Ordering::Relaxed);
    let upgraded = H2Stream::new(send, resp.into_body());
    // The pooled connection's totals, and this stream's own counts for the idle clock.
    let tunnel = relay::Counted::new(upgraded, slot.conn.received.clone())
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
                rec.response_flags.0 |= ResponseFlags::UPSTREAM_CONNECTION_TERMINATION;
                reset(down.into_inner());
            }
        }
        // Idle: the downstream gets FIN, the tunnel stream ends with the upgraded IO.
        _ = relay::silent_for(idle, [&down_read, &up_read], &never_spliced) => {
            tracing::debug!(%peer, %dst, "hbone outbound relay idle");
        }
    }
    // What was read from each side (the client's first bytes went with the CONNECT).
    rec.sent_bytes = early + down_read.load(std::sync::atomic::Ordering::Relaxed);
    rec.received_bytes = up_read.load(std::sync::atomic::Ordering::Relaxed);
    rec.duration = t0.elapsed();
    ctx.telemetry.record_tcp(&rec);
}

/// The CONNECT of one tunnelled stream (ztunnel's headers).
fn connect_request(
    peer: SocketAddr,
    dst: SocketAddr,
    source: Option<&comb_model::l7::Workload>,
    hbone: &crate::tunnel::Hbone,
) -> Request<()> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(
            Uri::try_from(SocketAddr::new(dst.ip().to_canonical(), dst.port()).to_string())
                .unwrap_or_default(),
        )
        .body(())
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

/// What the client has sent already, without waiting (nothing for a server-speaks-first
/// protocol, or when its bytes are still on the way). Read from the socket itself: tokio
/// does not know yet whether a socket this thread registered a moment ago is readable, and
/// its `try_read` would not look.
fn first_bytes(stream: &TcpStream) -> Bytes {
    use std::io::Read;
    let mut buf = vec![0u8; FIRST_BYTES];
    match (&*socket2::SockRef::from(stream)).read(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Bytes::from(buf)
        }
        Err(_) => Bytes::new(),
    }
}

/// Close with RST: the client must not read a failure as a clean end.
pub(crate) fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
