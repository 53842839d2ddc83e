//! AuthorizationPolicy enforcement through the proxy: HTTP 403, gRPC status 7, opaque TCP
//! reset, and a table swap while a request is in flight.

mod common;

use std::time::Duration;

use comb_proxy::Limits;
use common::*;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn deny_admin() -> String {
    format!(
        "{WEB_POD}{}",
        policy(
            "deny-admin",
            "DENY",
            "  - to: [{operation: {paths: [\"/admin/*\"]}}]\n"
        )
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_deny_is_403_rbac_access_denied() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        table(&deny_admin()),
        options(Limits::default()),
    )
    .await;
    let mut c = h1_client(proxy.addr).await;
    let r = h1_send(&mut c, "GET", "/admin/users?x=1", "").await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(text(r).await, "RBAC: access denied");
    // Same connection, allowed path.
    let r = h1_send(&mut c, "GET", "/echo", "ok").await;
    assert_eq!(r.status(), 200);
    assert_eq!(text(r).await, "ok");
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    proxy
        .wait_metrics(&["response_code=\"403\"", "destination_workload=\"web\""])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_deny_is_status_7_trailers_only() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        table(&deny_admin()),
        options(Limits::default()),
    )
    .await;
    let mut c = h2_client(proxy.addr).await;
    let req = Request::post("http://web.shop:8080/admin/Svc/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body(&b"\0\0\0\0\0"[..]))
        .unwrap();
    c.ready().await.unwrap();
    let r = c.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["grpc-status"], "7");
    assert_eq!(r.headers()["grpc-message"], "RBAC: access denied");
    assert!(
        hyper::body::Body::is_end_stream(r.body()),
        "not trailers-only"
    );
    proxy.wait_metrics(&["grpc_response_status=\"7\""]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_denied_by_http_only_allow_is_reset() {
    let backend = Backend::start().await;
    // An ALLOW rule with HTTP fields never matches opaque TCP: the connection is denied.
    let manifests = format!(
        "{WEB_POD}{}",
        policy(
            "allow-get",
            "ALLOW",
            "  - to: [{operation: {methods: [GET]}}]\n"
        )
    );
    let mut opts = options(Limits::default());
    opts.detect_timeout = Duration::from_millis(100);
    let proxy = TestProxy::start(backend.addr, table(&manifests), opts).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"\x16\x03\x01binary").await.unwrap();
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .unwrap();
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "denied TCP must be reset"
    );
    // HTTP GET is allowed, POST is not.
    let mut c = h1_client(proxy.addr).await;
    let r = h1_send(&mut c, "GET", "/echo", "").await;
    assert_eq!(r.status(), 200);
    let r = h1_send(&mut c, "POST", "/echo", "x").await;
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_swap_keeps_requests_in_flight() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(backend.addr, table(WEB_POD), options(Limits::default())).await;
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move {
        let mut c = h1_client(addr).await;
        let r = h1_send(&mut c, "GET", "/slow", "").await;
        (r.status(), text(r).await)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let deny_slow = format!(
        "{WEB_POD}{}",
        policy(
            "deny-slow",
            "DENY",
            "  - to: [{operation: {paths: [\"/slow\"]}}]\n"
        )
    );
    proxy.ctx.update(std::sync::Arc::new(table(&deny_slow)));
    // New requests see the new table at once...
    let mut c = h1_client(addr).await;
    let r = h1_send(&mut c, "GET", "/slow", "").await;
    assert_eq!(r.status(), 403);
    // ...the one in flight finishes under the table it started with.
    let (status, body) = in_flight.await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "slow done"));
}
