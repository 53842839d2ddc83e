//! Shared by the proxy tests: a proxy fed by a plain loopback listener (every connection's
//! original destination is given), a hyper backend with echo/gRPC/upgrade/slow routes, and
//! raw-socket helpers.
#![allow(dead_code)]

pub mod mesh;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use comb_model::l7::ProxyTable;
use comb_proxy::telemetry::{Telemetry, TelemetryOptions};
use comb_proxy::{Limits, ProxyContext, ProxyOptions, serve_connection};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub fn telemetry() -> Arc<Telemetry> {
    Telemetry::new(TelemetryOptions {
        access_log: None,
        otlp_endpoint: None,
        node: "test-node".into(),
        service_name: "comb-proxy".into(),
        max_stats_routes: 100,
    })
}

pub fn options(limits: Limits) -> ProxyOptions {
    let mut o = ProxyOptions::new(telemetry());
    o.port = 0;
    o.limits = limits;
    o
}

/// A proxy whose every connection is treated as going to `dst` (what the transparent
/// listener would learn from the accepted socket).
pub struct TestProxy {
    pub addr: SocketAddr,
    pub ctx: Arc<ProxyContext>,
    task: JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestProxy {
    pub async fn start(dst: SocketAddr, table: ProxyTable, opts: ProxyOptions) -> Self {
        let ctx = ProxyContext::new(&opts, Arc::new(table));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = ctx.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    return;
                };
                tokio::spawn(serve_connection(s, peer, dst, c.clone()));
            }
        });
        Self { addr, ctx, task }
    }

    pub fn metrics(&self) -> String {
        let mut out = String::new();
        self.ctx.telemetry().render_prometheus(&mut out);
        out
    }

    /// Waits until the rendered metrics contain every needle (records land when bodies end).
    pub async fn wait_metrics(&self, needles: &[&str]) -> String {
        for _ in 0..100 {
            let m = self.metrics();
            if needles.iter().all(|n| m.contains(n)) {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("metrics never contained {needles:?}:\n{}", self.metrics());
    }
}

/// A backend: hyper auto (HTTP/1.1 + h2c) with routes
/// - `/echo*`: 200, body = request body, headers `x-seen-*` describing the request;
/// - `/chunks`: three chunks, no length (chunked on HTTP/1.1);
/// - `/grpc`: echoes each request frame as it arrives, then trailers `grpc-status: 0`;
/// - `/ws`: 101 and an echo on the upgraded connection;
/// - `/slow`: answers after 800 ms.
pub struct Backend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1").await
    }

    /// The backend on another loopback address (HBONE tests' pod B).
    pub async fn start_on(ip: &str) -> Self {
        let l = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let n = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(route);
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }
}

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> TestBody {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn route(mut req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/ws" {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .body(full(""))
            .unwrap();
        return Ok(resp);
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(800)).await;
        return Ok(Response::new(full("slow done")));
    }
    if path == "/chunks" {
        let (tx, body) = ChannelBody::new();
        tokio::spawn(async move {
            for c in ["one,", "two,", "three"] {
                let _ = tx.send(Frame::data(Bytes::from(c))).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        return Ok(Response::new(body.boxed()));
    }
    if path == "/grpc" {
        let (tx, body) = ChannelBody::new();
        let mut incoming = req.into_body();
        tokio::spawn(async move {
            while let Some(Ok(f)) = incoming.frame().await {
                if let Ok(d) = f.into_data() {
                    let _ = tx.send(Frame::data(d)).await;
                }
            }
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            t.insert("grpc-message", "fine".parse().unwrap());
            let _ = tx.send(Frame::trailers(t)).await;
        });
        let resp = Response::builder()
            .header("content-type", "application/grpc")
            .body(body.boxed())
            .unwrap();
        return Ok(resp);
    }
    let h = |n: &str| {
        req.headers()
            .get(n)
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .unwrap_or_default()
    };
    let b = Response::builder()
        .header("x-seen-host", h("host"))
        .header(
            "x-seen-authority",
            req.uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        )
        .header("x-seen-traceparent", h("traceparent"))
        .header("x-seen-request-id", h("x-request-id"))
        .header("x-seen-connection", h("connection"))
        .header("x-seen-expect", h("expect"))
        .header(
            "x-seen-xff",
            req.headers()
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.to_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join("|"),
        )
        .header("x-seen-xfp", h("x-forwarded-proto"))
        .header("x-seen-version", format!("{:?}", req.version()))
        .header(
            "x-seen-path",
            req.uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
        );
    Ok(b.body(req.into_body().boxed()).unwrap())
}

/// A body fed from a channel (frames as they come; trailers allowed).
pub struct ChannelBody(mpsc::Receiver<Frame<Bytes>>);

impl ChannelBody {
    pub fn new() -> (mpsc::Sender<Frame<Bytes>>, Self) {
        let (tx, rx) = mpsc::channel(16);
        (tx, Self(rx))
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// Reads until the peer closes or `timeout`; returns what came.
pub async fn read_all(s: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, s.read_to_end(&mut out)).await;
    out
}

/// Reads one HTTP/1 response head (through the blank line) and returns it.
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("response head in time")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&out));
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

/// A loopback address nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// An HTTP/1.1 client connection (one TCP connection, requests in sequence).
pub async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// One request with `Host: web` on an HTTP/1.1 connection, once it is ready.
pub async fn h1_send(
    c: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    method: &str,
    path: &str,
    b: &str,
) -> Response<Incoming> {
    c.ready().await.unwrap();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web")
        .body(body(b.to_string()))
        .unwrap();
    c.send_request(req).await.unwrap()
}

pub async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

pub fn body(b: impl Into<Bytes>) -> TestBody {
    full(b)
}

pub async fn text(r: Response<Incoming>) -> String {
    String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// The proxy table of node `n1` for `manifests` (YAML, as `comb apply` reads them).
pub fn table(manifests: &str) -> ProxyTable {
    let docs = comb_config::parse_file_text(std::path::Path::new("m.yaml"), manifests)
        .unwrap_or_else(|e| panic!("{e}"));
    let snap = comb_config::build_snapshot(&docs).unwrap_or_else(|e| panic!("{e}"));
    let ids = comb_model::identity::IdentityAllocator::default().resolve(
        &snap,
        "n1",
        &comb_model::policy_compile::policy_cidrs(&snap),
    );
    comb_model::l7::compile_proxy_table(&snap, 1, &ids, "n1")
}

/// A pod `shop/web` (app=web) on n1 at 127.0.0.1: both the tests' client and backend
/// address, so it is the source and the destination workload.
pub const WEB_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web, containers: []}
status: {podIP: 127.0.0.1}
";

/// A policy document selecting the web pod.
pub fn policy(name: &str, action: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: {action}\n  rules:\n{rules}"
    )
}
