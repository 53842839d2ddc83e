//! Every name and address the lab uses, derived from the lab name, node order and pod order.
//! Kept pure so the scheme is unit-tested and so teardown can find things from the lab name
//! alone (a crashed run may not have written its state).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Result, bail};

/// Prefix of every network namespace the lab creates (`down_all` sweeps `comb-*`).
pub const NETNS_PREFIX: &str = "comb-";
/// Prefix of every lab cgroup directly under the cgroup2 mount.
pub const CGROUP_PREFIX: &str = "comb-lab-";
/// Where lab state directories live.
pub const RUN_DIR: &str = "/run/comb/lab";
/// Where agents of lab nodes pin their programs: `<PIN_ROOT>/<lab>-<node>`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/comb";
/// Cgroup leaf (under the node cgroup) for the node's agent. Pod leaves are `<ns>_<pod>` and a
/// namespace is never empty, so a leading `_` cannot collide with a pod.
pub const AGENT_CGROUP: &str = "_combd";
/// Cgroup leaf for processes started with `node_command`.
pub const NODE_CGROUP: &str = "_node";
/// The CA's cgroup under the lab cgroup (node names cannot start with `_`).
pub const CA_CGROUP: &str = "_ca";
/// Cgroup leaf (under the node cgroup) of the node's kubelet stand-in (Kubernetes mode).
pub const KUBELET_CGROUP: &str = "_kubelet";
/// Under the node cgroup: the kubelet's pod cgroups, in its cgroupfs layout
/// (`kubepods/besteffort/pod<uid>/<container>`).
pub const KUBEPODS_CGROUP: &str = "kubepods";
/// The control plane's cgroup under the lab cgroup (Kubernetes mode).
pub const KUBE_CGROUP: &str = "_kube";
/// The CA's port (Istio's istiod port for the CA API).
pub const CA_PORT: u16 = 15012;
/// Network names are files under /run/netns; stay well below NAME_MAX and readable.
pub const MAX_NETNS_LEN: usize = 59;
/// Router link subnet: node k's uplink is 198.18.254.k, the router side 198.18.254.254.
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 254);
/// Node indexes are the third octet; 254 is the router link.
pub const MAX_NODES: usize = 253;
/// Pods get .2 ..= .254 of their node's /24 (.1 is the gateway on the node side).
pub const MAX_PODS_PER_NODE: usize = 253;

/// Lab names are embedded in netns, cgroup and pin names: keep them short and plain.
pub fn validate_lab_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 8
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        bail!("invalid lab name {name:?}: use 1 to 8 characters from [a-z0-9]");
    }
    Ok(())
}

/// Kubernetes object names (DNS labels / subdomains) as path components: refuse anything
/// that could escape a directory or break `ip` argument parsing.
pub fn validate_object_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.']);
    if !ok {
        bail!("invalid {what} {name:?}: must be a lowercase DNS name ([a-z0-9.-])");
    }
    Ok(())
}

/// `[a-z0-9-]` only (dots become dashes) so names read well in `ip netns list`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// FNV-1a: stable across runs and Rust versions (unlike DefaultHasher), enough to keep
/// truncated names distinct.
fn fnv32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Fit `full` into MAX_NETNS_LEN; when truncating, append a hash of the untruncated name.
fn fit(full: String) -> String {
    if full.len() <= MAX_NETNS_LEN {
        return full;
    }
    let hash = format!("-{:08x}", fnv32(&full));
    let keep = MAX_NETNS_LEN - hash.len();
    format!("{}{hash}", full[..keep].trim_end_matches('-'))
}

pub fn lab_netns_prefix(lab: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-")
}

pub fn node_netns(lab: &str, node: &str) -> String {
    fit(format!("{NETNS_PREFIX}{lab}-{}", sanitize(node)))
}

pub fn router_netns(lab: &str) -> String {
    format!("{NETNS_PREFIX}{lab}-router")
}

/// `comb-<lab>-<node>-<ns>-<pod>`; the `-p-` keeps pod namespaces apart from node
/// namespaces whose node name happens to contain dashes.
pub fn pod_netns(lab: &str, node: &str, namespace: &str, pod: &str) -> String {
    fit(format!(
        "{NETNS_PREFIX}{lab}-{}-p-{}-{}",
        sanitize(node),
        sanitize(namespace),
        sanitize(pod)
    ))
}

/// Lab name from a netns name made by this module (`comb-<lab>-...`).
pub fn lab_of_netns(netns: &str) -> Option<&str> {
    let rest = netns.strip_prefix(NETNS_PREFIX)?;
    let (lab, _) = rest.split_once('-')?;
    validate_lab_name(lab).ok().map(|_| lab)
}

/// Lab cgroup relative to the cgroup2 mount.
pub fn lab_cgroup(lab: &str) -> PathBuf {
    PathBuf::from(format!("{CGROUP_PREFIX}{lab}"))
}

pub fn node_cgroup(lab: &str, node: &str) -> PathBuf {
    lab_cgroup(lab).join(node)
}

pub fn pod_cgroup(lab: &str, node: &str, namespace: &str, pod: &str) -> PathBuf {
    node_cgroup(lab, node).join(format!("{namespace}_{pod}"))
}

/// A Kubernetes-mode pod's cgroup relative to the cgroup2 mount, as a kubelet with the
/// cgroupfs driver makes it for a BestEffort pod.
pub fn kube_pod_cgroup(lab: &str, node: &str, uid: &str) -> PathBuf {
    node_cgroup(lab, node)
        .join(KUBEPODS_CGROUP)
        .join("besteffort")
        .join(format!("pod{uid}"))
}

pub fn state_dir(lab: &str) -> PathBuf {
    PathBuf::from(RUN_DIR).join(lab)
}

pub fn pin_dir(lab: &str, node: &str) -> PathBuf {
    PathBuf::from(PIN_ROOT).join(format!("{lab}-{node}"))
}

/// Node k (1-based) owns 198.18.k.0/24.
pub fn node_cidr(node_index: usize) -> String {
    format!("198.18.{node_index}.0/24")
}

pub fn node_gateway(node_index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node_index as u8, 1)
}

/// Pod j (0-based within its node) gets 198.18.k.(j+2).
pub fn pod_ip(node_index: usize, pod_index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node_index as u8, (pod_index + 2) as u8)
}

/// Node-side veth of a pod, named after the pod's last octet: unique per node, ≤ 15 chars.
pub fn host_veth(ip: Ipv4Addr) -> String {
    format!("lxc{}", ip.octets()[3])
}

pub fn uplink_ip(node_index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 254, node_index as u8)
}

/// Router-side veth towards node k.
pub fn router_veth(node_index: usize) -> String {
    format!("n{node_index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names() {
        assert!(validate_lab_name("t1").is_ok());
        assert!(validate_lab_name("abcdefgh").is_ok());
        for bad in ["", "abcdefghi", "A", "a-b", "a_b", "a/b"] {
            assert!(validate_lab_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn object_names() {
        assert!(validate_object_name("pod", "web-1.x").is_ok());
        for bad in ["", "Web", "a/b", "..", "-a", "a b"] {
            assert!(validate_object_name("pod", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn netns_names() {
        assert_eq!(node_netns("t1", "node-a"), "comb-t1-node-a");
        assert_eq!(
            pod_netns("t1", "n1.x", "default", "web"),
            "comb-t1-n1-x-p-default-web"
        );
        assert_eq!(router_netns("t1"), "comb-t1-router");
        assert_eq!(lab_of_netns("comb-t1-node-a"), Some("t1"));
        assert_eq!(lab_of_netns("other"), None);
    }

    #[test]
    fn long_names_are_truncated_distinctly() {
        let long = "a".repeat(100);
        let a = pod_netns("t1", "n1", "default", &format!("{long}1"));
        let b = pod_netns("t1", "n1", "default", &format!("{long}2"));
        assert!(a.len() <= MAX_NETNS_LEN && b.len() <= MAX_NETNS_LEN);
        assert_ne!(a, b);
        assert!(a.starts_with("comb-t1-n1-p-default-aaa"));
        assert_eq!(lab_of_netns(&a), Some("t1"));
    }

    #[test]
    fn addressing() {
        assert_eq!(node_cidr(2), "198.18.2.0/24");
        assert_eq!(node_gateway(2), Ipv4Addr::new(198, 18, 2, 1));
        assert_eq!(pod_ip(2, 0), Ipv4Addr::new(198, 18, 2, 2));
        assert_eq!(pod_ip(1, 252), Ipv4Addr::new(198, 18, 1, 254));
        assert_eq!(host_veth(pod_ip(1, 252)), "lxc254");
        assert_eq!(uplink_ip(3), Ipv4Addr::new(198, 18, 254, 3));
        assert_eq!(router_veth(3), "n3");
    }

    #[test]
    fn paths() {
        assert_eq!(
            pod_cgroup("t1", "n1", "default", "web"),
            PathBuf::from("comb-lab-t1/n1/default_web")
        );
        assert_eq!(pin_dir("t1", "n1"), PathBuf::from("/sys/fs/bpf/comb/t1-n1"));
        assert_eq!(state_dir("t1"), PathBuf::from("/run/comb/lab/t1"));
    }
}
