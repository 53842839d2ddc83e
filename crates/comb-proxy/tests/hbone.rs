//! HBONE between two proxies on loopback: a client pod A (127.0.0.2, `a/client`) on one
//! node, a server pod B (127.0.0.3, `shop/web`) on the other. The client side is a proxy
//! context driven with the original destination given (what the transparent outbound
//! listener learns); the server side is a started proxy with its inbound listener on B's
//! address (what the datapath's assignment gives it).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use comb_identity::{CertStore, SpiffeId};
use comb_model::l7::ProxyTable;
use comb_proxy::hbone::tls::TlsConfigs;
use comb_proxy::{ListenerKind, Proxy, ProxyContext, ProxyHandle, serve_outbound};
use common::mesh::{self, TestCa};
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

const A: &str = "127.0.0.2";
const B: &str = "127.0.0.3";

fn pods(extra: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: a, labels: {{app: client}}}}
spec: {{nodeName: n1, serviceAccountName: client, containers: []}}
status: {{podIP: {A}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: shop, labels: {{app: web}}}}
spec: {{nodeName: n2, serviceAccountName: web, containers: []}}
status: {{podIP: {B}}}
{extra}"
    )
}

fn table_of(manifests: &str, node: &str) -> ProxyTable {
    let docs = comb_config::parse_file_text(std::path::Path::new("m.yaml"), manifests)
        .unwrap_or_else(|e| panic!("{e}"));
    let snap = comb_config::build_snapshot(&docs).unwrap_or_else(|e| panic!("{e}"));
    let ids = comb_model::identity::IdentityAllocator::default().resolve(
        &snap,
        node,
        &comb_model::policy_compile::policy_cidrs(&snap),
    );
    comb_model::l7::compile_proxy_table(&snap, 1, &ids, node)
}

fn client_id() -> SpiffeId {
    mesh::id("a", "client")
}

fn web_id() -> SpiffeId {
    mesh::id("shop", "web")
}

/// The echo "pod" B: echoes until EOF, then half-closes.
struct Echo {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo() -> Echo {
    let l = TcpListener::bind((B, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Echo { addr, task }
}

/// The server node: a started proxy, HBONE inbound on B's address.
fn server(certs: CertStore, policies: &str) -> (ProxyHandle, SocketAddr) {
    server_with(certs, policies, comb_proxy::Limits::default())
}

fn server_with(
    certs: CertStore,
    policies: &str,
    limits: comb_proxy::Limits,
) -> (ProxyHandle, SocketAddr) {
    let mut table = table_of(&pods(policies), "n2");
    mesh::local(&mut table, B, &web_id());
    let mut o = options(limits);
    o.transparent = false;
    o.hbone.enabled = true;
    o.hbone.original_source = false;
    o.hbone.outbound_port = 0;
    o.hbone.inbound_addr = format!("{B}:0").parse().unwrap();
    o.certs = certs;
    let h = Proxy::start(o, Arc::new(table)).unwrap();
    let addr = h.addrs(ListenerKind::HboneInbound)[0];
    (h, addr)
}

/// The client node: flows accepted on `addr` are tunneled as if sent to `dst`.
struct Client {
    addr: SocketAddr,
    ctx: Arc<ProxyContext>,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn client(certs: CertStore, peer_port: u16, expect: &SpiffeId, dst: SocketAddr) -> Client {
    client_with(certs, peer_port, expect, dst, comb_proxy::Limits::default()).await
}

async fn client_with(
    certs: CertStore,
    peer_port: u16,
    expect: &SpiffeId,
    dst: SocketAddr,
    limits: comb_proxy::Limits,
) -> Client {
    client_of(certs, peer_port, expect, dst, limits, "").await
}

/// A client node whose manifests hold `extra` too (Services, ...).
async fn client_of(
    certs: CertStore,
    peer_port: u16,
    expect: &SpiffeId,
    dst: SocketAddr,
    limits: comb_proxy::Limits,
    extra: &str,
) -> Client {
    let mut table = table_of(&pods(extra), "n1");
    mesh::local(&mut table, A, &client_id());
    mesh::peer(&mut table, B, expect);
    let mut o = options(limits);
    o.hbone.enabled = true;
    o.hbone.original_source = false;
    o.hbone.peer_port = peer_port;
    o.certs = certs;
    let ctx = ProxyContext::new(&o, Arc::new(table));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let c = ctx.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = l.accept().await else {
                return;
            };
            tokio::spawn(serve_outbound(s, peer, dst, c.clone()));
        }
    });
    Client { addr, ctx, task }
}

/// A connection from pod A's address. bind(A, 0) picks a port before the destination is
/// known, so tests running in parallel can draw a 4-tuple already in use (EADDRINUSE at
/// connect): draw again.
async fn from_a(to: SocketAddr) -> TcpStream {
    try_from_a(to)
        .await
        .unwrap_or_else(|e| panic!("connecting from {A} to {to}: {e}"))
}

/// `from_a`, with the connect's other errors returned: a refused tunnel resets the
/// connection, and on a loaded machine the reset can land before `connect` returns.
async fn try_from_a(to: SocketAddr) -> std::io::Result<TcpStream> {
    let mut last = None;
    for _ in 0..20 {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(format!("{A}:0").parse().unwrap()).unwrap();
        match s.connect(to).await {
            Ok(c) => return Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port")))
}

/// A reset or broken pipe: what the client of a refused tunnel sees.
fn refused(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

struct Setup {
    ca: TestCa,
    _server: ProxyHandle,
    inbound: SocketAddr,
    echo: Echo,
    client: Client,
}

async fn setup(policies: &str) -> Setup {
    setup_with(policies, comb_proxy::Limits::default()).await
}

/// A server node with `limits`, an echo pod behind it, and a client node tunnelling to it.
async fn setup_with(policies: &str, limits: comb_proxy::Limits) -> Setup {
    let ca = TestCa::new("test-ca");
    let (server, inbound) = server_with(
        mesh::store(&[&ca], &[ca.issue(&web_id())]),
        policies,
        limits,
    );
    let echo = echo().await;
    let client = client(
        mesh::store(&[&ca], &[ca.issue(&client_id())]),
        inbound.port(),
        &web_id(),
        echo.addr,
    )
    .await;
    Setup {
        ca,
        _server: server,
        inbound,
        echo,
        client,
    }
}

async fn round_trip(to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = match try_from_a(to).await {
        Ok(s) => s,
        Err(e) if refused(&e) => return Vec::new(),
        Err(e) => panic!("connecting from {A} to {to}: {e}"),
    };
    match s.write_all(msg).await.and(s.shutdown().await) {
        Ok(()) => {}
        Err(e) if refused(&e) => return Vec::new(),
        Err(e) => panic!("writing to {to}: {e}"),
    }
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
        .await
        .expect("echo in time")
        .unwrap_or_default();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_round_trip_is_byte_exact_with_half_close() {
    let s = setup("").await;
    let data: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let got = round_trip(s.client.addr, &data).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
    let hbone = s.client.ctx.hbone().unwrap();
    let tunnels = hbone.pool().tunnels();
    assert_eq!(tunnels.len(), 1);
    let t = &tunnels[0];
    assert_eq!(t.peer, s.inbound);
    assert_eq!(t.local_identity, "spiffe://cluster.local/ns/a/sa/client");
    assert_eq!(t.peer_identity, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(t.streams_total, 1);
    assert!(t.bytes_sent >= data.len() as u64 && t.bytes_received >= data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_flows_cost_a_handful_of_handshakes() {
    let s = setup("").await;
    for i in 0..1000u32 {
        let msg = format!("flow {i}");
        assert_eq!(
            round_trip(s.client.addr, msg.as_bytes()).await,
            msg.as_bytes()
        );
    }
    let c = s.client.ctx.hbone().unwrap().pool().counters();
    eprintln!("{c:?}");
    assert!(c.full_handshakes + c.resumptions <= 3, "handshakes: {c:?}");
    assert!(c.full_handshakes >= 1);
    assert!(c.reuses >= 997, "{c:?}");
    assert_eq!(c.failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_reaped_and_the_next_resumes() {
    let ca = TestCa::new("test-ca");
    let (_server, inbound) = server(mesh::store(&[&ca], &[ca.issue(&web_id())]), "");
    let echo = echo().await;
    let mut table = table_of(&pods(""), "n1");
    mesh::local(&mut table, A, &client_id());
    mesh::peer(&mut table, B, &web_id());
    let mut o = options(comb_proxy::Limits::default());
    o.hbone.enabled = true;
    o.hbone.original_source = false;
    o.hbone.peer_port = inbound.port();
    o.hbone.pool_idle_timeout = Duration::from_millis(200);
    o.certs = mesh::store(&[&ca], &[ca.issue(&client_id())]);
    let ctx = ProxyContext::new(&o, Arc::new(table));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let c = ctx.clone();
    let dst = echo.addr;
    let task = tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            tokio::spawn(serve_outbound(s, peer, dst, c.clone()));
        }
    });
    assert_eq!(round_trip(addr, b"one").await, b"one");
    let pool = ctx.hbone().unwrap().pool().clone();
    for _ in 0..100 {
        if pool.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pool.is_empty(), "idle connection not reaped");
    assert_eq!(round_trip(addr, b"two").await, b"two");
    let counters = pool.counters();
    assert_eq!(counters.full_handshakes, 1, "{counters:?}");
    assert_eq!(counters.resumptions, 1, "{counters:?}");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_of_another_ca_is_refused_and_the_server_keeps_serving() {
    let ca = TestCa::new("test-ca");
    let rogue = TestCa::new("rogue-ca");
    let (srv, inbound) = server(mesh::store(&[&ca], &[ca.issue(&web_id())]), "");
    let echo = echo().await;
    // The rogue client trusts both CAs (it would accept the server) but holds a rogue cert.
    let bad = client(
        mesh::store(&[&ca, &rogue], &[rogue.issue(&client_id())]),
        inbound.port(),
        &web_id(),
        echo.addr,
    )
    .await;
    assert_eq!(round_trip(bad.addr, b"hello").await, b"");
    // TLS 1.3: the client's side of the handshake ends before the server judged its
    // certificate, so the refusal is the server's to count; the client keeps no tunnel.
    // Its CONNECT fails before any 200 with the client's "hello" sent along (the first
    // bytes go with the CONNECT), and the connection ended with an I/O error: the bytes may
    // have reached a pod, so it is not retried (docs/upgrades.md): one refused handshake.
    // The server counts after its side of the close, which the client can see first.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while srv.tunnel_stats().inbound.refused < 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let i = srv.tunnel_stats().inbound;
    assert_eq!((i.handshakes, i.refused, i.streams), (0, 1, 0));
    assert!(bad.ctx.hbone().unwrap().pool().tunnels().is_empty());
    let good = client(
        mesh::store(&[&ca], &[ca.issue(&client_id())]),
        inbound.port(),
        &web_id(),
        echo.addr,
    )
    .await;
    assert_eq!(round_trip(good.addr, b"hello").await, b"hello");
    let i = srv.tunnel_stats().inbound;
    assert_eq!((i.handshakes, i.refused, i.streams), (1, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_the_wrong_identity_is_refused_by_the_client() {
    let ca = TestCa::new("test-ca");
    let (_server, inbound) = server(mesh::store(&[&ca], &[ca.issue(&web_id())]), "");
    let echo = echo().await;
    let c = client(
        mesh::store(&[&ca], &[ca.issue(&client_id())]),
        inbound.port(),
        &mesh::id("shop", "db"),
        echo.addr,
    )
    .await;
    assert_eq!(round_trip(c.addr, b"hello").await, b"");
    let counters = c.ctx.hbone().unwrap().pool().counters();
    assert_eq!(counters.failures, 1, "{counters:?}");
    assert!(c.ctx.hbone().unwrap().pool().is_empty());
}

/// A raw HBONE client: mutual TLS as `a/client`, HTTP/2, requests of our choosing.
async fn raw_h2(
    certs: CertStore,
    inbound: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tls = TlsConfigs::new(certs);
    let cfg = tls.client(&client_id(), &web_id()).unwrap();
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(comb_proxy::hbone::tls::server_name(inbound.ip()), tcp)
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

async fn status_of(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    method: Method,
    uri: &str,
) -> StatusCode {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Empty::new())
        .unwrap();
    sender.send_request(req).await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_answers_like_ztunnel() {
    let deny_client = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-client, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/a/sa/client]}}]\n    to: [{operation: {ports: [\"9\"]}}]\n";
    let ca = TestCa::new("test-ca");
    let (_server, inbound) = server(mesh::store(&[&ca], &[ca.issue(&web_id())]), deny_client);
    let echo = echo().await;
    let certs = mesh::store(&[&ca], &[ca.issue(&client_id())]);
    let mut h2 = raw_h2(certs, inbound).await;
    let ok = format!("{B}:{}", echo.addr.port());
    assert_eq!(
        status_of(&mut h2, Method::CONNECT, &ok).await,
        StatusCode::OK
    );
    assert_eq!(
        status_of(&mut h2, Method::GET, &format!("http://{ok}/")).await,
        StatusCode::BAD_REQUEST,
        "not CONNECT"
    );
    assert_eq!(
        status_of(&mut h2, Method::CONNECT, "web.shop:80").await,
        StatusCode::BAD_REQUEST,
        "a name, not an address"
    );
    assert_eq!(
        status_of(&mut h2, Method::CONNECT, "127.0.0.4:80").await,
        StatusCode::BAD_REQUEST,
        "not the address the tunnel came to"
    );
    assert_eq!(
        status_of(&mut h2, Method::CONNECT, &format!("{B}:9")).await,
        StatusCode::UNAUTHORIZED,
        "denied by policy (certificate principal)"
    );
    let closed = TcpListener::bind((B, 0)).await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    assert_eq!(
        status_of(&mut h2, Method::CONNECT, &format!("{B}:{closed_port}")).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "pod refused"
    );
    // The same connection still serves.
    assert_eq!(
        status_of(&mut h2, Method::CONNECT, &ok).await,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_on_15008_closes_and_the_proxy_keeps_serving() {
    let s = setup("").await;
    // Not TLS.
    let mut raw = TcpStream::connect(s.inbound).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_all(&mut raw, Duration::from_secs(5)).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "plaintext must not be answered as HTTP"
    );
    // TLS without a client certificate.
    let ca = TestCa::new("other");
    let no_cert = rustls::ClientConfig::builder_with_provider(comb_proxy::hbone::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates({
            let mut r = rustls::RootCertStore::empty();
            r.add(rustls::pki_types::CertificateDer::from(ca.root_der.clone()))
                .unwrap();
            r
        })
        .with_no_client_auth();
    let tcp = TcpStream::connect(s.inbound).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(Arc::new(no_cert))
        .connect(comb_proxy::hbone::tls::server_name(s.inbound.ip()), tcp)
        .await;
    if let Ok(mut t) = r {
        // TLS 1.3: the client may finish first; the server's refusal arrives on read.
        let mut b = [0u8; 16];
        let n = t.read(&mut b).await.unwrap_or(0);
        assert_eq!(n, 0);
    }
    // Garbage after a good handshake: h2 expects its preface.
    let tls = TlsConfigs::new(mesh::store(&[&s.ca], &[s.ca.issue(&client_id())]));
    let cfg = tls.client(&client_id(), &web_id()).unwrap();
    let tcp = TcpStream::connect(s.inbound).await.unwrap();
    let mut t = tokio_rustls::TlsConnector::from(cfg)
        .connect(comb_proxy::hbone::tls::server_name(s.inbound.ip()), tcp)
        .await
        .unwrap();
    t.write_all(&[0xffu8; 256]).await.unwrap();
    let mut b = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut b)).await;
    // Still serving.
    assert_eq!(round_trip(s.client.addr, b"still").await, b"still");
    drop(s.echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_policy_applies_inside_the_tunnel_with_the_certificate_identity() {
    // DENY /admin/* to a/client (by certificate principal); everything else allowed.
    let policy = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/a/sa/client]}}]\n    to: [{operation: {paths: [\"/admin/*\"]}}]\n";
    let ca = TestCa::new("test-ca");
    let (srv, inbound) = server(mesh::store(&[&ca], &[ca.issue(&web_id())]), policy);
    let backend = Backend::start_on(B).await;
    let c = client(
        mesh::store(&[&ca], &[ca.issue(&client_id())]),
        inbound.port(),
        &web_id(),
        backend.addr,
    )
    .await;
    let stream = from_a(c.addr).await;
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = h1_send(&mut h1, "GET", "/admin/users", "").await;
    assert_eq!(r.status(), 403);
    assert_eq!(text(r).await, "RBAC: access denied");
    let r = h1_send(&mut h1, "POST", "/echo", "through the tunnel").await;
    assert_eq!(r.status(), 200);
    assert_eq!(text(r).await, "through the tunnel");
    let want = [
        "connection_security_policy=\"mutual_tls\"",
        "source_principal=\"spiffe://cluster.local/ns/a/sa/client\"",
        "response_code=\"403\"",
        "response_code=\"200\"",
    ];
    let mut m = String::new();
    for _ in 0..100 {
        m.clear();
        srv.telemetry().render_prometheus(&mut m);
        if want.iter().all(|w| m.contains(w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in want {
        assert!(m.contains(w), "{w} missing:\n{m}");
    }
    assert!(!m.contains("connection_security_policy=\"none\""), "{m}");
}

/// Sends a byte, reads its echo, then stays silent: the relay must close within 15 s.
async fn closes_when_silent(to: SocketAddr) {
    let mut s = from_a(to).await;
    s.write_all(b"\x00").await.unwrap();
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut b))
        .await
        .expect("echo in time")
        .unwrap();
    let t0 = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(15), s.read(&mut b))
        .await
        .expect("tunneled relay kept open while idle");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunneled_tcp_is_closed_by_either_side() {
    let ca = TestCa::new("test-ca");
    let echo = echo().await;
    let short = comb_proxy::Limits {
        tcp_idle_timeout: Duration::from_secs(1),
        ..comb_proxy::Limits::default()
    };
    // The receiving node's idle clock (delivery to the pod)...
    let (_server, inbound) = server_with(
        mesh::store(&[&ca], &[ca.issue(&web_id())]),
        "",
        short.clone(),
    );
    let c = client(
        mesh::store(&[&ca], &[ca.issue(&client_id())]),
        inbound.port(),
        &web_id(),
        echo.addr,
    )
    .await;
    closes_when_silent(c.addr).await;
    // ... and the sending node's (the tunnel stream).
    let (_server2, inbound2) = server(mesh::store(&[&ca], &[ca.issue(&web_id())]), "");
    let c2 = client_with(
        mesh::store(&[&ca], &[ca.issue(&client_id())]),
        inbound2.port(),
        &web_id(),
        echo.addr,
        short,
    )
    .await;
    closes_when_silent(c2.addr).await;
}

/// A pod's first flow can come before the node holds its certificate (it was just
/// scheduled; the CA answers in a moment): both sides wait for it instead of refusing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_flow_waits_for_certificates_still_being_issued() {
    let ca = TestCa::new("test-ca");
    let server_certs = mesh::store(&[&ca], &[]);
    let client_certs = mesh::store(&[&ca], &[]);
    let (_server, inbound) = server(server_certs.clone(), "");
    let echo = echo().await;
    let client = client(client_certs.clone(), inbound.port(), &web_id(), echo.addr).await;
    let issue = |store: &CertStore, cert: Arc<comb_identity::WorkloadCert>| {
        let cur = store.load();
        let mut set = (*cur).clone();
        set.generation += 1;
        set.certs.insert(cert.id.clone(), cert);
        store.store(Arc::new(set));
    };
    // The client's certificate arrives first, the server's later: the client's wait ends,
    // its handshake starts, and the server's side waits in turn.
    let (c, s) = (client_certs.clone(), server_certs.clone());
    let (client_cert, web_cert) = (ca.issue(&client_id()), ca.issue(&web_id()));
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        issue(&c, client_cert);
        tokio::time::sleep(Duration::from_millis(300)).await;
        issue(&s, web_cert);
    });
    let t0 = std::time::Instant::now();
    assert_eq!(round_trip(client.addr, b"first").await, b"first");
    assert!(
        t0.elapsed() >= Duration::from_millis(550),
        "{:?}",
        t0.elapsed()
    );
    late.await.unwrap();
    let c = client.ctx.hbone().unwrap().pool().counters();
    assert_eq!((c.full_handshakes, c.failures), (1, 0), "{c:?}");
}

/// A certificate that never comes: the flow is refused after the wait, not held forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_without_a_certificate_is_refused_after_the_wait() {
    let ca = TestCa::new("test-ca");
    let (_server, inbound) = server(mesh::store(&[&ca], &[ca.issue(&web_id())]), "");
    let echo = echo().await;
    let client = client(
        mesh::store(&[&ca], &[]),
        inbound.port(),
        &web_id(),
        echo.addr,
    )
    .await;
    let t0 = std::time::Instant::now();
    assert!(round_trip(client.addr, b"x").await.is_empty());
    let waited = t0.elapsed();
    let limit = comb_proxy::HboneOptions::default().cert_wait;
    assert!(
        waited >= limit && waited < limit + Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(client.ctx.hbone().unwrap().pool().counters().failures, 1);
}

/// A bare HBONE peer for B (h2 directly): reads what comes with a CONNECT for up to `wait`
/// before answering 200, then echoes. Returns its address and what it had received when it
/// answered.
async fn bare_peer(
    certs: CertStore,
    wait: Duration,
) -> (SocketAddr, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let l = TcpListener::bind(format!("{B}:0")).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let tls = TlsConfigs::new(certs);
        let cfg = tls.server(&web_id()).unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let stream = tokio_rustls::TlsAcceptor::from(cfg)
            .accept(tcp)
            .await
            .unwrap();
        let mut conn = h2::server::handshake(stream).await.unwrap();
        let (req, mut respond) = conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        assert_eq!(req.method(), Method::CONNECT);
        let mut body = req.into_body();
        let mut early = Vec::new();
        if let Ok(Some(Ok(b))) = tokio::time::timeout(wait, body.data()).await {
            let _ = body.flow_control().release_capacity(b.len());
            early.extend_from_slice(&b);
        }
        let mut send = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        send.send_data(Bytes::from(early.clone()), false).unwrap();
        let _ = tx.send(early);
        while let Some(Ok(b)) = body.data().await {
            let _ = body.flow_control().release_capacity(b.len());
            send.send_data(b, false).unwrap();
        }
        let _ = send.send_data(Bytes::new(), true);
        // Keep the connection until the client is done with it.
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_bytes_go_with_the_connect() {
    let ca = TestCa::new("test-ca");
    let (peer, early) = bare_peer(
        mesh::store(&[&ca], &[ca.issue(&web_id())]),
        Duration::from_secs(2),
    )
    .await;
    let dst: SocketAddr = format!("{B}:80").parse().unwrap();
    let client = client(
        mesh::store(&[&ca], &[ca.issue(&client_id())]),
        peer.port(),
        &web_id(),
        dst,
    )
    .await;
    let mut s = from_a(client.addr).await;
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let t = std::time::Instant::now();
    // The peer answers as soon as the bytes came with the CONNECT, and only after 2 s if
    // they were held back until its 200.
    let early = early.await.unwrap();
    assert_eq!(early, b"GET / HTTP/1.1\r\n\r\n");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
}

/// The value of the one `name` series whose labels contain every `labels` entry, if any.
fn series_value(metrics: &str, name: &str, labels: &[&str]) -> Option<u64> {
    let mut found = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)));
    let line = found.next()?;
    assert!(found.next().is_none(), "several {name} series match");
    line.rsplit(' ').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_flows_are_reported_by_the_source() {
    let s = setup("").await;
    // The source node knows the Service in front of the remote pod's port (a client that
    // dialled it had the address rewritten to the pod's at connect).
    let port = s.echo.addr.port();
    let service = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{ports: [{{port: 80, targetPort: {port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-abc, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: {port}}}]\nendpoints: [{{addresses: [{B}]}}]\n"
    );
    let with_service = client_of(
        mesh::store(&[&s.ca], &[s.ca.issue(&client_id())]),
        s.inbound.port(),
        &web_id(),
        s.echo.addr,
        comb_proxy::Limits::default(),
        &service,
    )
    .await;
    let msg: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    assert_eq!(round_trip(with_service.addr, &msg).await, msg);
    // A flow the peer cannot deliver (nothing listens on the pod's port): 503, reset.
    let closed = TcpListener::bind((B, 0)).await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let refused_client = client(
        mesh::store(&[&s.ca], &[s.ca.issue(&client_id())]),
        s.inbound.port(),
        &web_id(),
        closed_addr,
    )
    .await;
    assert!(round_trip(refused_client.addr, b"x").await.is_empty());

    let peers = [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "source_principal=\"spiffe://cluster.local/ns/a/sa/client\"",
        "destination_workload=\"web\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/web\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let ok: Vec<&str> = peers
        .iter()
        .copied()
        .chain([
            "response_flags=\"-\"",
            "destination_service=\"web.shop.svc.cluster.local\"",
        ])
        .collect();
    let uf: Vec<&str> = peers
        .iter()
        .copied()
        .chain(["response_flags=\"UF\"", "destination_service=\"unknown\""])
        .collect();
    let refused_open: Vec<&str> = peers
        .iter()
        .copied()
        .chain(["response_flags=\"-\"", "destination_service=\"unknown\""])
        .collect();
    let render = |ctx: &ProxyContext| {
        let mut m = String::new();
        ctx.telemetry().render_prometheus(&mut m);
        m
    };
    let closed_total = "istio_tcp_connections_closed_total";
    let mut m = String::new();
    for _ in 0..250 {
        m = render(&with_service.ctx);
        let r = render(&refused_client.ctx);
        if series_value(&m, closed_total, &ok) == Some(1)
            && series_value(&r, closed_total, &uf) == Some(1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        series_value(&m, "istio_tcp_connections_opened_total", &ok),
        Some(1),
        "{m}"
    );
    assert_eq!(series_value(&m, closed_total, &ok), Some(1), "{m}");
    // Istio's direction is the client's: received = from it, sent = back to it.
    assert_eq!(
        series_value(&m, "istio_tcp_received_bytes_total", &ok),
        Some(3000),
        "{m}"
    );
    assert_eq!(
        series_value(&m, "istio_tcp_sent_bytes_total", &ok),
        Some(3000),
        "{m}"
    );
    // The client's node served nothing itself: no destination-reported series there.
    assert!(!m.contains("reporter=\"destination\""), "{m}");
    // Counted open before its fate was known (flags `-`), closed with the failure's flag.
    let r = render(&refused_client.ctx);
    assert_eq!(
        series_value(&r, "istio_tcp_connections_opened_total", &refused_open),
        Some(1),
        "{r}"
    );
    assert_eq!(series_value(&r, closed_total, &uf), Some(1), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_closes_an_idle_tunnel_and_keeps_a_busy_one() {
    let limits = comb_proxy::Limits {
        downstream_idle_timeout: Duration::from_millis(400),
        ..comb_proxy::Limits::default()
    };
    // The client's pool would keep the connection for 60 s.
    let s = setup_with("", limits).await;
    let c = &s.client;
    let pool = c.ctx.hbone().unwrap().pool().clone();
    // A stream open (and silent) across several idle timeouts keeps its connection.
    let mut long = from_a(c.addr).await;
    let mut b = [0u8; 1];
    for byte in [b'a', b'b', b'c'] {
        long.write_all(&[byte]).await.unwrap();
        long.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], byte);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(pool.tunnels().len(), 1, "closed with a stream in flight");
    }
    drop(long);
    // No stream: the server drains it (GOAWAY) and the client's pool sees it closed.
    let mut gone = false;
    for _ in 0..150 {
        if pool.tunnels().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "idle tunnel still open: {:?}", pool.tunnels());
    // The next flow opens a new connection (resumed) and is served.
    assert_eq!(round_trip(c.addr, b"again").await, b"again");
    let n = pool.counters();
    assert_eq!(n.full_handshakes + n.resumptions, 2, "{n:?}");
    assert_eq!(n.failures, 0, "{n:?}");
}

/// Flows opened while the server drains an idle tunnel (its GOAWAY racing the client's
/// next CONNECT) are retried on a new connection: none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_racing_the_idle_drain_are_retried() {
    let limits = comb_proxy::Limits {
        downstream_idle_timeout: Duration::from_millis(30),
        ..comb_proxy::Limits::default()
    };
    let s = setup_with("", limits).await;
    for i in 0..150u32 {
        let msg = format!("flow {i}");
        assert_eq!(
            round_trip(s.client.addr, msg.as_bytes()).await,
            msg.as_bytes(),
            "flow {i}"
        );
        // Around the idle timeout, so some flows meet a connection being drained.
        tokio::time::sleep(Duration::from_millis(20 + u64::from(i % 3) * 10)).await;
    }
    let n = s.client.ctx.hbone().unwrap().pool().counters();
    eprintln!("{n:?}");
    assert!(
        n.full_handshakes + n.resumptions > 5,
        "the server drained: {n:?}"
    );
}
