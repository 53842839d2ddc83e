//! HTTP/2 prior knowledge through the proxy: curl as the client, gRPC-like unary and
//! streaming exchanges with trailers, stream multiplexing on one upstream connection.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use comb_model::l7::ProxyTable;
use comb_proxy::Limits;
use common::*;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Frame;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_prior_knowledge() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    let url = format!("http://{}/echo/h2?a=b", proxy.addr);
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "-H",
            "Host: web.shop:8080",
        ])
        .args([
            "--data-binary",
            "h2 body",
            "-w",
            "\nversion=%{http_version}",
            &url,
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("http/2 200"), "{stdout}");
    assert!(stdout.contains("x-seen-version: http/2.0"), "{stdout}");
    assert!(
        stdout.contains("x-seen-authority: web.shop:8080"),
        "{stdout}"
    );
    assert!(stdout.contains("x-seen-path: /echo/h2?a=b"), "{stdout}");
    assert!(stdout.ends_with("h2 body\nversion=2"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_keep_trailers() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    let mut c = h2_client(proxy.addr).await;
    let grpc = |b: TestBody| {
        Request::post("http://web.shop.svc.cluster.local/grpc")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(b)
            .unwrap()
    };
    // Unary.
    let r = c
        .send_request(grpc(body(&b"\0\0\0\0\x03abc"[..])))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let all = r.into_body().collect().await.unwrap();
    let trailers = all.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "fine");
    assert_eq!(&all.to_bytes()[..], b"\0\0\0\0\x03abc");

    // Streaming: each message comes back before the next is sent.
    let (tx, b) = ChannelBody::new();
    let mut r = c.send_request(grpc(b.boxed())).await.unwrap().into_body();
    for i in 0..5u8 {
        let msg = Bytes::from(vec![0, 0, 0, 0, 1, b'a' + i]);
        tx.send(Frame::data(msg.clone())).await.unwrap();
        let f = tokio::time::timeout(Duration::from_secs(5), r.frame())
            .await
            .expect("streamed echo")
            .unwrap()
            .unwrap();
        assert_eq!(f.into_data().unwrap(), msg);
    }
    drop(tx);
    let mut trailers = None;
    while let Some(f) = r.frame().await {
        if let Ok(t) = f.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1);
    proxy.wait_metrics(&["grpc_response_status=\"0\""]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_share_one_upstream_connection() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    let c = h2_client(proxy.addr).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let r = c
                .send_request(
                    Request::post("http://web/echo")
                        .body(body(format!("s{i}")))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(text(r).await, format!("s{i}"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_refused_is_503() {
    let dst = closed_port().await;
    let proxy = TestProxy::start(dst, ProxyTable::default(), options(Limits::default())).await;
    let mut c = h2_client(proxy.addr).await;
    let r = c
        .send_request(Request::get("http://web/x").body(body("")).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(text(r).await.ends_with("reset reason: connection failure"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_name_the_downstream_peer() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    let mut c = h2_client(proxy.addr).await;
    let req = Request::builder()
        .uri(format!("http://{}/echo", backend.addr))
        .header("x-forwarded-for", "203.0.113.9")
        .body(body(""))
        .unwrap();
    let r = c.send_request(req).await.unwrap();
    assert_eq!(r.headers()["x-seen-xff"], "203.0.113.9,127.0.0.1");
    assert_eq!(r.headers()["x-seen-xfp"], "http");
    assert_eq!(r.headers()["x-seen-version"], "HTTP/2.0");
}
