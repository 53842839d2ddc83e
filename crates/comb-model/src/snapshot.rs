//! The unit a source produces and State swaps in: every object, validated.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::mesh::PeerAuthentication;
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
