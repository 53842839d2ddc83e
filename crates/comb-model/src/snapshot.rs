//! The unit a source produces and State swaps in: every object, validated.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::mesh::{
    ANNOTATION_NODE_AGENT, ANNOTATION_SIDECAR_STATUS, DataplaneMode, LABEL_DATAPLANE_MODE,
    MtlsMode, PeerAuthentication, PodMtls,
};
use crate::objects::{ANNOTATION_L7, EndpointSlice, Namespace, Node, ObjKey, Pod, Service};
use crate::policy::{AuthorizationPolicy, NetworkPolicy};

/// Everything one source knows, validated; the unit [`crate::State::replace`] swaps in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub nodes: BTreeMap<String, Node>,
    pub pods: BTreeMap<ObjKey, Pod>,
    pub services: BTreeMap<ObjKey, Service>,
    pub endpoint_slices: BTreeMap<ObjKey, EndpointSlice>,
    pub network_policies: BTreeMap<ObjKey, NetworkPolicy>,
    pub authorization_policies: BTreeMap<ObjKey, AuthorizationPolicy>,
    pub peer_authentications: BTreeMap<ObjKey, PeerAuthentication>,
}

impl Snapshot {
    /// Whether `pod` asked for L7 visibility: its own [`ANNOTATION_L7`] (`"true"` or
    /// `"false"`) wins over its namespace's. comb-config rejects other values; here they count
    /// as unset.
    pub fn l7_visibility(&self, pod: &Pod) -> bool {
        let flag = |a: &BTreeMap<String, String>| match a.get(ANNOTATION_L7).map(String::as_str) {
            Some("true") => Some(true),
            Some("false") => Some(false),
            _ => None,
        };
        flag(&pod.annotations)
            .or_else(|| {
                self.namespaces
                    .get(&pod.key.namespace)
                    .and_then(|ns| flag(&ns.annotations))
            })
            .unwrap_or(false)
    }
}

/// Mesh queries (docs/mtls.md): enrolment, Comb nodes, PeerAuthentication's answer.
impl Snapshot {
    /// Enrolment: a sidecar wins (the pod is its sidecar's), then `istio.io/dataplane-mode:
    /// none` on the pod or, when the pod has no such label, on its namespace.
    pub fn dataplane_mode(&self, pod: &Pod) -> DataplaneMode {
        if pod.annotations.contains_key(ANNOTATION_SIDECAR_STATUS) {
            return DataplaneMode::Sidecar;
        }
        let label = pod.labels.get(LABEL_DATAPLANE_MODE).or_else(|| {
            self.namespaces
                .get(&pod.key.namespace)
                .and_then(|ns| ns.labels.get(LABEL_DATAPLANE_MODE))
        });
        match label.map(String::as_str) {
            Some("none") => DataplaneMode::None,
            _ => DataplaneMode::Mesh,
        }
    }

    /// Whether `node` runs a Comb agent (default yes; `comb.dev/agent: "false"` says no).
    pub fn node_runs_comb(&self, node: &str) -> bool {
        self.nodes.get(node).is_none_or(|n| {
            n.annotations.get(ANNOTATION_NODE_AGENT).map(String::as_str) != Some("false")
        })
    }

    /// The mutual-TLS mode PeerAuthentication gives `pod`, with Istio's inheritance:
    /// workload-selector policy (port level, then its mode) → namespace policy → mesh-wide
    /// policy in `root_namespace` → PERMISSIVE. `Unset` at a level means "ask the parent".
    /// Several policies at one level: the oldest wins in Istio; here the first by
    /// namespace/name (manifests carry no creation time).
    pub fn pod_mtls(&self, pod: &Pod, root_namespace: &str) -> PodMtls {
        let mut from = Vec::new();
        let ns = &pod.key.namespace;
        let in_ns = |namespace: &str| -> Vec<&PeerAuthentication> {
            self.peer_authentications
                .values()
                .filter(|pa| pa.key.namespace == namespace)
                .collect()
        };
        let workload = in_ns(ns).into_iter().find(|pa| {
            pa.selector
                .as_ref()
                .is_some_and(|s| !s.is_empty() && s.matches(&pod.labels))
        });
        let namespace = in_ns(ns)
            .into_iter()
            .find(|pa| pa.selector.as_ref().is_none_or(|s| s.is_empty()));
        let mesh = in_ns(root_namespace)
            .into_iter()
            .find(|pa| pa.selector.as_ref().is_none_or(|s| s.is_empty()));
        let mut default = MtlsMode::Unset;
        for pa in [workload, namespace, mesh].into_iter().flatten() {
            if from.last() != Some(&pa.key) {
                from.push(pa.key.clone());
            }
            if pa.mode != MtlsMode::Unset {
                default = pa.mode;
                break;
            }
        }
        if default == MtlsMode::Unset {
            default = MtlsMode::Permissive;
        }
        let ports = workload
            .map(|pa| {
                pa.port_level
                    .iter()
                    .map(|(&port, &m)| (port, if m == MtlsMode::Unset { default } else { m }))
                    .filter(|&(_, m)| m != default)
                    .collect()
            })
            .unwrap_or_default();
        PodMtls {
            default,
            ports,
            from,
        }
    }
}
