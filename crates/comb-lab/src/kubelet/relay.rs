//! The API server as a node sees it: a TCP relay listening on `127.0.0.1:<port>` inside the
//! node's network namespace, forwarding to the control plane on the machine's own loopback at
//! the same port. The node's agents then use the very kubeconfig `kubectl` uses on the host
//! (the serving certificate names 127.0.0.1), and nothing but loopbacks is involved.
//!
//! The listening socket is made on a thread that entered the node's namespace; a socket
//! keeps the namespace it was made in, so the thread goes back and every connection to the
//! API server is made from the machine's namespace.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};

/// Bind the relay in `netns` and serve it on background threads; returns once it listens.
pub fn start(netns: &str, port: u16) -> Result<()> {
    let here = std::fs::File::open("/proc/thread-self/ns/net").context("opening own netns")?;
    let there = crate::netns::open(netns)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    let netns_name = netns.to_owned();
    std::thread::Builder::new()
        .name("api-relay".into())
        .spawn(move || {
            let listener = (|| -> Result<TcpListener> {
                setns(there.as_fd(), CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering {netns_name}"))?;
                let l = TcpListener::bind(addr)
                    .with_context(|| format!("binding {addr} in {netns_name}"));
                setns(here.as_fd(), CloneFlags::CLONE_NEWNET).context("leaving the node netns")?;
                l
            })();
            match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    serve(l, addr);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    rx.recv().context("the relay thread ended")?
}

fn serve(listener: TcpListener, upstream: SocketAddr) {
    for conn in listener.incoming() {
        let Ok(down) = conn else { continue };
        match TcpStream::connect(upstream) {
            Ok(up) => {
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                pipe(down, up);
            }
            Err(e) => tracing::warn!(error = %e, "API relay: connecting to {upstream}"),
        }
    }
}

/// Copy both ways on two threads; each direction's end is passed on as a half-close.
fn pipe(a: TcpStream, b: TcpStream) {
    let spawn = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        })
    };
    match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => {
            spawn(a, b2);
            spawn(b, a2);
        }
        _ => tracing::warn!("API relay: cannot clone a socket"),
    }
}
