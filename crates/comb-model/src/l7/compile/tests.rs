use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::identity::IdentityAllocator;
use crate::l7::{DecisionReason, Request};
use crate::objects::{
    ContainerPort, Endpoint, EndpointPort, EndpointSlice, Namespace, ObjKey, PodOwner, ServicePort,
};
use crate::policy::{AuthorizationPolicy, AuthzAction, AuthzRule, ISTIO_ROOT_NAMESPACE};
use crate::policy_compile::policy_cidrs;

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(ns: &str, name: &str, node: &str, ips: &[&str], kv: &[(&str, &str)]) -> Pod {
    Pod {
        key: ObjKey::new(ns, name),
        labels: labels(kv),
        annotations: BTreeMap::new(),
        node_name: Some(node.into()),
        service_account: "default".into(),
        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        cgroup: None,
        splice: true,
        interface: None,
        ports: vec![],
        owner: None,
    }
}

fn owned(mut p: Pod, kind: &str, name: &str) -> Pod {
    p.owner = Some(PodOwner {
        kind: kind.into(),
        name: name.into(),
    });
    p
}

#[test]
fn workload_names_follow_istio() {
    let base = pod(
        "shop",
        "web-7c9f8d-abcde",
        "n1",
        &[],
        &[("pod-template-hash", "7c9f8d")],
    );
    assert_eq!(
        workload_name(&base),
        "web-7c9f8d-abcde",
        "no controller: the pod"
    );
    let cases = [
        ("ReplicaSet", "web-7c9f8d", "web"),
        // A ReplicaSet not made by a Deployment (name without the hash) keeps its name.
        ("ReplicaSet", "standalone", "standalone"),
        ("StatefulSet", "db", "db"),
        ("DaemonSet", "agent", "agent"),
        ("Job", "migrate", "migrate"),
        ("Job", "backup-28405720", "backup"),
        ("Job", "report-2024", "report-2024"),
        ("Job", "-12345678", "-12345678"),
        ("Rollout", "canary-x", "canary-x"),
    ];
    for (kind, owner, want) in cases {
        assert_eq!(
            workload_name(&owned(base.clone(), kind, owner)),
            want,
            "{kind} {owner}"
        );
    }
    let mut no_hash = owned(base.clone(), "ReplicaSet", "web-7c9f8d");
    no_hash.labels.clear();
    assert_eq!(
        workload_name(&no_hash),
        "web-7c9f8d",
        "no pod-template-hash label"
    );
    let mut other_hash = owned(base, "ReplicaSet", "web-7c9f8d");
    other_hash.labels = labels(&[("pod-template-hash", "f8d")]);
    assert_eq!(
        workload_name(&other_hash),
        "web-7c9f8d",
        "hash must be a whole suffix"
    );
}

#[test]
fn workload_fields_and_canonical_names() {
    let mut alloc = IdentityAllocator::default();
    let mut snap = Snapshot::default();
    let mut p = owned(
        pod(
            "shop",
            "web-7c9f8d-abcde",
            "n1",
            &["10.0.1.2"],
            &[("pod-template-hash", "7c9f8d")],
        ),
        "ReplicaSet",
        "web-7c9f8d",
    );
    p.service_account = "web-sa".into();
    snap.pods.insert(p.key.clone(), p.clone());
    let table = alloc.resolve(&snap, "n1", &policy_cidrs(&snap));
    let w = workload(&p, &table);
    assert_eq!(w.workload, "web");
    assert_eq!(w.namespace, "shop");
    assert_eq!(w.service_account, "web-sa");
    assert_eq!(w.principal, "cluster.local/ns/shop/sa/web-sa");
    assert_eq!(
        (w.canonical_service.as_str(), w.canonical_revision.as_str()),
        ("web", "latest")
    );
    assert_eq!(w.identity, table.pod_identity[&p.key]);
    assert!(w.identity >= crate::identity::FIRST_WORKLOAD_ID);

    let canon = |kv: &[(&str, &str)]| {
        let w = workload(&pod("shop", "p", "n1", &[], kv), &table);
        (w.canonical_service, w.canonical_revision, w.identity)
    };
    assert_eq!(
        canon(&[("app", "a"), ("version", "v1")]),
        ("a".into(), "v1".into(), 0)
    );
    assert_eq!(
        canon(&[
            ("app", "a"),
            ("app.kubernetes.io/name", "k"),
            ("app.kubernetes.io/version", "2"),
            ("version", "v1")
        ]),
        ("k".into(), "2".into(), 0)
    );
    assert_eq!(
        canon(&[
            ("service.istio.io/canonical-name", "c"),
            ("service.istio.io/canonical-revision", "r"),
            ("app.kubernetes.io/name", "k"),
        ]),
        ("c".into(), "r".into(), 0)
    );
    assert_eq!(
        canon(&[]),
        ("p".into(), "latest".into(), 0),
        "the workload name"
    );
}

fn svc_ref(ns: &str, name: &str, ports: &[u16]) -> ServiceRef {
    ServiceRef {
        key: ObjKey::new(ns, name),
        host: format!("{name}.{ns}.svc.cluster.local"),
        target_ports: ports.to_vec(),
    }
}

fn endpoint(services: Vec<ServiceRef>) -> L7Endpoint {
    L7Endpoint {
        workload: Arc::new(workload(
            &pod("shop", "p", "n1", &[], &[]),
            &IdentityTable::default(),
        )),
        services: services.into(),
        authz: Authz::default(),
        visibility: false,
    }
}

#[test]
fn destination_service_by_port_then_host() {
    let ep = endpoint(vec![
        svc_ref("shop", "api", &[8080, 9090]),
        svc_ref("shop", "web", &[8080]),
        svc_ref("shop", "metrics", &[9100]),
    ]);
    let name = |port, host| {
        ep.destination_service(port, host)
            .map(|s| s.key.name.as_str())
    };
    assert_eq!(
        name(9100, None),
        Some("metrics"),
        "the only one on the port"
    );
    assert_eq!(
        name(9100, Some("web")),
        Some("metrics"),
        "host names a Service not on the port"
    );
    assert_eq!(name(8080, None), Some("api"), "several: first by name");
    assert_eq!(
        name(8080, Some("10.0.1.2:8080")),
        Some("api"),
        "host names none"
    );
    for host in [
        "web",
        "web:8080",
        "web.shop",
        "WEB.shop.svc",
        "web.shop.svc.cluster.local",
        "web.shop.svc.cluster.local.",
        "web.shop.svc.cluster.local:8080",
    ] {
        assert_eq!(name(8080, Some(host)), Some("web"), "{host}");
    }
    for host in [
        "web.ops",
        "web.shop.svc.other",
        "web.shopx",
        "webx.shop",
        "web.shop.sv",
    ] {
        assert_eq!(name(8080, Some(host)), Some("api"), "{host}");
    }
    assert_eq!(name(1, Some("web")), None, "no Service fronts the port");
    assert_eq!(endpoint(vec![]).destination_service(8080, None), None);
}

fn slice(ns: &str, svc: &str, addrs: &[&str], ports: &[(Option<&str>, u16)]) -> EndpointSlice {
    EndpointSlice {
        key: ObjKey::new(ns, format!("{svc}-1")),
        service_name: svc.into(),
        ports: ports
            .iter()
            .map(|(n, p)| EndpointPort {
                name: n.map(Into::into),
                protocol: Protocol::Tcp,
                port: *p,
            })
            .collect(),
        endpoints: vec![Endpoint {
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
        }],
    }
}

fn service(ns: &str, name: &str, headless: bool, ports: Vec<ServicePort>) -> Service {
    Service {
        key: ObjKey::new(ns, name),
        cluster_ips: if headless {
            vec![]
        } else {
            vec!["10.96.0.10".parse().unwrap()]
        },
        ports,
        annotations: BTreeMap::new(),
        affinity_timeout_secs: None,
        internal_local: false,
    }
}

fn sport(name: Option<&str>, protocol: Protocol, port: u16, target: TargetPort) -> ServicePort {
    ServicePort {
        name: name.map(Into::into),
        protocol,
        port,
        target_port: target,
    }
}

fn ap(
    ns: &str,
    name: &str,
    selector: Option<&[(&str, &str)]>,
    action: AuthzAction,
) -> AuthorizationPolicy {
    AuthorizationPolicy {
        key: ObjKey::new(ns, name),
        selector: selector.map(labels),
        action,
        rules: vec![AuthzRule::default()],
    }
}

#[test]
fn proxy_table_of_a_small_cluster() {
    let mut snap = Snapshot::default();
    let mut web = pod(
        "shop",
        "web-0",
        "n1",
        &["10.0.1.2", "fd00::2"],
        &[("app", "web")],
    );
    web.ports = vec![
        ContainerPort {
            name: Some("http".into()),
            protocol: Protocol::Tcp,
            port: 8080,
        },
        ContainerPort {
            name: Some("dns".into()),
            protocol: Protocol::Udp,
            port: 5353,
        },
    ];
    let db = pod("shop", "db-0", "n1", &["10.0.1.3"], &[("app", "db")]);
    let remote = pod("ops", "admin", "n2", &["10.0.2.9"], &[("app", "admin")]);
    let pending = pod("shop", "pending", "n1", &[], &[("app", "web")]);
    for p in [web, db, remote, pending] {
        snap.pods.insert(p.key.clone(), p);
    }
    snap.namespaces.insert(
        "shop".into(),
        Namespace {
            name: "shop".into(),
            labels: BTreeMap::new(),
            annotations: labels(&[("comb.dev/l7", "true")]),
        },
    );
    snap.pods
        .get_mut(&ObjKey::new("shop", "db-0"))
        .unwrap()
        .annotations
        .insert("comb.dev/l7".into(), "false".into());
    for s in [
        service(
            "shop",
            "web",
            false,
            vec![
                sport(
                    Some("http"),
                    Protocol::Tcp,
                    80,
                    TargetPort::Name("http".into()),
                ),
                sport(Some("admin"), Protocol::Tcp, 81, TargetPort::Number(9000)),
                sport(
                    Some("dns"),
                    Protocol::Udp,
                    53,
                    TargetPort::Name("dns".into()),
                ),
            ],
        ),
        service(
            "shop",
            "web-headless",
            true,
            vec![sport(None, Protocol::Tcp, 80, TargetPort::Number(8080))],
        ),
        // Named target port the pod does not have: resolved through the slice.
        service(
            "shop",
            "legacy",
            false,
            vec![sport(
                Some("x"),
                Protocol::Tcp,
                80,
                TargetPort::Name("old".into()),
            )],
        ),
        service(
            "shop",
            "db",
            false,
            vec![sport(None, Protocol::Tcp, 5432, TargetPort::Number(5432))],
        ),
        service(
            "ops",
            "admin",
            false,
            vec![sport(None, Protocol::Tcp, 443, TargetPort::Number(9443))],
        ),
    ] {
        snap.services.insert(s.key.clone(), s);
    }
    for s in [
        slice("shop", "web", &["10.0.1.2"], &[(Some("http"), 8080)]),
        slice("shop", "web-headless", &["fd00::2"], &[]),
        slice("shop", "legacy", &["10.0.1.2"], &[(Some("x"), 7070)]),
        slice("shop", "db", &["10.0.1.3"], &[]),
        slice("ops", "admin", &["10.0.2.9"], &[]),
    ] {
        snap.endpoint_slices.insert(s.key.clone(), s);
    }
    for a in [
        ap(
            "shop",
            "web-allow",
            Some(&[("app", "web")]),
            AuthzAction::Allow,
        ),
        ap("shop", "ns-deny", None, AuthzAction::Deny),
        ap(ISTIO_ROOT_NAMESPACE, "mesh-audit", None, AuthzAction::Audit),
        ap(
            ISTIO_ROOT_NAMESPACE,
            "selected-elsewhere",
            Some(&[("app", "admin")]),
            AuthzAction::Allow,
        ),
        ap("ops", "ops-only", None, AuthzAction::Allow),
    ] {
        snap.authorization_policies.insert(a.key.clone(), a);
    }

    let table_ids = IdentityAllocator::default().resolve(&snap, "n1", &policy_cidrs(&snap));
    let t = compile_proxy_table(&snap, 42, &table_ids, "n1");
    assert_eq!(t.generation, 42);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // Workloads: every pod with an address, every address, all nodes.
    assert_eq!(t.workloads.len(), 4);
    assert_eq!(
        t.workload(ip("10.0.2.9")).unwrap().pod,
        ObjKey::new("ops", "admin")
    );
    assert!(Arc::ptr_eq(
        &t.workloads[&ip("10.0.1.2")],
        &t.workloads[&ip("fd00::2")]
    ));
    // Endpoints: this node's pods only.
    assert_eq!(t.endpoints.len(), 3);
    assert!(t.endpoint(ip("10.0.2.9")).is_none(), "other node");
    let web = t.endpoint(ip("fd00::2")).unwrap();
    assert!(Arc::ptr_eq(&web.workload, &t.workloads[&ip("10.0.1.2")]));
    assert!(web.visibility, "the namespace's annotation");
    assert!(
        !t.endpoint(ip("10.0.1.3")).unwrap().visibility,
        "the pod's false wins"
    );
    let svcs: Vec<(&str, &[u16])> = web
        .services
        .iter()
        .map(|s| (s.key.name.as_str(), s.target_ports.as_slice()))
        .collect();
    assert_eq!(
        svcs,
        [
            ("legacy", &[7070][..]),
            ("web", &[8080, 9000][..]),
            ("web-headless", &[8080][..])
        ],
        "UDP ports left out"
    );
    assert_eq!(web.services[1].host, "web.shop.svc.cluster.local");
    // Every pod's Services by address, other nodes' too (a tunnel's source reports them);
    // a local pod's are its endpoint's.
    assert!(Arc::ptr_eq(&web.services, &t.pod_services[&ip("fd00::2")]));
    assert_eq!(
        t.pod_destination_service(ip("10.0.2.9"), 9443)
            .map(|s| s.host.as_str()),
        Some("admin.ops.svc.cluster.local")
    );
    assert!(
        t.pod_destination_service(ip("10.0.2.9"), 80).is_none(),
        "no Service on the port"
    );
    assert_eq!(
        web.destination_service(8080, Some("web-headless.shop"))
            .map(|s| s.key.name.as_str()),
        Some("web-headless")
    );

    // Authz: web-allow (selector), ns-deny (namespace-wide), mesh-audit (root).
    assert!(!web.authz.is_empty());
    let from = t.workload(ip("10.0.2.9")).map(|w| &**w);
    let to = |dst: &str| Request {
        source_ip: ip("10.0.2.9"),
        source: from,
        authenticated: None,
        destination_ip: ip(dst),
        destination_port: 8080,
        http: None,
    };
    let req = to("10.0.1.2");
    let d = web.authz.evaluate(&req);
    assert_eq!(d.reason, DecisionReason::Denied);
    assert_eq!(d.policy, Some(ObjKey::new("shop", "ns-deny")));
    assert_eq!(
        d.audit,
        Some(ObjKey::new(ISTIO_ROOT_NAMESPACE, "mesh-audit"))
    );

    // Without the deny: the allow selecting web decides; db has no allow policy.
    snap.authorization_policies
        .remove(&ObjKey::new("shop", "ns-deny"));
    let t = compile_proxy_table(&snap, 43, &table_ids, "n1");
    let d = t.endpoint(ip("10.0.1.2")).unwrap().authz.evaluate(&req);
    assert_eq!(
        (d.reason, d.policy),
        (
            DecisionReason::Allowed,
            Some(ObjKey::new("shop", "web-allow"))
        )
    );
    let db = t.endpoint(ip("10.0.1.3")).unwrap();
    let d = db.authz.evaluate(&to("10.0.1.3"));
    assert_eq!(
        (d.allow, d.reason, d.policy),
        (true, DecisionReason::NoPolicy, None)
    );
    assert!(
        d.audit.is_some(),
        "root-namespace audit applies to every workload"
    );
    assert_eq!(db.services.len(), 1);

    // Another node sees the same workloads and only its own endpoints.
    let t2 = compile_proxy_table(&snap, 43, &table_ids, "n2");
    assert_eq!(t2.workloads.len(), 4);
    assert_eq!(t2.endpoints.len(), 1);
    let admin = t2.endpoint(ip("10.0.2.9")).unwrap();
    assert!(!admin.visibility);
    assert!(Arc::ptr_eq(
        &admin.services,
        &t2.pod_services[&ip("10.0.2.9")]
    ));
    let d = admin.authz.evaluate(&to("10.0.2.9"));
    assert_eq!(
        d.policy,
        Some(ObjKey::new(ISTIO_ROOT_NAMESPACE, "selected-elsewhere"))
    );
}
