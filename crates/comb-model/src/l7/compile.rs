//! State → [`ProxyTable`].

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::{Authz, L7Endpoint, ProxyTable, ServiceRef, Workload};
use crate::identity::IdentityTable;
use crate::objects::{ObjKey, Pod, Protocol, Service, TargetPort};
use crate::policy::TRUST_DOMAIN;
use crate::policy_compile::authz_selects;
use crate::snapshot::Snapshot;

/// Label the Deployment controller puts on its pods and appends to its ReplicaSets' names.
const LABEL_POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// The proxy table of node `node`.
pub fn compile_proxy_table(
    snapshot: &Snapshot,
    generation: u64,
    identities: &IdentityTable,
    node: &str,
) -> ProxyTable {
    let mut out = ProxyTable {
        generation,
        workloads: HashMap::new(),
        pod_services: HashMap::new(),
        endpoints: HashMap::new(),
        mesh_endpoints: HashMap::new(),
        hbone_peers: HashMap::new(),
    };
    let listed = listed_by_address(snapshot);
    for pod in snapshot.pods.values().filter(|p| !p.ips.is_empty()) {
        let w = Arc::new(workload(pod, identities));
        let services: Arc<[ServiceRef]> = services_of(snapshot, pod, &listed).into();
        for ip in &pod.ips {
            out.workloads.insert(*ip, Arc::clone(&w));
            if !services.is_empty() {
                out.pod_services.insert(*ip, Arc::clone(&services));
            }
        }
        if pod.node_name.as_deref() != Some(node) {
            continue;
        }
        let ep = Arc::new(L7Endpoint {
            workload: w,
            services,
            authz: Authz::new(
                snapshot
                    .authorization_policies
                    .values()
                    .filter(|ap| authz_selects(ap, pod)),
            ),
            visibility: snapshot.l7_visibility(pod),
        });
        for ip in &pod.ips {
            out.endpoints.insert(*ip, Arc::clone(&ep));
        }
    }
    out
}

/// A pod's telemetry and policy names. `identity` 0 when the table has none for it.
pub(super) fn workload(pod: &Pod, identities: &IdentityTable) -> Workload {
    let ns = &pod.key.namespace;
    let name = workload_name(pod);
    let label = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| pod.labels.get(*k).filter(|v| !v.is_empty()))
            .cloned()
    };
    Workload {
        pod: pod.key.clone(),
        namespace: ns.clone(),
        service_account: pod.service_account.clone(),
        principal: format!("{TRUST_DOMAIN}/ns/{ns}/sa/{}", pod.service_account),
        canonical_service: label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| name.clone()),
        canonical_revision: label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_owned()),
        identity: identities.pod_identity.get(&pod.key).copied().unwrap_or(0),
        workload: name,
    }
}

/// Istio's heuristic (`GetDeployMetaFromPod`): the controller's name, a ReplicaSet's with its
/// `-<pod-template-hash>` stripped (the Deployment), a Job's with a CronJob's
/// `-<8 to 10 digits>` schedule suffix stripped; the pod's own name without a controller.
pub(super) fn workload_name(pod: &Pod) -> String {
    let Some(owner) = &pod.owner else {
        return pod.key.name.clone();
    };
    match owner.kind.as_str() {
        "ReplicaSet" => pod
            .labels
            .get(LABEL_POD_TEMPLATE_HASH)
            .filter(|h| !h.is_empty())
            .and_then(|h| owner.name.strip_suffix(h.as_str()))
            .and_then(|n| n.strip_suffix('-'))
            .filter(|n| !n.is_empty())
            .unwrap_or(&owner.name)
            .to_owned(),
        "Job" => owner
            .name
            .rsplit_once('-')
            .filter(|(base, ts)| {
                !base.is_empty()
                    && (8..=10).contains(&ts.len())
                    && ts.bytes().all(|b| b.is_ascii_digit())
            })
            .map_or(&*owner.name, |(base, _)| base)
            .to_owned(),
        _ => owner.name.clone(),
    }
}

/// For every address an EndpointSlice lists, the Services (namespace, name) listing it: one
/// pass over the slices for the whole table, since every pod of the cluster needs its own.
fn listed_by_address(snapshot: &Snapshot) -> HashMap<IpAddr, BTreeSet<(&str, &str)>> {
    let mut out: HashMap<IpAddr, BTreeSet<(&str, &str)>> = HashMap::new();
    for s in snapshot.endpoint_slices.values() {
        for a in s.endpoints.iter().flat_map(|e| &e.addresses) {
            out.entry(*a)
                .or_default()
                .insert((s.key.namespace.as_str(), s.service_name.as_str()));
        }
    }
    out
}

/// Services whose EndpointSlices list one of the pod's addresses (what a Service's selector
/// amounts to once the EndpointSlice controller has run; Comb's model keeps no selectors),
/// by key, with the TCP ports they reach on this pod.
fn services_of(
    snapshot: &Snapshot,
    pod: &Pod,
    listed: &HashMap<IpAddr, BTreeSet<(&str, &str)>>,
) -> Vec<ServiceRef> {
    // In key order (namespace, name), as "first by name" below expects.
    let keys: BTreeSet<(&str, &str)> = pod
        .ips
        .iter()
        .filter_map(|ip| listed.get(ip))
        .flatten()
        .copied()
        .collect();
    let mut out = Vec::new();
    for (ns, name) in keys {
        let Some(svc) = snapshot.services.get(&ObjKey::new(ns, name)) else {
            continue;
        };
        out.push(ServiceRef {
            key: svc.key.clone(),
            host: format!("{}.{}.svc.{TRUST_DOMAIN}", svc.key.name, svc.key.namespace),
            target_ports: target_ports(snapshot, svc, pod),
        });
    }
    out
}

/// The pod ports a Service's TCP ports reach: numbers as given, names through the pod's
/// container ports, else through the slices' port of the same name (hand-written slices).
fn target_ports(snapshot: &Snapshot, svc: &Service, pod: &Pod) -> Vec<u16> {
    let mut out: Vec<u16> = svc
        .ports
        .iter()
        .filter(|sp| sp.protocol == Protocol::Tcp)
        .filter_map(|sp| match &sp.target_port {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => pod
                .ports
                .iter()
                .find(|c| c.protocol == Protocol::Tcp && c.name.as_deref() == Some(name))
                .map(|c| c.port)
                .or_else(|| {
                    snapshot
                        .endpoint_slices
                        .values()
                        .filter(|s| {
                            s.key.namespace == svc.key.namespace && s.service_name == svc.key.name
                        })
                        .flat_map(|s| &s.ports)
                        .find(|p| p.protocol == Protocol::Tcp && p.name == sp.name)
                        .map(|p| p.port)
                }),
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

pub(super) fn destination_service<'a>(
    services: &'a [ServiceRef],
    port: u16,
    host_header: Option<&str>,
) -> Option<&'a ServiceRef> {
    let mut fronting = services.iter().filter(|s| s.target_ports.contains(&port));
    let first = fronting.next()?;
    let Some(host) = host_header.map(|h| super::matchers::split_port(h).0) else {
        return Some(first);
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if names_service(host, first) {
        return Some(first);
    }
    Some(fronting.find(|s| names_service(host, s)).unwrap_or(first))
}

/// `web`, `web.shop`, `web.shop.svc` or `web.shop.svc.cluster.local` (any case) for Service
/// shop/web. Compares bytes in place: this runs per request.
fn names_service(host: &str, s: &ServiceRef) -> bool {
    let (label, rest) = match host.split_once('.') {
        Some((l, r)) => (l, Some(r)),
        None => (host, None),
    };
    if !label.eq_ignore_ascii_case(&s.key.name) {
        return false;
    }
    let Some(rest) = rest.map(str::as_bytes) else {
        return true;
    };
    let ns = s.key.namespace.as_bytes();
    if !rest
        .get(..ns.len())
        .is_some_and(|h| h.eq_ignore_ascii_case(ns))
    {
        return false;
    }
    let tail = rest.get(ns.len()..).unwrap_or_default();
    tail.is_empty()
        || tail.eq_ignore_ascii_case(b".svc")
        || tail.eq_ignore_ascii_case(b".svc.cluster.local")
}

#[cfg(test)]
mod tests;
