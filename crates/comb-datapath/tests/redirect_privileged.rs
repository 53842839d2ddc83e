//! Privileged tests of the transparent redirect to the node L7 proxy (`bpf/policy.c` step 6b,
//! docs/l7.md): real TCP between two pods (network namespaces) behind a node namespace, the
//! policy programs on their host veths, a transparent listener in the node namespace in
//! `comb_proxy_listeners`, and the proxy's policy routing (`policy::routing`) in the node
//! namespace. Nothing is attached, addressed or routed outside the namespaces the tests
//! create. Needs root; without it fails under CI=true and is skipped with a notice otherwise.

#[allow(dead_code)] // shared with the cgroup-based tests
mod common;
#[allow(dead_code)] // the policy tests' helpers; these tests use the namespace ones
mod policy_support;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comb_datapath::policy::abi::{ID_ANY, ID_HOST};
use comb_datapath::policy::routing;
use comb_datapath::{
    Datapath, DatapathOptions, IpcacheEntry, PolicyKey, PolicyMetric, PolicyValue, ProxyFamily,
};
use comb_model::terms::{Direction, Reason, Verdict};
use policy_support::{InNetns, Netns, ifindex, two_pod_node, two_pod_node_v6};

use Direction::{Egress, Ingress};

const TCP: u8 = 6;
const GW: &str = "198.18.1.1";
const POD_A: &str = "198.18.1.2";
const POD_B: &str = "198.18.1.3";
const ID_A: u32 = 300;
const ID_B: u32 = 301;
const PROXY_PORT: u16 = 15006;
/// B's REDIRECT port and a port without REDIRECT.
const L7_PORT: u16 = 8080;
const PLAIN_PORT: u16 = 9090;
const MIB: usize = 1 << 20;
const GW6: &str = "fd00:5::1";
const POD_A6: &str = "fd00:5::2";
const POD_B6: &str = "fd00:5::3";

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip4(ip), port))
}

/// The calling thread joins network namespace `name` for the rest of its life (threads made
/// for that purpose only).
fn join_netns(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).expect("opening the netns");
    // SAFETY: valid fd of a network namespace file.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// Run `f` on a thread inside namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let name = ns.0.clone();
    std::thread::spawn(move || {
        join_netns(&name);
        f()
    })
    .join()
    .expect("thread in the netns")
}

/// A node namespace with pods A and B (namespaces) on veths `lxc1`/`lxc2`, routed like the
/// lab: pod `eth0` with a /32 and a default route via the gateway address on every host veth.
/// IPv6 off everywhere.
struct Lab {
    a: Netns,
    b: Netns,
    node: Netns,
}

impl Lab {
    fn new() -> Self {
        let (node, pods) = two_pod_node("comb-rdn", "comb-rdp", GW, [POD_A, POD_B]);
        let [(a, _), (b, _)] = <[_; 2]>::try_from(pods).ok().unwrap();
        Self { a, b, node }
    }

    /// The same with IPv6 only: `GW6` (nodad) on every host veth, pods with a /128.
    fn new_v6() -> Self {
        let (node, mut pods) = two_pod_node_v6("comb-rdn6", "comb-rdp6", GW6, [POD_A6, POD_B6]);
        let b = pods.pop().unwrap();
        let a = pods.pop().unwrap();
        Self { a, b, node }
    }
}

/// Servers in pod B on some ports: each connection gets `hello <port>\n` and is counted.
/// Stopped and joined on drop.
struct PodServer {
    accepted: Arc<Vec<(u16, AtomicUsize)>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PodServer {
    /// `any`: the wildcard address to bind ("0.0.0.0" or "::").
    fn start(ns: &Netns, any: &'static str, ports: &[u16]) -> Self {
        let accepted: Arc<Vec<(u16, AtomicUsize)>> =
            Arc::new(ports.iter().map(|p| (*p, AtomicUsize::new(0))).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let (name, acc, st) = (ns.0.clone(), accepted.clone(), stop.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            join_netns(&name);
            let listeners: Vec<TcpListener> = acc
                .iter()
                .map(|(p, _)| {
                    let l = TcpListener::bind((any, *p)).expect("server bind");
                    l.set_nonblocking(true).unwrap();
                    l
                })
                .collect();
            ready_tx.send(()).unwrap();
            while !st.load(Ordering::Relaxed) {
                for (l, (port, n)) in listeners.iter().zip(acc.iter()) {
                    if let Ok((mut c, _)) = l.accept() {
                        n.fetch_add(1, Ordering::SeqCst);
                        let _ = c.set_nonblocking(false);
                        let _ = c.write_all(format!("hello {port}\n").as_bytes());
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        ready
            .recv_timeout(Duration::from_secs(5))
            .expect("server ready");
        Self {
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self, port: u16) -> usize {
        self.accepted
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(0, |(_, n)| n.load(Ordering::SeqCst))
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connect from pod `ns` to `dst` and read one line: the line, "timeout" or "error <kind>".
fn hello(ns: &Netns, dst: SocketAddr, timeout: Duration) -> String {
    in_netns(ns, move || {
        match TcpStream::connect_timeout(&dst, timeout) {
            Ok(mut c) => {
                c.set_read_timeout(Some(timeout)).unwrap();
                let mut buf = Vec::new();
                let mut b = [0u8; 64];
                loop {
                    match c.read(&mut b) {
                        Ok(0) => break,
                        Ok(n) => {
                            buf.extend_from_slice(&b[..n]);
                            if buf.contains(&b'\n') {
                                break;
                            }
                        }
                        Err(e) => return format!("error {:?}", e.kind()),
                    }
                }
                String::from_utf8_lossy(&buf).trim().to_string()
            }
            Err(e) if e.kind() == ErrorKind::TimedOut => "timeout".into(),
            Err(e) => format!("error {:?}", e.kind()),
        }
    })
}

/// A listening TCP socket with IP_TRANSPARENT (IPV6_TRANSPARENT) on `addr`, in the calling
/// thread's namespace.
fn transparent_listener(addr: SocketAddr) -> TcpListener {
    let one: libc::c_int = 1;
    let (family, level, opt) = match addr {
        SocketAddr::V4(_) => (libc::AF_INET, libc::SOL_IP, libc::IP_TRANSPARENT),
        SocketAddr::V6(_) => (libc::AF_INET6, libc::SOL_IPV6, libc::IPV6_TRANSPARENT),
    };
    // SAFETY: plain socket syscalls on an fd we own; the sockaddrs are fully initialised and
    // their sizes passed along.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = OwnedFd::from_raw_fd(fd);
        let mut opts = vec![(level, opt), (libc::SOL_SOCKET, libc::SO_REUSEADDR)];
        if family == libc::AF_INET6 {
            opts.push((libc::SOL_IPV6, libc::IPV6_V6ONLY));
        }
        for (level, opt) in opts {
            let r = libc::setsockopt(
                fd,
                level,
                opt,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
            assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
        }
        let r = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                libc::bind(
                    fd,
                    (&sin as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            SocketAddr::V6(a) => {
                let mut sin6: libc::sockaddr_in6 = std::mem::zeroed();
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                libc::bind(
                    fd,
                    (&sin6 as *const libc::sockaddr_in6).cast(),
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(
            libc::listen(fd, 128),
            0,
            "listen: {}",
            std::io::Error::last_os_error()
        );
        TcpListener::from(owned)
    }
}

/// Accept one connection within `timeout` (the listener is switched to non-blocking).
fn accept_within(l: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true).unwrap();
    let t = Instant::now();
    while t.elapsed() < timeout {
        match l.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false).unwrap();
                return Some((s, peer));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    None
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..MIB)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0] ^ seed)
        .collect()
}

fn metric(dp: &Datapath, ep: u32, dir: Direction, r: Reason) -> u64 {
    dp.policy()
        .metrics()
        .unwrap()
        .iter()
        .find(|m: &&PolicyMetric| m.endpoint == ep && m.direction == dir && m.reason == r)
        .map_or(0, |m| m.packets)
}

fn redirect(reason: Reason, policy: u32) -> PolicyValue {
    PolicyValue {
        verdict: Verdict::Redirect,
        reason: reason.into(),
        proxy_port: 0,
        policy,
    }
}

/// A redirected connection from A to B:8080: the client's view (its local address, bytes
/// received back) on one side, the proxy's accepted socket on the other.
fn proxied_exchange(
    lab: &Lab,
    listener: &TcpListener,
    dst: SocketAddr,
) -> (SocketAddr, SocketAddr, SocketAddr) {
    let (up, down) = (pattern(0x5a), pattern(0xa5));
    let (up2, down2) = (up.clone(), down.clone());
    let a = lab.a.0.clone();
    let client = std::thread::spawn(move || {
        join_netns(&a);
        let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .expect("connect through the proxy");
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let local = c.local_addr().unwrap();
        c.write_all(&up2).expect("client write");
        let mut got = vec![0u8; MIB];
        c.read_exact(&mut got).expect("client read");
        assert!(got == down2, "bytes from the proxy differ");
        local
    });
    let (mut s, peer) =
        accept_within(listener, Duration::from_secs(5)).expect("the proxy accepts a connection");
    let local = s.local_addr().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = vec![0u8; MIB];
    s.read_exact(&mut got).expect("proxy read");
    assert!(got == up, "bytes from the client differ");
    s.write_all(&down).expect("proxy write");
    let client_local = client.join().expect("client thread");
    drop(s);
    (client_local, local, peer)
}

/// `n` connections from A to `dst`, all from the same source port, each answered and closed
/// first by the proxy (`listener`); the client reads to EOF, then closes. Panics when a connect
/// does not complete within 3 s (a SYN left unanswered until the proxy's TIME_WAIT expires;
/// one lost SYN retransmitted after 1 s still passes). Returns the slowest connect.
fn reuse_tuple_after_proxy_close(
    lab: &Lab,
    listener: &TcpListener,
    dst: SocketAddr,
    n: usize,
) -> Duration {
    const SRC_PORT: u16 = 40123;
    let a = lab.a.0.clone();
    let client = std::thread::spawn(move || {
        join_netns(&a);
        let src = sa(POD_A, SRC_PORT);
        let mut slowest = Duration::ZERO;
        for i in 0..n {
            let mut tries = 0;
            let s = loop {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                s.set_reuse_address(true).unwrap();
                s.bind(&src.into()).unwrap();
                let t = Instant::now();
                match s.connect_timeout(&dst.into(), Duration::from_secs(3)) {
                    Ok(()) => {
                        slowest = slowest.max(t.elapsed());
                        break s;
                    }
                    // The client's own previous socket still in LAST_ACK (its FIN not yet
                    // acknowledged): not the proxy's TIME_WAIT; try again shortly.
                    Err(e) if e.kind() == ErrorKind::AddrNotAvailable && tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("connection {i} on the reused tuple {src} -> {dst}: {e}"),
                }
            };
            let mut c = TcpStream::from(s);
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).expect("client read to EOF");
            assert_eq!(got, b"bye\n", "connection {i}");
        }
        slowest
    });
    for i in 0..n {
        let Some((mut s, peer)) = accept_within(listener, Duration::from_secs(5)) else {
            // The client's panic says why.
            let _ = client.join();
            panic!("the proxy got no connection {i}");
        };
        assert_eq!(peer, sa(POD_A, SRC_PORT));
        s.write_all(b"bye\n").unwrap();
        drop(s); // the proxy closes first: TIME_WAIT on its side
    }
    client.join().expect("client thread")
}

#[test]
fn tcp_is_redirected_to_the_node_proxy() {
    if !common::privileged("redirect") {
        return;
    }
    comb_host::ensure_bpffs().unwrap();
    let pins = common::PinGuard::fresh();
    let lab = Lab::new();
    let server = PodServer::start(&lab.b, "0.0.0.0", &[L7_PORT, PLAIN_PORT]);
    // Plain routing works before anything is attached.
    assert_eq!(
        hello(&lab.a, sa(POD_B, PLAIN_PORT), Duration::from_secs(5)),
        "hello 9090"
    );

    let inside = InNetns::enter(&lab.node);
    let (ai, bi) = (ifindex("lxc1"), ifindex("lxc2"));
    let dp = Datapath::load(DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: comb_host::cgroup2_mount().unwrap(),
    })
    .expect("loading the datapath");
    dp.policy()
        .set_endpoint(ai, ID_A, &[POD_A.parse().unwrap()])
        .unwrap();
    dp.policy()
        .set_endpoint(bi, ID_B, &[POD_B.parse().unwrap()])
        .unwrap();
    dp.policy()
        .upsert_ipcache(format!("{POD_A}/32").parse().unwrap(), ID_A)
        .unwrap();
    // B has ingress REDIRECT entries: its ipcache value names its veth.
    dp.policy()
        .upsert_ipcache_entry(
            format!("{POD_B}/32").parse().unwrap(),
            IpcacheEntry {
                identity: ID_B,
                endpoint: bi,
            },
        )
        .unwrap();
    dp.policy()
        .upsert_ipcache(format!("{GW}/32").parse().unwrap(), ID_HOST)
        .unwrap();
    assert_eq!(
        dp.policy().ipcache_entries().unwrap()[&format!("{POD_B}/32").parse().unwrap()],
        IpcacheEntry {
            identity: ID_B,
            endpoint: bi
        }
    );
    // B: A on 8080 needs the proxy (fail closed), A on 9090 allowed, the node allowed,
    // everything else denied.
    let l7_key = PolicyKey::port(bi, ID_A, Ingress, TCP, Some(L7_PORT));
    for (k, v) in [
        (l7_key, redirect(Reason::ProxyUnavailable, 1)),
        (
            PolicyKey::port(bi, ID_A, Ingress, TCP, Some(PLAIN_PORT)),
            PolicyValue::allow(2),
        ),
        (PolicyKey::any(bi, ID_HOST, Ingress), PolicyValue::allow(3)),
        (
            PolicyKey::any(bi, ID_ANY, Ingress),
            PolicyValue::deny(Reason::PolicyDenied, 4),
        ),
    ] {
        dp.policy().upsert_entry(&k, &v).unwrap();
    }
    dp.policy().attach(ai).unwrap();
    dp.policy().attach(bi).unwrap();
    // The sk_lookup program that hands marked SYNs to the listener; attaching twice is fine.
    assert!(!dp.policy().proxy_lookup_attached());
    dp.policy().attach_proxy_lookup().unwrap();
    dp.policy().attach_proxy_lookup().unwrap();
    assert!(dp.policy().proxy_lookup_attached());

    // The proxy's routing, in the node namespace; installing twice adds nothing.
    assert!(!routing::installed().unwrap());
    routing::install().unwrap();
    routing::install().unwrap();
    assert!(routing::installed().unwrap());
    let rules = lab.node.exec(&["ip", "rule", "show"]);
    assert_eq!(
        rules.matches("fwmark 0xb00/0xf00 lookup 2005").count(),
        1,
        "{rules}"
    );

    // The listener, in the node namespace (this thread is in it).
    let listener = transparent_listener(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::LOCALHOST,
        PROXY_PORT,
    )));
    assert!(!dp.policy().proxy_listener_present(ProxyFamily::V4).unwrap());
    dp.policy()
        .set_proxy_listener(ProxyFamily::V4, listener.as_fd())
        .unwrap();
    assert!(dp.policy().proxy_listener_present(ProxyFamily::V4).unwrap());
    assert!(!dp.policy().proxy_listener_present(ProxyFamily::V6).unwrap());
    // Only listening (or established) sockets go in.
    let idle = in_netns(&lab.node, || {
        // SAFETY: socket(2); the fd is owned right away.
        unsafe {
            OwnedFd::from_raw_fd(libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
            ))
        }
    });
    assert!(
        dp.policy()
            .set_proxy_listener(ProxyFamily::V6, idle.as_fd())
            .is_err()
    );
    drop(idle);

    // A -> B:8080 lands on the proxy: local address B:8080, peer A; 1 MiB each way.
    let t = Instant::now();
    let (client_local, proxy_local, proxy_peer) =
        proxied_exchange(&lab, &listener, sa(POD_B, L7_PORT));
    let elapsed = t.elapsed();
    assert_eq!(proxy_local, sa(POD_B, L7_PORT));
    assert_eq!(proxy_peer, client_local);
    assert_eq!(proxy_peer.ip(), POD_A.parse::<std::net::IpAddr>().unwrap());
    // A second one, right after.
    let (c2, _, p2) = proxied_exchange(&lab, &listener, sa(POD_B, L7_PORT));
    assert_eq!(p2, c2);
    assert_eq!(server.count(L7_PORT), 0, "B's server never sees them");
    eprintln!("redirected connection, 1 MiB each way, took {elapsed:?}");

    assert_eq!(metric(&dp, ai, Egress, Reason::ProxyRedirect), 2);
    assert!(metric(&dp, ai, Egress, Reason::CtEstablished) > 10);
    // The proxy's packets to A are replies of the PROXY entry.
    assert!(metric(&dp, ai, Ingress, Reason::CtReply) > 10);
    assert_eq!(metric(&dp, bi, Ingress, Reason::ProxyUnavailable), 0);
    let ct = dp.policy().ct_entries().unwrap();
    let proxied: Vec<_> = ct.iter().filter(|e| e.proxy).collect();
    assert_eq!(proxied.len(), 2, "{ct:#?}");
    for e in proxied {
        assert_eq!((e.endpoint, e.direction), (ai, Egress));
        assert_eq!(e.dst, sa(POD_B, L7_PORT));
        assert_eq!(e.reason, Reason::ProxyRedirect);
        assert!(e.seen_reply, "{e:?}");
    }

    // The proxy closes first, so its accepted socket sits in TIME_WAIT, and the client opens
    // the same 4-tuple again at once, 200 times: every SYN reopens the tuple (the kernel's
    // TIME_WAIT recycling, then the sk_lookup program), none waits for the TIME_WAIT (60 s).
    let slowest = reuse_tuple_after_proxy_close(&lab, &listener, sa(POD_B, L7_PORT), 200);
    eprintln!(
        "200 connections on one 4-tuple, the proxy closing first: slowest connect {slowest:?}"
    );
    assert_eq!(server.count(L7_PORT), 0, "B's server never sees them");
    // Each reopened tuple is a new redirected flow (its closed entry judged again).
    let redirected = metric(&dp, ai, Egress, Reason::ProxyRedirect);
    assert_eq!(redirected, 202);

    // A port without REDIRECT goes to B untouched.
    assert_eq!(
        hello(&lab.a, sa(POD_B, PLAIN_PORT), Duration::from_secs(5)),
        "hello 9090"
    );
    assert_eq!(server.count(PLAIN_PORT), 2);
    // The proxy's own upstream connection, from the node, reaches B's server (host identity).
    assert_eq!(
        hello(&lab.node, sa(POD_B, L7_PORT), Duration::from_secs(5)),
        "hello 8080"
    );
    assert_eq!(server.count(L7_PORT), 1);
    assert!(metric(&dp, bi, Ingress, Reason::PolicyAllow) >= 2);

    // Proxy gone (listener closed): the sockmap entry goes with it and L7-policy (proxy-unavailable) flows
    // fail closed, counted at the destination whose policy it is (its own hook judges the
    // REDIRECT the source could not carry out).
    drop(listener);
    // The entry goes when the socket is released, which is not always at our close: a child
    // another test thread is forking holds a copy of our fd table until it execs.
    let t = Instant::now();
    while dp.policy().proxy_listener_present(ProxyFamily::V4).unwrap() {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the closed listener is still in the sockmap after 2 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        hello(&lab.a, sa(POD_B, L7_PORT), Duration::from_secs(1)),
        "timeout"
    );
    assert!(metric(&dp, bi, Ingress, Reason::ProxyUnavailable) >= 1);
    assert_eq!(metric(&dp, ai, Egress, Reason::ProxyUnavailable), 0);
    assert_eq!(server.count(L7_PORT), 1);

    // Visibility only: without a proxy the flow goes on to B, whose hook forwards it with
    // l7-visibility (the source's hook counts its own egress verdict).
    dp.policy()
        .upsert_entry(&l7_key, &redirect(Reason::L7Visibility, 1))
        .unwrap();
    assert_eq!(
        hello(&lab.a, sa(POD_B, L7_PORT), Duration::from_secs(5)),
        "hello 8080"
    );
    assert_eq!(server.count(L7_PORT), 2);
    assert_eq!(metric(&dp, ai, Egress, Reason::L7Visibility), 0);
    assert_eq!(metric(&dp, bi, Ingress, Reason::L7Visibility), 1);

    // With a listener again, visibility flows are redirected too; clear takes it out.
    let listener = transparent_listener(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::LOCALHOST,
        PROXY_PORT,
    )));
    dp.policy()
        .set_proxy_listener(ProxyFamily::V4, listener.as_fd())
        .unwrap();
    let (c3, _, p3) = proxied_exchange(&lab, &listener, sa(POD_B, L7_PORT));
    assert_eq!(p3, c3);
    assert_eq!(
        metric(&dp, ai, Egress, Reason::ProxyRedirect),
        redirected + 1
    );
    assert_eq!(server.count(L7_PORT), 2);
    dp.policy().clear_proxy_listener(ProxyFamily::V4).unwrap();
    dp.policy()
        .clear_proxy_listener(ProxyFamily::V4)
        .expect("clearing is idempotent");
    assert!(!dp.policy().proxy_listener_present(ProxyFamily::V4).unwrap());
    assert_eq!(
        hello(&lab.a, sa(POD_B, L7_PORT), Duration::from_secs(5)),
        "hello 8080"
    );
    assert!(
        accept_within(&listener, Duration::from_millis(200)).is_none(),
        "a cleared listener gets nothing"
    );
    assert_eq!(server.count(L7_PORT), 3);

    routing::remove().unwrap();
    assert!(!routing::installed().unwrap());
    routing::remove().expect("removing is idempotent");
    dp.shutdown(false).unwrap();
    assert!(!pins.0.exists());
    drop(inside);
}

/// IPv6: the listener in slot 1, the IPv6 half of the routing.
#[test]
fn tcp6_is_redirected_to_the_node_proxy() {
    if !common::privileged("redirect") {
        return;
    }
    comb_host::ensure_bpffs().unwrap();
    let pins = common::PinGuard::fresh();
    let lab = Lab::new_v6();
    let b = SocketAddr::new(POD_B6.parse().unwrap(), L7_PORT);
    let server = PodServer::start(&lab.b, "::", &[L7_PORT]);
    assert_eq!(hello(&lab.a, b, Duration::from_secs(5)), "hello 8080");

    let inside = InNetns::enter(&lab.node);
    let (ai, bi) = (ifindex("lxc1"), ifindex("lxc2"));
    let dp = Datapath::load(DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: comb_host::cgroup2_mount().unwrap(),
    })
    .expect("loading the datapath");
    dp.policy()
        .set_endpoint(ai, ID_A, &[POD_A6.parse().unwrap()])
        .unwrap();
    dp.policy()
        .set_endpoint(bi, ID_B, &[POD_B6.parse().unwrap()])
        .unwrap();
    dp.policy()
        .upsert_ipcache(format!("{POD_A6}/128").parse().unwrap(), ID_A)
        .unwrap();
    dp.policy()
        .upsert_ipcache_entry(
            format!("{POD_B6}/128").parse().unwrap(),
            IpcacheEntry {
                identity: ID_B,
                endpoint: bi,
            },
        )
        .unwrap();
    dp.policy()
        .upsert_entry(
            &PolicyKey::port(bi, ID_A, Ingress, TCP, Some(L7_PORT)),
            &redirect(Reason::ProxyUnavailable, 1),
        )
        .unwrap();
    dp.policy().attach(ai).unwrap();
    dp.policy().attach(bi).unwrap();
    dp.policy().attach_proxy_lookup().unwrap();
    routing::install().unwrap();
    assert!(routing::installed().unwrap());

    // No IPv6 listener: fails closed (an IPv4 one does not serve IPv6).
    let l4 = transparent_listener(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::LOCALHOST,
        PROXY_PORT,
    )));
    dp.policy()
        .set_proxy_listener(ProxyFamily::V4, l4.as_fd())
        .unwrap();
    assert_eq!(hello(&lab.a, b, Duration::from_secs(1)), "timeout");
    assert!(metric(&dp, bi, Ingress, Reason::ProxyUnavailable) >= 1);
    assert_eq!(metric(&dp, ai, Egress, Reason::ProxyUnavailable), 0);

    let listener = transparent_listener(SocketAddr::new(
        std::net::Ipv6Addr::LOCALHOST.into(),
        PROXY_PORT,
    ));
    dp.policy()
        .set_proxy_listener(ProxyFamily::V6, listener.as_fd())
        .unwrap();
    assert!(dp.policy().proxy_listener_present(ProxyFamily::V6).unwrap());
    let (client_local, proxy_local, proxy_peer) = proxied_exchange(&lab, &listener, b);
    assert_eq!(proxy_local, b);
    assert_eq!(proxy_peer, client_local);
    assert_eq!(
        server.count(L7_PORT),
        1,
        "only the unpoliced first connection"
    );
    assert_eq!(metric(&dp, ai, Egress, Reason::ProxyRedirect), 1);
    assert!(metric(&dp, ai, Ingress, Reason::CtReply) > 10);

    routing::remove().unwrap();
    dp.shutdown(false).unwrap();
    assert!(!pins.0.exists());
    drop(inside);
}

#[test]
fn proxy_routing_in_a_namespace_with_ipv6() {
    if !common::privileged("redirect") {
        return;
    }
    let ns = Netns::new("comb-rdr");
    ns.sysctl("net.ipv6.conf.all.disable_ipv6=0");
    ns.sysctl("net.ipv6.conf.lo.disable_ipv6=0");
    let _inside = InNetns::enter(&ns);
    assert!(!routing::installed().unwrap());
    routing::install().unwrap();
    routing::install().unwrap();
    assert!(routing::installed().unwrap());
    for fam in ["-4", "-6"] {
        let rules = ns.exec(&["ip", fam, "rule", "show"]);
        assert_eq!(
            rules.matches("fwmark 0xb00/0xf00 lookup 2005").count(),
            1,
            "{fam}: {rules}"
        );
        assert!(rules.contains("100:"), "{rules}");
        let routes = ns.exec(&["ip", fam, "route", "show", "table", "2005"]);
        assert!(
            routes.starts_with("local default dev lo"),
            "{fam}: {routes}"
        );
    }
    routing::remove().unwrap();
    assert!(!routing::installed().unwrap());
    for fam in ["-4", "-6"] {
        let rules = ns.exec(&["ip", fam, "rule", "show"]);
        assert!(!rules.contains("2005"), "{fam}: {rules}");
    }
}
