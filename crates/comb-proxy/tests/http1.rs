//! HTTP/1.1 through the proxy on loopback: keep-alive and pooling, chunked both ways,
//! 100-continue, upgrades, upstream failure, and the robustness limits.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use comb_model::l7::ProxyTable;
use comb_proxy::Limits;
use common::*;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_share_one_upstream_connection() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    let mut c = h1_client(proxy.addr).await;
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut ids = Vec::new();
    for i in 0..5 {
        let req = Request::post(format!("/echo/{i}?q=1"))
            .header("host", "web.shop.svc.cluster.local")
            .header("traceparent", parent)
            .header("connection", "keep-alive, x-drop")
            .header("x-drop", "hop")
            .body(body(format!("req-{i}")))
            .unwrap();
        c.ready().await.unwrap();
        let r = c.send_request(req).await.unwrap();
        assert_eq!(r.status(), 200);
        let h = |n: &str| r.headers()[n].to_str().unwrap().to_owned();
        assert_eq!(h("x-seen-host"), "web.shop.svc.cluster.local");
        assert_eq!(h("x-seen-path"), format!("/echo/{i}?q=1"));
        assert_eq!(h("x-seen-version"), "HTTP/1.1");
        assert_eq!(
            h("x-seen-connection"),
            "",
            "hop-by-hop Connection forwarded"
        );
        let tp = h("x-seen-traceparent");
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{tp}"
        );
        assert!(
            !tp.contains("b7ad6b7169203331"),
            "parent span not replaced: {tp}"
        );
        ids.push(h("x-seen-request-id"));
        assert_eq!(text(r).await, format!("req-{i}"));
    }
    assert!(ids.iter().all(|id| id.len() == 36), "{ids:?}");
    ids.dedup();
    assert_eq!(ids.len(), 5, "request ids not unique");
    // Five requests, one downstream connection, one pooled upstream connection.
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1);
    proxy
        .wait_metrics(&["istio_requests_total", "response_code=\"200\""])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_and_response() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut rest = Vec::new();
    while !rest.ends_with(b"0\r\n\r\n") {
        let mut b = [0u8; 256];
        let n = s.read(&mut b).await.unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&b[..n]);
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(
        rest.contains("hello") && rest.contains(" world"),
        "{rest:?}"
    );

    // Response without a length from the backend, streamed in chunks.
    s.write_all(b"GET /chunks HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut rest = Vec::new();
    while !rest.ends_with(b"0\r\n\r\n") {
        let mut b = [0u8; 256];
        let n = s.read(&mut b).await.unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&b[..n]);
    }
    assert_eq!(
        String::from_utf8(rest).unwrap(),
        "4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"PUT /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let interim = read_head(&mut s).await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    // The proxy answered the expectation itself: the request has not gone upstream yet, so
    // an upstream that answers before reading the body (this echo) cannot race the 100.
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0);
    s.write_all(b"data").await.unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("x-seen-expect: \r\n"),
        "Expect forwarded upstream: {head}"
    );
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http1_post() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    let url = format!("http://{}/echo/curl", proxy.addr);
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--http1.1",
            "-H",
            "Host: web.shop",
            "--data-binary",
            "from curl",
            &url,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from curl");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_style_upgrade_echo() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"ping one"[..], b"second frame"] {
        s.write_all(msg).await.unwrap();
        let mut b = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(b, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refused_is_503_uf() {
    let dst = closed_port().await;
    let proxy = TestProxy::start(dst, ProxyTable::default(), options(Limits::default())).await;
    let mut c = h1_client(proxy.addr).await;
    let r = h1_send(&mut c, "GET", "/x", "").await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        text(r).await,
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
    );
    proxy
        .wait_metrics(&["response_code=\"503\"", "response_flags=\"UF\""])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_is_400_and_closed() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: web\r\nBad Header Line\r\n\r\n"[..],
        b"GET /\x01 HTTP/1.1\r\nHost: web\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    ] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(bad).await.unwrap();
        let out = read_all(&mut s, Duration::from_secs(5)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 400"), "{bad:?} -> {out}");
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0);
}

/// One raw request on a new connection; what came back before the close (5 s at most).
async fn raw_reply(addr: std::net::SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(req.as_bytes()).await;
    String::from_utf8_lossy(&read_all(&mut s, Duration::from_secs(5)).await).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431() {
    let backend = Backend::start().await;
    let limits = Limits {
        max_header_bytes: 16 * 1024,
        ..Limits::default()
    };
    let proxy = TestProxy::start(backend.addr, ProxyTable::default(), options(limits)).await;
    let big = "a".repeat(40 * 1024);
    let out = raw_reply(
        proxy.addr,
        &format!("GET / HTTP/1.1\r\nHost: web\r\nX-Big: {big}\r\n\r\n"),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");

    // At the limit (100 headers, the default) the proxy forwards the request (the backend,
    // a hyper server with the same limit, may refuse it with the proxy's own headers added).
    let many: String = (0..98).map(|i| format!("X-H{i}: v\r\n")).collect();
    let out = raw_reply(
        proxy.addr,
        &format!("GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n{many}\r\n"),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 "), "{out:?}");
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1);

    // Too many headers: refused by the proxy, not forwarded.
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let out = raw_reply(
        proxy.addr,
        &format!("GET / HTTP/1.1\r\nHost: web\r\n{many}\r\n"),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413() {
    let backend = Backend::start().await;
    let limits = Limits {
        max_body_bytes: 1000,
        ..Limits::default()
    };
    let proxy = TestProxy::start(backend.addr, ProxyTable::default(), options(limits)).await;
    let mut c = h1_client(proxy.addr).await;
    c.ready().await.unwrap();
    let r = c
        .send_request(
            Request::post("/echo")
                .header("host", "web")
                .body(body(vec![b'x'; 5000]))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Chunked (no length announced): cut at the limit.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /grpc HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = format!("7d0\r\n{}\r\n", "y".repeat(2000));
    let _ = s.write_all(chunk.as_bytes()).await;
    let out = read_all(&mut s, Duration::from_secs(5)).await;
    let out = String::from_utf8_lossy(&out);
    // Either refused before the upstream answered (413) or the stream was cut mid-response.
    assert!(
        out.starts_with("HTTP/1.1 413") || !out.contains("0\r\n\r\n"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_while_others_are_served() {
    let backend = Backend::start().await;
    let limits = Limits {
        header_read_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let proxy = TestProxy::start(backend.addr, ProxyTable::default(), options(limits)).await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    let t0 = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n")
        .await
        .unwrap();
    let addr = proxy.addr;
    // Meanwhile other clients get answers.
    let others = tokio::spawn(async move {
        let mut served = 0;
        while t0.elapsed() < Duration::from_millis(700) {
            let mut c = h1_client(addr).await;
            let r = h1_send(&mut c, "GET", "/echo", "").await;
            assert_eq!(r.status(), 200);
            served += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        served
    });
    let closed_at = loop {
        if slow.write_all(b"X-Trickle: a\r\n").await.is_err() {
            break t0.elapsed();
        }
        let mut b = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break t0.elapsed(),
            Ok(Ok(_)) => {} // a 408 or similar, then the close
            Err(_) => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "slowloris connection kept open"
        );
    };
    assert!(
        closed_at >= Duration::from_millis(700),
        "closed too early: {closed_at:?}"
    );
    assert!(
        closed_at < Duration::from_millis(2000),
        "closed late: {closed_at:?}"
    );
    assert!(others.await.unwrap() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_without_host() {
    let backend = Backend::start().await;
    let proxy = TestProxy::start(
        backend.addr,
        ProxyTable::default(),
        options(Limits::default()),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.0\r\n\r\n").await.unwrap();
    let out = read_all(&mut s, Duration::from_secs(5)).await;
    let out = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(
        out.starts_with("http/1.0 200") || out.starts_with("http/1.1 200"),
        "{out}"
    );
    assert!(
        out.contains(&format!("x-seen-host: {}", backend.addr)),
        "{out}"
    );
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
    let mut c = h1_client(proxy.addr).await;
    // No header: the peer's address alone, and the downstream's scheme. (No access log: the
    // proxy keeps no request details, and still sends its generated x-request-id, a UUID.)
    let r = h1_send(&mut c, "GET", "/echo", "").await;
    assert_eq!(r.headers()["x-seen-xff"], "127.0.0.1");
    assert_eq!(r.headers()["x-seen-xfp"], "http");
    assert_eq!(r.headers()["x-seen-request-id"].len(), 36);
    text(r).await;
    // A client's chain (xff_num_trusted_hops 0: kept, not trusted) gets the peer appended as
    // one header; a received x-forwarded-proto survives.
    c.ready().await.unwrap();
    let req = Request::builder()
        .uri("/echo")
        .header("host", "web")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-for", "198.51.100.2")
        .header("x-forwarded-proto", "https")
        .body(body(""))
        .unwrap();
    let r = c.send_request(req).await.unwrap();
    assert_eq!(
        r.headers()["x-seen-xff"],
        "203.0.113.9,198.51.100.2,127.0.0.1"
    );
    assert_eq!(r.headers()["x-seen-xfp"], "https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_carry_the_request_details() {
    // (Without one, the request still gets its generated x-request-id: the test above.)
    let backend = Backend::start().await;
    // With an access log the details are there: the generated id (the one the backend saw),
    // authority, user agent, x-forwarded-for as forwarded.
    let dir = std::env::temp_dir().join(format!("comb-access-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let telemetry =
        comb_proxy::telemetry::Telemetry::new(comb_proxy::telemetry::TelemetryOptions {
            access_log: Some(comb_proxy::telemetry::AccessLogTarget::File(path.clone())),
            otlp_endpoint: None,
            node: "test-node".into(),
            service_name: "comb-proxy".into(),
            max_stats_routes: 100,
        });
    let mut opts = comb_proxy::ProxyOptions::new(telemetry.clone());
    opts.port = 0;
    let proxy = TestProxy::start(backend.addr, ProxyTable::default(), opts).await;
    let mut c = h1_client(proxy.addr).await;
    c.ready().await.unwrap();
    let req = Request::builder()
        .uri("/echo")
        .header("host", "web.shop")
        .header("user-agent", "comb-test/1")
        .body(body(""))
        .unwrap();
    let r = c.send_request(req).await.unwrap();
    let id = r.headers()["x-seen-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    text(r).await;
    telemetry.flush_access_log();
    let log = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(line["request_id"], id.as_str(), "{line}");
    assert_eq!(line["authority"], "web.shop", "{line}");
    assert_eq!(line["user_agent"], "comb-test/1", "{line}");
    assert_eq!(line["x_forwarded_for"], "127.0.0.1", "{line}");
}
