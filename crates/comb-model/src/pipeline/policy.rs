//! Identity policy's desired state: identities → ipcache, local pods → policy endpoints
//! (their host-side interfaces) and compiled entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::identity::{IdentityId, IdentityTable};
use crate::policy_compile::{EntryKey, EntryValue, PolicyRef, compile_endpoint};
use crate::terms::{Direction, Verdict};
use crate::{ObjKey, State};

/// One local pod as the policy programs see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyEndpoint {
    pub pod: ObjKey,
    pub identity: IdentityId,
    pub addrs: Vec<IpAddr>,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub policies: Vec<PolicyRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredPolicy {
    pub ipcache: BTreeMap<IpNet, IdentityId>,
    /// Host prefixes of local pods with ingress REDIRECT entries → their host-side interface
    /// index: the ipcache value's `endpoint`, whose entries the source pod's hook consults to
    /// redirect a flow to the node proxy.
    pub redirect_endpoints: BTreeMap<IpNet, u32>,
    /// By host-side interface index.
    pub endpoints: BTreeMap<u32, PolicyEndpoint>,
    pub entries: BTreeMap<(u32, EntryKey), EntryValue>,
    /// Local pods whose traffic cannot be judged, with why.
    pub unenforced: Vec<String>,
}

/// `interfaces`: the node's network interfaces, name → index (read by the caller: the
/// pipeline does no I/O).
pub fn desired(
    state: &State,
    node: &str,
    table: &IdentityTable,
    interfaces: &BTreeMap<String, u32>,
) -> DesiredPolicy {
    let snap = state.snapshot();
    let mut out = DesiredPolicy {
        ipcache: table.ipcache.clone(),
        ..Default::default()
    };
    let mut seen_if: BTreeSet<u32> = BTreeSet::new();
    for pod in state.local_pods(node) {
        let Some(&identity) = table.pod_identity.get(&pod.key) else {
            continue;
        };
        let Some(name) = pod.interface.as_deref() else {
            out.unenforced.push(format!(
                "pod {}: no {} annotation naming its host-side interface",
                pod.key,
                crate::ANNOTATION_INTERFACE
            ));
            continue;
        };
        let Some(&index) = interfaces.get(name) else {
            out.unenforced.push(format!(
                "pod {}: interface {name} not found in the node's network namespace",
                pod.key
            ));
            continue;
        };
        if !seen_if.insert(index) {
            out.unenforced.push(format!(
                "pod {}: interface {name} is claimed by another pod too",
                pod.key
            ));
            continue;
        }
        let compiled = compile_endpoint(snap, table, pod);
        let redirects = compiled
            .entries
            .iter()
            .any(|(k, v)| k.direction == Direction::Ingress && v.verdict == Verdict::Redirect);
        if redirects {
            for ip in &pod.ips {
                out.redirect_endpoints.insert(IpNet::from(*ip), index);
            }
        }
        for (k, v) in compiled.entries {
            out.entries.insert((index, k), v);
        }
        out.endpoints.insert(
            index,
            PolicyEndpoint {
                pod: pod.key.clone(),
                identity,
                addrs: pod.ips.clone(),
                ingress_enforced: compiled.ingress_enforced,
                egress_enforced: compiled.egress_enforced,
                policies: compiled.policies,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityAllocator;
    use crate::policy::{LabelSelector, NetworkPolicy};
    use crate::policy_compile::policy_cidrs;
    use crate::{Pod, Snapshot};

    fn pod(name: &str, ip: &str, iface: Option<&str>) -> Pod {
        Pod {
            key: ObjKey::new("default", name),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            node_name: Some("n1".into()),
            service_account: "default".into(),
            ips: vec![ip.parse().unwrap()],
            cgroup: None,
            splice: true,
            interface: iface.map(Into::into),
            ports: vec![],
            owner: None,
        }
    }

    #[test]
    fn endpoints_by_interface_and_entries_for_enforced_pods() {
        let mut snap = Snapshot::default();
        for p in [
            pod("a", "198.18.1.2", Some("lxc2")),
            pod("b", "198.18.1.3", None),
            pod("c", "198.18.1.4", Some("gone")),
        ] {
            snap.pods.insert(p.key.clone(), p);
        }
        let np = NetworkPolicy {
            key: ObjKey::new("default", "deny"),
            pod_selector: LabelSelector::default(),
            ingress_enforced: true,
            egress_enforced: false,
            ingress: vec![],
            egress: vec![],
        };
        snap.network_policies.insert(np.key.clone(), np);
        let mut state = State::new();
        state.replace(snap);
        let table = IdentityAllocator::default().resolve(
            state.snapshot(),
            "n1",
            &policy_cidrs(state.snapshot()),
        );
        let d = desired(
            &state,
            "n1",
            &table,
            &BTreeMap::from([("lxc2".to_string(), 7)]),
        );
        assert_eq!(d.endpoints.len(), 1);
        let ep = &d.endpoints[&7];
        assert_eq!(ep.pod, ObjKey::new("default", "a"));
        assert!(ep.ingress_enforced && !ep.egress_enforced);
        assert!(d.entries.keys().all(|(i, _)| *i == 7));
        assert!(!d.entries.is_empty());
        assert_eq!(d.unenforced.len(), 2, "{:?}", d.unenforced);
        assert_eq!(d.ipcache.len(), table.ipcache.len());
        assert!(d.redirect_endpoints.is_empty(), "no REDIRECT entries");
    }

    #[test]
    fn pods_with_ingress_redirects_name_their_interface_in_the_ipcache() {
        let mut snap = Snapshot::default();
        let mut web = pod("web", "198.18.1.2", Some("lxc2"));
        web.annotations
            .insert(crate::ANNOTATION_L7.into(), "true".into());
        for p in [web, pod("client", "198.18.1.3", Some("lxc3"))] {
            snap.pods.insert(p.key.clone(), p);
        }
        let mut state = State::new();
        state.replace(snap);
        let table = IdentityAllocator::default().resolve(
            state.snapshot(),
            "n1",
            &policy_cidrs(state.snapshot()),
        );
        let d = desired(
            &state,
            "n1",
            &table,
            &BTreeMap::from([("lxc2".to_string(), 7), ("lxc3".to_string(), 8)]),
        );
        assert!(
            d.entries.iter().any(|((i, k), v)| *i == 7
                && k.direction == Direction::Ingress
                && v.verdict == Verdict::Redirect),
            "visibility compiles to ingress REDIRECT entries: {:?}",
            d.entries
        );
        let web_net: IpNet = "198.18.1.2/32".parse().unwrap();
        assert_eq!(
            d.redirect_endpoints,
            BTreeMap::from([(web_net, 7)]),
            "only the pod with REDIRECT entries"
        );
        assert!(d.ipcache.contains_key(&web_net));
    }
}
