//! What a lab is made of, persisted as `state.json` so another process (`comb lab exec`,
//! `comb lab down`) can use or remove it; and the manifests written for the agents.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus, PodIP, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::spec::PodSpec;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOptions {
    /// Path of the combd binary.
    pub combd: PathBuf,
    /// Appended after the flags the lab sets.
    pub extra_args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    /// Node-side veth, in the node's namespace.
    pub host_veth: String,
    /// Absolute cgroup path.
    pub cgroup: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// The container command's process, if the pod has one.
    pub pid: Option<u32>,
}

impl LabPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabNode {
    pub name: String,
    /// 1-based; the third octet of the node's pod CIDR.
    pub index: usize,
    pub netns: String,
    pub pod_cidr: String,
    /// Absolute cgroup of the node (pods' parent).
    pub cgroup: PathBuf,
    /// 198.18.254.k when there is a router.
    pub uplink_ip: Option<Ipv4Addr>,
    /// Whether a combd runs on it: false for a node declared with a Node manifest annotated
    /// `comb.dev/agent: "false"` (e.g. a ztunnel node); its pods exist all the same.
    #[serde(default = "yes")]
    pub agent: bool,
    /// Annotations of the Node manifest given for it, written back into nodes.yaml.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// The lab's certificate authority (`comb ca`), started whenever agents are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabCa {
    /// The `comb` binary.
    pub comb: PathBuf,
    /// Network namespace it runs in: the router's (several nodes) or the node's (one).
    pub netns: String,
    /// `198.18.254.254:15012` or `127.0.0.1:15012`.
    pub listen: String,
    /// Absolute cgroup of the CA process.
    pub cgroup: PathBuf,
}

/// The lab's Kubernetes control plane (`comb lab up --kubernetes`): etcd, kube-apiserver and
/// kube-controller-manager on the machine's loopback, and a kubelet stand-in per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabKube {
    /// Data, credentials and logs (inside the lab's state directory).
    pub dir: PathBuf,
    /// Admin credentials; works on the machine and, through each node's relay, in every
    /// node's namespace (`comb lab kubeconfig`).
    pub kubeconfig: PathBuf,
    pub api_port: u16,
    /// The `comb` binary (runs the kubelet stand-ins; comb-cni is beside it).
    pub comb: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub cgroup2: PathBuf,
    pub nodes: Vec<LabNode>,
    pub pods: Vec<LabPod>,
    pub router_netns: Option<String>,
    pub agent: Option<AgentOptions>,
    #[serde(default)]
    pub ca: Option<LabCa>,
    #[serde(default)]
    pub kube: Option<LabKube>,
}

impl LabState {
    pub fn load(path: &Path) -> Result<LabState> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &serde_json::to_string_pretty(self)?)
    }
}

/// Write via rename so a watching agent never reads half a file.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn multi_doc<T: Serialize>(objects: &[T]) -> Result<String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(o)?);
    }
    Ok(out)
}

/// The Pod manifests as given, plus what a kubelet would report: IPs and phase; and the pod
/// cgroup (relative to the cgroup2 mount) as annotation `comb.dev/cgroup`.
pub fn pods_yaml(state: &LabState, specs: &[PodSpec]) -> Result<String> {
    let mut pods = Vec::new();
    for spec in specs {
        let lab_pod = state
            .pods
            .iter()
            .find(|p| p.key() == spec.key())
            .context("pod missing from state")?;
        let mut pod = spec.manifest.clone();
        pod.metadata.namespace = Some(spec.namespace.clone());
        let rel = lab_pod
            .cgroup
            .strip_prefix(&state.cgroup2)
            .unwrap_or(&lab_pod.cgroup);
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert("comb.dev/cgroup".into(), rel.display().to_string());
        // What a CNI plugin would report: the pod's interface on the node side.
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert("comb.dev/interface".into(), lab_pod.host_veth.clone());
        let ip = lab_pod.ip.to_string();
        let status = pod.status.get_or_insert_with(PodStatus::default);
        status.phase = Some("Running".into());
        status.pod_ip = Some(ip.clone());
        status.pod_ips = Some(vec![PodIP { ip }]);
        status.host_ip = state
            .nodes
            .iter()
            .find(|n| n.name == lab_pod.node)
            .and_then(|n| n.uplink_ip.map(|i| i.to_string()));
        pods.push(pod);
    }
    multi_doc(&pods)
}

pub fn nodes_yaml(state: &LabState) -> Result<String> {
    let nodes: Vec<Node> = state.nodes.iter().map(node_object).collect();
    multi_doc(&nodes)
}

/// A lab node as a Node object: its annotations, pod CIDR and addresses.
pub fn node_object(n: &LabNode) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(n.name.clone()),
            annotations: (!n.annotations.is_empty()).then(|| n.annotations.clone()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/hostname".to_string(),
                n.name.clone(),
            )])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(n.pod_cidr.clone()),
            pod_cidrs: Some(vec![n.pod_cidr.clone()]),
            ..Default::default()
        }),
        // The node's addresses: the pods' gateway (the node's address on every pod veth,
        // the source of node-to-pod traffic) and the uplink when there is a router.
        status: Some(NodeStatus {
            addresses: Some(
                std::iter::once(crate::naming::node_gateway(n.index))
                    .chain(n.uplink_ip)
                    .map(|ip| NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}

/// Non-Pod input documents, passed through so one file can describe pods and services.
pub fn others_yaml(others: &[serde_yaml_ng::Value]) -> Result<String> {
    multi_doc(others)
}
