//! HBONE with the original source address (privileged): in a throwaway network namespace
//! holding pod A's (10.232.0.2) and pod B's (10.232.0.3) addresses, the client side opens its
//! pooled connection from A's address (IP_TRANSPARENT) and the server side delivers the
//! stream from the tunnel's peer address with the delivery mark: pod B must see A's address
//! as its peer, not the node's.

mod common;

use std::os::fd::AsFd;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use comb_proxy::{ListenerKind, Proxy, ProxyContext, serve_outbound};
use common::mesh::{self, TestCa};
use common::options;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

const A: &str = "10.232.0.2";
const B: &str = "10.232.0.3";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deleting the namespace removes its addresses with it.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn table(node: &str) -> comb_model::l7::ProxyTable {
    let m = format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: a}}
spec: {{nodeName: n1, serviceAccountName: client, containers: []}}
status: {{podIP: {A}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: shop}}
spec: {{nodeName: n2, serviceAccountName: web, containers: []}}
status: {{podIP: {B}}}
"
    );
    let docs = comb_config::parse_file_text(std::path::Path::new("m.yaml"), &m).unwrap();
    let snap = comb_config::build_snapshot(&docs).unwrap();
    let ids = comb_model::identity::IdentityAllocator::default().resolve(
        &snap,
        node,
        &comb_model::policy_compile::policy_cidrs(&snap),
    );
    comb_model::l7::compile_proxy_table(&snap, 1, &ids, node)
}

#[test]
fn pod_sees_the_original_source_address() {
    if !comb_host::privileged_test("HBONE original source (netns, IP_TRANSPARENT, SO_MARK)") {
        return;
    }
    let ns = format!("chb-{:x}", std::process::id() & 0xffff);
    sh(&["ip", "netns", "add", &ns]);
    let _guard = Netns(ns.clone());
    let nx = |a: &[&str]| {
        let mut v = vec!["ip", "netns", "exec", &ns];
        v.extend_from_slice(a);
        sh(&v);
    };
    nx(&["ip", "link", "set", "lo", "up"]);
    nx(&["ip", "addr", "add", &format!("{A}/32"), "dev", "lo"]);
    nx(&["ip", "addr", "add", &format!("{B}/32"), "dev", "lo"]);
    let ns2 = ns.clone();
    let seen = std::thread::spawn(move || {
        // Threads (the runtimes' workers) created from here on live in the namespace.
        let f = std::fs::File::open(format!("/var/run/netns/{ns2}")).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run())
    })
    .join()
    .unwrap();
    assert_eq!(
        seen.0, A,
        "pod B must see pod A's address as its peer (opaque TCP)"
    );
    assert!(
        seen.1.starts_with("HTTP/1.1 200") && seen.1.ends_with(A),
        "HTTP inside the tunnel must reach pod B from pod A's address too: {:?}",
        seen.1
    );
}

async fn run() -> (String, String) {
    let ca = TestCa::new("test-ca");
    let web = mesh::id("shop", "web");
    let client = mesh::id("a", "client");
    // Pod B: answers with the peer address it sees.
    let pod_b = TcpListener::bind((B, 0)).await.unwrap();
    let pod_b_addr = pod_b.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = pod_b.accept().await {
            let _ = s.write_all(peer.ip().to_string().as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    // Pod B's HTTP port: answers every request with the peer address it sees.
    let pod_b_http = TcpListener::bind((B, 0)).await.unwrap();
    let pod_b_http_addr = pod_b_http.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = pod_b_http.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let body = peer.ip().to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    // Server node.
    let mut t = table("n2");
    mesh::local(&mut t, B, &web);
    let mut o = options(comb_proxy::Limits::default());
    o.hbone.enabled = true;
    o.hbone.outbound_port = 0;
    o.hbone.inbound_addr = format!("{B}:0").parse().unwrap();
    o.port = 0;
    o.certs = mesh::store(&[&ca], &[ca.issue(&web)]);
    let server = Proxy::start(o, Arc::new(t)).unwrap();
    let inbound = server.addrs(ListenerKind::HboneInbound)[0];
    // Client node (original source on: the pool binds A's address).
    let mut t = table("n1");
    mesh::local(&mut t, A, &client);
    mesh::peer(&mut t, B, &web);
    let mut o = options(comb_proxy::Limits::default());
    o.hbone.enabled = true;
    o.hbone.peer_port = inbound.port();
    o.certs = mesh::store(&[&ca], &[ca.issue(&client)]);
    let ctx = ProxyContext::new(&o, Arc::new(t));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let l_http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr_http = l_http.local_addr().unwrap();
    let ctx2 = ctx.clone();
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            tokio::spawn(serve_outbound(s, peer, pod_b_addr, ctx.clone()));
        }
    });
    tokio::spawn(async move {
        while let Ok((s, peer)) = l_http.accept().await {
            tokio::spawn(serve_outbound(s, peer, pod_b_http_addr, ctx2.clone()));
        }
    });
    // Pod A's flow (from A's address, as the transparent listener would accept it).
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{A}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut got))
        .await
        .expect("answer in time")
        .unwrap();
    // An HTTP request through the tunnel (served by the proxy's HTTP path on the far side).
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{A}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(addr_http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut http = Vec::new();
    let mut b = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&http).ends_with(A) {
        let n = tokio::time::timeout_at(deadline, s.read(&mut b))
            .await
            .expect("HTTP answer in time")
            .unwrap();
        if n == 0 {
            break;
        }
        http.extend_from_slice(&b[..n]);
    }
    let tunnels = server.tunnel_stats();
    assert_eq!(tunnels.inbound.streams, 2, "{tunnels:?}");
    drop(server);
    (got, String::from_utf8_lossy(&http).into_owned())
}
