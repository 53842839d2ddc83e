//! The objects State holds, already validated and reduced to what Comb uses.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Annotation that opts a pod out of the local socket splice (`"off"` or `"false"`).
pub const ANNOTATION_SPLICE: &str = "comb.dev/splice";
/// Annotation naming a pod's cgroup v2 path relative to the cgroup2 mount (written by the lab;
/// in a cluster it would be derived from the pod UID and the kubelet's cgroup layout).
pub const ANNOTATION_CGROUP: &str = "comb.dev/cgroup";
/// Annotation naming the pod's host-side interface in the node's network namespace (written
/// by the lab, as a CNI plugin would report it); policy programs attach there.
pub const ANNOTATION_INTERFACE: &str = "comb.dev/interface";

/// Pod or namespace annotation asking for L7 visibility: every TCP flow to the pod goes
/// through the node proxy (telemetry, access log) even when no L7 policy needs it.
pub const ANNOTATION_L7: &str = "comb.dev/l7";

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Read for namespace-wide settings (`comb.dev/l7`).
    pub annotations: BTreeMap<String, String>,
}

/// A node and the pod address ranges it owns (`spec.podCIDRs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub pod_cidrs: Vec<IpNet>,
    /// `status.addresses` of type InternalIP and ExternalIP: the node's own addresses, which
    /// policy sees as `host` (this node) or `remote-node` (the others).
    pub addresses: Vec<IpAddr>,
    /// Read for node-wide settings (`comb.dev/agent`).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A named container port (`spec.containers[].ports[]`), what NetworkPolicy port names
/// resolve to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
}

/// The controller of a pod (`metadata.ownerReferences[]` with `controller: true`): what
/// Istio's workload name is derived from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodOwner {
    /// `ReplicaSet`, `StatefulSet`, `DaemonSet`, `Job`, ...
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub key: ObjKey,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub node_name: Option<String>,
    pub service_account: String,
    /// `status.podIPs` (or `status.podIP`); empty until the pod has an address.
    pub ips: Vec<IpAddr>,
    /// cgroup v2 path relative to the cgroup2 mount (see [`ANNOTATION_CGROUP`]).
    pub cgroup: Option<String>,
    /// False when the pod opted out of the splice (see [`ANNOTATION_SPLICE`]).
    pub splice: bool,
    /// Host-side interface in the node's network namespace (see [`ANNOTATION_INTERFACE`]).
    pub interface: Option<String>,
    /// Every container's ports.
    pub ports: Vec<ContainerPort>,
    /// The controller owner reference, if any.
    pub owner: Option<PodOwner>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub key: ObjKey,
    /// Empty for a headless Service (`clusterIP: None`).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub annotations: BTreeMap<String, String>,
    /// `sessionAffinity: ClientIP` timeout in seconds, when set.
    pub affinity_timeout_secs: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSlice {
    pub key: ObjKey,
    /// The `kubernetes.io/service-name` label.
    pub service_name: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}
