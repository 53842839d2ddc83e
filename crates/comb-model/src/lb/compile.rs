//! Services + EndpointSlices → [`LbFrontend`]s: the rules kube-proxy applies, in one pure
//! function so every rule is unit-tested without a kernel.

use std::net::IpAddr;

use super::{ANNOTATION_LB, BackendState, LbAlgorithm, LbBackend, LbFrontend};
use crate::objects::{Endpoint, EndpointSlice, Service, ServicePort, TargetPort};
use crate::snapshot::Snapshot;

/// One frontend per (cluster IP, Service port) of every non-headless Service, with the
/// backends `node`'s datapath should know. Order: Services by key, then cluster IPs, then
/// ports as listed; backends sorted by address and port.
pub fn compile_frontends(snapshot: &Snapshot, node: &str) -> Vec<LbFrontend> {
    // Each Service's slices, found in one pass (not one pass per Service).
    let mut by_service: std::collections::HashMap<(&str, &str), Vec<&EndpointSlice>> =
        std::collections::HashMap::new();
    for s in snapshot.endpoint_slices.values() {
        by_service
            .entry((s.key.namespace.as_str(), s.service_name.as_str()))
            .or_default()
            .push(s);
    }
    let mut out = Vec::new();
    for svc in snapshot.services.values() {
        // Headless Services have no VIP: clients resolve the pods themselves.
        if svc.cluster_ips.is_empty() {
            continue;
        }
        let slices: &[&EndpointSlice] = by_service
            .get(&(svc.key.namespace.as_str(), svc.key.name.as_str()))
            .map_or(&[], Vec::as_slice);
        let algorithm = algorithm(svc);
        for vip in &svc.cluster_ips {
            for sp in &svc.ports {
                out.push(LbFrontend {
                    service: svc.key.clone(),
                    port_name: sp.name.clone(),
                    vip: *vip,
                    port: sp.port,
                    protocol: sp.protocol,
                    algorithm,
                    affinity_timeout_secs: svc.affinity_timeout_secs,
                    backends: backends(slices, sp, *vip, svc.internal_local, node),
                });
            }
        }
    }
    out
}

fn algorithm(svc: &Service) -> LbAlgorithm {
    match svc.annotations.get(ANNOTATION_LB).map(|v| v.trim()) {
        Some("maglev") => LbAlgorithm::Maglev,
        _ => LbAlgorithm::Random,
    }
}

/// The port a slice's endpoints serve `sp` on, if any.
fn slice_port(slice: &EndpointSlice, sp: &ServicePort) -> Option<u16> {
    // The EndpointSlice controller names slice ports after the Service ports, so the name
    // (None for a single unnamed port) and protocol identify the one meant.
    if let Some(p) = slice
        .ports
        .iter()
        .find(|p| p.name == sp.name && p.protocol == sp.protocol)
    {
        return Some(p.port);
    }
    // Hand-written slices often omit ports; a numeric targetPort still says where to go,
    // a named one can only be resolved through the slice.
    match sp.target_port {
        TargetPort::Number(n) => Some(n),
        TargetPort::Name(_) => None,
    }
}

fn state(e: &Endpoint) -> BackendState {
    if e.ready {
        BackendState::Ready
    } else if e.serving && e.terminating {
        BackendState::Terminating
    } else {
        BackendState::NotReady
    }
}

fn backends(
    slices: &[&EndpointSlice],
    sp: &ServicePort,
    vip: IpAddr,
    internal_local: bool,
    node: &str,
) -> Vec<LbBackend> {
    let mut all = Vec::new();
    for slice in slices {
        let Some(port) = slice_port(slice, sp) else {
            continue;
        };
        for e in &slice.endpoints {
            // Like kube-proxy, use the first address: the API says they are fungible. A slice
            // of the other family belongs to the dual-stack Service's other VIP.
            let Some(ip) = e.addresses.first().copied() else {
                continue;
            };
            if ip.is_ipv4() != vip.is_ipv4() {
                continue;
            }
            all.push(LbBackend {
                ip,
                port,
                state: state(e),
                node: e.node_name.clone(),
                active: false,
            });
        }
    }
    // Sorting puts the best state first for each ip:port (Ready < Terminating < NotReady),
    // so the duplicate kept is the most usable one.
    all.sort();
    all.dedup_by_key(|b| (b.ip, b.port));

    // internalTrafficPolicy: Local: only this node's endpoints may take traffic, and the
    // ready/terminating fallback is decided among them (as kube-proxy does).
    let eligible = |b: &LbBackend| !internal_local || b.node.as_deref() == Some(node);
    let want = if all
        .iter()
        .any(|b| eligible(b) && b.state == BackendState::Ready)
    {
        BackendState::Ready
    } else {
        // Terminating endpoints serve only when no ready one remains, so that connections
        // draining during a rollout still succeed.
        BackendState::Terminating
    };
    for b in &mut all {
        b.active = eligible(b) && b.state == want;
    }
    all
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::objects::{EndpointPort, ObjKey, Protocol};

    fn svc(name: &str, ips: &[&str], ports: Vec<ServicePort>) -> Service {
        Service {
            key: ObjKey::new("apps", name),
            cluster_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            ports,
            annotations: BTreeMap::new(),
            affinity_timeout_secs: None,
            internal_local: false,
        }
    }

    fn sport(name: Option<&str>, port: u16, target: TargetPort) -> ServicePort {
        ServicePort {
            name: name.map(Into::into),
            protocol: Protocol::Tcp,
            port,
            target_port: target,
        }
    }

    fn eport(name: Option<&str>, port: u16) -> EndpointPort {
        EndpointPort {
            name: name.map(Into::into),
            protocol: Protocol::Tcp,
            port,
        }
    }

    fn ep(ip: &str, ready: bool, serving: bool, terminating: bool, node: &str) -> Endpoint {
        Endpoint {
            addresses: vec![ip.parse().unwrap()],
            ready,
            serving,
            terminating,
            node_name: Some(node.into()),
        }
    }

    fn ready(ip: &str, node: &str) -> Endpoint {
        ep(ip, true, true, false, node)
    }

    fn slice(
        name: &str,
        service: &str,
        ports: Vec<EndpointPort>,
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            key: ObjKey::new("apps", name),
            service_name: service.into(),
            ports,
            endpoints,
        }
    }

    fn snap(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Snapshot {
        let mut s = Snapshot::default();
        for v in services {
            s.services.insert(v.key.clone(), v);
        }
        for e in slices {
            s.endpoint_slices.insert(e.key.clone(), e);
        }
        s
    }

    /// `ip:port (state, active?)` for each backend of the frontend.
    fn show(f: &LbFrontend) -> Vec<String> {
        f.backends
            .iter()
            .map(|b| {
                let mark = if b.active { "+" } else { "-" };
                format!("{mark}{}:{} {:?}", b.ip, b.port, b.state)
            })
            .collect()
    }

    fn web() -> Service {
        svc(
            "web",
            &["10.96.0.10"],
            vec![sport(None, 80, TargetPort::Number(8080))],
        )
    }

    #[test]
    fn one_frontend_per_cluster_ip_and_port() {
        let s = svc(
            "web",
            &["10.96.0.10", "fd00::10"],
            vec![
                sport(Some("http"), 80, TargetPort::Number(8080)),
                ServicePort {
                    protocol: Protocol::Udp,
                    ..sport(Some("dns"), 53, TargetPort::Number(5353))
                },
            ],
        );
        let f = compile_frontends(&snap(vec![s], vec![]), "n1");
        let keys: Vec<_> = f
            .iter()
            .map(|f| format!("{}:{}/{:?}", f.vip, f.port, f.protocol))
            .collect();
        assert_eq!(
            keys,
            [
                "10.96.0.10:80/Tcp",
                "10.96.0.10:53/Udp",
                "fd00::10:80/Tcp",
                "fd00::10:53/Udp"
            ]
        );
        assert_eq!(f[0].port_name.as_deref(), Some("http"));
        assert!(f.iter().all(|f| f.backends.is_empty()));
    }

    #[test]
    fn headless_service_has_no_frontend() {
        let s = svc("db", &[], vec![sport(None, 5432, TargetPort::Number(5432))]);
        let e = slice(
            "db-1",
            "db",
            vec![eport(None, 5432)],
            vec![ready("198.18.1.2", "n1")],
        );
        assert!(compile_frontends(&snap(vec![s], vec![e]), "n1").is_empty());
    }

    #[test]
    fn backends_come_from_every_slice_of_the_service_in_its_namespace() {
        let a = slice(
            "web-a",
            "web",
            vec![eport(None, 8080)],
            vec![ready("198.18.1.3", "n1")],
        );
        let b = slice(
            "web-b",
            "web",
            vec![eport(None, 8080)],
            vec![ready("198.18.2.2", "n2")],
        );
        let other = slice(
            "api-a",
            "api",
            vec![eport(None, 8080)],
            vec![ready("198.18.1.9", "n1")],
        );
        let mut elsewhere = slice(
            "web-x",
            "web",
            vec![eport(None, 8080)],
            vec![ready("198.18.1.8", "n1")],
        );
        elsewhere.key.namespace = "other".into();
        let f = compile_frontends(&snap(vec![web()], vec![a, b, other, elsewhere]), "n1");
        assert_eq!(
            show(&f[0]),
            ["+198.18.1.3:8080 Ready", "+198.18.2.2:8080 Ready"]
        );
    }

    #[test]
    fn backend_port_is_the_slice_port_with_the_service_ports_name_and_protocol() {
        let s = svc(
            "web",
            &["10.96.0.10"],
            vec![
                sport(Some("http"), 80, TargetPort::Name("web".into())),
                sport(Some("admin"), 81, TargetPort::Number(9999)),
            ],
        );
        let mut udp = eport(Some("http"), 7000);
        udp.protocol = Protocol::Udp;
        let e = slice(
            "web-a",
            "web",
            vec![udp, eport(Some("admin"), 9090), eport(Some("http"), 8080)],
            vec![ready("198.18.1.2", "n1")],
        );
        let f = compile_frontends(&snap(vec![s], vec![e]), "n1");
        assert_eq!(
            show(&f[0]),
            ["+198.18.1.2:8080 Ready"],
            "http: by name, TCP"
        );
        assert_eq!(
            show(&f[1]),
            ["+198.18.1.2:9090 Ready"],
            "slice port beats targetPort"
        );
    }

    #[test]
    fn unnamed_single_port_matches_the_unnamed_slice_port() {
        let e = slice(
            "web-a",
            "web",
            vec![eport(None, 8443)],
            vec![ready("198.18.1.2", "n1")],
        );
        let f = compile_frontends(&snap(vec![web()], vec![e]), "n1");
        assert_eq!(show(&f[0]), ["+198.18.1.2:8443 Ready"]);
    }

    #[test]
    fn numeric_target_port_is_the_fallback_when_the_slice_has_no_matching_port() {
        let portless = slice("web-a", "web", vec![], vec![ready("198.18.1.2", "n1")]);
        let other_name = slice(
            "web-b",
            "web",
            vec![eport(Some("metrics"), 9100)],
            vec![ready("198.18.1.3", "n1")],
        );
        let f = compile_frontends(&snap(vec![web()], vec![portless, other_name]), "n1");
        assert_eq!(
            show(&f[0]),
            ["+198.18.1.2:8080 Ready", "+198.18.1.3:8080 Ready"]
        );
    }

    #[test]
    fn named_target_port_without_a_matching_slice_port_gives_no_backend() {
        let s = svc(
            "web",
            &["10.96.0.10"],
            vec![sport(Some("http"), 80, TargetPort::Name("web".into()))],
        );
        let unresolved = slice("web-a", "web", vec![], vec![ready("198.18.1.2", "n1")]);
        let resolved = slice(
            "web-b",
            "web",
            vec![eport(Some("http"), 8080)],
            vec![ready("198.18.1.3", "n1")],
        );
        let f = compile_frontends(&snap(vec![s], vec![unresolved, resolved]), "n1");
        assert_eq!(show(&f[0]), ["+198.18.1.3:8080 Ready"]);
    }

    #[test]
    fn states_from_conditions_and_ready_ones_are_active() {
        let e = slice(
            "web-a",
            "web",
            vec![eport(None, 8080)],
            vec![
                ep("198.18.1.2", true, true, false, "n1"),
                ep("198.18.1.3", false, true, true, "n1"),
                ep("198.18.1.4", false, false, true, "n1"),
                ep("198.18.1.5", false, false, false, "n1"),
                ep("198.18.1.6", false, true, false, "n1"),
            ],
        );
        let f = compile_frontends(&snap(vec![web()], vec![e]), "n1");
        assert_eq!(
            show(&f[0]),
            [
                "+198.18.1.2:8080 Ready",
                "-198.18.1.3:8080 Terminating",
                "-198.18.1.4:8080 NotReady",
                "-198.18.1.5:8080 NotReady",
                "-198.18.1.6:8080 NotReady",
            ]
        );
    }

    #[test]
    fn terminating_ones_are_active_only_when_no_ready_one_remains() {
        let e = slice(
            "web-a",
            "web",
            vec![eport(None, 8080)],
            vec![
                ep("198.18.1.3", false, true, true, "n1"),
                ep("198.18.1.4", false, true, true, "n2"),
                ep("198.18.1.5", false, false, false, "n1"),
            ],
        );
        let f = compile_frontends(&snap(vec![web()], vec![e]), "n1");
        assert_eq!(
            show(&f[0]),
            [
                "+198.18.1.3:8080 Terminating",
                "+198.18.1.4:8080 Terminating",
                "-198.18.1.5:8080 NotReady",
            ]
        );
        assert_eq!(f[0].active_backends().count(), 2);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_only_this_nodes_endpoints_active() {
        let mut s = web();
        s.internal_local = true;
        let e = slice(
            "web-a",
            "web",
            vec![eport(None, 8080)],
            vec![
                ready("198.18.1.2", "n1"),
                ready("198.18.2.2", "n2"),
                ep("198.18.1.3", false, true, true, "n1"),
            ],
        );
        let f = compile_frontends(&snap(vec![s.clone()], vec![e.clone()]), "n1");
        assert_eq!(
            show(&f[0]),
            [
                "+198.18.1.2:8080 Ready",
                "-198.18.1.3:8080 Terminating",
                "-198.18.2.2:8080 Ready"
            ]
        );
        // n2 has a ready local endpoint; n3 has none, so its clients get no backend
        // (the remote ready ones do not count).
        let f = compile_frontends(&snap(vec![s.clone()], vec![e]), "n3");
        assert_eq!(f[0].active_backends().count(), 0);
        // The terminating fallback is decided among the local endpoints.
        let only_remote_ready = slice(
            "web-a",
            "web",
            vec![eport(None, 8080)],
            vec![
                ready("198.18.2.2", "n2"),
                ep("198.18.1.3", false, true, true, "n1"),
            ],
        );
        let f = compile_frontends(&snap(vec![s], vec![only_remote_ready]), "n1");
        assert_eq!(
            show(&f[0]),
            ["+198.18.1.3:8080 Terminating", "-198.18.2.2:8080 Ready"]
        );
    }

    #[test]
    fn cluster_policy_uses_every_nodes_endpoints() {
        let e = slice(
            "web-a",
            "web",
            vec![eport(None, 8080)],
            vec![ready("198.18.2.2", "n2"), ready("198.18.3.2", "n3")],
        );
        let f = compile_frontends(&snap(vec![web()], vec![e]), "n1");
        assert_eq!(f[0].active_backends().count(), 2);
    }

    #[test]
    fn algorithm_from_annotation_and_affinity_from_the_service() {
        let mut s = web();
        s.affinity_timeout_secs = Some(600);
        let f = compile_frontends(&snap(vec![s.clone()], vec![]), "n1");
        assert_eq!(f[0].algorithm, LbAlgorithm::Random);
        assert_eq!(f[0].affinity_timeout_secs, Some(600));
        s.annotations.insert(ANNOTATION_LB.into(), "maglev".into());
        let f = compile_frontends(&snap(vec![s.clone()], vec![]), "n1");
        assert_eq!(f[0].algorithm, LbAlgorithm::Maglev);
        s.annotations.insert(ANNOTATION_LB.into(), "random".into());
        let f = compile_frontends(&snap(vec![s], vec![]), "n1");
        assert_eq!(f[0].algorithm, LbAlgorithm::Random);
    }

    #[test]
    fn duplicates_across_slices_collapse_keeping_the_best_state() {
        let a = slice(
            "web-a",
            "web",
            vec![eport(None, 8080)],
            vec![
                ready("198.18.1.3", "n1"),
                ep("198.18.1.2", false, true, true, "n1"),
            ],
        );
        let b = slice(
            "web-b",
            "web",
            vec![eport(None, 8080)],
            vec![ready("198.18.1.2", "n1"), ready("198.18.1.3", "n1")],
        );
        let f = compile_frontends(&snap(vec![web()], vec![b, a]), "n1");
        assert_eq!(
            show(&f[0]),
            ["+198.18.1.2:8080 Ready", "+198.18.1.3:8080 Ready"]
        );
    }

    #[test]
    fn backends_are_sorted_whatever_the_input_order() {
        let eps = ["198.18.1.10", "198.18.1.2", "198.18.2.2", "198.18.1.3"];
        let e1 = slice(
            "web-a",
            "web",
            vec![eport(None, 8080)],
            eps.iter().map(|i| ready(i, "n1")).collect(),
        );
        let e2 = slice(
            "web-a",
            "web",
            vec![eport(None, 8080)],
            eps.iter().rev().map(|i| ready(i, "n1")).collect(),
        );
        let f1 = compile_frontends(&snap(vec![web()], vec![e1]), "n1");
        let f2 = compile_frontends(&snap(vec![web()], vec![e2]), "n1");
        assert_eq!(f1, f2);
        assert_eq!(
            show(&f1[0]),
            [
                "+198.18.1.2:8080 Ready",
                "+198.18.1.3:8080 Ready",
                "+198.18.1.10:8080 Ready",
                "+198.18.2.2:8080 Ready"
            ]
        );
    }

    #[test]
    fn backends_match_the_vip_family() {
        let s = svc(
            "web",
            &["10.96.0.10", "fd00::10"],
            vec![sport(None, 80, TargetPort::Number(8080))],
        );
        let v4 = slice(
            "web-4",
            "web",
            vec![eport(None, 8080)],
            vec![ready("198.18.1.2", "n1")],
        );
        let v6 = slice(
            "web-6",
            "web",
            vec![eport(None, 8080)],
            vec![ready("fd00:1::2", "n1")],
        );
        let f = compile_frontends(&snap(vec![s], vec![v4, v6]), "n1");
        assert_eq!(show(&f[0]), ["+198.18.1.2:8080 Ready"]);
        assert_eq!(show(&f[1]), ["+fd00:1::2:8080 Ready"]);
    }

    #[test]
    fn endpoint_uses_its_first_address_only() {
        let mut e = ready("198.18.1.2", "n1");
        e.addresses.push("198.18.1.99".parse().unwrap());
        let s = slice("web-a", "web", vec![eport(None, 8080)], vec![e]);
        let f = compile_frontends(&snap(vec![web()], vec![s]), "n1");
        assert_eq!(show(&f[0]), ["+198.18.1.2:8080 Ready"]);
    }
}
