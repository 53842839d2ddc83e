//! The mesh part of the datapath reconciler: the pipeline's [`DesiredMesh`] compiled into
//! the kernel's mesh maps (`comb_mesh_ports`: local pods' enrolment and PeerAuthentication
//! modes; `comb_mesh_addrs`: HBONE peers and local mesh pods by address) and diffed against
//! what the datapath holds; plus the uplink program's attachments.
//!
//! Write order, so that no packet meets a half-applied change (every port of a pod goes from
//! its old mode to its new one exactly once): port overrides first (absolute values, and
//! ignored by the kernel while the pod's own entry is missing or not enrolled), then the pods'
//! own entries, then removals of pods' own entries, then of port overrides. Addresses: new
//! and changed before stale ones are removed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use comb_datapath::{Datapath, MeshAddr, MeshPort, MeshPortKey};
use comb_model::mesh::{DataplaneMode, MtlsMode};
use comb_model::pipeline::DesiredMesh;

/// The kernel's form of [`DesiredMesh`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshEntries {
    pub addrs: BTreeMap<IpAddr, MeshAddr>,
    pub ports: BTreeMap<MeshPortKey, MeshPort>,
}

fn strict(m: MtlsMode) -> bool {
    // UNSET never reaches here (PodMtls resolves it); were it to, it is Istio's default.
    m == MtlsMode::Strict
}

/// Compile the mesh for the kernel. Only pods in the mesh (`mode == Mesh`) with a known
/// interface get entries: the others are plain (no steering, no STRICT), as is a pod whose
/// interface is not known yet.
pub fn compile(mesh: &DesiredMesh) -> MeshEntries {
    let mut out = MeshEntries::default();
    for ep in mesh.endpoints.values() {
        let Some(ifindex) = ep.ifindex.filter(|i| *i != 0) else {
            continue;
        };
        if ep.mode != DataplaneMode::Mesh {
            continue;
        }
        out.ports.insert(
            MeshPortKey {
                endpoint: ifindex,
                port: None,
            },
            MeshPort {
                enrolled: true,
                strict: strict(ep.mtls.default),
            },
        );
        for (port, mode) in ep.mtls.ports.iter().filter(|(p, _)| **p != 0) {
            out.ports.insert(
                MeshPortKey {
                    endpoint: ifindex,
                    port: Some(*port),
                },
                MeshPort {
                    enrolled: false,
                    strict: strict(*mode),
                },
            );
        }
        for ip in &ep.addrs {
            out.addrs.entry(*ip).or_default().local = Some(ifindex);
        }
    }
    for ip in mesh.hbone_peers.keys() {
        out.addrs.entry(*ip).or_default().peer = true;
    }
    out
}

/// Make the mesh maps match `want` (order in the module doc).
pub fn apply(d: &Datapath, want: &DesiredMesh, errors: &mut Vec<String>) {
    let mut fail = |what: String, e: anyhow::Error| errors.push(format!("{what}: {e:#}"));
    let want = compile(want);
    let p = d.policy();

    match p.mesh_ports() {
        Ok(have) => {
            let (port_entries, own_entries): (Vec<_>, Vec<_>) =
                want.ports.iter().partition(|(k, _)| k.port.is_some());
            for (k, v) in port_entries.into_iter().chain(own_entries) {
                if have.get(k) != Some(v)
                    && let Err(e) = p.upsert_mesh_port(*k, *v)
                {
                    fail(format!("mesh entry {k:?}"), e);
                }
            }
            let stale: Vec<&MeshPortKey> = have
                .keys()
                .filter(|k| !want.ports.contains_key(k))
                .collect();
            let (stale_ports, stale_own): (Vec<&MeshPortKey>, Vec<&MeshPortKey>) =
                stale.into_iter().partition(|k| k.port.is_some());
            for k in stale_own.into_iter().chain(stale_ports) {
                if let Err(e) = p.remove_mesh_port(*k) {
                    fail(format!("removing mesh entry {k:?}"), e);
                }
            }
        }
        Err(e) => fail("reading the mesh entries".into(), e),
    }

    match p.mesh_addrs() {
        Ok(have) => {
            for (ip, a) in &want.addrs {
                if have.get(ip) != Some(a)
                    && let Err(e) = p.upsert_mesh_addr(*ip, *a)
                {
                    fail(format!("mesh address {ip}"), e);
                }
            }
            for ip in have.keys().filter(|ip| !want.addrs.contains_key(ip)) {
                if let Err(e) = p.remove_mesh_addr(*ip) {
                    fail(format!("removing mesh address {ip}"), e);
                }
            }
        }
        Err(e) => fail("reading the mesh addresses".into(), e),
    }
}

/// Attach the uplink program to exactly `want` (ifindexes of the node's uplinks); what is
/// attached and no longer wanted is detached. Links adopted from a previous agent count as
/// attached.
pub fn apply_uplinks(d: &Datapath, want: &BTreeSet<u32>, errors: &mut Vec<String>) {
    let have: BTreeSet<u32> = d.policy().uplinks().into_iter().collect();
    for i in want.difference(&have) {
        if let Err(e) = d.policy().attach_uplink(*i) {
            errors.push(format!(
                "attaching the uplink program to ifindex {i}: {e:#}"
            ));
        }
    }
    for i in have.difference(want) {
        if let Err(e) = d.policy().detach_uplink(*i) {
            errors.push(format!(
                "detaching the uplink program from ifindex {i}: {e:#}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_model::ObjKey;
    use comb_model::mesh::{PodMtls, SpiffeId};
    use comb_model::pipeline::{HbonePeer, MeshEndpoint};

    fn ep(ifindex: Option<u32>, ip: &str, mode: DataplaneMode, mtls: PodMtls) -> MeshEndpoint {
        MeshEndpoint {
            addrs: vec![ip.parse().unwrap()],
            ifindex,
            mode,
            identity: SpiffeId::new("cluster.local", "ns", "sa"),
            mtls,
        }
    }

    fn mtls(default: MtlsMode, ports: &[(u16, MtlsMode)]) -> PodMtls {
        PodMtls {
            default,
            ports: ports.iter().copied().collect(),
            from: vec![],
        }
    }

    fn key(endpoint: u32, port: Option<u16>) -> MeshPortKey {
        MeshPortKey { endpoint, port }
    }

    fn own(strict: bool) -> MeshPort {
        MeshPort {
            enrolled: true,
            strict,
        }
    }

    fn port(strict: bool) -> MeshPort {
        MeshPort {
            enrolled: false,
            strict,
        }
    }

    fn obj(name: &str) -> ObjKey {
        ObjKey::new("ns", name)
    }

    #[test]
    fn compiles_modes_ports_and_addresses() {
        let mut m = DesiredMesh::default();
        m.endpoints.insert(
            obj("strict"),
            ep(
                Some(7),
                "198.18.1.2",
                DataplaneMode::Mesh,
                mtls(
                    MtlsMode::Strict,
                    &[(8080, MtlsMode::Permissive), (9090, MtlsMode::Disable)],
                ),
            ),
        );
        m.endpoints.insert(
            obj("permissive"),
            ep(
                Some(8),
                "198.18.1.3",
                DataplaneMode::Mesh,
                mtls(MtlsMode::Permissive, &[(5432, MtlsMode::Strict)]),
            ),
        );
        m.endpoints.insert(
            obj("disabled"),
            ep(
                Some(9),
                "198.18.1.4",
                DataplaneMode::Mesh,
                mtls(MtlsMode::Disable, &[]),
            ),
        );
        // Out of the mesh, or its interface unknown: nothing, whatever PeerAuthentication says.
        for (name, i, ip, mode) in [
            ("none", Some(10), "198.18.1.5", DataplaneMode::None),
            ("sidecar", Some(11), "198.18.1.6", DataplaneMode::Sidecar),
            ("unknown", None, "198.18.1.7", DataplaneMode::Mesh),
        ] {
            m.endpoints.insert(
                obj(name),
                ep(
                    i,
                    ip,
                    mode,
                    mtls(MtlsMode::Strict, &[(80, MtlsMode::Strict)]),
                ),
            );
        }
        m.hbone_peers.insert(
            "198.18.2.2".parse().unwrap(),
            HbonePeer {
                pod: obj("remote"),
                node: Some("n2".into()),
                identity: SpiffeId::new("cluster.local", "ns", "sa"),
                comb: true,
            },
        );

        let got = compile(&m);
        let want_ports: BTreeMap<MeshPortKey, MeshPort> = [
            (key(7, None), own(true)),
            (key(7, Some(8080)), port(false)),
            (key(7, Some(9090)), port(false)),
            (key(8, None), own(false)),
            (key(8, Some(5432)), port(true)),
            (key(9, None), own(false)),
        ]
        .into_iter()
        .collect();
        assert_eq!(got.ports, want_ports);
        let want_addrs: BTreeMap<IpAddr, MeshAddr> = [
            ("198.18.1.2", MeshAddr::local(7)),
            ("198.18.1.3", MeshAddr::local(8)),
            ("198.18.1.4", MeshAddr::local(9)),
            ("198.18.2.2", MeshAddr::peer()),
        ]
        .into_iter()
        .map(|(ip, a)| (ip.parse().unwrap(), a))
        .collect();
        assert_eq!(got.addrs, want_addrs);
    }

    #[test]
    fn empty_mesh_compiles_to_nothing() {
        assert_eq!(compile(&DesiredMesh::default()), MeshEntries::default());
    }
}
