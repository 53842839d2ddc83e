//! `comb probe http-serve`: the HTTP backend that L7 tests and the `l7` benchmark run in pods.
//! HTTP/1.1 and HTTP/2 (prior knowledge) on one port, detected by hyper.
//!
//! Paths:
//! - `/bytes/N`: N bytes of `x` (the benchmark's 1 KiB response is `/bytes/1024`).
//! - `/status/N`: an empty response with status N.
//! - `/chunked/N`: N chunks of 16 bytes, streamed (chunked in HTTP/1.1).
//! - `/echo`: the request body back.
//! - anything else: a JSON object describing the request as the server saw it (`pod`,
//!   `method`, `path`, `version`, `headers` (lowercase names, repeated values joined with
//!   ","), `body_bytes`, `peer`), so tests can check what the proxy forwarded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type Body = BoxBody<Bytes, Infallible>;

pub fn serve(port: u16, threads: usize) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("binding port {port}"))?;
        // Tests wait for this line before connecting.
        println!("listening on {port}");
        loop {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, peer));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn number(path: &str, prefix: &str) -> Option<u64> {
    path.strip_prefix(prefix)?.parse().ok()
}

async fn handle(req: Request<Incoming>, peer: SocketAddr) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(n) = number(&path, "/bytes/") {
        let _ = req.into_body().collect().await;
        let n = n.min(64 << 20) as usize;
        return Ok(Response::new(full(vec![b'x'; n])));
    }
    if let Some(code) = number(&path, "/status/") {
        let _ = req.into_body().collect().await;
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::from_u16(code as u16).unwrap_or(StatusCode::BAD_REQUEST);
        return Ok(resp);
    }
    if let Some(n) = number(&path, "/chunked/") {
        let _ = req.into_body().collect().await;
        let body = Chunks {
            next: 0,
            n: n.min(10_000),
        };
        return Ok(Response::new(body.boxed()));
    }
    if path == "/echo" {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        return Ok(Response::new(full(body)));
    }
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let mut headers = serde_json::Map::new();
    for name in req.headers().keys() {
        let joined = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        headers.insert(name.as_str().to_string(), joined.into());
    }
    let full_path = req
        .uri()
        .path_and_query()
        .map_or(path.clone(), |p| p.to_string());
    let body_bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let doc = serde_json::json!({
        "pod": std::env::var("POD_NAME").unwrap_or_default(),
        "method": method,
        "path": full_path,
        "version": version,
        "headers": headers,
        "body_bytes": body_bytes,
        "peer": peer.to_string(),
    });
    let mut resp = Response::new(full(doc.to_string()));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// `n` chunks of 16 bytes, each its own DATA frame / HTTP/1.1 chunk.
struct Chunks {
    next: u64,
    n: u64,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.next >= self.n {
            return std::task::Poll::Ready(None);
        }
        let i = self.next;
        self.next += 1;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
            "chunk {i:>9}\n"
        ))))))
    }
}
