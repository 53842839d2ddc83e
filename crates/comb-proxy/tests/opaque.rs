//! Opaque TCP through the proxy: client-first non-HTTP bytes, server-first protocols (the
//! detection timeout), and an unreachable destination.

mod common;

use std::time::{Duration, Instant};

use comb_model::l7::ProxyTable;
use comb_proxy::Limits;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Echoes; with `banner`, says it first.
async fn tcp_backend(
    banner: Option<&'static [u8]>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if let Some(b) = banner {
                    let _ = s.write_all(b).await;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_first_binary_is_relayed() {
    let (dst, task) = tcp_backend(None).await;
    let proxy = TestProxy::start(dst, ProxyTable::default(), options(Limits::default())).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let t0 = Instant::now();
    s.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    let mut b = [0u8; 10];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"\x16\x03\x01\x00\x05hello");
    // Decided on the first bytes, not after the detection timeout.
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
    // Lowercase text is not an HTTP method either.
    s.write_all(b"ping x\r\n").await.unwrap();
    let mut b = [0u8; 8];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping x\r\n");
    drop(s);
    proxy
        .wait_metrics(&["istio_tcp_connections_closed_total"])
        .await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocol_after_detection_timeout() {
    let (dst, task) = tcp_backend(Some(b"220 smtp ready\r\n")).await;
    let mut opts = options(Limits::default());
    opts.detect_timeout = Duration::from_millis(150);
    let proxy = TestProxy::start(dst, ProxyTable::default(), opts).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .expect("banner")
        .unwrap();
    assert_eq!(&b, b"220 smtp ready\r\n");
    assert!(
        t0.elapsed() >= Duration::from_millis(140),
        "{:?}",
        t0.elapsed()
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_destination_resets_the_client() {
    let dst = closed_port().await;
    let proxy = TestProxy::start(dst, ProxyTable::default(), options(Limits::default())).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"\x00\x01\x02").await.unwrap();
    let mut b = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .unwrap();
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    proxy
        .wait_metrics(&[
            "istio_tcp_connections_closed_total",
            "response_flags=\"UF\"",
        ])
        .await;
}

/// Sum of a metric's samples in the Prometheus text.
fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_counted_opened_while_open() {
    let (dst, task) = tcp_backend(None).await;
    let proxy = TestProxy::start(dst, ProxyTable::default(), options(Limits::default())).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"\x00open").await.unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).await.unwrap();
    // The relay is running: opened moved, closed has not.
    let m = proxy
        .wait_metrics(&["istio_tcp_connections_opened_total{"])
        .await;
    assert_eq!(metric_sum(&m, "istio_tcp_connections_opened_total"), 1);
    assert_eq!(metric_sum(&m, "istio_tcp_connections_closed_total"), 0);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = proxy.metrics();
        if metric_sum(&m, "istio_tcp_connections_closed_total") == 1 {
            assert_eq!(metric_sum(&m, "istio_tcp_connections_opened_total"), 1);
            break;
        }
        assert!(Instant::now() < deadline, "closed never counted: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}
