//! A real IP_TRANSPARENT listener (privileged): in a throwaway network namespace, an
//! iptables TPROXY rule hands connections for 10.231.0.2:8080 to the proxy's 127.0.0.1
//! listener (what `bpf_sk_assign` does in the datapath); the proxy must accept them with the
//! original destination as local address and forward there.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use comb_model::l7::ProxyTable;
use comb_proxy::telemetry::{Telemetry, TelemetryOptions};
use comb_proxy::{Family, Proxy, ProxyOptions};

fn privileged(what: &str) -> bool {
    comb_host::privileged_test(&format!("{what} (netns, iptables TPROXY)"))
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth; deleting them removes the veth, rules and routes.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Moves the calling thread into network namespace `name`.
fn enter(name: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    // SAFETY: setns on a valid namespace fd affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// The client and proxy namespaces (10.231.0.1 and .2 on a veth); `t` tells tests apart.
fn lab(t: &str) -> (Netns, String, String, String) {
    let tag = format!("{:x}{t}", std::process::id() & 0xffff);
    let (cli, prx) = (format!("ctc-{tag}"), format!("ctp-{tag}"));
    let (vc, vp) = (format!("vc{tag}"), format!("vp{tag}"));
    sh(&["ip", "netns", "add", &cli]);
    let guard = Netns(vec![cli.clone(), prx.clone()]);
    sh(&["ip", "netns", "add", &prx]);
    sh(&[
        "ip", "link", "add", &vc, "netns", &cli, "type", "veth", "peer", "name", &vp, "netns", &prx,
    ]);
    nx(&cli, &["ip", "addr", "add", "10.231.0.1/24", "dev", &vc]);
    nx(&cli, &["ip", "link", "set", &vc, "up"]);
    nx(&prx, &["ip", "addr", "add", "10.231.0.2/24", "dev", &vp]);
    nx(&prx, &["ip", "link", "set", &vp, "up"]);
    nx(&prx, &["ip", "link", "set", "lo", "up"]);
    (guard, cli, prx, vp)
}

fn nx(ns: &str, a: &[&str]) {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(a);
    sh(&v);
}

/// TPROXY: connections for port 8080 arriving on `vp` go to the proxy's listener on `port`.
fn steer(prx: &str, vp: &str, port: u16) {
    let port = port.to_string();
    nx(
        prx,
        &["ip", "rule", "add", "fwmark", "0x1/0x1", "lookup", "100"],
    );
    nx(
        prx,
        &[
            "ip",
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ],
    );
    nx(
        prx,
        &[
            "iptables",
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-i",
            vp,
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "TPROXY",
            "--on-ip",
            "127.0.0.1",
            "--on-port",
            &port,
            "--tproxy-mark",
            "0x1/0x1",
        ],
    );
}

#[test]
fn tproxy_to_transparent_listener_keeps_original_destination() {
    if !privileged("transparent listener") {
        return;
    }
    let (_guard, cli, prx, vp) = lab("a");

    // The proxy and the backend live in the proxy namespace (threads inherit it).
    let (tx, rx) = std::sync::mpsc::channel();
    let prx2 = prx.clone();
    let proxy_thread = std::thread::spawn(move || {
        enter(&prx2);
        let backend = TcpListener::bind("10.231.0.2:8080").unwrap();
        let h = start_proxy(|_| {});
        let v4 = h.local_addrs()[0];
        // The listener really is transparent.
        let fds = h.listener_fds();
        let (fam, fd) = fds[0];
        assert_eq!(fam, Family::V4);
        let mut val: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd, out-pointers to a c_int and its length.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_IP,
                libc::IP_TRANSPARENT,
                (&mut val as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!((rc, val), (0, 1));
        tx.send(v4).unwrap();
        // Backend: one request, answers with the peer it saw.
        let (mut s, peer) = backend.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let body = format!("peer={}", peer.ip());
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut m = String::new();
        h.telemetry().render_prometheus(&mut m);
        h.shutdown(Duration::from_secs(1));
        m
    });
    let v4: SocketAddr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    steer(&prx, &vp, v4.port());

    let cli2 = cli.clone();
    let reply = std::thread::spawn(move || {
        enter(&cli2);
        let mut s =
            TcpStream::connect_timeout(&"10.231.0.2:8080".parse().unwrap(), Duration::from_secs(5))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /t HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .join()
    .unwrap();
    let metrics = proxy_thread.join().unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // The backend was reached by the proxy (from its own namespace), not by the client.
    assert!(reply.ends_with("peer=10.231.0.2"), "{reply}");
    assert!(metrics.contains("response_code=\"200\""), "{metrics}");
}

/// A transparent proxy on an ephemeral port in the calling thread's namespace, with the
/// default options changed by `tune`.
fn start_proxy(tune: impl FnOnce(&mut ProxyOptions)) -> comb_proxy::ProxyHandle {
    let tel = Telemetry::new(TelemetryOptions {
        access_log: None,
        otlp_endpoint: None,
        node: "n1".into(),
        service_name: "comb-proxy".into(),
        max_stats_routes: 10,
    });
    let mut opts = ProxyOptions::new(tel);
    opts.port = 0;
    opts.transparent = true;
    tune(&mut opts);
    Proxy::start(opts, Arc::new(ProxyTable::default())).unwrap()
}

/// Answers every request of a keep-alive connection with `ok`, one thread per connection.
fn ok_backend(l: TcpListener) {
    std::thread::spawn(move || {
        while let Ok((mut s, _)) = l.accept() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(r).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
}

/// One GET on a keep-alive connection; the response, or the read error.
fn get(s: &mut TcpStream) -> std::io::Result<String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")?;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !out.ends_with(b"\r\n\r\nok") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn connections_beyond_the_cap_wait_in_the_backlog() {
    if !privileged("connection cap") {
        return;
    }
    let (_guard, cli, prx, vp) = lab("m");
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let prx2 = prx.clone();
    let proxy_thread = std::thread::spawn(move || {
        enter(&prx2);
        ok_backend(TcpListener::bind("10.231.0.2:8080").unwrap());
        let h = start_proxy(|o| o.limits.max_connections = 2);
        tx.send((h.local_addrs()[0], h.active_connections()))
            .unwrap();
        let _ = done_rx.recv_timeout(Duration::from_secs(60));
        let active = h.active_connections();
        h.shutdown(Duration::from_millis(200));
        active
    });
    let (v4, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    steer(&prx, &vp, v4.port());

    let cli2 = cli.clone();
    let clients = std::thread::spawn(move || {
        enter(&cli2);
        let dst: SocketAddr = "10.231.0.2:8080".parse().unwrap();
        let connect = || {
            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        };
        let mut a = connect();
        let mut b = connect();
        assert!(get(&mut a).unwrap().starts_with("HTTP/1.1 200"));
        assert!(get(&mut b).unwrap().starts_with("HTTP/1.1 200"));
        // At the cap: the kernel completes the handshake (backlog), the proxy does not serve.
        let mut c = connect();
        c.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let waiting = get(&mut c).map_err(|e| e.kind());
        assert!(
            matches!(
                waiting,
                Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
            ),
            "served beyond the cap: {waiting:?}"
        );
        // One leaves: the waiting connection is accepted and its request answered.
        drop(a);
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nok") {
            let n = c.read(&mut buf).expect("waiting connection served");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
        assert!(get(&mut b).unwrap().starts_with("HTTP/1.1 200"));
        // Kept open until the proxy counted them.
        (b, c)
    })
    .join()
    .unwrap();
    let open = {
        let _still_open = &clients;
        done_tx.send(()).unwrap();
        proxy_thread.join().unwrap()
    };
    assert_eq!(open, 2, "b and c are served");
}

/// Answers one upgrade request with 101, then echoes bytes, one thread per connection.
fn upgrade_echo_backend(l: TcpListener) {
    std::thread::spawn(move || {
        while let Ok((mut s, _)) = l.accept() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let r = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n";
                if s.write_all(r).is_err() {
                    return;
                }
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// An upgraded connection outlives the HTTP connection it came from: a shutting-down proxy
/// counts it and keeps relaying it for the grace period (a draining agent must not cut
/// WebSockets once its plain HTTP connections are done).
#[test]
fn shutdown_waits_for_upgraded_tunnels() {
    if !privileged("upgraded tunnels at shutdown") {
        return;
    }
    let (_guard, cli, prx, vp) = lab("u");
    let (tx, rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let prx2 = prx.clone();
    let proxy_thread = std::thread::spawn(move || {
        enter(&prx2);
        upgrade_echo_backend(TcpListener::bind("10.231.0.2:8080").unwrap());
        let h = start_proxy(|_| {});
        tx.send(h.local_addrs()[0]).unwrap();
        go_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let counted = h.active_connections();
        let started = std::time::Instant::now();
        let cut = h.shutdown(Duration::from_secs(3));
        (counted, cut, started.elapsed())
    });
    let v4 = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    steer(&prx, &vp, v4.port());

    enter(&cli);
    let mut s =
        TcpStream::connect_timeout(&"10.231.0.2:8080".parse().unwrap(), Duration::from_secs(5))
            .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed before the 101");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    let echo = |s: &mut TcpStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).expect("echo through the tunnel");
        assert_eq!(got, msg);
    };
    echo(&mut s, b"before");
    go_tx.send(()).unwrap();
    // The proxy is shutting down now, with no HTTP connection left: the tunnel still works.
    std::thread::sleep(Duration::from_millis(500));
    echo(&mut s, b"during the grace period");
    drop(s);
    let (counted, cut, took) = proxy_thread.join().unwrap();
    assert_eq!(counted, 1, "the tunnel is a connection being served");
    assert_eq!(cut, 0, "the tunnel ended within the grace period");
    assert!(took < Duration::from_secs(3), "shutdown waited {took:?}");
}
