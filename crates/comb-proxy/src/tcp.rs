//! Opaque TCP: authorize the connection as a whole (TCP semantics), then relay it to the
//! original destination (spliced in the kernel when a splice is configured).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use comb_model::l7::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::context::ProxyContext;
use crate::relay::{Counted, relay, silent_for};
use crate::telemetry::{Reporter, ResponseFlags, TcpRecord};
use crate::tunnel::TunnelPeer;
use crate::upstream::Failure;

pub async fn serve_opaque(
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    ctx: Arc<ProxyContext>,
) {
    let t0 = Instant::now();
    let mut rec = judge(&ctx, peer, dst, None);
    ctx.telemetry.tcp_opened(&rec);
    if rec.denied {
        reset(stream);
        rec.duration = t0.elapsed();
        ctx.telemetry.record_tcp(&rec);
        return;
    }
    let up =
        match tokio::time::timeout(ctx.limits.upstream_connect_timeout, TcpStream::connect(dst))
            .await
        {
            Ok(Ok(up)) => up,
            Ok(Err(e)) => return fail(stream, rec, Failure::classify(&e, true), t0, &ctx),
            Err(_) => return fail(stream, rec, Failure::CONNECT_TIMEOUT, t0, &ctx),
        };
    let _ = up.set_nodelay(true);
    let out = relay(
        stream,
        Bytes::new(),
        up,
        Bytes::new(),
        ctx.splice.as_deref(),
        Some(ctx.limits.tcp_idle_timeout),
    )
    .await;
    rec.sent_bytes = out.sent;
    rec.received_bytes = out.received;
    rec.spliced = out.spliced;
    if out.error.is_some() {
        rec.response_flags.0 |= ResponseFlags::UPSTREAM_CONNECTION_TERMINATION;
    }
    rec.duration = t0.elapsed();
    ctx.telemetry.record_tcp(&rec);
}

fn fail(stream: TcpStream, mut rec: TcpRecord, f: Failure, t0: Instant, ctx: &ProxyContext) {
    // The client sees what it would have seen from the destination: a reset.
    reset(stream);
    rec.response_flags.0 |= f.flag;
    rec.duration = t0.elapsed();
    ctx.telemetry.record_tcp(&rec);
}

/// Authorize a TCP connection from `peer` to `dst` as a whole (TCP semantics) and start its
/// telemetry record. Through a tunnel, the certificate's identity is the source.
fn judge(
    ctx: &ProxyContext,
    peer: SocketAddr,
    dst: SocketAddr,
    tunnel: Option<&TunnelPeer>,
) -> TcpRecord {
    let table = ctx.table();
    let by_address = table.workload(peer.ip()).cloned();
    let endpoint = table.endpoint(dst.ip()).cloned();
    let decision = endpoint.as_ref().map(|ep| {
        ep.authz.evaluate(&Request {
            source_ip: peer.ip(),
            source: by_address.as_deref(),
            authenticated: tunnel.map(TunnelPeer::authenticated),
            destination_ip: dst.ip(),
            destination_port: dst.port(),
            http: None,
        })
    });
    drop(table);
    TcpRecord {
        start: SystemTime::now(),
        duration: Default::default(),
        downstream: peer,
        upstream: dst,
        source: match tunnel {
            Some(t) => Some(t.source_workload(by_address)),
            None => by_address,
        },
        destination: endpoint.as_ref().map(|e| e.workload.clone()),
        destination_service: endpoint
            .as_ref()
            .and_then(|ep| ep.destination_service(dst.port(), None))
            .map(|s| s.host.clone()),
        sent_bytes: 0,
        received_bytes: 0,
        response_flags: ResponseFlags::NONE,
        spliced: false,
        authz_policy: decision
            .as_ref()
            .and_then(|d| d.policy.as_ref())
            .map(|k| k.to_string()),
        denied: decision.as_ref().is_some_and(|d| !d.allow),
        mtls: tunnel.is_some(),
        reporter: Reporter::Destination,
    }
}

/// Close with RST (SO_LINGER 0), not FIN: a denied client must not read it as a clean end.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// Opaque TCP delivered through an HBONE tunnel: authorized with the tunnel client's
/// certificate identity (TCP semantics), then copied between the tunnel stream and `up`
/// (already connected to the pod from the original source's address), half-closes passed on.
pub async fn serve_opaque_tunneled<IO>(
    io: IO,
    up: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    tunnel: &TunnelPeer,
    ctx: Arc<ProxyContext>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let t0 = Instant::now();
    let mut rec = judge(&ctx, peer, dst, Some(tunnel));
    ctx.telemetry.tcp_opened(&rec);
    if rec.denied {
        reset(up);
        rec.duration = t0.elapsed();
        ctx.telemetry.record_tcp(&rec);
        return;
    }
    // Counted on both sides so the idle clock sees bytes as they move.
    let (down_read, up_read) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut down = Counted::new(io, down_read.clone());
    let mut up = Counted::new(up, up_read.clone());
    let never_spliced = AtomicBool::new(false);
    let copied = tokio::select! {
        r = crate::stream_copy::copy_bidirectional(&mut down, &mut up) => Some(r),
        _ = silent_for(ctx.limits.tcp_idle_timeout, [&down_read, &up_read], &never_spliced) => None,
    };
    match copied {
        Some(Ok((sent, received))) => {
            rec.sent_bytes = sent;
            rec.received_bytes = received;
        }
        Some(Err(_)) => {
            rec.response_flags.0 |= ResponseFlags::UPSTREAM_CONNECTION_TERMINATION;
            reset(up.into_inner());
        }
        // Idle: both sides closed with FIN when dropped.
        None => {
            rec.sent_bytes = down_read.load(Ordering::Relaxed);
            rec.received_bytes = up_read.load(Ordering::Relaxed);
        }
    }
    rec.duration = t0.elapsed();
    ctx.telemetry.record_tcp(&rec);
}
