//! The splice's desired state: local pod addresses (splice allowed or not) and the cgroups
//! whose sockets join the sockhash.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::{Pod, State};

/// The pod half of what this node's datapath should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredPods {
    /// Local pod address → splice allowed.
    pub endpoints: BTreeMap<IpAddr, bool>,
    /// Attachment id → pod cgroup relative to the cgroup root.
    pub cgroups: BTreeMap<String, PathBuf>,
}

/// The attachment id of a pod: stable, filename-safe.
pub fn attach_id(pod: &Pod) -> String {
    format!("{}_{}", pod.key.namespace, pod.key.name)
}

/// The attachment id of the node proxy's cgroup (a namespace never starts with `_`).
pub const PROXY_ATTACH_ID: &str = "_proxy";

pub fn desired(state: &State, node: &str, proxy_cgroup: Option<&Path>) -> DesiredPods {
    let mut d = DesiredPods::default();
    if let Some(cg) = proxy_cgroup {
        d.cgroups
            .insert(PROXY_ATTACH_ID.to_owned(), cg.to_path_buf());
    }
    for pod in state.local_pods(node) {
        for ip in &pod.ips {
            d.endpoints.insert(*ip, pod.splice);
        }
        // An opted-out pod gets no sockops at all: its sockets never enter the sockhash.
        if let (Some(cg), true) = (&pod.cgroup, pod.splice) {
            d.cgroups
                .insert(attach_id(pod), PathBuf::from(cg.trim_start_matches('/')));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ObjKey, Snapshot};

    fn pod(name: &str, node: &str, ip: &str, splice: bool) -> Pod {
        Pod {
            key: ObjKey::new("default", name),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            node_name: Some(node.into()),
            service_account: "default".into(),
            ips: vec![ip.parse().unwrap()],
            cgroup: Some(format!("/lab/{name}")),
            splice,
            interface: None,
            ports: Vec::new(),
            owner: None,
        }
    }

    fn state(pods: Vec<Pod>) -> State {
        let mut snap = Snapshot::default();
        for p in pods {
            snap.pods.insert(p.key.clone(), p);
        }
        let mut s = State::new();
        s.replace(snap);
        s
    }

    #[test]
    fn the_proxy_cgroup_joins_the_splice_under_its_own_id() {
        let s = state(vec![pod("a", "n1", "10.0.0.1", true)]);
        let d = desired(&s, "n1", Some(Path::new("lab/n1/_combd")));
        assert_eq!(
            d.cgroups.get(PROXY_ATTACH_ID),
            Some(&PathBuf::from("lab/n1/_combd"))
        );
        assert_eq!(d.cgroups.len(), 2);
        assert!(
            !desired(&s, "n1", None)
                .cgroups
                .contains_key(PROXY_ATTACH_ID)
        );
    }

    #[test]
    fn only_local_pods_are_desired() {
        let s = state(vec![
            pod("a", "n1", "198.18.1.2", true),
            pod("b", "n2", "198.18.2.2", true),
        ]);
        let d = desired(&s, "n1", None);
        assert_eq!(
            d.endpoints
                .keys()
                .map(|i| i.to_string())
                .collect::<Vec<_>>(),
            ["198.18.1.2"]
        );
        assert_eq!(d.cgroups.get("default_a"), Some(&PathBuf::from("lab/a")));
        assert!(!d.cgroups.contains_key("default_b"));
    }

    #[test]
    fn opted_out_pod_is_an_endpoint_without_sockops() {
        let s = state(vec![pod("a", "n1", "198.18.1.2", false)]);
        let d = desired(&s, "n1", None);
        assert_eq!(
            d.endpoints.get(&"198.18.1.2".parse().unwrap()),
            Some(&false)
        );
        assert!(d.cgroups.is_empty());
    }

    #[test]
    fn pod_without_address_is_ignored() {
        let mut p = pod("a", "n1", "198.18.1.2", true);
        p.ips.clear();
        let d = desired(&state(vec![p]), "n1", None);
        assert_eq!(d, DesiredPods::default());
    }
}
