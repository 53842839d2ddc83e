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
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::context::ProxyContext;
use crate::tunnel::{TunnelPeer, headers, socket, tls};

/// Serves one connection accepted on the inbound listener (`local` = the address it was
/// sent to) until the client closes it. Anything that is not a mutual-TLS HTTP/2 client of
/// our trust domain is closed.
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
    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        let tunnel = tunnel.clone();
        async move {
            let resp = connect(req, peer, local, tunnel, ctx.clone()).await;
            if let Some(h) = &ctx.hbone {
                let counter = if resp.status() == StatusCode::OK {
                    &h.inbound.streams
                } else {
                    &h.inbound.rejected_streams
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut stop = ctx.stopping();
    let served = hbone.h2.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(served);
    let r = tokio::select! {
        r = served.as_mut() => r,
        _ = stop.changed() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = r {
        tracing::debug!(%peer, %local, "hbone inbound connection: {e}");
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

async fn connect(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    tunnel: Arc<TunnelPeer>,
    ctx: Arc<ProxyContext>,
) -> Response<Empty<Bytes>> {
    let Some(hbone) = ctx.hbone.clone() else {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    };
    if req.method() != Method::CONNECT {
        return status(StatusCode::BAD_REQUEST);
    }
    let Some(dst) = req
        .uri()
        .authority()
        .and_then(|a| headers::parse_authority(a.as_str()))
    else {
        return status(StatusCode::BAD_REQUEST);
    };
    // The tunnel may only reach the pod it was addressed to (ztunnel's rule).
    if dst.ip() != local.ip() {
        return status(StatusCode::BAD_REQUEST);
    }
    let table = ctx.table();
    let Some(endpoint) = table.endpoint(dst.ip()).cloned() else {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    };
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
        return status(StatusCode::UNAUTHORIZED);
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
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
        Err(_) => return status(StatusCode::SERVICE_UNAVAILABLE),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => {
                crate::conn::serve_tunneled(
                    TokioIo::new(io),
                    up,
                    (src, mark),
                    peer,
                    dst,
                    tunnel,
                    ctx,
                )
                .await
            }
            Err(e) => tracing::debug!(%peer, %dst, "hbone inbound upgrade: {e}"),
        }
    });
    let mut resp = status(StatusCode::OK);
    if let Some(v) = baggage_of(&endpoint.workload, &hbone.opts.cluster_name) {
        resp.headers_mut().insert("baggage", v);
    }
    resp
}

fn baggage_of(w: &comb_model::l7::Workload, cluster: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&headers::baggage(w, cluster)).ok()
}
