//! The pipeline: one pure function from State (+ node, identity allocator, config, the
//! node's interfaces) to everything the reconcilers need — desired datapath entries, the
//! proxy table, the flow index, warnings. No I/O: the agent calls it on every State change,
//! the benchmarks call the same function to time its steps, and tests call it directly.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::identity::{IdentityAllocator, IdentityTable};
use crate::l7::{ProxyTable, compile_proxy_table};
use crate::lb::{LbFrontend, LbService, compile_frontends};
use crate::policy_compile::policy_cidrs;
use crate::{Generation, State};

pub mod endpoints;
pub mod flow_index;
pub mod mesh;
pub mod policy;
pub mod services;

pub use endpoints::{DesiredPods, PROXY_ATTACH_ID, attach_id};
pub use flow_index::FlowIndex;
pub use mesh::{DesiredMesh, HbonePeer, MeshConfig, MeshEndpoint};
pub use policy::{DesiredPolicy, PolicyEndpoint};
pub use services::{DesiredServices, ServiceKey};

/// The switches of the agent that change what is desired (not how it is applied).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Trust domain and PeerAuthentication root namespace.
    pub mesh: MeshConfig,
    /// Identity policy on: local pods get policy endpoints and entries.
    pub policy: bool,
    /// Socket LB on: Service frontends go into the socket-LB maps (off: the maps stay empty,
    /// nothing would read them).
    pub socket_lb: bool,
    /// The node proxy's cgroup, relative to the cgroup root: its sockets join the splice
    /// too, so a local pod's connection to the proxy is spliced. None: they do not.
    pub proxy_cgroup: Option<std::path::PathBuf>,
}

/// Everything a State asks of this node.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub generation: Generation,
    pub identities: IdentityTable,
    /// Local pods: endpoints map and splice attachments.
    pub pods: DesiredPods,
    /// Every Service frontend of the State as compiled for this node (for `comb service
    /// list`), whether or not the socket LB programs it.
    pub frontends: Vec<LbFrontend>,
    /// Socket-LB entries; empty when the socket LB is off.
    pub services: BTreeMap<ServiceKey, LbService>,
    /// Frontends that cannot be programmed, with why.
    pub lb_skipped: Vec<String>,
    /// Identity policy (empty when policy is off); `policy.unenforced` says which local pods
    /// cannot be judged and why.
    pub policy: DesiredPolicy,
    /// The node proxy's table (shared with the proxy, which swaps it in whole).
    pub proxy: Arc<ProxyTable>,
    pub flow_index: FlowIndex,
    /// Enrolment, mutual-TLS modes, HBONE peers, certificates wanted.
    pub mesh: DesiredMesh,
}

impl Desired {
    /// What a person should know about this configuration, one line each.
    pub fn warnings(&self) -> impl Iterator<Item = String> + '_ {
        let lb = self
            .lb_skipped
            .iter()
            .map(|s| format!("service frontend not programmed: {s}"));
        let policy = self
            .policy
            .unenforced
            .iter()
            .map(|s| format!("policy not enforced: {s}"));
        lb.chain(policy)
    }
}

/// Compute what `state` asks of `node`. `identities` hands out (and remembers) identity
/// numbers: the caller persists it before any map holds a number. `interfaces` are the
/// node's network interfaces, name → index (read by the caller).
pub fn compute(
    state: &State,
    node: &str,
    identities: &mut IdentityAllocator,
    config: &PipelineConfig,
    interfaces: &BTreeMap<String, u32>,
) -> Desired {
    let snapshot = state.snapshot();
    let table = identities.resolve(snapshot, node, &policy_cidrs(snapshot));
    let policy = if config.policy {
        policy::desired(state, node, &table, interfaces)
    } else {
        DesiredPolicy::default()
    };
    let frontends = compile_frontends(snapshot, node);
    let lb = services::desired(&frontends);
    let mesh = mesh::desired(state, node, &config.mesh, interfaces);
    let mut proxy = compile_proxy_table(snapshot, state.generation(), &table, node);
    mesh::fill_proxy_table(&mesh, &mut proxy);
    Desired {
        generation: state.generation(),
        pods: endpoints::desired(state, node, config.proxy_cgroup.as_deref()),
        frontends,
        services: if config.socket_lb {
            lb.services
        } else {
            BTreeMap::new()
        },
        lb_skipped: lb.skipped,
        proxy: Arc::new(proxy),
        flow_index: flow_index::build(snapshot, &policy),
        mesh,
        policy,
        identities: table,
    }
}

/// The host-side interface names of the local pods, the only interfaces the pipeline asks
/// about (the caller resolves them to indexes).
pub fn interface_names<'a>(state: &'a State, node: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    state
        .local_pods(node)
        .filter_map(|p| p.interface.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LabelSelector, NetworkPolicy};
    use crate::{
        Endpoint, EndpointPort, EndpointSlice, ObjKey, Pod, Protocol, Service, ServicePort,
        Snapshot, TargetPort,
    };

    fn state() -> State {
        let mut snap = Snapshot::default();
        let svc = Service {
            key: ObjKey::new("apps", "web"),
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![
                ServicePort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: TargetPort::Number(8080),
                },
                ServicePort {
                    name: Some("sig".into()),
                    protocol: Protocol::Sctp,
                    port: 9,
                    target_port: TargetPort::Number(9),
                },
            ],
            annotations: BTreeMap::new(),
            affinity_timeout_secs: None,
            internal_local: false,
        };
        let slice = EndpointSlice {
            key: ObjKey::new("apps", "web-1"),
            service_name: "web".into(),
            ports: vec![EndpointPort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: vec![Endpoint {
                addresses: vec!["198.18.2.2".parse().unwrap()],
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some("n2".into()),
            }],
        };
        snap.services.insert(svc.key.clone(), svc);
        snap.endpoint_slices.insert(slice.key.clone(), slice);
        for (name, ip, iface) in [("a", "198.18.1.2", "lxc2"), ("b", "198.18.1.3", "lxc3")] {
            let p = Pod {
                key: ObjKey::new("apps", name),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                node_name: Some("n1".into()),
                service_account: "default".into(),
                ips: vec![ip.parse().unwrap()],
                cgroup: Some(format!("/lab/{name}")),
                splice: true,
                interface: Some(iface.into()),
                ports: vec![],
                owner: None,
            };
            snap.pods.insert(p.key.clone(), p);
        }
        let np = NetworkPolicy {
            key: ObjKey::new("apps", "deny"),
            pod_selector: LabelSelector::default(),
            ingress_enforced: true,
            egress_enforced: false,
            ingress: vec![],
            egress: vec![],
        };
        snap.network_policies.insert(np.key.clone(), np);
        let mut s = State::new();
        s.replace(snap);
        s
    }

    fn interfaces() -> BTreeMap<String, u32> {
        BTreeMap::from([("lxc2".into(), 7)])
    }

    fn all_on() -> PipelineConfig {
        PipelineConfig {
            policy: true,
            socket_lb: true,
            proxy_cgroup: None,
            ..Default::default()
        }
    }

    #[test]
    fn one_call_gives_every_reconciler_its_part() {
        let st = state();
        let mut ids = IdentityAllocator::default();
        let d = compute(&st, "n1", &mut ids, &all_on(), &interfaces());
        assert_eq!(d.generation, st.generation());
        assert_eq!(d.pods.endpoints.len(), 2);
        assert_eq!(d.services.len(), 1, "the TCP port; SCTP is skipped");
        let s = d.services.values().next().unwrap();
        assert_eq!(s.backends, [("198.18.2.2".parse().unwrap(), 8080)]);
        assert_eq!(d.frontends.len(), 2);
        assert_eq!(d.policy.endpoints.len(), 1, "b's interface is missing");
        assert!(!d.policy.entries.is_empty());
        assert_eq!(d.proxy.generation, st.generation());
        assert_eq!(d.flow_index.pod_by_ifindex.get(&7).unwrap(), "apps/a");
        assert_eq!(d.flow_index.policy_names.len(), 1);
        let warnings: Vec<String> = d.warnings().collect();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("SCTP"), "{warnings:?}");
        assert!(warnings[1].contains("lxc3"), "{warnings:?}");
    }

    #[test]
    fn socket_lb_off_keeps_the_maps_empty_but_still_reports() {
        let cfg = PipelineConfig {
            socket_lb: false,
            ..all_on()
        };
        let d = compute(&state(), "n1", &mut Default::default(), &cfg, &interfaces());
        assert!(d.services.is_empty());
        assert_eq!(d.frontends.len(), 2, "service list still shows them");
        assert_eq!(d.lb_skipped.len(), 1, "a property of the configuration");
    }

    #[test]
    fn policy_off_desires_no_policy_but_keeps_identities() {
        let cfg = PipelineConfig {
            policy: false,
            ..all_on()
        };
        let d = compute(&state(), "n1", &mut Default::default(), &cfg, &interfaces());
        assert_eq!(d.policy, DesiredPolicy::default());
        assert!(
            !d.identities.identities.is_empty(),
            "the proxy still needs them"
        );
    }

    #[test]
    fn same_input_same_output_and_stable_identity_numbers() {
        let st = state();
        let mut ids = IdentityAllocator::default();
        let a = compute(&st, "n1", &mut ids, &all_on(), &interfaces());
        let b = compute(&st, "n1", &mut ids, &all_on(), &interfaces());
        assert_eq!(a.policy, b.policy);
        assert_eq!(a.services, b.services);
        assert_eq!(a.pods, b.pods);
        assert_eq!(a.flow_index, b.flow_index);
    }

    #[test]
    fn interface_names_are_those_of_local_pods() {
        let st = state();
        let mut names: Vec<&str> = interface_names(&st, "n1").collect();
        names.sort();
        assert_eq!(names, ["lxc2", "lxc3"]);
        assert_eq!(interface_names(&st, "n2").count(), 0);
    }
}
