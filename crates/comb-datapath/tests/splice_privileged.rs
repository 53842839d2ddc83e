//! Privileged end-to-end test of the splice datapath on loopback, inside a throwaway child
//! cgroup. Needs root (BPF, cgroup2, bpffs). Without privileges it fails under CI=true and is
//! skipped with a notice otherwise.

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use comb_datapath::splice::abi::SockKey;
use comb_datapath::{Backpressure, Datapath, DatapathOptions, EndpointInfo};
use common::{CgroupChild, CgroupGuard, PinGuard, bpftool_cgroup_show};

const SERVER: &str = r#"
import socket, sys, threading
def echo(c):
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        c.sendall(d)
    c.close()
host = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

// Sends and receives concurrently so 4 MiB cannot deadlock on full buffers.
const CLIENT: &str = r#"
import os, socket, sys, threading
src = (sys.argv[3], 0) if len(sys.argv) > 3 else None
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), source_address=src)
print("connected", c.getsockname()[1], flush=True)
sys.stdin.readline()
for n in (1, 64 << 10, 4 << 20):
    data = os.urandom(n)
    t = threading.Thread(target=c.sendall, args=(data,))
    t.start()
    got = bytearray()
    while len(got) < n:
        d = c.recv(min(1 << 20, n - len(got)))
        if not d:
            sys.exit("eof after %d of %d bytes" % (len(got), n))
        got += d
    t.join()
    if bytes(got) != data:
        sys.exit("payload of %d bytes came back different" % n)
    print("ok", n, flush=True)
print("done", flush=True)
sys.stdin.readline()
c.close()
print("closed", flush=True)
"#;

fn privileged() -> bool {
    common::privileged("splice")
}

/// A helper process joined to the test cgroup; killed on drop.
struct Helper(CgroupChild);

impl Helper {
    fn spawn(cgroup: &Path, script: &str, args: &[&str]) -> Self {
        Self(CgroupChild::spawn(cgroup, None, script, args))
    }

    fn line(&mut self) -> String {
        self.0.line(
            Duration::from_secs(30),
            "helper gave no output line in time",
        )
    }

    fn go(&mut self) {
        let stdin = &mut self.0.stdin;
        stdin
            .write_all(b"\n")
            .and_then(|()| stdin.flush())
            .expect("writing to helper");
    }
}

/// A datapath on fresh pins, for tests that put sockets into the sockhash themselves.
fn fresh_datapath() -> (PinGuard, Datapath) {
    comb_host::ensure_bpffs().expect("bpffs");
    let mount = comb_host::cgroup2_mount().expect("cgroup2 mount");
    let pins = PinGuard::fresh();
    let dp = Datapath::load(DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: mount,
    })
    .expect("loading datapath");
    (pins, dp)
}

/// A connected (client, server) pair on 127.0.0.1.
fn loopback_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// Backpressure tests: `bounds` set (and read back), then a loopback pair with both ends
/// spliced; the server side times reads out after 10 s.
fn spliced_pair_with(
    dp: &Datapath,
    bounds: Backpressure,
) -> (std::net::TcpStream, std::net::TcpStream) {
    dp.splice().set_backpressure(bounds).unwrap();
    assert_eq!(dp.splice().backpressure().unwrap(), bounds);
    let (client, server) = loopback_pair();
    dp.splice().splice_socket(&client).unwrap();
    dp.splice().splice_socket(&server).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (client, server)
}

/// Once the test's sockets are closed: the sockhash empties, and unloading leaves no pin.
fn unload_after_close(dp: Datapath, pins: PinGuard) {
    wait_for("the sockhash to empty after close", || {
        dp.splice().stats().unwrap().sockets == 0
    });
    dp.shutdown(false).unwrap();
    assert!(!pins.0.exists());
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn splice_echo_on_loopback_v4() {
    if privileged() {
        splice_echo(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
}

/// The same over ::1: sockops and sk_msg read the IPv6 context fields.
#[test]
fn splice_echo_on_loopback_v6() {
    if privileged() {
        splice_echo(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
    }
}

fn splice_echo(lo: IpAddr) {
    comb_host::ensure_bpffs().expect("bpffs");
    let mount = comb_host::cgroup2_mount().expect("cgroup2 mount");
    // Declaration order = reverse drop order: helpers die first, the cgroup goes last.
    let cg = CgroupGuard::new(&mount);
    let pins = PinGuard::fresh();
    let cg_rel = cg.0.strip_prefix(&mount).unwrap().to_path_buf();

    let dp = Datapath::load(DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: mount.clone(),
    })
    .expect("loading datapath");
    dp.splice().set_enabled(true).unwrap();
    assert!(dp.splice().enabled().unwrap());
    dp.splice()
        .upsert_endpoint(lo, EndpointInfo { splice: true })
        .unwrap();
    assert_eq!(
        dp.splice().endpoints().unwrap(),
        vec![(lo, EndpointInfo { splice: true })]
    );
    dp.splice().attach_cgroup("test-pod", &cg_rel).unwrap();
    dp.splice()
        .attach_cgroup("test-pod", &cg_rel)
        .expect("attach is idempotent");
    assert_eq!(
        dp.splice().attached(),
        vec![("test-pod".to_string(), cg_rel.clone())]
    );
    assert!(pins.0.join("links/test-pod").exists());
    assert!(bpftool_cgroup_show(&cg.0).contains("sock_ops"));

    let host = lo.to_string();
    let mut server = Helper::spawn(&cg.0, SERVER, &[&host]);
    let port: u16 = server.line().trim().parse().expect("server port");
    let mut client = Helper::spawn(&cg.0, CLIENT, &[&host, &port.to_string()]);
    let line = client.line();
    let cport: u16 = line
        .strip_prefix("connected ")
        .and_then(|p| p.parse().ok())
        .expect("client port");

    // Both ends are in the sockhash under the keys the BPF side built: this checks the port
    // byte order of the sockops context (local host order, remote network order).
    let client_key = SockKey::new(SocketAddr::new(lo, cport), SocketAddr::new(lo, port));
    wait_for("both sockets in the sockhash", || {
        dp.splice().stats().unwrap().sockets == 2
    });
    let mut keys = dp.splice().spliced_sockets().unwrap();
    keys.sort_by_key(|k| k.local_port);
    let mut want = vec![client_key, client_key.peer()];
    want.sort_by_key(|k| k.local_port);
    assert_eq!(keys, want);

    client.go();
    for n in [1, 64 << 10, 4 << 20] {
        assert_eq!(client.line(), format!("ok {n}"));
    }
    assert_eq!(client.line(), "done");

    let stats = dp.splice().stats().unwrap();
    eprintln!("splice stats after echo over {lo}: {stats:?}");
    let payload: u64 = 1 + (64 << 10) + (4 << 20);
    assert_eq!(stats.sockets, 2);
    assert_eq!(stats.sockets_added, 2);
    assert_eq!(stats.add_failures, 0);
    assert_eq!(stats.sticky_failures, 0);
    // Each byte went client -> server and back, all of it redirected.
    assert_eq!(stats.redirected_bytes, 2 * payload, "{stats:?}");
    assert_eq!(stats.passed_bytes, 0, "{stats:?}");

    client.go();
    assert_eq!(client.line(), "closed");
    wait_for("the sockhash to empty after close", || {
        dp.splice().stats().unwrap().sockets == 0
    });
    wait_for("both closes counted", || {
        dp.splice().stats().unwrap().sockets_closed == 2
    });
    drop(client);
    drop(server);

    dp.splice().detach_cgroup("test-pod").unwrap();
    assert!(dp.splice().attached().is_empty());
    assert!(!pins.0.join("links/test-pod").exists());
    dp.splice().attach_cgroup("test-pod", &cg_rel).unwrap();
    dp.shutdown(false).expect("shutdown");
    assert!(!pins.0.exists(), "pins left behind: {}", pins.0.display());
    let shown = bpftool_cgroup_show(&cg.0);
    assert!(!shown.contains("sock_ops"), "still attached:\n{shown}");
}

#[test]
fn restart_adopts_pins() {
    if !privileged() {
        return;
    }
    comb_host::ensure_bpffs().expect("bpffs");
    let mount = comb_host::cgroup2_mount().expect("cgroup2 mount");
    let cg = CgroupGuard::new(&mount);
    let pins = PinGuard::fresh();
    let cg_rel = cg.0.strip_prefix(&mount).unwrap().to_path_buf();
    let opts = || DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: mount.clone(),
    };
    let ip: IpAddr = "fd00::7".parse().unwrap();

    let dp = Datapath::load(opts()).expect("first load");
    dp.splice().set_enabled(true).unwrap();
    dp.splice()
        .upsert_endpoint(ip, EndpointInfo { splice: false })
        .unwrap();
    dp.splice().attach_cgroup("pod-a", &cg_rel).unwrap();
    dp.shutdown(true).unwrap();
    assert!(
        bpftool_cgroup_show(&cg.0).contains("sock_ops"),
        "pinned link must survive the agent"
    );

    let dp = Datapath::load(opts()).expect("second load adopts pins");
    assert!(dp.splice().enabled().unwrap());
    assert_eq!(
        dp.splice().endpoints().unwrap(),
        vec![(ip, EndpointInfo { splice: false })]
    );
    assert_eq!(
        dp.splice().attached(),
        vec![("pod-a".to_string(), cg_rel.clone())]
    );
    dp.splice().remove_endpoint(ip).unwrap();
    dp.splice()
        .remove_endpoint(ip)
        .expect("removing a missing endpoint is fine");
    assert!(dp.splice().endpoints().unwrap().is_empty());
    // Re-attaching under the same id replaces the adopted link rather than adding one.
    dp.splice().attach_cgroup("pod-a", &cg_rel).unwrap();
    assert_eq!(bpftool_cgroup_show(&cg.0).matches("sock_ops").count(), 1);
    dp.shutdown(false).unwrap();
    assert!(!pins.0.exists());
    assert!(!bpftool_cgroup_show(&cg.0).contains("sock_ops"));
}

/// The TCP-first rule, driven deterministically from this process: a socket that sent over
/// TCP while its peer was not spliced keeps using TCP after the peer joins the sockhash, so the
/// receiver reads in order; the peer (which never sent over TCP) is redirected.
#[test]
fn tcp_first_is_sticky() {
    use std::io::Read;
    use std::net::TcpStream;

    if !privileged() {
        return;
    }
    let (pins, dp) = fresh_datapath();

    let (mut client, mut server) = loopback_pair();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let read_n = |s: &mut TcpStream, n: usize| {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).expect("read");
        b
    };

    dp.splice().splice_socket(&client).unwrap();
    client.write_all(b"A").unwrap(); // peer not spliced: TCP, and now sticky
    dp.splice().splice_socket(&server).unwrap();
    client.write_all(b"B").unwrap(); // must stay on TCP
    assert_eq!(read_n(&mut server, 2), b"AB");
    let s = dp.splice().stats().unwrap();
    assert_eq!((s.passed_msgs, s.redirected_msgs), (2, 0), "{s:?}");

    server.write_all(b"C").unwrap(); // server never used TCP: redirected
    assert_eq!(read_n(&mut client, 1), b"C");
    let s = dp.splice().stats().unwrap();
    assert_eq!(
        (s.passed_msgs, s.redirected_msgs, s.redirected_bytes),
        (2, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.sockets, 2);

    drop((client, server));
    unload_after_close(dp, pins);
}

/// The node proxy's connections to pods: its end joins because its remote is a local
/// endpoint, the pod's end (whose remote, the node's address, is not one) joins because its
/// other end did. An accepted socket whose own address is not an endpoint (the proxy's end of
/// a flow to a remote pod) stays out, and so does a connection between two non-endpoints.
#[test]
fn the_other_end_of_an_endpoint_connection_joins() {
    if !privileged() {
        return;
    }
    comb_host::ensure_bpffs().expect("bpffs");
    let mount = comb_host::cgroup2_mount().expect("cgroup2 mount");
    let cg = CgroupGuard::new(&mount);
    let pins = PinGuard::fresh();
    let cg_rel = cg.0.strip_prefix(&mount).unwrap().to_path_buf();
    let dp = Datapath::load(DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: mount.clone(),
    })
    .expect("loading datapath");
    dp.splice().set_enabled(true).unwrap();
    // 127.0.0.2 is the "pod"; 127.0.0.1 (the "node") and 127.0.0.3 (a "remote pod") are not
    // endpoints.
    let pod: IpAddr = "127.0.0.2".parse().unwrap();
    dp.splice()
        .upsert_endpoint(pod, EndpointInfo { splice: true })
        .unwrap();
    dp.splice().attach_cgroup("test-pod", &cg_rel).unwrap();

    let run = |server_ip: &str, client_src: &str| -> (u64, u64) {
        let before = dp.splice().stats().unwrap();
        let mut server = Helper::spawn(&cg.0, SERVER, &[server_ip]);
        let port: u16 = server.line().trim().parse().expect("server port");
        let mut client = Helper::spawn(&cg.0, CLIENT, &[server_ip, &port.to_string(), client_src]);
        assert!(client.line().starts_with("connected "));
        client.go();
        for n in [1, 64 << 10, 4 << 20] {
            assert_eq!(client.line(), format!("ok {n}"));
        }
        assert_eq!(client.line(), "done");
        let after = dp.splice().stats().unwrap();
        client.go();
        assert_eq!(client.line(), "closed");
        drop(client);
        drop(server);
        (
            after.sockets_added - before.sockets_added,
            after.redirected_bytes - before.redirected_bytes,
        )
    };
    let payload: u64 = 1 + (64 << 10) + (4 << 20);
    // "Proxy upstream": node -> pod. Both ends join, every byte is redirected.
    assert_eq!(run("127.0.0.2", "127.0.0.1"), (2, 2 * payload));
    // "HBONE outbound": pod -> remote pod. The accepted end's own address is no endpoint.
    assert_eq!(run("127.0.0.3", "127.0.0.2"), (0, 0));
    // Neither end is an endpoint.
    assert_eq!(run("127.0.0.3", "127.0.0.1"), (0, 0));
    dp.shutdown(false).expect("shutdown");
}

/// Backpressure: the kernel's redirect queues on the peer without bound, so a peer that does not
/// read would let its sender queue until sendmsg fails with ENOMEM. Past the queue limit the
/// sender moves to TCP and blocks there as TCP does; the reader then gets every byte in order,
/// the redirected ones first.
#[test]
fn a_peer_that_does_not_read_pushes_its_sender_to_tcp() {
    use std::io::{ErrorKind, Read};

    if !privileged() {
        return;
    }
    let (pins, dp) = fresh_datapath();
    const LIMIT: u64 = 1 << 20;
    const CHUNK: usize = 64 << 10;
    // The stall rule out of the way (a long time): only the full queue moves the sender.
    let (mut client, mut server) = spliced_pair_with(
        &dp,
        Backpressure {
            queue_limit: LIMIT as u32,
            stall_limit: LIMIT as u32,
            stall_ms: 600_000,
        },
    );

    // The byte at stream offset i is (i / 4) as u32, little-endian, byte i % 4: any loss,
    // duplicate or reordering shows.
    let pattern = |from: u64, len: usize| -> Vec<u8> {
        (from..from + len as u64)
            .map(|i| ((i / 4) as u32).to_le_bytes()[(i % 4) as usize])
            .collect()
    };

    // Write without blocking until the kernel says the buffers are full.
    client.set_nonblocking(true).unwrap();
    let mut sent: u64 = 0;
    loop {
        assert!(
            sent < 512 << 20,
            "512 MiB accepted by a peer that reads nothing: no backpressure"
        );
        let chunk = pattern(sent, CHUNK);
        match client.write(&chunk) {
            Ok(n) => {
                // The next chunk starts at the new offset, so a short write loses nothing.
                sent += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write after {sent} bytes: {e}"),
        }
    }
    let s = dp.splice().stats().unwrap();
    eprintln!("sender blocked after {sent} bytes; {s:?}");
    assert_eq!((s.queue_fallbacks, s.stall_fallbacks), (1, 0), "{s:?}");
    assert!(s.max_unread >= LIMIT, "{s:?}");
    assert!(s.passed_bytes > 0, "TCP took the rest: {s:?}");
    // What the peer holds: the limit, one more message, and what TCP buffers (the sender's
    // send buffer and the receiver's window, a few MiB at most with default sysctls).
    assert!(sent >= LIMIT, "blocked before the limit: {sent}");
    assert!(
        sent <= LIMIT + CHUNK as u64 + (24 << 20),
        "{sent} bytes queued for a peer that reads nothing"
    );

    // The reader gets everything in order, then more bytes (now over TCP) follow them.
    let mut got = vec![0u8; sent as usize];
    server
        .read_exact(&mut got)
        .expect("reading what was queued");
    assert!(got == pattern(0, sent as usize), "bytes lost or reordered");
    client.set_nonblocking(false).unwrap();
    let more = pattern(sent, CHUNK);
    client.write_all(&more).unwrap();
    let mut got = vec![0u8; CHUNK];
    server.read_exact(&mut got).unwrap();
    assert!(got == more, "bytes after the switch lost or reordered");
    let after = dp.splice().stats().unwrap();
    assert_eq!(
        after.redirected_bytes, s.redirected_bytes,
        "the sender went back to redirecting: {after:?}"
    );

    // The other direction was never over the limit: it still redirects.
    server.write_all(b"pong").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 4];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
    let last = dp.splice().stats().unwrap();
    assert_eq!(
        last.redirected_bytes,
        after.redirected_bytes + 4,
        "{last:?}"
    );

    drop((client, server));
    unload_after_close(dp, pins);
}

/// A peer that stops reading while its sender sends slowly: the queue never gets near the full
/// limit, but once it has stayed over the stall limit for the stall time the sender moves to
/// TCP; a peer that reads in time keeps its sender spliced.
#[test]
fn a_stalled_peer_moves_a_slow_sender_to_tcp() {
    use std::io::Read;

    if !privileged() {
        return;
    }
    let (pins, dp) = fresh_datapath();
    const STALL: usize = 256 << 10;
    let (mut client, mut server) = spliced_pair_with(
        &dp,
        Backpressure {
            queue_limit: 64 << 20,
            stall_limit: STALL as u32,
            stall_ms: 300,
        },
    );
    let drain = |server: &mut std::net::TcpStream, n: usize| {
        let mut b = vec![0u8; n];
        server.read_exact(&mut b).unwrap();
        b
    };

    // Over the stall limit, then read back under it within the stall time: still spliced.
    let block = vec![7u8; STALL + (16 << 10)];
    client.write_all(&block).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    client.write_all(b"x").unwrap(); // judged while over: the clock starts
    assert_eq!(drain(&mut server, block.len() + 1).len(), block.len() + 1);
    client.write_all(b"y").unwrap(); // judged under: the clock stops
    assert_eq!(drain(&mut server, 1), b"y");
    std::thread::sleep(Duration::from_millis(400));
    client.write_all(b"z").unwrap();
    assert_eq!(drain(&mut server, 1), b"z");
    let s = dp.splice().stats().unwrap();
    assert_eq!((s.queue_fallbacks, s.stall_fallbacks), (0, 0), "{s:?}");
    assert_eq!(s.passed_bytes, 0, "{s:?}");

    // Over the stall limit and left there: small sends keep being redirected until the stall
    // time has passed, then go over TCP, after the queued bytes.
    client.write_all(&block).unwrap();
    let mut sent = block.len();
    let t = Instant::now();
    while dp.splice().stats().unwrap().stall_fallbacks == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no stall fallback after 5 s"
        );
        client.write_all(&[b'a'; 100]).unwrap();
        sent += 100;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "moved before the stall time"
    );
    let redirected = dp.splice().stats().unwrap().redirected_bytes;
    client.write_all(b"tail").unwrap();
    sent += 4;
    let got = drain(&mut server, sent);
    assert!(got.ends_with(b"tail"), "bytes reordered after the switch");
    assert_eq!(got[..block.len()], block[..]);
    let s = dp.splice().stats().unwrap();
    assert_eq!(s.redirected_bytes, redirected, "{s:?}");
    assert!(s.passed_bytes >= 4, "{s:?}");

    drop((client, server));
    unload_after_close(dp, pins);
}
