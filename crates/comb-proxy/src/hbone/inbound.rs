//! The server side of HBONE: mutual TLS with the certificate of the pod a connection is
//! addressed to, then HTTP/2 CONNECT answered as ztunnel does — 200 (+ `baggage`) and the
//! stream delivered; 400 not CONNECT, a malformed authority or one that is not the address
//! the connection came to; 401 denied by the destination's AuthorizationPolicy (with the
//! certificate's identity as the source); 503 no such workload or the pod refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use comb_model::l7::Request as AuthzRequest;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::conn_clock::ConnClock;
use crate::context::ProxyContext;
use crate::tunnel::h2_stream::{H2Stream, keep_alive};
use crate::tunnel::{H2_PING_INTERVAL, H2_PING_TIMEOUT, TunnelPeer, headers, socket, tls};

/// Serves one connection accepted on the inbound listener (`local` = the address it was
/// sent to) until the client closes it, or until it carried no stream for the downstream
/// idle timeout (it is then drained with GOAWAY, as any idle downstream HTTP/2 connection:
/// a client's stream racing the GOAWAY is refused unprocessed, and the client retries it on
/// a new connection). Anything that is not a mutual-TLS HTTP/2 client of our trust domain
/// is closed.
pub async fn serve_inbound(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: Arc<ProxyContext>,
) {
    let Some(hbone) = ctx.hbone.clone() else {
        return;
    };
    let _ = stream.set_nodelay(true);
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    // No SNI: the certificate is the one of the pod the connection is addressed to. The
    // node's own address has no identity of its own: such a handshake is refused.
    let refused = || hbone.inbound.refused.fetch_add(1, Ordering::Relaxed);
    let Some(identity) = ctx.table().mesh_identity(local.ip()).cloned() else {
        refused();
        tracing::debug!(%peer, %local, "hbone inbound: no local mesh pod at this address");
        return;
    };
    // A pod that just started may not hold its certificate yet; the peer's handshake
    // timer runs meanwhile, and is longer than this wait.
    hbone
        .tls
        .store()
        .wait_for(&identity, hbone.opts.cert_wait)
        .await;
    let cfg = match hbone.tls.server(&identity) {
        Ok(c) => c,
        Err(e) => {
            refused();
            tracing::info!(%peer, %local, "hbone inbound: {e}");
            return;
        }
    };
    let accepted = tokio::time::timeout(
        hbone.opts.handshake_timeout,
        TlsAcceptor::from(cfg).accept(stream),
    )
    .await;
    let tls = match accepted {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            refused();
            tracing::debug!(%peer, %local, "hbone inbound handshake: {e}");
            return;
        }
        Err(_) => {
            refused();
            tracing::debug!(%peer, %local, "hbone inbound handshake timed out");
            return;
        }
    };
    let Some(client) = tls::peer_identity(tls.get_ref().1) else {
        refused();
        tracing::info!(%peer, %local, "hbone inbound: client certificate without a SPIFFE ID");
        return;
    };
    hbone.inbound.handshakes.fetch_add(1, Ordering::Relaxed);
    let tunnel = Arc::new(TunnelPeer::new(client));
    let mut conn = match tokio::time::timeout(
        hbone.opts.handshake_timeout,
        hbone.h2.handshake::<_, Bytes>(tls),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%peer, %local, "hbone inbound http/2 handshake: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, %local, "hbone inbound http/2 handshake timed out");
            return;
        }
    };
    let pings = conn.ping_pong();
    let alive = async {
        match pings {
            Some(p) => keep_alive(p, H2_PING_INTERVAL, H2_PING_TIMEOUT).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(alive);
    // Streams in flight and when the last one ended: the idle clock of an HTTP/2 downstream.
    let clock = ConnClock::new();
    let idle = clock.expired(ctx.limits.downstream_idle_timeout, None);
    tokio::pin!(idle);
    let mut stop = ctx.stopping();
    let mut draining = false;
    // Polling `accept` drives the connection (its streams' frames too) until it closes; a
    // drain sends GOAWAY and lets the streams in flight finish.
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let stream = clock.begin();
                    let serve = serve_stream(req, respond, peer, local, tunnel.clone(), ctx.clone());
                    tokio::spawn(async move {
                        serve.await;
                        drop(stream);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, %local, "hbone inbound connection: {e}");
                    break;
                }
                None => break,
            },
            _ = stop.changed(), if !draining => {
                conn.graceful_shutdown();
                draining = true;
            }
            _ = &mut idle, if !draining => {
                tracing::debug!(%peer, %local, "hbone inbound connection idle, closing");
                conn.graceful_shutdown();
                draining = true;
            }
            _ = &mut alive => {
                tracing::debug!(%peer, %local, "hbone inbound connection: keep-alive failed, closing");
                break;
            }
        }
    }
}

/// One CONNECT stream: answered, and on 200 delivered to the pod.
async fn serve_stream(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    local: SocketAddr,
    tunnel: Arc<TunnelPeer>,
    ctx: Arc<ProxyContext>,
) {
    let Some(hbone) = ctx.hbone.clone() else {
        return;
    };
    let (resp, delivery) = match connect(&req, peer, local, &tunnel, &hbone, &ctx).await {
        Ok((resp, d)) => (resp, Some(d)),
        Err(code) => (status(code), None),
    };
    let counter = if delivery.is_some() {
        &hbone.inbound.streams
    } else {
        &hbone.inbound.rejected_streams
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let send = match respond.send_response(resp, delivery.is_none()) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, %local, "hbone inbound response: {e}");
            return;
        }
    };
    let Some(Delivery { up, src, mark, dst }) = delivery else {
        return;
    };
    let io = H2Stream::new(send, req.into_body());
    crate::conn::serve_tunneled(io, up, (src, mark), peer, dst, tunnel, ctx).await;
}

fn status(code: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r
}

/// An accepted stream's way to the pod: the connection to it, made from the original source
/// (`src`, `mark`) when configured.
struct Delivery {
    up: TcpStream,
    src: Option<std::net::IpAddr>,
    mark: Option<u32>,
    dst: SocketAddr,
}

/// Judges a CONNECT and connects to the pod: the 200 to send, or the refusal's status.
async fn connect(
    req: &Request<RecvStream>,
    peer: SocketAddr,
    local: SocketAddr,
    tunnel: &TunnelPeer,
    hbone: &crate::tunnel::Hbone,
    ctx: &ProxyContext,
) -> Result<(Response<()>, Delivery), StatusCode> {
    if req.method() != Method::CONNECT {
        return Err(StatusCode::BAD_REQUEST);
    }
    let dst = req
        .uri()
        .authority()
        .and_then(|a| headers::parse_authority(a.as_str()))
        .ok_or(StatusCode::BAD_REQUEST)?;
    // The tunnel may only reach the pod it was addressed to (ztunnel's rule).
    if dst.ip() != local.ip() {
        return Err(StatusCode::BAD_REQUEST);
    }
    let table = ctx.table();
    let endpoint = table
        .endpoint(dst.ip())
        .cloned()
        .ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    // TCP semantics here; a denial that an HTTP request could still turn (ALLOW rules with
    // HTTP fields) is left to the per-request check inside the tunnel.
    let decision = endpoint.authz.evaluate(&AuthzRequest {
        source_ip: peer.ip(),
        source: table.workload(peer.ip()).map(|w| &**w),
        authenticated: Some(tunnel.authenticated()),
        destination_ip: dst.ip(),
        destination_port: dst.port(),
        http: None,
    });
    drop(table);
    if !decision.allow && !endpoint.authz.has_http_rules() {
        tracing::debug!(%peer, %dst, principal = %tunnel.principal, "hbone inbound: denied");
        return Err(StatusCode::UNAUTHORIZED);
    }
    let (src, mark) = if hbone.opts.original_source {
        (
            Some(peer.ip()),
            Some(comb_datapath::policy::abi::HBONE_DELIVERY_MARK),
        )
    } else {
        (None, None)
    };
    let up = match tokio::time::timeout(
        ctx.limits.upstream_connect_timeout,
        socket::connect_from(src, dst, mark),
    )
    .await
    {
        Ok(Ok(up)) => up,
        Ok(Err(e)) => {
            tracing::debug!(%peer, %dst, "hbone inbound delivery: {e}");
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
        Err(_) => return Err(StatusCode::SERVICE_UNAVAILABLE),
    };
    let mut resp = status(StatusCode::OK);
    if let Some(v) = baggage_of(&endpoint.workload, &hbone.opts.cluster_name) {
        resp.headers_mut().insert("baggage", v);
    }
    Ok((resp, Delivery { up, src, mark, dst }))
}

fn baggage_of(w: &comb_model::l7::Workload, cluster: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&headers::baggage(w, cluster)).ok()
}
