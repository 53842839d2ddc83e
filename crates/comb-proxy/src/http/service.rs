//! One HTTP request through the proxy: authorize, forward to the original destination,
//! stream the response back, and record it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use comb_model::l7::{DecisionRef, HttpRequest, ProxyTable, Request as AuthzRequest};
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::headers::{HeaderView, authority, is_grpc, is_upgrade, set_forwarded, strip_hop_by_hop};
use super::{responses, upgrade};
use crate::body::{Recorder, RequestBody, RequestProgress, ResponseBody};
use crate::conn_clock::ConnClock;
use crate::context::ProxyContext;
use crate::telemetry::{RequestProtocol, RequestRecord, ResponseFlags, trace};
use crate::tunnel::TunnelPeer;
use crate::upstream::Dedicated;

/// The connection a request arrived on.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Original destination.
    pub dst: SocketAddr,
    pub h2: bool,
    /// Delivered through an HBONE tunnel: the client's certificate identity.
    pub tunnel: Option<Arc<TunnelPeer>>,
    /// The connection's own upstream (HBONE deliveries: from the original source's address);
    /// None = the proxy's shared pools.
    pub upstream: Option<Arc<Dedicated>>,
}

/// hyper service of one downstream connection.
#[derive(Clone)]
pub struct ProxyService {
    pub ctx: Arc<ProxyContext>,
    pub conn: Arc<ConnInfo>,
    /// The connection's idle and head clocks: each request counts as in flight until its
    /// response body is done.
    pub(crate) clock: Arc<ConnClock>,
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let ctx = self.ctx.clone();
        let conn = self.conn.clone();
        let guard = self.clock.begin();
        Box::pin(async move {
            let h2 = conn.h2;
            let mut resp = handle(ctx.clone(), conn, req).await;
            // Draining: end an HTTP/1 connection after this response, at a request boundary
            // (hyper closes after a `Connection: close` response). Not on a 101: the
            // connection becomes the upgraded stream.
            if !h2 && ctx.is_stopping() && resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
                resp.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
            }
            Ok(resp.map(|b| b.hold(guard)))
        })
    }
}

static X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");
static TRACEPARENT: header::HeaderName = header::HeaderName::from_static("traceparent");
static X_FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");

async fn handle(
    ctx: Arc<ProxyContext>,
    conn: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Response<ResponseBody> {
    let t0 = Instant::now();
    // Held until the response is built: a request in flight keeps the table it started with.
    let table = ctx.table();
    let mut source = table.workload(conn.peer.ip()).cloned();
    if let Some(t) = &conn.tunnel {
        source = Some(t.source_workload(source));
    }
    let endpoint = table.endpoint(conn.dst.ip()).cloned();
    let grpc = is_grpc(req.headers());
    let upgrade = !conn.h2 && is_upgrade(req.headers());
    let trace = trace::incoming(header_str(&req, &TRACEPARENT));
    let details = ctx.telemetry.wants_details();
    let request_id = match header_str(&req, &X_REQUEST_ID) {
        Some(id) => details.then(|| id.to_owned()),
        None => {
            let id = new_request_id();
            let kept = details.then(|| id.clone());
            // The string's buffer becomes the header's, no copy.
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(id)) {
                req.headers_mut().insert(X_REQUEST_ID.clone(), v);
            }
            kept
        }
    };
    // Before authorization, as Envoy's connection manager does: policies see the result.
    set_forwarded(req.headers_mut(), conn.peer.ip());
    let decision = authorize(&table, &conn, &req);
    // What only the access log and spans read (RequestRecord): copied only for them.
    let (authority_seen, user_agent, x_forwarded_for) = if details {
        (
            authority(&req).to_owned(),
            header_str(&req, &header::USER_AGENT).map(str::to_owned),
            header_str(&req, &X_FORWARDED_FOR).map(str::to_owned),
        )
    } else {
        (String::new(), None, None)
    };
    let destination_service = endpoint.as_ref().and_then(|ep| {
        ep.destination_service(conn.dst.port(), Some(authority(&req)))
            .map(|s| s.host.clone())
    });
    let record = RequestRecord {
        start: SystemTime::now(),
        duration: Duration::ZERO,
        downstream: conn.peer,
        upstream: conn.dst,
        source,
        destination: endpoint.as_ref().map(|e| e.workload.clone()),
        destination_service,
        protocol: if grpc {
            RequestProtocol::Grpc
        } else {
            RequestProtocol::Http
        },
        http_version: version_str(req.version()),
        method: req.method().as_str().to_owned(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
        authority: authority_seen,
        user_agent,
        x_forwarded_for,
        request_id,
        response_code: 0,
        grpc_status: None,
        response_flags: ResponseFlags::NONE,
        request_bytes: 0,
        response_bytes: 0,
        trace: Some(trace),
        authz_policy: decision
            .as_ref()
            .and_then(|d| d.policy.filter(|_| details))
            .map(|k| k.to_string()),
        denied: decision.as_ref().is_some_and(|d| !d.allow),
        audited: decision
            .as_ref()
            .and_then(|d| d.audit.filter(|_| details))
            .map(|k| k.to_string()),
        mtls: conn.tunnel.is_some(),
    };
    drop(endpoint);
    let progress = Arc::new(RequestProgress::default());
    let mut rec = Box::new(Recorder::new(
        record,
        t0,
        ctx.telemetry.clone(),
        progress.clone(),
    ));
    if rec.record.denied {
        return responses::denied(grpc, Some(rec));
    }
    let limit = ctx.limits.max_body_bytes;
    if req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > limit)
    {
        return responses::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload too large",
            Some(rec),
        );
    }

    let down_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (mut parts, mut body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::EXPECT);
    // Envoy's default (proxy_100_continue off): the proxy answers `100 Continue` itself,
    // before the request goes upstream. hyper sends it when the body is first read, so read
    // the first frame now; left to the upstream exchange, the read raced an upstream that
    // answers before reading the body, and the client then saw the final head first.
    let first = if expects_continue {
        match body.frame().await {
            Some(Ok(f)) => Some(f),
            None => None,
            Some(Err(_)) => {
                rec.flag(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
                return responses::status(StatusCode::BAD_REQUEST, "bad request", Some(rec));
            }
        }
    } else {
        None
    };
    // The string's buffer becomes the header's, no copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(trace.traceparent())) {
        parts.headers.insert(TRACEPARENT.clone(), v);
    }
    let upstream_req = |parts: http::request::Parts| {
        Request::from_parts(
            parts,
            RequestBody::with_first(body, first, progress.clone(), limit),
        )
    };
    let sent = if conn.h2 {
        parts.uri = h2_uri(&parts.uri, conn.dst);
        match &conn.upstream {
            Some(d) => d.send_h2(upstream_req(parts)).await,
            None => ctx.upstreams().send_h2(conn.dst, upstream_req(parts)).await,
        }
    } else {
        // Host goes as received (the destination address when there was none); the
        // request line in origin form, as a server behind no proxy expects it.
        if !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(&conn.dst.to_string())
        {
            parts.headers.insert(header::HOST, v);
        }
        if parts.method != http::Method::CONNECT
            && let Some(u) = origin_form(&parts.uri)
        {
            parts.uri = u;
        }
        parts.version = Version::HTTP_11;
        match &conn.upstream {
            Some(d) => d.send_h1(upstream_req(parts)).await,
            None => ctx.upstreams().send_h1(conn.dst, upstream_req(parts)).await,
        }
    };
    let mut resp = match sent {
        Ok(r) => r,
        Err(_) if progress.too_large.load(Ordering::Relaxed) => {
            return responses::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload too large",
                Some(rec),
            );
        }
        Err(f) => {
            rec.flag(f.flag);
            return responses::upstream_failure(f.reason, Some(rec));
        }
    };
    drop(table);
    rec.record.response_code = resp.status().as_u16();
    if grpc {
        rec.grpc_status_from(resp.headers());
    }
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching && let Some(down) = down_upgrade {
        let up = hyper::upgrade::on(&mut resp);
        // hyper's connection ends here, the tunnel runs on: counted as a connection of its
        // own so a draining proxy waits for it too.
        let running = ctx.upgraded_running();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            upgrade::tunnel(down, up, ctx).await;
            drop(running);
        });
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, switching && upgrade);
    Response::from_parts(parts, ResponseBody::upstream(body, Some(rec)))
}

/// The endpoint's decision; None when the destination is not a local endpoint (steered here
/// anyway: forwarded, nothing to enforce).
fn authorize<'t>(
    table: &'t ProxyTable,
    conn: &ConnInfo,
    req: &Request<Incoming>,
) -> Option<DecisionRef<'t>> {
    let ep = table.endpoint(conn.dst.ip())?;
    let host = authority(req);
    let method = req.method().as_str();
    let full_path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path(), |p| p.as_str());
    let view = HeaderView {
        map: req.headers(),
        authority: host,
        method,
        path: full_path,
    };
    let areq = AuthzRequest {
        source_ip: conn.peer.ip(),
        source: table.workload(conn.peer.ip()).map(|w| &**w),
        authenticated: conn.tunnel.as_ref().map(|t| t.authenticated()),
        destination_ip: conn.dst.ip(),
        destination_port: conn.dst.port(),
        http: Some(HttpRequest {
            host,
            method,
            path: req.uri().path(),
            headers: &view,
        }),
    };
    Some(ep.authz.evaluate_ref(&areq))
}

fn header_str<'a, B>(req: &'a Request<B>, name: &header::HeaderName) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_09 => "HTTP/0.9",
        _ => "HTTP/1.1",
    }
}

/// The origin form of an absolute-form request target (`http://host/p?q` → `/p?q`); None
/// when it is in origin form already (the common case: no allocation).
fn origin_form(uri: &Uri) -> Option<Uri> {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return None;
    }
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Some(Uri::from(pq))
}

/// HTTP/2 keeps the client's `:authority` (the destination address when it sent none).
fn h2_uri(uri: &Uri, dst: SocketAddr) -> Uri {
    if uri.scheme().is_some() && uri.authority().is_some() {
        return uri.clone();
    }
    let mut parts = uri.clone().into_parts();
    if parts.authority.is_none() {
        parts.authority = Authority::try_from(dst.to_string()).ok();
    }
    parts.scheme = Some(Scheme::HTTP);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// A UUIDv4, as Envoy generates for `x-request-id`; one allocation (this runs per request).
fn new_request_id() -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(DIGITS[usize::from(x >> 4)] as char);
        s.push(DIGITS[usize::from(x & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let dst: SocketAddr = "10.0.0.5:8080".parse().unwrap();
        let u: Uri = "/a/b?c=d".parse().unwrap();
        assert_eq!(origin_form(&u), None);
        let abs: Uri = "http://web.shop:8080/a/b?c=d".parse().unwrap();
        assert_eq!(origin_form(&abs).unwrap().to_string(), "/a/b?c=d");
        let bare: Uri = "http://web.shop".parse().unwrap();
        assert_eq!(origin_form(&bare).unwrap().to_string(), "/");
        let u2: Uri = "http://web.shop:80/x".parse().unwrap();
        assert_eq!(h2_uri(&u2, dst).to_string(), "http://web.shop:80/x");
        assert_eq!(h2_uri(&u, dst).to_string(), "http://10.0.0.5:8080/a/b?c=d");
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }
}
