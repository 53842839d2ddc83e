//! The policy part of the datapath reconciler: identities → ipcache, local pods → policy
//! endpoints (their host-side interfaces) and compiled entries. `desired` is pure; `apply`
//! diffs against what the datapath's maps hold and writes in an order that never widens:
//! new identities and entries before the interfaces that use them, removals last.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use comb_datapath::Datapath;
use comb_datapath::policy as dp;
use comb_model::identity::{IdentityId, IdentityTable};
use comb_model::policy_compile::{EntryKey, EntryValue, PolicyRef, compile_endpoint};
use comb_model::terms::{Direction, Verdict};
use comb_model::{ObjKey, State};
use ipnet::IpNet;

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

/// `ifindex`: the interface index of a host-side interface name in the agent's network
/// namespace (None when it does not exist).
pub fn desired(
    state: &State,
    node: &str,
    table: &IdentityTable,
    ifindex: &dyn Fn(&str) -> Option<u32>,
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
                comb_model::ANNOTATION_INTERFACE
            ));
            continue;
        };
        let Some(index) = ifindex(name) else {
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

/// The kernel's form of a compiled entry.
pub fn datapath_entry(
    endpoint: u32,
    k: &EntryKey,
    v: &EntryValue,
) -> (dp::PolicyKey, dp::PolicyValue) {
    let key = dp::PolicyKey {
        endpoint,
        identity: k.identity,
        direction: k.direction,
        protocol: k.protocol,
        port: k.port,
        port_prefix: k.port_prefix,
    };
    let value = dp::PolicyValue {
        verdict: v.verdict,
        reason: v.reason.into(),
        proxy_port: 0,
        policy: v.policy,
    };
    (key, value)
}

/// Make the policy maps and attachments match `want`. Order: ipcache and endpoint entries
/// first, then policy entries (new before stale are removed, so an entry is always either the
/// old or the new answer), then attachments (a new interface is judged from its first
/// packet), and removals of what nothing uses any more last.
pub fn apply(d: &mut Datapath, want: &DesiredPolicy, errors: &mut Vec<String>) {
    let mut fail = |what: String, e: anyhow::Error| errors.push(format!("{what}: {e:#}"));

    let have_ipcache = d.policy().ipcache_entries().unwrap_or_else(|e| {
        fail("reading the ipcache".into(), e);
        BTreeMap::new()
    });
    for (net, id) in &want.ipcache {
        let entry = dp::IpcacheEntry {
            identity: *id,
            endpoint: want.redirect_endpoints.get(net).copied().unwrap_or(0),
        };
        if have_ipcache.get(net) != Some(&entry)
            && let Err(e) = d.policy().upsert_ipcache_entry(*net, entry)
        {
            fail(format!("ipcache {net} -> {entry:?}"), e);
        }
    }

    let have_eps = d.policy().endpoints().unwrap_or_else(|e| {
        fail("reading the policy endpoints".into(), e);
        BTreeMap::new()
    });
    for (ifindex, ep) in &want.endpoints {
        let same = have_eps
            .get(ifindex)
            .is_some_and(|h| h.identity == ep.identity && h.addrs == ep.addrs);
        if !same && let Err(e) = d.policy().set_endpoint(*ifindex, ep.identity, &ep.addrs) {
            fail(format!("policy endpoint {} (ifindex {ifindex})", ep.pod), e);
        }
    }

    let want_entries: BTreeMap<dp::PolicyKey, dp::PolicyValue> = want
        .entries
        .iter()
        .map(|((ep, k), v)| datapath_entry(*ep, k, v))
        .collect();
    match d.policy().entries() {
        Ok(have) => {
            for (k, v) in &want_entries {
                if have.get(k) != Some(v)
                    && let Err(e) = d.policy().upsert_entry(k, v)
                {
                    fail(format!("policy entry {k:?}"), e);
                }
            }
            for k in have.keys().filter(|k| !want_entries.contains_key(k)) {
                if let Err(e) = d.policy().remove_entry(k) {
                    fail(format!("removing policy entry {k:?}"), e);
                }
            }
        }
        Err(e) => fail("reading the policy entries".into(), e),
    }

    let attached: BTreeSet<u32> = d.policy().attachments().into_iter().collect();
    for (ifindex, ep) in &want.endpoints {
        if !attached.contains(ifindex)
            && let Err(e) = d.policy_mut().attach(*ifindex)
        {
            fail(
                format!("attaching policy to pod {} (ifindex {ifindex})", ep.pod),
                e,
            );
        }
    }
    for ifindex in attached.iter().filter(|i| !want.endpoints.contains_key(i)) {
        if let Err(e) = d.policy_mut().detach(*ifindex) {
            fail(format!("detaching policy from ifindex {ifindex}"), e);
        }
    }
    for ifindex in have_eps.keys().filter(|i| !want.endpoints.contains_key(i)) {
        if let Err(e) = d.policy().remove_endpoint(*ifindex) {
            fail(format!("removing policy endpoint {ifindex}"), e);
        }
    }
    for net in have_ipcache
        .keys()
        .filter(|n| !want.ipcache.contains_key(n))
    {
        if let Err(e) = d.policy().remove_ipcache(*net) {
            fail(format!("removing ipcache {net}"), e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_model::identity::IdentityAllocator;
    use comb_model::policy::{LabelSelector, NetworkPolicy};
    use comb_model::policy_compile::policy_cidrs;
    use comb_model::{Pod, Snapshot};

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
        let d = desired(&state, "n1", &table, &|n| (n == "lxc2").then_some(7));
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
            .insert(comb_model::l7::ANNOTATION_L7.into(), "true".into());
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
        let d = desired(&state, "n1", &table, &|n| match n {
            "lxc2" => Some(7),
            "lxc3" => Some(8),
            _ => None,
        });
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
