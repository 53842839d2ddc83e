//! Names for flow events: which pod an address or a host-side interface belongs to and
//! which policy a number stands for. Rebuilt with every desired state, read by the flow
//! monitor without touching the writer.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::policy_compile::{KIND_AUTHORIZATION_POLICY, KIND_NETWORK_POLICY, policy_id};
use crate::{Snapshot, pipeline::policy::DesiredPolicy};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowIndex {
    pub pod_by_ip: HashMap<IpAddr, String>,
    pub pod_by_ifindex: HashMap<u32, String>,
    pub policy_names: HashMap<u32, String>,
}

pub fn build(snap: &Snapshot, policy: &DesiredPolicy) -> FlowIndex {
    let mut index = FlowIndex::default();
    for p in snap.pods.values() {
        for ip in &p.ips {
            index.pod_by_ip.insert(*ip, p.key.to_string());
        }
    }
    for (ifindex, ep) in &policy.endpoints {
        index.pod_by_ifindex.insert(*ifindex, ep.pod.to_string());
    }
    for key in snap.network_policies.keys() {
        index.policy_names.insert(
            policy_id(KIND_NETWORK_POLICY, key),
            format!("{KIND_NETWORK_POLICY} {key}"),
        );
    }
    for key in snap.authorization_policies.keys() {
        index.policy_names.insert(
            policy_id(KIND_AUTHORIZATION_POLICY, key),
            format!("{KIND_AUTHORIZATION_POLICY} {key}"),
        );
    }
    index
}
