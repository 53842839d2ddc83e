//! Security identities: one number per distinct (namespace, service account, labels) of the
//! pods, reserved numbers for the node, other nodes, the world and unmanaged pod addresses, and
//! numbers for the CIDRs policies name; and the ipcache, the prefix → identity table the
//! kernel looks peers up in.
//!
//! Numbers are node-local (nothing carries them on the wire) but must stay the same across
//! agent restarts, because pinned maps and live conntrack entries hold them: the
//! [`IdentityAllocator`] is serializable and the agent persists it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::objects::{ObjKey, Pod};
use crate::policy::TRUST_DOMAIN;
use crate::snapshot::Snapshot;

pub type IdentityId = u32;

/// In a policy key: every identity without entries of its own.
pub const ID_ANY: IdentityId = 0;
pub const ID_HOST: IdentityId = 1;
/// A peer address the ipcache does not know (cannot happen while the /0 entries exist).
pub const ID_WORLD: IdentityId = 2;
/// An address in a node's pod CIDRs that belongs to no known pod.
pub const ID_UNMANAGED: IdentityId = 3;
pub const ID_REMOTE_NODE: IdentityId = 6;
/// Outside every other prefix, per family (Cilium's dual-stack world identities), so that
/// `ipBlock: 0.0.0.0/0` selects exactly the IPv4 world.
pub const ID_WORLD_IPV4: IdentityId = 9;
pub const ID_WORLD_IPV6: IdentityId = 10;
pub const FIRST_WORKLOAD_ID: IdentityId = 256;
pub const FIRST_CIDR_ID: IdentityId = 1 << 24;
const LAST_WORKLOAD_ID: IdentityId = FIRST_CIDR_ID - 1;
const LAST_CIDR_ID: IdentityId = (1 << 25) - 1;

/// Label Kubernetes puts on every namespace; namespace selectors can always use it.
pub const LABEL_NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

/// What an allocated identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IdentityKey {
    Workload {
        namespace: String,
        service_account: String,
        labels: BTreeMap<String, String>,
    },
    Cidr(IpNet),
}

impl IdentityKey {
    pub fn of_pod(p: &Pod) -> Self {
        IdentityKey::Workload {
            namespace: p.key.namespace.clone(),
            service_account: p.service_account.clone(),
            labels: p.labels.clone(),
        }
    }
}

/// Allocations that must survive restarts. Numbers are handed out in increasing order and
/// not reused until the range wraps, so a number freed by one label set does not name
/// another one while old conntrack entries or flow logs still mention it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityAllocator {
    assigned: Vec<(IdentityKey, IdentityId)>,
    next_workload: IdentityId,
    next_cidr: IdentityId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdentityKind {
    Reserved(String),
    Workload {
        namespace: String,
        service_account: String,
        labels: BTreeMap<String, String>,
    },
    Cidr(IpNet),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: IdentityId,
    pub kind: IdentityKind,
    /// The addresses this identity covers, as prefixes (pods' /32s, node addresses, the
    /// CIDR itself). A prefix identity does not cover the longer ipcache prefixes inside it.
    pub prefixes: Vec<IpNet>,
}

impl Identity {
    /// Cilium-style label strings, for display.
    pub fn label_strings(&self) -> Vec<String> {
        match &self.kind {
            IdentityKind::Reserved(name) => vec![format!("reserved:{name}")],
            IdentityKind::Workload {
                namespace,
                service_account,
                labels,
            } => {
                let mut out: Vec<String> =
                    labels.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect();
                out.push(format!("k8s:io.kubernetes.pod.namespace={namespace}"));
                out.push(format!(
                    "k8s:io.kubernetes.pod.serviceaccount={service_account}"
                ));
                out
            }
            IdentityKind::Cidr(net) => vec![format!("cidr:{net}")],
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        match &self.kind {
            IdentityKind::Workload { namespace, .. } => Some(namespace),
            _ => None,
        }
    }

    /// The Istio principal of a workload: `cluster.local/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> Option<String> {
        match &self.kind {
            IdentityKind::Workload {
                namespace,
                service_account,
                ..
            } => Some(format!(
                "{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"
            )),
            _ => None,
        }
    }
}

/// Everything the policy compiler and the ipcache reconciler need to know about identities.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityTable {
    pub identities: BTreeMap<IdentityId, Identity>,
    pub pod_identity: BTreeMap<ObjKey, IdentityId>,
    /// Prefix → identity, as the kernel's LPM map should hold it.
    pub ipcache: BTreeMap<IpNet, IdentityId>,
    /// Workload identity → the pods that have it.
    pub pods_of: BTreeMap<IdentityId, Vec<ObjKey>>,
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn reserved(id: IdentityId, name: &str, prefixes: Vec<IpNet>) -> Identity {
    Identity {
        id,
        kind: IdentityKind::Reserved(name.into()),
        prefixes,
    }
}

impl IdentityAllocator {
    /// The ids currently handed out, for display and tests.
    pub fn assigned(&self) -> &[(IdentityKey, IdentityId)] {
        &self.assigned
    }

    /// Identities for `snapshot` as seen from `node`, allocating numbers for new label sets and
    /// the CIDRs policies name (`policy_cidrs`), and forgetting the ones no longer used.
    pub fn resolve(
        &mut self,
        snapshot: &Snapshot,
        node: &str,
        policy_cidrs: &BTreeSet<IpNet>,
    ) -> IdentityTable {
        let mut wanted: BTreeSet<IdentityKey> = snapshot
            .pods
            .values()
            .filter(|p| !p.ips.is_empty())
            .map(IdentityKey::of_pod)
            .collect();
        wanted.extend(policy_cidrs.iter().map(|n| IdentityKey::Cidr(n.trunc())));
        let mut old: BTreeMap<IdentityKey, IdentityId> =
            std::mem::take(&mut self.assigned).into_iter().collect();
        old.retain(|k, _| wanted.contains(k));
        let mut used: BTreeSet<IdentityId> = old.values().copied().collect();
        for key in wanted {
            if old.contains_key(&key) {
                continue;
            }
            let id = match key {
                IdentityKey::Workload { .. } => alloc(
                    &mut self.next_workload,
                    FIRST_WORKLOAD_ID,
                    LAST_WORKLOAD_ID,
                    &used,
                ),
                IdentityKey::Cidr(_) => {
                    alloc(&mut self.next_cidr, FIRST_CIDR_ID, LAST_CIDR_ID, &used)
                }
            };
            used.insert(id);
            old.insert(key, id);
        }
        self.assigned = old.into_iter().collect();
        self.table(snapshot, node)
    }

    fn table(&self, snapshot: &Snapshot, node: &str) -> IdentityTable {
        let by_key: BTreeMap<&IdentityKey, IdentityId> =
            self.assigned.iter().map(|(k, id)| (k, *id)).collect();
        let mut t = IdentityTable::default();

        let (mut host, mut remote, mut pod_cidrs) = (Vec::new(), Vec::new(), Vec::new());
        for n in snapshot.nodes.values() {
            let addrs = n.addresses.iter().map(|a| host_net(*a));
            if n.name == node {
                host.extend(addrs);
            } else {
                remote.extend(addrs);
            }
            pod_cidrs.extend(n.pod_cidrs.iter().copied());
        }
        let world4: IpNet = "0.0.0.0/0".parse().expect("literal");
        let world6: IpNet = "::/0".parse().expect("literal");
        for (id, name, prefixes) in [
            (ID_HOST, "host", host),
            (ID_WORLD, "world", vec![]),
            (ID_UNMANAGED, "unmanaged", pod_cidrs),
            (ID_REMOTE_NODE, "remote-node", remote),
            (ID_WORLD_IPV4, "world-ipv4", vec![world4]),
            (ID_WORLD_IPV6, "world-ipv6", vec![world6]),
        ] {
            t.identities.insert(id, reserved(id, name, prefixes));
        }

        // The same prefix may be claimed twice (a policy CIDR that is also a pod CIDR, a pod
        // address that is also a node's): later inserts win, most specific kind last.
        for id in [ID_WORLD_IPV4, ID_WORLD_IPV6, ID_UNMANAGED] {
            for p in t.identities[&id].prefixes.clone() {
                t.ipcache.insert(p, id);
            }
        }
        for (key, id) in &self.assigned {
            if let IdentityKey::Cidr(net) = key {
                t.identities.insert(
                    *id,
                    Identity {
                        id: *id,
                        kind: IdentityKind::Cidr(*net),
                        prefixes: vec![],
                    },
                );
                t.ipcache.insert(*net, *id);
            }
        }
        for p in snapshot.pods.values().filter(|p| !p.ips.is_empty()) {
            let key = IdentityKey::of_pod(p);
            let Some(&id) = by_key.get(&key) else {
                continue;
            };
            if let IdentityKey::Workload {
                namespace,
                service_account,
                labels,
            } = key
            {
                t.identities.entry(id).or_insert_with(|| Identity {
                    id,
                    kind: IdentityKind::Workload {
                        namespace,
                        service_account,
                        labels,
                    },
                    prefixes: Vec::new(),
                });
            }
            for ip in &p.ips {
                t.ipcache.insert(host_net(*ip), id);
            }
            t.pod_identity.insert(p.key.clone(), id);
            t.pods_of.entry(id).or_default().push(p.key.clone());
        }
        for id in [ID_REMOTE_NODE, ID_HOST] {
            for p in t.identities[&id].prefixes.clone() {
                t.ipcache.insert(p, id);
            }
        }
        // What each identity covers is what the ipcache gives it, after the overrides.
        for ident in t.identities.values_mut() {
            ident.prefixes.clear();
        }
        for (net, id) in &t.ipcache {
            if let Some(ident) = t.identities.get_mut(id) {
                ident.prefixes.push(*net);
            }
        }
        t
    }
}

fn alloc(
    next: &mut IdentityId,
    first: IdentityId,
    last: IdentityId,
    used: &BTreeSet<IdentityId>,
) -> IdentityId {
    let mut id = (*next).clamp(first, last);
    // Wraps at most once; the ranges hold millions of ids, far above any node's pods.
    for _ in 0..=(last - first) {
        if !used.contains(&id) {
            *next = if id == last { first } else { id + 1 };
            return id;
        }
        id = if id == last { first } else { id + 1 };
    }
    panic!("identity range {first}..={last} exhausted")
}

impl IdentityTable {
    /// Namespace labels as selectors see them: the Namespace object's labels plus
    /// `kubernetes.io/metadata.name`, which Kubernetes sets on every namespace.
    pub fn namespace_labels(snapshot: &Snapshot, ns: &str) -> BTreeMap<String, String> {
        let mut labels = snapshot
            .namespaces
            .get(ns)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        labels.insert(LABEL_NAMESPACE_NAME.into(), ns.into());
        labels
    }

    /// Identities that belong to pods of the snapshot (not reserved, not CIDR).
    pub fn workloads(&self) -> impl Iterator<Item = &Identity> {
        self.identities
            .values()
            .filter(|i| matches!(i.kind, IdentityKind::Workload { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::Node;

    pub(crate) fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str) -> Pod {
        Pod {
            key: ObjKey::new(ns, name),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: BTreeMap::new(),
            node_name: Some("n1".into()),
            service_account: "default".into(),
            ips: vec![ip.parse().unwrap()],
            cgroup: None,
            splice: true,
            interface: None,
            ports: vec![],
            owner: None,
        }
    }

    fn snap(pods: Vec<Pod>) -> Snapshot {
        let mut s = Snapshot::default();
        for (name, cidr, addr) in [
            ("n1", "198.18.1.0/24", "198.18.1.1"),
            ("n2", "198.18.2.0/24", "198.18.2.1"),
        ] {
            s.nodes.insert(
                name.into(),
                Node {
                    name: name.into(),
                    pod_cidrs: vec![cidr.parse().unwrap()],
                    addresses: vec![addr.parse().unwrap()],
                    annotations: Default::default(),
                },
            );
        }
        for p in pods {
            s.pods.insert(p.key.clone(), p);
        }
        s
    }

    #[test]
    fn same_labels_share_an_identity_and_numbers_stay() {
        let mut a = IdentityAllocator::default();
        let s = snap(vec![
            pod("x", "a", &[("app", "web")], "198.18.1.2"),
            pod("x", "b", &[("app", "web")], "198.18.1.3"),
            pod("x", "c", &[("app", "db")], "198.18.2.2"),
            pod("y", "d", &[("app", "web")], "198.18.2.3"),
        ]);
        let t = a.resolve(&s, "n1", &BTreeSet::new());
        let id = |n: &str, ns: &str| t.pod_identity[&ObjKey::new(ns, n)];
        assert_eq!(id("a", "x"), id("b", "x"));
        assert_ne!(id("a", "x"), id("c", "x"));
        assert_ne!(
            id("a", "x"),
            id("d", "y"),
            "namespace is part of the identity"
        );
        assert!(id("a", "x") >= FIRST_WORKLOAD_ID);
        assert_eq!(t.workloads().count(), 3);

        // A persisted allocator gives the same numbers after a restart, whatever the order
        // pods appear in, and a new label set gets a fresh number.
        let saved = serde_json::to_string(&a).unwrap();
        let mut b: IdentityAllocator = serde_json::from_str(&saved).unwrap();
        let mut s2 = s.clone();
        s2.pods.remove(&ObjKey::new("x", "c"));
        let p = pod("x", "e", &[("app", "new")], "198.18.1.9");
        s2.pods.insert(p.key.clone(), p);
        let t2 = b.resolve(&s2, "n1", &BTreeSet::new());
        assert_eq!(t2.pod_identity[&ObjKey::new("x", "a")], id("a", "x"));
        assert_eq!(t2.pod_identity[&ObjKey::new("y", "d")], id("d", "y"));
        let fresh = t2.pod_identity[&ObjKey::new("x", "e")];
        assert!(
            ![id("a", "x"), id("c", "x"), id("d", "y")].contains(&fresh),
            "a freed number is not reused at once"
        );
    }

    #[test]
    fn ipcache_holds_pods_nodes_cidrs_and_world() {
        let mut a = IdentityAllocator::default();
        let s = snap(vec![pod("x", "a", &[], "198.18.1.2")]);
        let cidrs: BTreeSet<IpNet> = ["10.0.0.0/8", "198.18.1.1/32"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let t = a.resolve(&s, "n1", &cidrs);
        let at = |p: &str| t.ipcache[&p.parse::<IpNet>().unwrap()];
        assert_eq!(at("198.18.1.2/32"), t.pod_identity[&ObjKey::new("x", "a")]);
        assert_eq!(
            at("198.18.1.1/32"),
            ID_HOST,
            "the node wins over a policy CIDR"
        );
        let pod_cidr: IpNet = "198.18.2.0/24".parse().unwrap();
        assert_eq!(t.identities[&ID_UNMANAGED].prefixes.len(), 2);
        let t3 = a.resolve(&s, "n1", &[pod_cidr].into_iter().collect());
        assert!(
            t3.ipcache[&pod_cidr] >= FIRST_CIDR_ID,
            "a policy CIDR wins over unmanaged"
        );
        assert_eq!(
            t3.identities[&ID_UNMANAGED].prefixes,
            ["198.18.1.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(at("198.18.2.1/32"), ID_REMOTE_NODE);
        assert_eq!(at("198.18.1.0/24"), ID_UNMANAGED);
        assert_eq!(at("0.0.0.0/0"), ID_WORLD_IPV4);
        assert_eq!(at("::/0"), ID_WORLD_IPV6);
        assert!(at("10.0.0.0/8") >= FIRST_CIDR_ID);
        // From another node's point of view the roles of the node addresses swap.
        let t2 = a.resolve(&s, "n2", &cidrs);
        assert_eq!(
            t2.ipcache[&"198.18.1.1/32".parse().unwrap()],
            ID_REMOTE_NODE
        );
        assert_eq!(t2.ipcache[&"198.18.2.1/32".parse().unwrap()], ID_HOST);
    }

    #[test]
    fn principals_and_labels() {
        let mut a = IdentityAllocator::default();
        let mut p = pod("shop", "a", &[("app", "web")], "198.18.1.2");
        p.service_account = "front".into();
        let t = a.resolve(&snap(vec![p]), "n1", &BTreeSet::new());
        let ident = t.workloads().next().unwrap();
        assert_eq!(
            ident.principal().as_deref(),
            Some("cluster.local/ns/shop/sa/front")
        );
        assert!(ident.label_strings().contains(&"k8s:app=web".to_string()));
        assert_eq!(t.identities[&ID_HOST].principal(), None);
    }

    #[test]
    fn allocation_wraps_and_skips_used_numbers() {
        let used: BTreeSet<IdentityId> = [5, 6].into_iter().collect();
        let mut next = 5;
        assert_eq!(alloc(&mut next, 1, 6, &used), 1, "wraps past the used tail");
        assert_eq!(next, 2);
    }
}
