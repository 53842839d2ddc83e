//! Bounds and timeouts (docs/l7.md, "Limits and failure answers"): downstream idle
//! timeouts (HTTP/1 between requests, HTTP/2 GOAWAY), the head clock apart from the idle
//! one, the upstream pools (HTTP/1 total cap, HTTP/2 destinations bounded and reaped, idle
//! upstreams closed), and the opaque relay's idle timeout. Margins are wide: the machine is
//! shared and loaded; what is asserted is behaviour (closed or not, answered or not).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use comb_model::l7::ProxyTable;
use comb_proxy::{Limits, ProxyContext, serve_connection};
use common::*;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads until EOF or error; panics if the peer keeps the connection open past `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match tokio::time::timeout(within, s.read(&mut b)).await {
            Err(_) => panic!("still open after {within:?}; read {out:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&b[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_keep_alive_connection_closes_when_idle_not_before() {
    let backend = Backend::start().await;
    let limits = Limits {
        downstream_idle_timeout: Duration::from_millis(1500),
        ..Limits::default()
    };
    let proxy = TestProxy::start(backend.addr, ProxyTable::default(), options(limits)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // A request slower than the idle timeout is in flight, not idle: it is answered.
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = [0u8; 9];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"slow done");
    // Still open shortly after (keep-alive), then closed once silent for the idle time.
    let t0 = Instant::now();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let rest = closed_within(&mut s, Duration::from_secs(10)).await;
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "closed before the idle timeout: {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_idle_is_not_the_head_timeout() {
    // A short head timeout must not close a connection that is only idle between requests
    // (hyper's own timer did), and a long idle timeout must not spare a slowloris head.
    let backend = Backend::start().await;
    let limits = Limits {
        header_read_timeout: Duration::from_millis(400),
        downstream_idle_timeout: Duration::from_secs(3600),
        ..Limits::default()
    };
    let proxy = TestProxy::start(backend.addr, ProxyTable::default(), options(limits)).await;
    let mut c = h1_client(proxy.addr).await;
    let r = h1_send(&mut c, "GET", "/echo", "").await;
    assert_eq!(r.status(), 200);
    text(r).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = h1_send(&mut c, "GET", "/echo", "again").await;
    assert_eq!(r.status(), 200);
    assert_eq!(text(r).await, "again");
    // A head started and never finished is cut by the head clock.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n")
        .await
        .unwrap();
    closed_within(&mut slow, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connection_gets_goaway_when_idle_and_keeps_streams_in_flight() {
    let backend = Backend::start().await;
    let limits = Limits {
        downstream_idle_timeout: Duration::from_millis(600),
        ..Limits::default()
    };
    let proxy = TestProxy::start(backend.addr, ProxyTable::default(), options(limits)).await;
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    // /slow (800 ms) outlives the idle timeout: it is a stream, so nothing is idle.
    let req = Request::builder()
        .uri(format!("http://{}/slow", backend.addr))
        .body(body(""))
        .unwrap();
    let r = tx.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(text(r).await, "slow done");
    // Then no stream: GOAWAY and close, which ends the client's connection task cleanly.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("h2 connection not closed when idle");
    assert!(ended.unwrap().is_ok(), "closed without GOAWAY");
}

/// A proxy whose accepted connections go to the next of `dsts` in turn (what distinct
/// original destinations would be through the transparent listener).
struct MultiProxy {
    addr: SocketAddr,
    ctx: Arc<ProxyContext>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MultiProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn multi_proxy(dsts: Vec<SocketAddr>, limits: Limits) -> MultiProxy {
    let ctx = ProxyContext::new(&options(limits), Arc::new(ProxyTable::default()));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let c = ctx.clone();
    let task = tokio::spawn(async move {
        let mut i = 0;
        while let Ok((s, peer)) = l.accept().await {
            let dst = dsts[i % dsts.len()];
            i += 1;
            tokio::spawn(serve_connection(s, peer, dst, c.clone()));
        }
    });
    MultiProxy { addr, ctx, task }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_pool_is_bounded_and_reaped() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let limits = Limits {
        max_upstream_h2_destinations: 2,
        upstream_idle_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let p = multi_proxy(backends.iter().map(|b| b.addr).collect(), limits).await;
    // Three destinations through a map of two: every request is served, the map stays ≤ 2.
    for round in 0..2 {
        for b in &backends {
            let mut c = h2_client(p.addr).await;
            let req = Request::builder()
                .uri(format!("http://{}/echo", b.addr))
                .body(body(format!("r{round}")))
                .unwrap();
            let r = c.send_request(req).await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(text(r).await, format!("r{round}"));
            let n = p.ctx.upstream_counts().h2_destinations;
            assert!((1..=2).contains(&n), "{n} destinations");
        }
    }
    // Unused for the idle time: every entry leaves and its connection closes.
    wait_for("h2 pool reaped", || {
        p.ctx.upstream_counts().h2_destinations == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_upstream_connections_are_capped_and_idle_ones_reaped() {
    let backend = Backend::start().await;
    let limits = Limits {
        max_upstream_h1_connections: 1,
        upstream_idle_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let p = multi_proxy(vec![backend.addr], limits).await;
    // One slow request holds the only upstream connection; a second one overflows (UO).
    let addr = p.addr;
    let slow = tokio::spawn(async move {
        let mut c = h1_client(addr).await;
        let r = h1_send(&mut c, "GET", "/slow", "").await;
        (r.status(), text(r).await)
    });
    wait_for("first upstream connection", || {
        p.ctx.upstream_counts().h1_connections == 1
    })
    .await;
    let mut c = h1_client(p.addr).await;
    let r = h1_send(&mut c, "GET", "/echo", "").await;
    assert_eq!(r.status(), 503);
    assert!(text(r).await.ends_with("reset reason: overflow"));
    assert_eq!(
        slow.await.unwrap(),
        (http::StatusCode::OK, "slow done".to_string())
    );
    // The connection is back in the pool and takes the next request once hyper has
    // finished the previous response (allow it a moment): reused, not a second one opened.
    let mut served = false;
    for _ in 0..100 {
        let r = h1_send(&mut c, "GET", "/echo", "pooled").await;
        if r.status() == 200 {
            assert_eq!(text(r).await, "pooled");
            served = true;
            break;
        }
        text(r).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the pooled connection was never reused");
    assert_eq!(p.ctx.upstream_counts().h1_connections, 1);
    let m = p.ctx.telemetry();
    let mut out = String::new();
    m.render_prometheus(&mut out);
    assert!(out.contains("response_flags=\"UO\""), "{out}");
    // Idle past the upstream idle timeout: closed and counted out.
    wait_for("h1 pool reaped", || {
        p.ctx.upstream_counts().h1_connections == 0
    })
    .await;
}

/// Echoes every byte back.
async fn tcp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_relay_closes_when_idle_and_not_while_busy() {
    let (dst, task) = tcp_echo().await;
    let limits = Limits {
        tcp_idle_timeout: Duration::from_millis(1200),
        ..Limits::default()
    };
    let proxy = TestProxy::start(dst, ProxyTable::default(), options(limits)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // Busy for twice the idle timeout (a byte every 200 ms): kept.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2400) {
        s.write_all(b"\x00ping").await.unwrap();
        let mut b = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .expect("relay stalled")
            .expect("relay closed while busy");
        assert_eq!(&b, b"\x00ping");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Silent: closed (FIN) after the idle timeout, and recorded as an ended connection.
    let t1 = Instant::now();
    let rest = closed_within(&mut s, Duration::from_secs(10)).await;
    assert!(rest.is_empty());
    assert!(
        t1.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        t1.elapsed()
    );
    proxy
        .wait_metrics(&["istio_tcp_connections_closed_total{"])
        .await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connection_closes_when_idle() {
    let backend = Backend::start().await;
    let limits = Limits {
        tcp_idle_timeout: Duration::from_millis(1000),
        // The HTTP side's idle clock is not the one that ends an upgraded connection.
        downstream_idle_timeout: Duration::from_secs(3600),
        ..Limits::default()
    };
    let proxy = TestProxy::start(backend.addr, ProxyTable::default(), options(limits)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    s.write_all(b"frame").await.unwrap();
    let mut b = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .expect("echo in time")
        .unwrap();
    let t0 = Instant::now();
    let rest = closed_within(&mut s, Duration::from_secs(10)).await;
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_head_is_bounded_like_the_downstream_one() {
    // An upstream whose response head outgrows the connection's buffer (max header bytes
    // + 1 KiB): the proxy stops reading it and answers 503 UPE instead of buffering on.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dst = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
                // 50 headers (under hyper's count limit) of 2 KB: 100 KB, under hyper's default
                // buffer (~400 KiB), over this proxy's bound (17 KiB).
                for i in 0..50 {
                    head.extend_from_slice(
                        format!("x-big-{i}: {}\r\n", "v".repeat(2000)).as_bytes(),
                    );
                }
                head.extend_from_slice(b"content-length: 0\r\n\r\n");
                let _ = s.write_all(&head).await;
            });
        }
    });
    let limits = Limits {
        max_header_bytes: 16 * 1024,
        ..Limits::default()
    };
    let proxy = TestProxy::start(dst, ProxyTable::default(), options(limits)).await;
    let mut c = h1_client(proxy.addr).await;
    let r = h1_send(&mut c, "GET", "/", "").await;
    assert_eq!(r.status(), 503);
    assert!(text(r).await.ends_with("reset reason: protocol error"));
    proxy.wait_metrics(&["response_flags=\"UPE\""]).await;
    task.abort();
}
