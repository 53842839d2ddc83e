//! What the mesh asks of this node: each local pod's enrolment and effective mutual-TLS
//! mode, the remote pods reached through HBONE, and the workload identities this node needs
//! certificates for.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::l7::{HboneTarget, MeshIdentity, ProxyTable};
use crate::mesh::{ANNOTATION_AMBIENT_REDIRECTION, DataplaneMode, MtlsMode, PodMtls, SpiffeId};
use crate::{ObjKey, State};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredMesh {
    /// Every local pod with an address.
    pub endpoints: BTreeMap<ObjKey, MeshEndpoint>,
    /// Pods on other nodes that are reached through HBONE, by address: the outbound
    /// redirect's targets (a pod not listed here is reached in plaintext).
    pub hbone_peers: BTreeMap<IpAddr, HbonePeer>,
    /// The identities of the local mesh pods: the certificates this node needs.
    pub identities: BTreeSet<SpiffeId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshEndpoint {
    pub addrs: Vec<IpAddr>,
    /// Host-side interface index (`None` when the pod's interface is unknown).
    pub ifindex: Option<u32>,
    pub mode: DataplaneMode,
    pub identity: SpiffeId,
    /// PeerAuthentication's answer; only meaningful for `mode == Mesh` (a pod outside the
    /// mesh accepts plaintext, as in Istio).
    pub mtls: PodMtls,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HbonePeer {
    pub pod: ObjKey,
    pub node: Option<String>,
    /// The identity the peer must present (its service account's).
    pub identity: SpiffeId,
    /// A Comb node (`true`) or an ambient pod on a node Comb does not run (ztunnel).
    pub comb: bool,
}

/// The mesh switches of the pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    pub trust_domain: String,
    /// Where a selector-less PeerAuthentication applies mesh-wide.
    pub root_namespace: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: crate::mesh::DEFAULT_TRUST_DOMAIN.into(),
            root_namespace: crate::mesh::DEFAULT_ROOT_NAMESPACE.into(),
        }
    }
}

pub fn desired(
    state: &State,
    node: &str,
    config: &MeshConfig,
    interfaces: &BTreeMap<String, u32>,
) -> DesiredMesh {
    let snap = state.snapshot();
    let mut out = DesiredMesh::default();
    for pod in state.local_pods(node) {
        let mode = snap.dataplane_mode(pod);
        let identity = SpiffeId::of_pod(&config.trust_domain, pod);
        if mode == DataplaneMode::Mesh {
            out.identities.insert(identity.clone());
        }
        out.endpoints.insert(
            pod.key.clone(),
            MeshEndpoint {
                addrs: pod.ips.clone(),
                ifindex: pod
                    .interface
                    .as_deref()
                    .and_then(|i| interfaces.get(i).copied()),
                mode,
                identity,
                mtls: snap.pod_mtls(pod, &config.root_namespace),
            },
        );
    }
    for pod in snap.pods.values() {
        let Some(pod_node) = pod.node_name.as_deref() else {
            continue;
        };
        if pod_node == node || pod.ips.is_empty() || snap.dataplane_mode(pod) != DataplaneMode::Mesh
        {
            continue;
        }
        let comb = snap.node_runs_comb(pod_node);
        let ambient = pod
            .annotations
            .get(ANNOTATION_AMBIENT_REDIRECTION)
            .is_some_and(|v| v == "enabled");
        if !comb && !ambient {
            continue;
        }
        // PeerAuthentication DISABLE on every port of the destination: its owner asked for
        // plaintext, so the source sends plaintext (what a sidecar client does for a DISABLE
        // server). A DISABLE port among tunnelled ones is still tunnelled (accepted either way).
        let mtls = snap.pod_mtls(pod, &config.root_namespace);
        if mtls.default == MtlsMode::Disable && mtls.ports.values().all(|m| *m == MtlsMode::Disable)
        {
            continue;
        }
        for ip in &pod.ips {
            out.hbone_peers.insert(
                *ip,
                HbonePeer {
                    pod: pod.key.clone(),
                    node: Some(pod_node.to_string()),
                    identity: SpiffeId::of_pod(&config.trust_domain, pod),
                    comb,
                },
            );
        }
    }
    out
}

/// What the node proxy needs of the mesh for HBONE: each local pod's identity and mode by
/// address, and the remote peers with the identity each must prove.
pub fn fill_proxy_table(mesh: &DesiredMesh, table: &mut ProxyTable) {
    for ep in mesh.endpoints.values() {
        for ip in &ep.addrs {
            table.mesh_endpoints.insert(
                *ip,
                MeshIdentity {
                    identity: ep.identity.clone(),
                    mode: ep.mode,
                },
            );
        }
    }
    for (ip, peer) in &mesh.hbone_peers {
        table.hbone_peers.insert(
            *ip,
            HboneTarget {
                identity: peer.identity.clone(),
                comb: peer.comb,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{ANNOTATION_NODE_AGENT, LABEL_DATAPLANE_MODE};
    use crate::{Node, Pod, Snapshot};

    fn pod(name: &str, node: &str, ip: &str) -> Pod {
        Pod {
            key: ObjKey::new("shop", name),
            labels: Default::default(),
            annotations: Default::default(),
            node_name: Some(node.into()),
            service_account: format!("{name}-sa"),
            ips: vec![ip.parse().unwrap()],
            cgroup: None,
            splice: true,
            interface: Some(format!("veth-{name}")),
            ports: vec![],
            owner: None,
        }
    }

    #[test]
    fn local_endpoints_remote_peers_and_wanted_identities() {
        let mut snap = Snapshot::default();
        let mut legacy = pod("legacy", "n1", "198.18.1.3");
        legacy
            .labels
            .insert(LABEL_DATAPLANE_MODE.into(), "none".into());
        let mut far = pod("far", "n3", "198.18.3.2");
        let mut plain = pod("plain", "n3", "198.18.3.3");
        far.annotations
            .insert(ANNOTATION_AMBIENT_REDIRECTION.into(), "enabled".into());
        plain.service_account = "x".into();
        for p in [
            pod("web", "n1", "198.18.1.2"),
            legacy,
            pod("db", "n2", "198.18.2.2"),
            far,
            plain,
        ] {
            snap.pods.insert(p.key.clone(), p);
        }
        snap.nodes.insert(
            "n3".into(),
            Node {
                name: "n3".into(),
                pod_cidrs: vec![],
                addresses: vec![],
                annotations: [(ANNOTATION_NODE_AGENT.to_string(), "false".to_string())].into(),
            },
        );
        let mut st = State::new();
        st.replace(snap);
        let ifs = BTreeMap::from([("veth-web".to_string(), 4)]);
        let d = desired(&st, "n1", &MeshConfig::default(), &ifs);
        assert_eq!(d.endpoints.len(), 2);
        let web = &d.endpoints[&ObjKey::new("shop", "web")];
        assert_eq!(web.ifindex, Some(4));
        assert_eq!(web.mode, DataplaneMode::Mesh);
        assert_eq!(web.mtls.default, MtlsMode::Permissive);
        assert_eq!(
            d.endpoints[&ObjKey::new("shop", "legacy")].mode,
            DataplaneMode::None
        );
        assert_eq!(
            d.identities
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>(),
            ["spiffe://cluster.local/ns/shop/sa/web-sa"]
        );
        let peers: Vec<(String, bool)> = d
            .hbone_peers
            .iter()
            .map(|(ip, p)| (ip.to_string(), p.comb))
            .collect();
        assert_eq!(
            peers,
            [("198.18.2.2".into(), true), ("198.18.3.2".into(), false)],
            "a pod on a node without Comb is a peer only when ambient captures it"
        );
        // DISABLE at the destination: plaintext, no tunnel.
        let mut snap = st.snapshot().clone();
        let pa = crate::mesh::PeerAuthentication {
            key: ObjKey::new("shop", "off"),
            selector: None,
            mode: MtlsMode::Disable,
            port_level: Default::default(),
        };
        snap.peer_authentications.insert(pa.key.clone(), pa);
        let mut disabled = State::new();
        disabled.replace(snap);
        let off = desired(&disabled, "n1", &MeshConfig::default(), &ifs);
        assert!(off.hbone_peers.is_empty(), "{:?}", off.hbone_peers);
        let mut table = ProxyTable::default();
        fill_proxy_table(&d, &mut table);
        let web_ip = "198.18.1.2".parse().unwrap();
        assert_eq!(
            table
                .mesh_identity(web_ip)
                .map(|i| i.to_string())
                .as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web-sa")
        );
        let legacy_ip = "198.18.1.3".parse().unwrap();
        assert!(table.mesh_endpoints.contains_key(&legacy_ip));
        assert_eq!(
            table.mesh_identity(legacy_ip),
            None,
            "opted out: no tunnels"
        );
        let far = table.hbone_peer("198.18.3.2".parse().unwrap()).unwrap();
        assert!(!far.comb);
        assert_eq!(
            far.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/far-sa"
        );
    }
}
