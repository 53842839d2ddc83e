//! Helpers of the policy privileged tests: throwaway network namespaces, entering one on the
//! test's own thread, and a fixture with a loaded datapath and a veth to run programs on.

pub mod packets;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use comb_datapath::{Datapath, DatapathOptions, PolicyMetric};
use comb_model::terms::{Direction, Reason};

use crate::common::{self, PinGuard};

/// `ip` with `args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace (`ip netns add`), deleted on drop with everything in it.
pub struct Netns(pub String);

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = common::unique(prefix);
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.0.as_str()];
        a.extend_from_slice(args);
        ip(&a);
    }

    /// Run a command in the namespace; its output when it succeeds.
    pub fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("running ip netns exec");
        assert!(
            out.status.success(),
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn sysctl(&self, kv: &str) {
        self.exec(&["sysctl", "-qw", kv]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn netns_ino(path: &str) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .ino()
}

/// The calling thread inside a namespace until dropped (setns is per thread, so other tests
/// are not affected). Refuses to stay in the namespace the test started in: nothing here may
/// attach to the machine's own interfaces.
pub struct InNetns {
    orig: File,
}

impl InNetns {
    pub fn enter(ns: &Netns) -> Self {
        let orig = File::open("/proc/thread-self/ns/net").expect("opening our netns");
        let target_path = format!("/run/netns/{}", ns.0);
        let target = File::open(&target_path).expect("opening the test netns");
        // SAFETY: valid fd of a network namespace file.
        let r = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "setns into {}: {}",
            ns.0,
            std::io::Error::last_os_error()
        );
        let now = netns_ino("/proc/thread-self/ns/net");
        assert_eq!(now, netns_ino(&target_path), "not in the test netns");
        assert_ne!(
            now,
            orig.metadata().unwrap().ino(),
            "still in the original netns"
        );
        // PID 1's namespace, when we may look at it (not in every sandbox).
        if let Ok(md) = std::fs::metadata("/proc/1/ns/net") {
            assert_ne!(now, md.ino(), "in the root netns");
        }
        Self { orig }
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        // SAFETY: valid fd of our original namespace.
        unsafe { libc::setns(self.orig.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// A node namespace with two pods (namespaces) on veths `lxc1`/`lxc2`, routed like the lab:
/// pod `eth0` with a /32 and a default route via `gw`, which every host veth carries; IPv6 off
/// everywhere. Returns the node and (pod, host-side interface) in `addrs` order.
pub fn two_pod_node(
    node_prefix: &str,
    pod_prefix: &str,
    gw: &str,
    addrs: [&str; 2],
) -> (Netns, Vec<(Netns, String)>) {
    let node = Netns::new(node_prefix);
    node.sysctl("net.ipv4.ip_forward=1");
    node.sysctl("net.ipv4.conf.all.rp_filter=0");
    node.sysctl("net.ipv6.conf.all.disable_ipv6=1");
    let mut pods = Vec::new();
    for (i, addr) in (1..).zip(addrs) {
        let pod = Netns::new(pod_prefix);
        pod.sysctl("net.ipv6.conf.all.disable_ipv6=1");
        let host_if = format!("lxc{i}");
        node.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.0,
        ]);
        node.sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter=0"));
        node.ip(&["addr", "add", &format!("{gw}/32"), "dev", &host_if]);
        node.ip(&["link", "set", &host_if, "up"]);
        node.ip(&["route", "add", &format!("{addr}/32"), "dev", &host_if]);
        pod.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", gw, "dev", "eth0", "scope", "link"]);
        pod.ip(&["route", "add", "default", "via", gw, "dev", "eth0"]);
        pods.push((pod, host_if));
    }
    (node, pods)
}

/// [`two_pod_node`] with IPv6 only: `gw` (nodad) on every host veth, pods with a /128 and a
/// default route via `gw`, DAD off. Returns the node and the pods in `addrs` order.
#[allow(dead_code)] // the redirect and HBONE suites use it, the policy suite does not
pub fn two_pod_node_v6(
    node_prefix: &str,
    pod_prefix: &str,
    gw: &str,
    addrs: [&str; 2],
) -> (Netns, Vec<Netns>) {
    let node = Netns::new(node_prefix);
    for kv in [
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ] {
        node.sysctl(kv);
    }
    let mut pods = Vec::new();
    for (i, addr) in (1..).zip(addrs) {
        let pod = Netns::new(pod_prefix);
        pod.sysctl("net.ipv6.conf.all.accept_dad=0");
        pod.sysctl("net.ipv6.conf.default.accept_dad=0");
        let host_if = format!("lxc{i}");
        node.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.0,
        ]);
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{gw}/128"),
            "dev",
            &host_if,
            "nodad",
        ]);
        node.ip(&["link", "set", &host_if, "up"]);
        node.ip(&[
            "-6",
            "route",
            "add",
            &format!("{addr}/128"),
            "dev",
            &host_if,
        ]);
        pod.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["-6", "route", "add", gw, "dev", "eth0"]);
        pod.ip(&["-6", "route", "add", "default", "via", gw, "dev", "eth0"]);
        pods.push(pod);
    }
    (node, pods)
}

/// The ifindex of `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

/// A datapath loaded inside a fresh namespace holding the veth pair `v0`/`v1`; the policy
/// programs are run (BPF_PROG_TEST_RUN) as if packets crossed `v0`.
/// Field order is drop order: the datapath, then back to our netns, the netns, the pins.
pub struct Fixture {
    pub dp: Option<Datapath>,
    /// `v0`: the endpoint's host veth.
    pub ifindex: u32,
    /// `v1`: an interface without an endpoint entry.
    pub other: u32,
    _in: InNetns,
    pub ns: Netns,
    pub pins: PinGuard,
}

pub const PASS: u32 = 0;
pub const DROP: u32 = 2;

impl Fixture {
    pub fn new() -> Self {
        comb_host::ensure_bpffs().expect("bpffs");
        let pins = PinGuard::fresh();
        let ns = Netns::new("comb-pol");
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        let inside = InNetns::enter(&ns);
        let dp = Datapath::load(DatapathOptions {
            pin_dir: pins.0.clone(),
            cgroup_root: comb_host::cgroup2_mount().expect("cgroup2 mount"),
        })
        .expect("loading the datapath");
        Self {
            dp: Some(dp),
            ifindex: ifindex("v0"),
            other: ifindex("v1"),
            _in: inside,
            ns,
            pins,
        }
    }

    pub fn dp(&self) -> &Datapath {
        self.dp.as_ref().unwrap()
    }

    pub fn dp_mut(&mut self) -> &mut Datapath {
        self.dp.as_mut().unwrap()
    }

    /// Run the program of `dir` on `pkt` crossing the endpoint's veth.
    pub fn run(&self, dir: Direction, pkt: &[u8]) -> u32 {
        self.run_on(self.ifindex, dir, pkt)
    }

    pub fn run_on(&self, ifindex: u32, dir: Direction, pkt: &[u8]) -> u32 {
        self.dp()
            .policy()
            .test_run(dir, ifindex, pkt, 1)
            .expect("BPF_PROG_TEST_RUN")
    }

    /// Packets counted for (the endpoint, dir, reason).
    pub fn count(&self, dir: Direction, reason: Reason) -> u64 {
        self.metric(dir, reason).map_or(0, |m| m.packets)
    }

    pub fn metric(&self, dir: Direction, reason: Reason) -> Option<PolicyMetric> {
        self.dp()
            .policy()
            .metrics()
            .unwrap()
            .into_iter()
            .find(|m| m.endpoint == self.ifindex && m.direction == dir && m.reason == reason)
    }

    /// Shut the datapath down without keeping pins and check nothing is left.
    pub fn finish(mut self) {
        let dp = self.dp.take().unwrap();
        dp.shutdown(false).expect("shutdown");
        assert!(!self.pins.0.exists(), "pin dir left behind");
    }
}
