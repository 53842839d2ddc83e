//! Privileged tests of the mesh datapath (docs/mtls.md "Datapath"): HBONE outbound steering at
//! the source pod's veth, HBONE inbound on the node uplink, HBONE delivery to a pod and its
//! replies, and PeerAuthentication STRICT. Two nodes (network namespaces) joined through a
//! router namespace as the lab does, two pods on each, a datapath loaded in each node, and
//! small transparent listeners standing in for the node proxy. Nothing is attached, addressed
//! or routed outside the namespaces the tests create. Needs root; without it fails under
//! CI=true and is skipped with a notice otherwise.

#[allow(dead_code)] // shared with the cgroup-based tests
mod common;
#[allow(dead_code)] // the policy tests' helpers; these tests use the namespace ones
mod policy_support;

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comb_datapath::policy::abi::{HBONE_DELIVERY_MARK, ID_HOST, ID_REMOTE_NODE};
use comb_datapath::policy::routing;
use comb_datapath::{
    Datapath, DatapathOptions, ListenerKind, MeshAddr, MeshPort, MeshPortKey, PolicyConfig,
    PolicyMetric, ProxyFamily,
};
use comb_model::terms::{Direction, Reason};
use policy_support::{InNetns, Netns, ifindex, two_pod_node, two_pod_node_v6};

use Direction::{Egress, Ingress};

/// Node 1: A (mesh) and C (not in the mesh). Node 2: B (mesh, the server under test) and D
/// (not in the mesh, a plain server).
const GW1: &str = "198.18.1.1";
const POD_A: &str = "198.18.1.2";
const POD_C: &str = "198.18.1.3";
const GW2: &str = "198.18.2.1";
const POD_B: &str = "198.18.2.2";
const POD_D: &str = "198.18.2.3";
const ID_A: u32 = 300;
const ID_B: u32 = 301;
const ID_C: u32 = 302;
const ID_D: u32 = 303;
/// A STRICT port of B, and one with a port-level PERMISSIVE override.
const STRICT_PORT: u16 = 8080;
const OPEN_PORT: u16 = 9090;
const HBONE_OUT_PORT: u16 = 15001;
const HBONE_IN_PORT: u16 = 15008;

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip4(ip), port))
}

/// The calling thread joins network namespace `name` for the rest of its life.
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

/// Two nodes like the lab's: pods on `lxc1`/`lxc2` of each node, each node's `uplink` veth
/// (198.18.254.k/32, default route via the router's 198.18.254.254) to the router's `n<k>`;
/// the router routes 198.18.k.0/24 to node k. Field order is drop order.
struct TwoNodes {
    a: Netns,
    c: Netns,
    b: Netns,
    d: Netns,
    node1: Netns,
    node2: Netns,
    _router: Netns,
}

impl TwoNodes {
    fn new() -> Self {
        let router = Netns::new("comb-hbr");
        router.sysctl("net.ipv4.ip_forward=1");
        router.sysctl("net.ipv4.conf.all.rp_filter=0");
        router.sysctl("net.ipv6.conf.all.disable_ipv6=1");
        router.ip(&["addr", "add", "198.18.254.254/32", "dev", "lo"]);
        let (node1, pods1) = two_pod_node("comb-hbn1", "comb-hbp1", GW1, [POD_A, POD_C]);
        let (node2, pods2) = two_pod_node("comb-hbn2", "comb-hbp2", GW2, [POD_B, POD_D]);
        for (k, node) in [(1, &node1), (2, &node2)] {
            let rif = format!("n{k}");
            let addr = format!("198.18.254.{k}");
            node.ip(&[
                "link", "add", "uplink", "type", "veth", "peer", "name", &rif, "netns", &router.0,
            ]);
            node.sysctl("net.ipv4.conf.uplink.rp_filter=0");
            node.ip(&["addr", "add", &format!("{addr}/32"), "dev", "uplink"]);
            node.ip(&["link", "set", "uplink", "up"]);
            node.ip(&[
                "route",
                "add",
                "198.18.254.254",
                "dev",
                "uplink",
                "scope",
                "link",
            ]);
            node.ip(&[
                "route",
                "add",
                "default",
                "via",
                "198.18.254.254",
                "dev",
                "uplink",
            ]);
            router.ip(&["addr", "add", "198.18.254.254/32", "dev", &rif]);
            router.ip(&["link", "set", &rif, "up"]);
            router.sysctl(&format!("net.ipv4.conf.{rif}.rp_filter=0"));
            router.ip(&["route", "add", &addr, "dev", &rif, "scope", "link"]);
            router.ip(&["route", "add", &format!("198.18.{k}.0/24"), "via", &addr]);
        }
        let [(a, _), (c, _)] = <[_; 2]>::try_from(pods1).ok().unwrap();
        let [(b, _), (d, _)] = <[_; 2]>::try_from(pods2).ok().unwrap();
        Self {
            a,
            c,
            b,
            d,
            node1,
            node2,
            _router: router,
        }
    }
}

/// Servers in a pod: TCP on each port answers `hello <port> <peer ip>\n`, then echoes every
/// line as `echo <line>\n`; UDP on each port answers `udp <port> <peer ip>`. Stopped on drop.
struct PodServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PodServer {
    fn start(ns: &Netns, ports: &[u16]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (name, st, ports) = (ns.0.clone(), stop.clone(), ports.to_vec());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            join_netns(&name);
            let tcp: Vec<(u16, TcpListener)> = ports
                .iter()
                .map(|p| {
                    let l = TcpListener::bind(("0.0.0.0", *p)).expect("server bind");
                    l.set_nonblocking(true).unwrap();
                    (*p, l)
                })
                .collect();
            let udp: Vec<(u16, UdpSocket)> = ports
                .iter()
                .map(|p| {
                    let s = UdpSocket::bind(("0.0.0.0", *p)).expect("udp bind");
                    s.set_nonblocking(true).unwrap();
                    (*p, s)
                })
                .collect();
            ready_tx.send(()).unwrap();
            while !st.load(Ordering::Relaxed) {
                for (port, l) in &tcp {
                    if let Ok((c, peer)) = l.accept() {
                        let port = *port;
                        std::thread::spawn(move || serve(c, port, peer));
                    }
                }
                for (port, s) in &udp {
                    let mut b = [0u8; 64];
                    if let Ok((_, peer)) = s.recv_from(&mut b) {
                        let _ = s.send_to(format!("udp {port} {}", peer.ip()).as_bytes(), peer);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        ready
            .recv_timeout(Duration::from_secs(5))
            .expect("server ready");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn serve(mut c: TcpStream, port: u16, peer: SocketAddr) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
    if c.write_all(format!("hello {port} {}\n", peer.ip()).as_bytes())
        .is_err()
    {
        return;
    }
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
        if c.write_all(format!("echo {}\n", line.trim()).as_bytes())
            .is_err()
        {
            return;
        }
        line.clear();
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

/// One line from `c`, or "timeout" / "error <kind>" / "eof".
fn read_line(c: &mut TcpStream, timeout: Duration) -> String {
    c.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match c.read(&mut b) {
            Ok(0) => return if buf.is_empty() { "eof".into() } else { break },
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => buf.push(b[0]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return "timeout".into();
            }
            Err(e) => return format!("error {:?}", e.kind()),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Connect from pod `ns` to `dst`: the connected stream, or "timeout" / "error <kind>".
fn connect(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    in_netns(ns, move || {
        match TcpStream::connect_timeout(&dst, timeout) {
            Ok(c) => Ok(c),
            Err(e) if e.kind() == ErrorKind::TimedOut => Err("timeout".into()),
            Err(e) => Err(format!("error {:?}", e.kind())),
        }
    })
}

/// Connect from pod `ns` to `dst` and read the first line (or what went wrong).
fn hello(ns: &Netns, dst: SocketAddr, timeout: Duration) -> String {
    match connect(ns, dst, timeout) {
        Ok(mut c) => read_line(&mut c, timeout),
        Err(e) => e,
    }
}

/// One UDP datagram from pod `ns` to `dst`: the answer, or None.
fn udp_ask(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Option<String> {
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        s.send_to(b"ping", dst).unwrap();
        let mut b = [0u8; 64];
        s.recv_from(&mut b)
            .ok()
            .map(|(n, _)| String::from_utf8_lossy(&b[..n]).into_owned())
    })
}

fn setsockopt_int(fd: libc::c_int, level: libc::c_int, opt: libc::c_int, v: libc::c_int) {
    // SAFETY: fd is a socket we own; the option value is an int whose size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// An IPv4 TCP socket with IP_TRANSPARENT (and SO_MARK `mark` when non-zero), bound to `bind`,
/// in the calling thread's namespace.
fn transparent_socket(bind: SocketAddrV4, mark: u32) -> OwnedFd {
    // SAFETY: plain socket syscalls on an fd we own; the sockaddr is fully initialised.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = OwnedFd::from_raw_fd(fd);
        setsockopt_int(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1);
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        if mark != 0 {
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int);
        }
        let sin = sockaddr_in(bind);
        let r = libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        owned
    }
}

/// A transparent listener (the proxy's) on `addr` in the calling thread's namespace.
fn transparent_listener(addr: SocketAddrV4) -> TcpListener {
    let fd = transparent_socket(addr, 0);
    // SAFETY: listen(2) on our socket.
    let r = unsafe { libc::listen(fd.as_raw_fd(), 128) };
    assert_eq!(r, 0, "listen: {}", std::io::Error::last_os_error());
    TcpListener::from(fd)
}

/// What the proxy does to deliver a stream or to open an HBONE connection: a transparent
/// socket bound to `src` (not an address of the node), with SO_MARK `mark`, connected to
/// `dst` within 5 s.
fn transparent_connect(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    mark: u32,
) -> Result<TcpStream, String> {
    let fd = transparent_socket(src, mark);
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a timeval of the right size; connect with a full sockaddr_in.
    unsafe {
        let r = libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
        assert_eq!(r, 0);
        let sin = sockaddr_in(dst);
        let r = libc::connect(
            fd.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if r != 0 {
            return Err(format!("connect: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(TcpStream::from(fd))
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

fn metric(dp: &Datapath, ep: u32, dir: Direction, r: Reason) -> u64 {
    dp.policy()
        .metrics()
        .unwrap()
        .iter()
        .find(|m: &&PolicyMetric| m.endpoint == ep && m.direction == dir && m.reason == r)
        .map_or(0, |m| m.packets)
}

/// A loaded node: its datapath (pins removed on drop by the test's explicit shutdown), pod
/// ifindexes and its uplink.
struct Node {
    dp: Datapath,
    pods: [u32; 2],
    uplink: u32,
    _pins: common::PinGuard,
}

/// Load a datapath in `ns` for pods `[(addr, identity); 2]` on `lxc1`/`lxc2`: endpoints,
/// ipcache (both nodes' pods, the gateway as host, the other node's uplink as remote-node),
/// policy programs, the uplink program and the proxy routing. `mesh`: the local pods in the
/// mesh (by index) and the remote pods that are HBONE peers.
fn load_node(
    ns: &Netns,
    gw: &str,
    pods: [(&str, u32); 2],
    all_pods: &[(&str, u32)],
    local_mesh: &[usize],
    peers: &[&str],
) -> Node {
    let pins = common::PinGuard::fresh();
    let _inside = InNetns::enter(ns);
    let dp = Datapath::load(DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: comb_host::cgroup2_mount().unwrap(),
    })
    .expect("loading the datapath");
    let ifs = [ifindex("lxc1"), ifindex("lxc2")];
    let uplink = ifindex("uplink");
    let p = dp.policy();
    for ((addr, id), ifx) in pods.iter().zip(ifs) {
        p.set_endpoint(ifx, *id, &[ip(addr)]).unwrap();
    }
    for (addr, id) in all_pods {
        p.upsert_ipcache(format!("{addr}/32").parse().unwrap(), *id)
            .unwrap();
    }
    p.upsert_ipcache(format!("{gw}/32").parse().unwrap(), ID_HOST)
        .unwrap();
    p.upsert_ipcache("198.18.254.0/24".parse().unwrap(), ID_REMOTE_NODE)
        .unwrap();
    for i in local_mesh {
        p.upsert_mesh_addr(ip(pods[*i].0), MeshAddr::local(ifs[*i]))
            .unwrap();
        p.upsert_mesh_port(
            MeshPortKey {
                endpoint: ifs[*i],
                port: None,
            },
            MeshPort {
                enrolled: true,
                strict: false,
            },
        )
        .unwrap();
    }
    for peer in peers {
        p.upsert_mesh_addr(ip(peer), MeshAddr::peer()).unwrap();
    }
    for ifx in ifs {
        p.attach(ifx).unwrap();
    }
    p.attach_proxy_lookup().unwrap();
    p.attach_uplink(uplink).unwrap();
    p.attach_uplink(uplink).expect("attaching twice is fine");
    assert_eq!(p.uplinks(), vec![uplink]);
    assert!(
        p.listener_present(ListenerKind::HboneIn, ProxyFamily::V4)
            .is_ok()
    );
    routing::install().unwrap();
    Node {
        dp,
        pods: ifs,
        uplink,
        _pins: pins,
    }
}

impl Node {
    fn finish(self, ns: &Netns) {
        let _inside = InNetns::enter(ns);
        assert_eq!(self.dp.policy().uplinks(), vec![self.uplink]);
        routing::remove().unwrap();
        self.dp.shutdown(false).unwrap();
        assert!(!self._pins.0.exists(), "pins left behind");
    }
}

const ALL_PODS: [(&str, u32); 4] = [(POD_A, ID_A), (POD_C, ID_C), (POD_B, ID_B), (POD_D, ID_D)];

fn two_loaded_nodes() -> (TwoNodes, Node, Node) {
    comb_host::ensure_bpffs().unwrap();
    let lab = TwoNodes::new();
    let n1 = load_node(
        &lab.node1,
        GW1,
        [(POD_A, ID_A), (POD_C, ID_C)],
        &ALL_PODS,
        &[0],
        &[POD_B],
    );
    let n2 = load_node(
        &lab.node2,
        GW2,
        [(POD_B, ID_B), (POD_D, ID_D)],
        &ALL_PODS,
        &[0],
        &[POD_A],
    );
    (lab, n1, n2)
}

#[test]
fn hbone_outbound_inbound_and_delivery() {
    if !common::privileged("hbone") {
        return;
    }
    let (lab, n1, n2) = two_loaded_nodes();
    let _sb = PodServer::start(&lab.b, &[STRICT_PORT, OPEN_PORT]);
    let _sd = PodServer::start(&lab.d, &[STRICT_PORT]);
    let [ai, ci] = n1.pods;
    let [bi, _di] = n2.pods;

    // Plain routing across the router works with everything attached (PERMISSIVE, no
    // listeners): the pods' own traffic is not disturbed by the uplink programs.
    assert_eq!(
        hello(&lab.c, sa(POD_D, STRICT_PORT), Duration::from_secs(5)),
        format!("hello {STRICT_PORT} {POD_C}")
    );

    // 1. Outbound steering. The HBONE outbound listener in node 1.
    let out = in_netns(&lab.node1, || {
        transparent_listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, HBONE_OUT_PORT))
    });
    let p1 = n1.dp.policy();
    assert!(
        !p1.listener_present(ListenerKind::HboneOut, ProxyFamily::V4)
            .unwrap()
    );
    p1.set_listener(ListenerKind::HboneOut, ProxyFamily::V4, out.as_fd())
        .unwrap();
    assert!(
        p1.listener_present(ListenerKind::HboneOut, ProxyFamily::V4)
            .unwrap()
    );
    assert!(
        !p1.listener_present(ListenerKind::L7, ProxyFamily::V4)
            .unwrap()
    );
    assert!(
        !p1.listener_present(ListenerKind::HboneIn, ProxyFamily::V4)
            .unwrap()
    );

    // A (mesh) -> B (an HBONE peer): lands on the listener with the original destination as
    // local address and A as peer; B's server never sees it.
    let a_ns = lab.a.0.clone();
    let client = std::thread::spawn(move || {
        join_netns(&a_ns);
        let mut c = TcpStream::connect_timeout(&sa(POD_B, STRICT_PORT), Duration::from_secs(5))
            .expect("connect through the HBONE listener");
        let local = c.local_addr().unwrap();
        let line = read_line(&mut c, Duration::from_secs(5));
        c.write_all(b"up\n").unwrap();
        (local, line)
    });
    let (mut s, peer) =
        accept_within(&out, Duration::from_secs(5)).expect("the HBONE outbound listener accepts");
    assert_eq!(s.local_addr().unwrap(), sa(POD_B, STRICT_PORT));
    s.write_all(b"tunnelled\n").unwrap();
    assert_eq!(read_line(&mut s, Duration::from_secs(5)), "up");
    let (client_local, line) = client.join().unwrap();
    assert_eq!(peer, client_local);
    assert_eq!(peer.ip(), ip(POD_A));
    assert_eq!(line, "tunnelled");
    drop(s);
    assert_eq!(metric(&n1.dp, ai, Egress, Reason::HboneRedirect), 1);
    assert!(metric(&n1.dp, ai, Ingress, Reason::CtReply) >= 2);
    let ct = p1.ct_entries().unwrap();
    let e = ct
        .iter()
        .find(|e| e.dst == sa(POD_B, STRICT_PORT) && e.endpoint == ai)
        .expect("the steered flow's entry");
    assert!(e.proxy && e.hbone, "{e:?}");
    assert_eq!(e.reason, Reason::HboneRedirect);

    // C is not in the mesh: straight to B. A to D (not an HBONE peer): straight to D.
    assert_eq!(
        hello(&lab.c, sa(POD_B, STRICT_PORT), Duration::from_secs(5)),
        format!("hello {STRICT_PORT} {POD_C}")
    );
    assert_eq!(
        hello(&lab.a, sa(POD_D, STRICT_PORT), Duration::from_secs(5)),
        format!("hello {STRICT_PORT} {POD_A}")
    );
    assert_eq!(metric(&n1.dp, ai, Egress, Reason::HboneRedirect), 1);
    assert_eq!(metric(&n1.dp, ci, Egress, Reason::HboneRedirect), 0);
    assert!(
        accept_within(&out, Duration::from_millis(100)).is_none(),
        "nothing else was steered"
    );

    // No listener: plaintext, counted as hbone-unavailable; B's PeerAuthentication decides
    // (PERMISSIVE here).
    p1.clear_listener(ListenerKind::HboneOut, ProxyFamily::V4)
        .unwrap();
    p1.clear_listener(ListenerKind::HboneOut, ProxyFamily::V4)
        .expect("clearing is idempotent");
    assert_eq!(
        hello(&lab.a, sa(POD_B, STRICT_PORT), Duration::from_secs(5)),
        format!("hello {STRICT_PORT} {POD_A}")
    );
    assert_eq!(metric(&n1.dp, ai, Egress, Reason::HboneUnavailable), 1);
    drop(out);

    // 2. Inbound: the proxy's outbound HBONE socket in node 1 (bound transparently to A's
    // address) connects to B:15008; node 2's uplink program hands the SYN to the HBONE
    // inbound listener; node 1's uplink program brings the replies back to the socket.
    let inbound = in_netns(&lab.node2, || {
        transparent_listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, HBONE_IN_PORT))
    });
    let p2 = n2.dp.policy();
    p2.set_listener(ListenerKind::HboneIn, ProxyFamily::V4, inbound.as_fd())
        .unwrap();
    let n1_ns = lab.node1.0.clone();
    let tunnel = std::thread::spawn(move || {
        join_netns(&n1_ns);
        let mut c = transparent_connect(
            SocketAddrV4::new(ip4(POD_A), 0),
            SocketAddrV4::new(ip4(POD_B), HBONE_IN_PORT),
            0,
        )
        .expect("HBONE connection from node 1");
        let local = c.local_addr().unwrap();
        c.write_all(b"CONNECT\n").unwrap();
        (local, read_line(&mut c, Duration::from_secs(5)))
    });
    let (mut s, peer) = accept_within(&inbound, Duration::from_secs(5))
        .expect("the HBONE inbound listener accepts");
    assert_eq!(s.local_addr().unwrap(), sa(POD_B, HBONE_IN_PORT));
    assert_eq!(read_line(&mut s, Duration::from_secs(5)), "CONNECT");
    s.write_all(b"200\n").unwrap();
    let (tunnel_local, answer) = tunnel.join().unwrap();
    assert_eq!(answer, "200");
    assert_eq!(peer, tunnel_local);
    assert_eq!(peer.ip(), ip(POD_A));
    drop(s);

    // 3. Delivery: the proxy in node 2 delivers a stream to B from A's address with the
    // delivery mark; B sees A as its peer, and B's replies come back to the socket.
    let n2_ns = lab.node2.0.clone();
    let delivered = move |n2_ns: String| {
        std::thread::spawn(move || {
            join_netns(&n2_ns);
            let mut c = transparent_connect(
                SocketAddrV4::new(ip4(POD_A), 0),
                SocketAddrV4::new(ip4(POD_B), STRICT_PORT),
                HBONE_DELIVERY_MARK,
            )?;
            let hello = read_line(&mut c, Duration::from_secs(5));
            c.write_all(b"request\n").map_err(|e| e.to_string())?;
            let echo = read_line(&mut c, Duration::from_secs(5));
            Ok::<_, String>((hello, echo))
        })
        .join()
        .unwrap()
    };
    let (h, echo) = delivered(n2_ns.clone()).expect("delivery");
    assert_eq!(h, format!("hello {STRICT_PORT} {POD_A}"));
    assert_eq!(echo, "echo request");
    // Its entry (the plaintext one of before has none of the flags).
    let ct = p2.ct_entries().unwrap();
    let delivered_entries: Vec<_> = ct
        .iter()
        .filter(|e| e.endpoint == bi && e.direction == Ingress && e.src.ip() == ip(POD_A))
        .filter(|e| e.hbone)
        .collect();
    assert_eq!(delivered_entries.len(), 1, "{ct:#?}");
    let e = delivered_entries[0];
    assert!(!e.proxy && e.seen_reply, "{e:?}");
    assert_eq!(e.dst, sa(POD_B, STRICT_PORT));

    // STRICT on B: the delivery is still accepted.
    p2.upsert_mesh_port(
        MeshPortKey {
            endpoint: bi,
            port: None,
        },
        MeshPort {
            enrolled: true,
            strict: true,
        },
    )
    .unwrap();
    let (h, echo) = delivered(n2_ns).expect("delivery under STRICT");
    assert_eq!(h, format!("hello {STRICT_PORT} {POD_A}"));
    assert_eq!(echo, "echo request");
    assert_eq!(metric(&n2.dp, bi, Ingress, Reason::MtlsRequired), 0);

    drop(inbound);
    n2.finish(&lab.node2);
    n1.finish(&lab.node1);
}

#[test]
fn peer_authentication_strict_truth_table() {
    if !common::privileged("hbone") {
        return;
    }
    let (lab, n1, n2) = two_loaded_nodes();
    let _sb = PodServer::start(&lab.b, &[STRICT_PORT, OPEN_PORT]);
    let [bi, _di] = n2.pods;
    let p2 = n2.dp.policy();
    let own = MeshPortKey {
        endpoint: bi,
        port: None,
    };
    let t = Duration::from_secs(5);
    let short = Duration::from_millis(700);

    // A plaintext connection established while B is PERMISSIVE.
    let mut before = connect(&lab.c, sa(POD_B, STRICT_PORT), t).expect("PERMISSIVE accepts");
    assert_eq!(
        read_line(&mut before, t),
        format!("hello {STRICT_PORT} {POD_C}")
    );

    // STRICT by default, PERMISSIVE on OPEN_PORT (written first, as the reconciler does).
    p2.upsert_mesh_port(
        MeshPortKey {
            endpoint: bi,
            port: Some(OPEN_PORT),
        },
        MeshPort {
            enrolled: false,
            strict: false,
        },
    )
    .unwrap();
    p2.upsert_mesh_port(
        own,
        MeshPort {
            enrolled: true,
            strict: true,
        },
    )
    .unwrap();
    assert_eq!(p2.mesh_ports().unwrap().len(), 2);

    // Plaintext TCP from the other node: dropped, counted, and reported as a flow event
    // (what `comb monitor` shows) with the source's identity.
    p2.set_config(&PolicyConfig {
        events: true,
        ..PolicyConfig::default()
    })
    .unwrap();
    let mut reader = p2.flow_events().unwrap();
    assert_eq!(hello(&lab.c, sa(POD_B, STRICT_PORT), short), "timeout");
    let dropped = metric(&n2.dp, bi, Ingress, Reason::MtlsRequired);
    assert!(dropped >= 1, "mtls-required counted");
    let mut events = Vec::new();
    reader
        .poll(Duration::from_secs(1), |e| events.push(e))
        .unwrap();
    let e = events
        .iter()
        .find(|e| e.reason == Reason::MtlsRequired)
        .unwrap_or_else(|| panic!("no mtls-required event: {events:#?}"));
    assert_eq!((e.src, e.dst, e.dport), (ip(POD_C), ip(POD_B), STRICT_PORT));
    assert_eq!((e.direction, e.endpoint), (Ingress, bi));
    assert_eq!((e.src_identity, e.dst_identity), (ID_C, ID_B));
    assert!(e.dropped());
    drop(reader);
    p2.set_config(&PolicyConfig::default()).unwrap();
    // Port-level PERMISSIVE: accepted.
    assert_eq!(
        hello(&lab.c, sa(POD_B, OPEN_PORT), t),
        format!("hello {OPEN_PORT} {POD_C}")
    );
    // UDP: the same.
    assert_eq!(udp_ask(&lab.c, sa(POD_B, STRICT_PORT), short), None);
    assert!(metric(&n2.dp, bi, Ingress, Reason::MtlsRequired) > dropped);
    assert_eq!(
        udp_ask(&lab.c, sa(POD_B, OPEN_PORT), t).as_deref(),
        Some(format!("udp {OPEN_PORT} {POD_C}").as_str())
    );
    // Same node (D on B's node): not affected.
    assert_eq!(
        hello(&lab.d, sa(POD_B, STRICT_PORT), t),
        format!("hello {STRICT_PORT} {POD_D}")
    );
    assert_eq!(
        udp_ask(&lab.d, sa(POD_B, STRICT_PORT), t).as_deref(),
        Some(format!("udp {STRICT_PORT} {POD_D}").as_str())
    );
    // The node itself (kubelet probes): not affected.
    assert_eq!(
        hello(&lab.node2, sa(POD_B, STRICT_PORT), t),
        format!("hello {STRICT_PORT} {GW2}")
    );
    // The connection established before STRICT goes on (documented: mode changes apply to
    // new flows, like policy changes).
    before.write_all(b"still\n").unwrap();
    assert_eq!(read_line(&mut before, t), "echo still");
    drop(before);

    let drops_now = metric(&n2.dp, bi, Ingress, Reason::MtlsRequired);

    // DISABLE: plaintext accepted.
    p2.upsert_mesh_port(
        own,
        MeshPort {
            enrolled: true,
            strict: false,
        },
    )
    .unwrap();
    assert_eq!(
        hello(&lab.c, sa(POD_B, STRICT_PORT), t),
        format!("hello {STRICT_PORT} {POD_C}")
    );
    // A STRICT port override of a PERMISSIVE pod.
    p2.upsert_mesh_port(
        MeshPortKey {
            endpoint: bi,
            port: Some(OPEN_PORT),
        },
        MeshPort {
            enrolled: false,
            strict: true,
        },
    )
    .unwrap();
    assert_eq!(hello(&lab.c, sa(POD_B, OPEN_PORT), short), "timeout");
    assert!(metric(&n2.dp, bi, Ingress, Reason::MtlsRequired) > drops_now);
    // Not in the mesh (no endpoint entry): port entries mean nothing, plaintext accepted.
    p2.remove_mesh_port(own).unwrap();
    p2.remove_mesh_port(own).expect("removing twice is fine");
    assert_eq!(
        hello(&lab.c, sa(POD_B, OPEN_PORT), t),
        format!("hello {OPEN_PORT} {POD_C}")
    );

    n2.finish(&lab.node2);
    n1.finish(&lab.node1);
}

/// A restarted agent adopts the pinned uplink link and the mesh maps; a link whose interface
/// is gone is dropped; shutdown without pins removes everything.
#[test]
fn uplink_link_and_mesh_maps_survive_a_restart() {
    if !common::privileged("hbone") {
        return;
    }
    comb_host::ensure_bpffs().unwrap();
    let pins = common::PinGuard::fresh();
    let ns = Netns::new("comb-hbu");
    ns.ip(&[
        "link", "add", "uplink", "type", "veth", "peer", "name", "peer1",
    ]);
    ns.ip(&[
        "link", "add", "uplink2", "type", "veth", "peer", "name", "peer2",
    ]);
    let _inside = InNetns::enter(&ns);
    let (u1, u2) = (ifindex("uplink"), ifindex("uplink2"));
    let opts = || DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: comb_host::cgroup2_mount().unwrap(),
    };
    let dp = Datapath::load(opts()).unwrap();
    dp.policy().attach_uplink(u1).unwrap();
    dp.policy().attach_uplink(u2).unwrap();
    dp.policy().attach_proxy_lookup().unwrap();
    dp.policy()
        .upsert_mesh_addr(ip(POD_B), MeshAddr::local(7))
        .unwrap();
    let k = MeshPortKey {
        endpoint: 7,
        port: Some(8080),
    };
    dp.policy()
        .upsert_mesh_port(
            k,
            MeshPort {
                enrolled: false,
                strict: true,
            },
        )
        .unwrap();
    assert!(
        dp.policy()
            .upsert_mesh_port(
                MeshPortKey {
                    endpoint: 7,
                    port: Some(0)
                },
                MeshPort::default()
            )
            .is_err(),
        "port 0 is the endpoint's own entry"
    );
    dp.shutdown(true).unwrap();
    drop(dp);
    assert!(
        pins.0
            .join("links/uplink-{u1}".replace("{u1}", &u1.to_string()))
            .exists()
    );

    // uplink2 goes away (with its peer) while no agent runs.
    ns.ip(&["link", "del", "uplink2"]);
    assert!(pins.0.join("links/proxy-lookup").exists());
    let dp = Datapath::load(opts()).unwrap();
    assert_eq!(dp.policy().uplinks(), vec![u1]);
    assert!(
        dp.policy().proxy_lookup_attached(),
        "the sk_lookup link is adopted"
    );
    assert_eq!(
        dp.policy().mesh_addrs().unwrap()[&ip(POD_B)],
        MeshAddr::local(7)
    );
    assert!(dp.policy().mesh_ports().unwrap()[&k].strict);
    dp.policy().detach_uplink(u1).unwrap();
    assert!(dp.policy().uplinks().is_empty());
    dp.policy().attach_uplink(u1).unwrap();
    dp.policy().detach_proxy_lookup().unwrap();
    assert!(!dp.policy().proxy_lookup_attached());
    assert!(!pins.0.join("links/proxy-lookup").exists());
    dp.policy().attach_proxy_lookup().unwrap();
    dp.shutdown(false).unwrap();
    assert!(!pins.0.exists());
}

/// IPv6: the HBONE outbound listener's IPv6 slot. One node, pods A6 (mesh) and B6 whose
/// address is declared an HBONE peer (the steering happens at A's veth, whatever is behind
/// the address); an IPv4 listener does not serve IPv6 (plaintext, hbone-unavailable).
#[test]
fn hbone_outbound_steering_ipv6() {
    if !common::privileged("hbone") {
        return;
    }
    const GW6: &str = "fd00:7::1";
    const A6: &str = "fd00:7::2";
    const B6: &str = "fd00:7::3";
    comb_host::ensure_bpffs().unwrap();
    let pins = common::PinGuard::fresh();
    let (node, mut pods) = two_pod_node_v6("comb-hb6n", "comb-hb6p", GW6, [A6, B6]);
    let b = pods.pop().unwrap();
    let a = pods.pop().unwrap();
    // B's plain server answers on [B6]:8080 when nothing steers.
    let bname = b.0.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        join_netns(&bname);
        let l = TcpListener::bind(("::", STRICT_PORT)).unwrap();
        ready_tx.send(()).unwrap();
        if let Ok((mut c, _)) = l.accept() {
            let _ = c.write_all(b"plain\n");
        }
    });
    ready.recv_timeout(Duration::from_secs(5)).unwrap();

    let inside = InNetns::enter(&node);
    let dp = Datapath::load(DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: comb_host::cgroup2_mount().unwrap(),
    })
    .unwrap();
    let (ai, bi) = (ifindex("lxc1"), ifindex("lxc2"));
    let p = dp.policy();
    p.set_endpoint(ai, ID_A, &[ip(A6)]).unwrap();
    p.set_endpoint(bi, ID_B, &[ip(B6)]).unwrap();
    p.upsert_mesh_port(
        MeshPortKey {
            endpoint: ai,
            port: None,
        },
        MeshPort {
            enrolled: true,
            strict: false,
        },
    )
    .unwrap();
    p.upsert_mesh_addr(ip(B6), MeshAddr::peer()).unwrap();
    p.attach(ai).unwrap();
    p.attach(bi).unwrap();
    p.attach_proxy_lookup().unwrap();
    routing::install().unwrap();
    let l4 = transparent_listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, HBONE_OUT_PORT));
    p.set_listener(ListenerKind::HboneOut, ProxyFamily::V4, l4.as_fd())
        .unwrap();
    let dst = SocketAddr::new(ip(B6), STRICT_PORT);
    assert_eq!(hello(&a, dst, Duration::from_secs(5)), "plain");
    server.join().unwrap();
    assert_eq!(metric(&dp, ai, Egress, Reason::HboneUnavailable), 1);

    let l6 = {
        // IPV6_TRANSPARENT listener on [::1]:15001.
        let fd = {
            // SAFETY: plain socket syscalls on an fd we own; the sockaddr is fully initialised.
            unsafe {
                let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                assert!(fd >= 0);
                let owned = OwnedFd::from_raw_fd(fd);
                setsockopt_int(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1);
                setsockopt_int(fd, libc::SOL_IPV6, libc::IPV6_V6ONLY, 1);
                setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
                let mut sin6: libc::sockaddr_in6 = std::mem::zeroed();
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = HBONE_OUT_PORT.to_be();
                sin6.sin6_addr.s6_addr = std::net::Ipv6Addr::LOCALHOST.octets();
                let r = libc::bind(
                    fd,
                    (&sin6 as *const libc::sockaddr_in6).cast(),
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                );
                assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
                assert_eq!(libc::listen(fd, 16), 0);
                owned
            }
        };
        TcpListener::from(fd)
    };
    p.set_listener(ListenerKind::HboneOut, ProxyFamily::V6, l6.as_fd())
        .unwrap();
    let a_ns = a.0.clone();
    let client = std::thread::spawn(move || {
        join_netns(&a_ns);
        let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
        (
            c.local_addr().unwrap(),
            read_line(&mut c, Duration::from_secs(5)),
        )
    });
    let (mut s, peer) = accept_within(&l6, Duration::from_secs(5)).expect("IPv6 HBONE listener");
    assert_eq!(s.local_addr().unwrap(), dst);
    s.write_all(b"tunnelled6\n").unwrap();
    let (local, line) = client.join().unwrap();
    assert_eq!((peer, line.as_str()), (local, "tunnelled6"));
    assert_eq!(metric(&dp, ai, Egress, Reason::HboneRedirect), 1);
    drop(s);

    routing::remove().unwrap();
    dp.shutdown(false).unwrap();
    assert!(!pins.0.exists());
    drop(inside);
}
