//! Privileged tests of the socket load balancer: the 8 programs on a throwaway child cgroup,
//! clients (python) in that cgroup, backends in this process on loopback, VIPs on 127.77.0.0/16
//! (local, so an untranslated connect fails fast instead of hanging). Needs root; without it
//! fails under CI=true and is skipped with a notice otherwise.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use comb_datapath::{Datapath, DatapathOptions, LbService, SocketLbMode};
use common::{CgroupChild, CgroupGuard, PinGuard, bpftool_cgroup_show};
use serde_json::{Value, json};

const CLIENT: &str = r#"
import json, socket, sys, threading, time
def fam(h): return socket.AF_INET6 if ":" in h else socket.AF_INET
def addr(a): return "[%s]:%d" % a[:2] if ":" in a[0] else "%s:%d" % a[:2]
held = None
def serve(l):
    while True:
        c, _ = l.accept()
        c.sendall(b"native\n")
for line in sys.stdin:
    cmd = json.loads(line)
    op, h, p = cmd["op"], cmd.get("host"), cmd.get("port")
    try:
        if op == "tcp":
            counts, peers = {}, set()
            for i in range(cmd.get("n", 1)):
                s = socket.socket(fam(h), socket.SOCK_STREAM)
                s.settimeout(5)
                if "bind" in cmd:
                    s.bind((cmd["bind"], 0))
                s.connect((h, p))
                peers.add(addr(s.getpeername()))
                name = s.makefile().readline().strip()
                counts[name] = counts.get(name, 0) + 1
                s.close()
            out = {"counts": counts, "peers": sorted(peers)}
        elif op == "refused":
            tcp = cmd["proto"] == "tcp"
            s = socket.socket(fam(h), socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
            s.settimeout(5)
            t = time.perf_counter()
            try:
                if tcp:
                    s.connect((h, p))
                else:
                    s.sendto(b"x", (h, p))
                out = {"errno": 0}
            except OSError as e:
                out = {"errno": e.errno}
            out["ms"] = (time.perf_counter() - t) * 1000
            s.close()
        elif op == "udp":
            s = socket.socket(fam(h), socket.SOCK_DGRAM)
            s.settimeout(5)
            s.sendto(b"ping", (h, p))
            data, src = s.recvfrom(64)
            c = socket.socket(fam(h), socket.SOCK_DGRAM)
            c.settimeout(5)
            c.connect((h, p))
            c.send(b"ping")
            data2, src2 = c.recvfrom(64)
            out = {"reply": data.decode(), "src": addr(src), "creply": data2.decode(),
                   "csrc": addr(src2), "cpeer": addr(c.getpeername())}
        elif op == "hold":
            held = socket.socket(fam(h), socket.SOCK_STREAM)
            held.settimeout(5)
            held.connect((h, p))
            held_f = held.makefile()
            out = {"backend": held_f.readline().strip(), "peer": addr(held.getpeername())}
        elif op == "ping":
            held.sendall(b"hello\n")
            out = {"echo": held_f.readline().strip(), "peer": addr(held.getpeername())}
        elif op == "listen":
            l = socket.socket(fam(h), socket.SOCK_STREAM)
            l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            l.bind((h, p))
            l.listen(16)
            threading.Thread(target=serve, args=(l,), daemon=True).start()
            out = {}
        else:
            out = {"error": "unknown op " + op}
    except Exception as e:
        out = {"error": repr(e)}
    print(json.dumps(out), flush=True)
"#;

/// A throwaway network namespace (`ip netns add`), deleted on drop.
struct NetnsGuard(String);

impl NetnsGuard {
    fn new() -> Self {
        let name = common::unique("comb-lbt");
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        let g = Self(name);
        let ok = Command::new("ip")
            .args(["-n", &g.0, "link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "lo up in {}", g.0);
        g
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A test setup: the datapath with its own pins, the socket LB on a child cgroup. Field order
/// is drop order: the datapath shuts down, then pins and the cgroup go.
struct Lab {
    dp: Option<Datapath>,
    pins: PinGuard,
    cg: CgroupGuard,
}

impl Lab {
    /// The lab for a privileged test; None (skip) without root, see [`common::privileged`].
    fn privileged(mode: SocketLbMode) -> Option<Self> {
        common::privileged("socket-LB").then(|| Self::new(mode))
    }

    fn new(mode: SocketLbMode) -> Self {
        comb_host::ensure_bpffs().expect("bpffs");
        let mount = comb_host::cgroup2_mount().expect("cgroup2 mount");
        let cg = CgroupGuard::new(&mount);
        let pins = PinGuard::fresh();
        let dp = Datapath::load(DatapathOptions {
            pin_dir: pins.0.clone(),
            cgroup_root: mount.clone(),
        })
        .expect("loading datapath");
        let rel = cg.0.strip_prefix(&mount).unwrap().to_path_buf();
        dp.lb().attach(&rel, mode).expect("attach socket LB");
        Self {
            dp: Some(dp),
            pins,
            cg,
        }
    }

    fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().unwrap()
    }

    fn client(&self) -> Client {
        Client::spawn(&self.cg.0, None)
    }

    /// The test cgroup, relative to the cgroup2 mount.
    fn cg_rel(&self) -> PathBuf {
        self.cg
            .0
            .strip_prefix(comb_host::cgroup2_mount().unwrap())
            .unwrap()
            .to_path_buf()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take()
            && let Err(e) = dp.shutdown(false)
        {
            eprintln!("warning: shutdown: {e:#}");
        }
    }
}

/// The python client, joined to the cgroup (and optionally a netns); killed on drop.
struct Client(CgroupChild);

impl Client {
    fn spawn(cgroup: &Path, netns: Option<&str>) -> Self {
        Self(CgroupChild::spawn(cgroup, netns, CLIENT, &[]))
    }

    fn ask(&mut self, cmd: Value) -> Value {
        writeln!(self.0.stdin, "{cmd}").expect("writing to client");
        self.0.stdin.flush().unwrap();
        let line = self.0.line(
            Duration::from_secs(60),
            &format!("client gave no answer to {cmd}"),
        );
        let v: Value = serde_json::from_str(&line).expect("client JSON");
        assert!(v.get("error").is_none(), "{cmd} -> {v}");
        v
    }

    /// `n` TCP connects; (backend name → count, distinct peer names seen).
    fn tcp(&mut self, host: &str, port: u16, n: usize) -> (BTreeMap<String, u64>, Vec<String>) {
        let v = self.ask(json!({"op": "tcp", "host": host, "port": port, "n": n}));
        counts_peers(&v)
    }
}

fn counts_peers(v: &Value) -> (BTreeMap<String, u64>, Vec<String>) {
    let counts = v["counts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, c)| (k.clone(), c.as_u64().unwrap()))
        .collect();
    let peers = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    (counts, peers)
}

/// A TCP backend in this process: sends its name on accept, then echoes lines.
fn tcp_backend(ip: &str, name: &str) -> (IpAddr, u16) {
    let l = TcpListener::bind((ip, 0)).expect("backend bind");
    let addr = l.local_addr().unwrap();
    let name = name.to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let name = name.clone();
            std::thread::spawn(move || {
                if writeln!(s, "{name}").is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr.ip(), addr.port())
}

/// `n` TCP backends on 127.0.0.1, named b0, b1, ...
fn tcp_backends(n: usize) -> Vec<(IpAddr, u16)> {
    (0..n)
        .map(|i| tcp_backend("127.0.0.1", &format!("b{i}")))
        .collect()
}

/// A UDP backend in this process: answers every datagram with its name.
fn udp_backend(ip: &str, name: &str) -> (IpAddr, u16) {
    let s = UdpSocket::bind((ip, 0)).expect("udp bind");
    let addr = s.local_addr().unwrap();
    let name = name.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(name.as_bytes(), from);
        }
    });
    (addr.ip(), addr.port())
}

fn svc(vip: &str, port: u16, proto: u8, backends: Vec<(IpAddr, u16)>) -> LbService {
    LbService {
        vip: vip.parse().unwrap(),
        port,
        protocol: proto,
        backends,
        maglev: false,
        affinity_timeout_secs: 0,
    }
}

#[test]
fn tcp_connect_lands_on_a_backend_and_peer_is_the_vip() {
    let Some(mut lab) = Lab::privileged(SocketLbMode::All) else {
        return;
    };
    let shown = bpftool_cgroup_show(&lab.cg.0);
    for hook in [
        "connect4",
        "connect6",
        "sendmsg4",
        "sendmsg6",
        "recvmsg4",
        "recvmsg6",
        "getpeername4",
        "getpeername6",
    ] {
        assert!(shown.contains(hook), "{hook} not attached:\n{shown}");
        assert!(lab.pins.0.join("links").join(format!("lb-{hook}")).exists());
    }
    let b = tcp_backend("127.0.0.1", "b0");
    let s = svc("127.77.0.1", 80, 6, vec![b]);
    lab.dp().lb().upsert_service(&s).unwrap();
    assert_eq!(lab.dp().lb().services().unwrap(), vec![s.clone()]);
    let rel = lab.cg_rel();
    lab.dp()
        .lb()
        .attach(&rel, SocketLbMode::All)
        .expect("attach is idempotent");
    assert_eq!(lab.dp().lb().attachment(), Some((rel, SocketLbMode::All)));
    assert_eq!(
        bpftool_cgroup_show(&lab.cg.0).matches("connect4").count(),
        1
    );

    let mut c = lab.client();
    let (counts, peers) = c.tcp("127.77.0.1", 80, 5);
    assert_eq!(counts, BTreeMap::from([("b0".to_string(), 5)]));
    assert_eq!(
        peers,
        vec!["127.77.0.1:80".to_string()],
        "getpeername shows the VIP"
    );
    // A dual-stack AF_INET6 socket reaches the v4 Service as ::ffff:VIP (connect6 hook).
    let (counts, peers) = c.tcp("::ffff:127.77.0.1", 80, 3);
    assert_eq!(counts, BTreeMap::from([("b0".to_string(), 3)]));
    assert_eq!(peers, vec!["[::ffff:127.77.0.1]:80".to_string()]);
    let st = lab.dp().lb().stats().unwrap();
    assert_eq!(st.connects_translated, 8, "{st:?}");
    assert!(st.replies_reversed >= 8, "{st:?}");

    lab.dp()
        .lb()
        .remove_service("127.77.0.1".parse().unwrap(), 80, 6)
        .unwrap();
    assert!(lab.dp().lb().services().unwrap().is_empty());
    let pins = lab.pins.0.clone();
    let cg = lab.cg.0.clone();
    lab.dp().lb().detach().unwrap();
    assert!(lab.dp().lb().attachment().is_none());
    assert!(!pins.join("links/lb-connect4").exists());
    assert!(!bpftool_cgroup_show(&cg).contains("connect4"));
}

#[test]
fn tcp_ipv6_service() {
    let Some(mut lab) = Lab::privileged(SocketLbMode::All) else {
        return;
    };
    let b = tcp_backend("::1", "b6");
    lab.dp()
        .lb()
        .upsert_service(&svc("fd00:77::1", 443, 6, vec![b]))
        .unwrap();
    let mut c = lab.client();
    let (counts, peers) = c.tcp("fd00:77::1", 443, 3);
    assert_eq!(counts, BTreeMap::from([("b6".to_string(), 3)]));
    assert_eq!(peers, vec!["[fd00:77::1]:443".to_string()]);
}

#[test]
fn udp_replies_come_from_the_vip() {
    let Some(mut lab) = Lab::privileged(SocketLbMode::All) else {
        return;
    };
    let b = udp_backend("127.0.0.1", "u0");
    lab.dp()
        .lb()
        .upsert_service(&svc("127.77.0.2", 53, 17, vec![b]))
        .unwrap();
    let mut c = lab.client();
    let v = c.ask(json!({"op": "udp", "host": "127.77.0.2", "port": 53}));
    assert_eq!(v["reply"], "u0", "{v}");
    assert_eq!(v["src"], "127.77.0.2:53", "recvfrom shows the VIP: {v}");
    assert_eq!(v["creply"], "u0", "{v}");
    assert_eq!(v["csrc"], "127.77.0.2:53", "{v}");
    assert_eq!(v["cpeer"], "127.77.0.2:53", "{v}");
    let st = lab.dp().lb().stats().unwrap();
    assert_eq!(st.sendmsgs_translated, 1, "{st:?}");
    assert_eq!(st.connects_translated, 1, "{st:?}");
    assert!(st.replies_reversed >= 3, "{st:?}");
}

#[test]
fn no_backends_refuses_at_once() {
    let Some(mut lab) = Lab::privileged(SocketLbMode::All) else {
        return;
    };
    lab.dp()
        .lb()
        .upsert_service(&svc("127.77.0.3", 80, 6, vec![]))
        .unwrap();
    lab.dp()
        .lb()
        .upsert_service(&svc("127.77.0.3", 53, 17, vec![]))
        .unwrap();
    let mut c = lab.client();
    for proto in ["tcp", "udp"] {
        let port = if proto == "tcp" { 80 } else { 53 };
        let v = c.ask(json!({"op": "refused", "proto": proto, "host": "127.77.0.3", "port": port}));
        eprintln!("{proto} to a Service without backends: {v}");
        assert_eq!(v["errno"], libc::ECONNREFUSED, "{proto}: {v}");
        assert!(v["ms"].as_f64().unwrap() < 10.0, "{proto}: {v}");
    }
    assert_eq!(lab.dp().lb().stats().unwrap().refused_no_backend, 2);
}

#[test]
fn random_spreads_over_all_backends() {
    let Some(mut lab) = Lab::privileged(SocketLbMode::All) else {
        return;
    };
    let backends = tcp_backends(4);
    lab.dp()
        .lb()
        .upsert_service(&svc("127.77.0.4", 80, 6, backends))
        .unwrap();
    let mut c = lab.client();
    let (counts, _) = c.tcp("127.77.0.4", 80, 2000);
    eprintln!("2000 random connects: {counts:?}");
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(counts.values().all(|&n| n > 350), "{counts:?}");
    assert_eq!(lab.dp().lb().stats().unwrap().connects_translated, 2000);
}

#[test]
fn maglev_same_client_same_backend() {
    let Some(mut lab) = Lab::privileged(SocketLbMode::All) else {
        return;
    };
    let backends = tcp_backends(4);
    let mut s = svc("127.77.0.5", 80, 6, backends);
    s.maglev = true;
    lab.dp().lb().upsert_service(&s).unwrap();
    assert_eq!(lab.dp().lb().services().unwrap(), vec![s.clone()]);
    let mut c = lab.client();
    let (counts, _) = c.tcp("127.77.0.5", 80, 100);
    assert_eq!(
        counts.len(),
        1,
        "one unbound client, one backend: {counts:?}"
    );
    // Bound sockets: the source port is part of the client hash, so they spread.
    let v = c
        .ask(json!({"op": "tcp", "host": "127.77.0.5", "port": 80, "n": 100, "bind": "127.0.0.1"}));
    let (counts, _) = counts_peers(&v);
    eprintln!("maglev, 100 bound source ports: {counts:?}");
    assert!(counts.len() >= 3, "{counts:?}");
}

#[test]
fn affinity_keeps_the_backend() {
    let Some(mut lab) = Lab::privileged(SocketLbMode::All) else {
        return;
    };
    let mut backends = tcp_backends(4);
    let mut s = svc("127.77.0.6", 80, 6, backends.clone());
    s.affinity_timeout_secs = 60;
    lab.dp().lb().upsert_service(&s).unwrap();
    let mut c = lab.client();
    let (counts, _) = c.tcp("127.77.0.6", 80, 50);
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_eq!(lab.dp().lb().stats().unwrap().affinity_hits, 49);
    let chosen = counts.keys().next().unwrap().clone();
    // A new backend set that still holds the chosen one (at another index): kept.
    backends.insert(0, tcp_backend("127.0.0.1", "b4"));
    backends.reverse();
    s.backends = backends;
    lab.dp().lb().upsert_service(&s).unwrap();
    let (counts, _) = c.tcp("127.77.0.6", 80, 20);
    assert_eq!(counts, BTreeMap::from([(chosen, 20)]));
    assert_eq!(lab.dp().lb().stats().unwrap().affinity_hits, 69);

    // Expiry: after the timeout the remembered backend is not used.
    let mut short = svc("127.77.0.7", 80, 6, s.backends.clone());
    short.affinity_timeout_secs = 1;
    lab.dp().lb().upsert_service(&short).unwrap();
    c.tcp("127.77.0.7", 80, 1);
    std::thread::sleep(Duration::from_millis(1200));
    let hits = lab.dp().lb().stats().unwrap().affinity_hits;
    c.tcp("127.77.0.7", 80, 1);
    assert_eq!(
        lab.dp().lb().stats().unwrap().affinity_hits,
        hits,
        "expired"
    );
    c.tcp("127.77.0.7", 80, 1);
    assert_eq!(lab.dp().lb().stats().unwrap().affinity_hits, hits + 1);
}

#[test]
fn backend_update_keeps_established_connections() {
    let Some(mut lab) = Lab::privileged(SocketLbMode::All) else {
        return;
    };
    let b0 = tcp_backend("127.0.0.1", "b0");
    let b1 = tcp_backend("127.0.0.1", "b1");
    lab.dp()
        .lb()
        .upsert_service(&svc("127.77.0.8", 80, 6, vec![b0]))
        .unwrap();
    let mut c = lab.client();
    let v = c.ask(json!({"op": "hold", "host": "127.77.0.8", "port": 80}));
    assert_eq!(v["backend"], "b0");
    // Replace the set: b0 leaves, b1 arrives. New connects go to b1, the held one keeps b0.
    lab.dp()
        .lb()
        .upsert_service(&svc("127.77.0.8", 80, 6, vec![b1]))
        .unwrap();
    let (counts, _) = c.tcp("127.77.0.8", 80, 10);
    assert_eq!(counts, BTreeMap::from([("b1".to_string(), 10)]));
    let v = c.ask(json!({"op": "ping"}));
    assert_eq!(v["echo"], "hello", "{v}");
    assert_eq!(v["peer"], "127.77.0.8:80", "{v}");
    // Even with the Service gone.
    lab.dp()
        .lb()
        .remove_service("127.77.0.8".parse().unwrap(), 80, 6)
        .unwrap();
    let v = c.ask(json!({"op": "ping"}));
    assert_eq!(v["echo"], "hello", "{v}");
}

#[test]
fn host_only_leaves_other_netns_alone() {
    let Some(mut lab) = Lab::privileged(SocketLbMode::HostOnly) else {
        return;
    };
    let b = tcp_backend("127.0.0.1", "b0");
    lab.dp()
        .lb()
        .upsert_service(&svc("127.77.0.9", 80, 6, vec![b]))
        .unwrap();
    // Same netns as this process (the "node"): translated.
    let mut c = lab.client();
    let (counts, _) = c.tcp("127.77.0.9", 80, 3);
    assert_eq!(counts, BTreeMap::from([("b0".to_string(), 3)]));
    // Another netns, same cgroup: untranslated, reaches that netns' own 127.77.0.9:80.
    let ns = NetnsGuard::new();
    let mut other = Client::spawn(&lab.cg.0, Some(&ns.0));
    other.ask(json!({"op": "listen", "host": "127.77.0.9", "port": 80}));
    let (counts, peers) = other.tcp("127.77.0.9", 80, 3);
    assert_eq!(counts, BTreeMap::from([("native".to_string(), 3)]));
    assert_eq!(peers, vec!["127.77.0.9:80".to_string()]);
    assert_eq!(lab.dp().lb().stats().unwrap().connects_translated, 3);
    drop(other);
    // Mode All translates the other netns too.
    let rel = lab.cg_rel();
    lab.dp().lb().attach(&rel, SocketLbMode::All).unwrap();
    // The backend (127.0.0.1:port of this netns) does not exist in that netns: refused, where
    // untranslated it would have reached the "native" listener.
    let mut other = Client::spawn(&lab.cg.0, Some(&ns.0));
    let v = other.ask(json!({"op": "refused", "proto": "tcp", "host": "127.77.0.9", "port": 80}));
    assert_eq!(v["errno"], libc::ECONNREFUSED, "{v}");
    assert_eq!(lab.dp().lb().stats().unwrap().connects_translated, 4);
    drop(other);
}

#[test]
fn restart_adopts_services_and_links() {
    let Some(mut lab) = Lab::privileged(SocketLbMode::HostOnly) else {
        return;
    };
    let b = tcp_backend("127.0.0.1", "b0");
    let mut a = svc("127.77.0.10", 80, 6, vec![b]);
    a.maglev = true;
    let bsvc = svc("127.77.0.11", 80, 6, vec![]);
    lab.dp().lb().upsert_service(&a).unwrap();
    lab.dp().lb().upsert_service(&bsvc).unwrap();
    let before = lab.dp().lb().services().unwrap();
    let attached = lab.dp().lb().attachment();
    lab.dp.take().unwrap().shutdown(true).unwrap();
    let mut c = lab.client();
    let (counts, _) = c.tcp("127.77.0.10", 80, 2);
    assert_eq!(
        counts.len(),
        1,
        "pinned programs keep working without an agent"
    );

    let mount = comb_host::cgroup2_mount().unwrap();
    let dp = Datapath::load(DatapathOptions {
        pin_dir: lab.pins.0.clone(),
        cgroup_root: mount,
    })
    .expect("reload adopts pins");
    lab.dp = Some(dp);
    assert_eq!(lab.dp().lb().services().unwrap(), before);
    assert_eq!(lab.dp().lb().attachment(), attached);
    // Ids were adopted: a new Service does not reuse a live id (checked through behaviour:
    // both old Services still resolve after adding a third).
    lab.dp()
        .lb()
        .upsert_service(&svc("127.77.0.12", 80, 6, vec![b]))
        .unwrap();
    let (counts, _) = c.tcp("127.77.0.10", 80, 2);
    assert_eq!(counts, BTreeMap::from([("b0".to_string(), 2)]));
    let v = c.ask(json!({"op": "refused", "proto": "tcp", "host": "127.77.0.11", "port": 80}));
    assert_eq!(v["errno"], libc::ECONNREFUSED);
    assert_eq!(
        bpftool_cgroup_show(&lab.cg.0).matches("connect4").count(),
        1
    );
}
