use std::collections::BTreeMap;

use super::*;
use crate::identity::{ID_UNMANAGED, ID_WORLD_IPV4, IdentityAllocator};
use crate::objects::{ContainerPort, Namespace, Node};
use crate::policy::{
    AuthzCondition, AuthzOperation, AuthzSource, LabelSelector, NpPeer, SelectorOp,
    SelectorRequirement,
};
use crate::terms::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(ns: &str, name: &str, kv: &[(&str, &str)], ip: &str) -> Pod {
    Pod {
        key: ObjKey::new(ns, name),
        labels: labels(kv),
        annotations: BTreeMap::new(),
        node_name: Some("n1".into()),
        service_account: "default".into(),
        ips: vec![ip.parse().unwrap()],
        cgroup: None,
        splice: true,
        interface: None,
        ports: vec![],
        owner: None,
    }
}

fn sel(kv: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(kv),
        match_expressions: vec![],
    }
}

fn tcp(port: u16) -> NpPort {
    NpPort {
        protocol: Protocol::Tcp,
        port: Some(NpPortSpec::Range { port, end: port }),
    }
}

fn pods_peer(ns: Option<LabelSelector>, pods: Option<LabelSelector>) -> NpPeer {
    NpPeer::Pods {
        namespaces: ns,
        pods,
    }
}

struct World {
    snap: Snapshot,
    alloc: IdentityAllocator,
}

impl World {
    fn new() -> Self {
        let mut snap = Snapshot::default();
        snap.nodes.insert(
            "n1".into(),
            Node {
                name: "n1".into(),
                pod_cidrs: vec!["198.18.1.0/24".parse().unwrap()],
                addresses: vec!["198.18.1.1".parse().unwrap()],
                annotations: Default::default(),
            },
        );
        for (ns, kv) in [("shop", vec![("team", "a")]), ("ops", vec![("team", "b")])] {
            snap.namespaces.insert(
                ns.into(),
                Namespace {
                    name: ns.into(),
                    labels: labels(&kv),
                    annotations: BTreeMap::new(),
                },
            );
        }
        let mut server = pod("shop", "server", &[("app", "server")], "198.18.1.2");
        server.ports = vec![ContainerPort {
            name: Some("http".into()),
            protocol: Protocol::Tcp,
            port: 8080,
        }];
        let mut other = pod("shop", "server2", &[("app", "other")], "198.18.1.6");
        other.ports = vec![ContainerPort {
            name: Some("http".into()),
            protocol: Protocol::Tcp,
            port: 9090,
        }];
        let mut admin = pod("ops", "admin", &[("app", "client")], "198.18.1.5");
        admin.service_account = "admin".into();
        for p in [
            server,
            other,
            pod("shop", "client", &[("app", "client")], "198.18.1.3"),
            pod("shop", "client-b", &[("app", "client")], "198.18.1.4"),
            admin,
        ] {
            snap.pods.insert(p.key.clone(), p);
        }
        World {
            snap,
            alloc: IdentityAllocator::default(),
        }
    }

    fn np(&mut self, name: &str, f: impl FnOnce(&mut NetworkPolicy)) {
        let mut np = NetworkPolicy {
            key: ObjKey::new("shop", name),
            pod_selector: sel(&[("app", "server")]),
            ingress_enforced: true,
            egress_enforced: false,
            ingress: vec![],
            egress: vec![],
        };
        f(&mut np);
        self.snap.network_policies.insert(np.key.clone(), np);
    }

    fn ap(&mut self, name: &str, action: AuthzAction, rules: Vec<AuthzRule>) {
        let ap = AuthorizationPolicy {
            key: ObjKey::new("shop", name),
            selector: Some(labels(&[("app", "server")])),
            action,
            rules,
        };
        self.snap.authorization_policies.insert(ap.key.clone(), ap);
    }

    /// Compiles for `pod` and checks every identity (and an unknown one) on many ports
    /// against the direct evaluation: the encoded entries must give the same answers.
    fn compile(&mut self, pod: &str) -> Compiled {
        let table = self
            .alloc
            .resolve(&self.snap, "n1", &policy_cidrs(&self.snap));
        let p = &self.snap.pods[&ObjKey::new("shop", pod)];
        let c = compile_endpoint(&self.snap, &table, p);
        let ctx = ctx_for(&self.snap, &table, p);
        let mut ids: Vec<Option<&Identity>> = table.identities.values().map(Some).collect();
        ids.push(None);
        for dir in [Direction::Ingress, Direction::Egress] {
            for ident in &ids {
                let id = ident.map_or(123_456, |i| i.id);
                for proto in [0u8, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, 1] {
                    for port in [
                        0u16, 1, 79, 80, 81, 443, 7999, 8000, 8040, 8080, 8081, 9090, 65535,
                    ] {
                        let eval_proto = if PORTED.contains(&proto) { proto } else { 0 };
                        let eval_port = if eval_proto == 0 { 0 } else { port };
                        let view = ctx.view(dir, *ident);
                        let want = ctx
                            .enforced(dir)
                            .then(|| ctx.eval(dir, &view, *ident, eval_proto, eval_port));
                        let got = lookup(&c.entries, id, dir, proto, port);
                        assert_eq!(got, want, "identity {id} {dir:?} proto {proto} port {port}");
                    }
                }
            }
        }
        Compiled { c, table }
    }
}

fn ctx_for<'a>(snap: &'a Snapshot, table: &'a IdentityTable, pod: &'a Pod) -> Ctx<'a> {
    Ctx::new(snap, table, pod).0
}

struct Compiled {
    c: CompiledEndpoint,
    table: IdentityTable,
}

impl Compiled {
    fn of(&self, ns: &str, pod: &str) -> IdentityId {
        self.table.pod_identity[&ObjKey::new(ns, pod)]
    }
    fn verdict(&self, id: IdentityId, dir: Direction, proto: u8, port: u16) -> Option<Verdict> {
        lookup(&self.c.entries, id, dir, proto, port).map(|v| v.verdict)
    }
    fn ingress(&self, id: IdentityId, port: u16) -> Option<Verdict> {
        self.verdict(id, Direction::Ingress, IPPROTO_TCP, port)
    }
}

const ALLOW: Option<Verdict> = Some(Verdict::Allow);
const DENY: Option<Verdict> = Some(Verdict::Deny);
const REDIRECT: Option<Verdict> = Some(Verdict::Redirect);

#[test]
fn no_policy_no_entries() {
    let mut w = World::new();
    let c = w.compile("server");
    assert!(c.c.entries.is_empty());
    assert!(!c.c.ingress_enforced && !c.c.egress_enforced);
}

#[test]
fn ingress_from_selected_pods_on_one_port() {
    let mut w = World::new();
    w.np("allow-client", |np| {
        np.ingress = vec![NpRule {
            peers: vec![pods_peer(None, Some(sel(&[("app", "client")])))],
            ports: vec![tcp(80)],
        }];
    });
    let c = w.compile("server");
    let client = c.of("shop", "client");
    assert_eq!(
        client,
        c.of("shop", "client-b"),
        "same labels, same identity"
    );
    assert_eq!(c.ingress(client, 80), ALLOW);
    assert_eq!(c.ingress(client, 81), DENY);
    assert_eq!(c.verdict(client, Direction::Ingress, IPPROTO_UDP, 80), DENY);
    assert_eq!(c.ingress(c.of("ops", "admin"), 80), DENY, "other namespace");
    assert_eq!(c.ingress(123_456, 80), DENY, "unknown identity");
    assert_eq!(
        c.ingress(ID_HOST, 22),
        ALLOW,
        "the node may always reach its pods"
    );
    assert_eq!(
        c.verdict(client, Direction::Egress, IPPROTO_TCP, 80),
        None,
        "egress not enforced"
    );
    let denied = lookup(&c.c.entries, client, Direction::Ingress, IPPROTO_TCP, 81).unwrap();
    assert_eq!(denied.reason, Reason::PolicyDenied);
    assert_eq!(
        denied.policy,
        policy_id(KIND_NETWORK_POLICY, &ObjKey::new("shop", "allow-client"))
    );
    assert_eq!(c.c.policies.len(), 1);
}

#[test]
fn default_deny_both_directions() {
    let mut w = World::new();
    w.np("deny-all", |np| {
        np.pod_selector = LabelSelector::default();
        np.egress_enforced = true;
    });
    let c = w.compile("client");
    assert!(c.c.ingress_enforced && c.c.egress_enforced);
    let server = c.of("shop", "server");
    assert_eq!(c.verdict(server, Direction::Egress, IPPROTO_TCP, 80), DENY);
    assert_eq!(c.verdict(server, Direction::Egress, 1, 0), DENY, "ICMP too");
    assert_eq!(c.ingress(server, 80), DENY);
}

#[test]
fn namespace_and_pod_selectors() {
    let mut w = World::new();
    // One peer with both selectors: client pods in team-b namespaces.
    w.np("both", |np| {
        np.ingress = vec![NpRule {
            peers: vec![pods_peer(
                Some(sel(&[("team", "b")])),
                Some(sel(&[("app", "client")])),
            )],
            ports: vec![],
        }];
    });
    let c = w.compile("server");
    assert_eq!(c.ingress(c.of("ops", "admin"), 80), ALLOW);
    assert_eq!(c.ingress(c.of("shop", "client"), 80), DENY);

    // A namespace selector alone, with an expression on the automatic name label.
    w.np("both", |np| {
        np.ingress = vec![NpRule {
            peers: vec![pods_peer(
                Some(LabelSelector {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![SelectorRequirement {
                        key: "kubernetes.io/metadata.name".into(),
                        operator: SelectorOp::In,
                        values: vec!["shop".into()],
                    }],
                }),
                None,
            )],
            ports: vec![],
        }];
    });
    let c = w.compile("server");
    assert_eq!(c.ingress(c.of("shop", "client"), 80), ALLOW);
    assert_eq!(c.ingress(c.of("shop", "server2"), 80), ALLOW);
    assert_eq!(c.ingress(c.of("ops", "admin"), 80), DENY);
}

#[test]
fn policies_add_up_and_end_port_ranges() {
    let mut w = World::new();
    w.np("a", |np| {
        np.ingress = vec![NpRule {
            peers: vec![pods_peer(None, Some(sel(&[("app", "client")])))],
            ports: vec![NpPort {
                protocol: Protocol::Tcp,
                port: Some(NpPortSpec::Range {
                    port: 8000,
                    end: 8080,
                }),
            }],
        }];
    });
    w.np("b", |np| {
        np.ingress = vec![NpRule {
            peers: vec![],
            ports: vec![NpPort {
                protocol: Protocol::Udp,
                port: None,
            }],
        }];
    });
    let c = w.compile("server");
    let client = c.of("shop", "client");
    for (port, want) in [
        (7999, DENY),
        (8000, ALLOW),
        (8040, ALLOW),
        (8080, ALLOW),
        (8081, DENY),
    ] {
        assert_eq!(c.ingress(client, port), want, "port {port}");
    }
    assert_eq!(
        c.verdict(client, Direction::Ingress, IPPROTO_UDP, 53),
        ALLOW,
        "policy b"
    );
    assert_eq!(
        c.verdict(c.of("ops", "admin"), Direction::Ingress, IPPROTO_UDP, 9),
        ALLOW
    );
    assert_eq!(c.ingress(c.of("ops", "admin"), 8000), DENY);
}

#[test]
fn named_ports_resolve_per_side() {
    let mut w = World::new();
    w.np("named", |np| {
        np.pod_selector = LabelSelector::default();
        np.egress_enforced = true;
        let http = NpPort {
            protocol: Protocol::Tcp,
            port: Some(NpPortSpec::Name("http".into())),
        };
        np.ingress = vec![NpRule {
            peers: vec![],
            ports: vec![http.clone()],
        }];
        np.egress = vec![NpRule {
            peers: vec![],
            ports: vec![http],
        }];
    });
    // Ingress: the server's own "http" (8080).
    let c = w.compile("server");
    let client = c.of("shop", "client");
    assert_eq!(c.ingress(client, 8080), ALLOW);
    assert_eq!(c.ingress(client, 9090), DENY);
    // Egress from the client: each destination's own "http".
    let c = w.compile("client");
    let eg = |id, port| c.verdict(id, Direction::Egress, IPPROTO_TCP, port);
    assert_eq!(eg(c.of("shop", "server"), 8080), ALLOW);
    assert_eq!(eg(c.of("shop", "server"), 9090), DENY);
    assert_eq!(eg(c.of("shop", "server2"), 9090), ALLOW);
    assert_eq!(eg(c.of("shop", "server2"), 8080), DENY);
    assert_eq!(eg(123_456, 8080), DENY, "unknown peers have no named ports");
}

#[test]
fn ip_blocks_with_except() {
    let mut w = World::new();
    w.np("cidr", |np| {
        np.pod_selector = sel(&[("app", "client")]);
        np.ingress_enforced = false;
        np.egress_enforced = true;
        np.egress = vec![NpRule {
            peers: vec![NpPeer::IpBlock {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec!["10.1.0.0/16".parse().unwrap()],
            }],
            ports: vec![],
        }];
    });
    let c = w.compile("client");
    let id_of = |net: &str| c.table.ipcache[&net.parse::<IpNet>().unwrap()];
    let eg = |id| c.verdict(id, Direction::Egress, IPPROTO_TCP, 443);
    assert_eq!(eg(id_of("10.0.0.0/8")), ALLOW);
    assert_eq!(eg(id_of("10.1.0.0/16")), DENY, "except");
    assert_eq!(eg(ID_WORLD_IPV4), DENY);
    assert_eq!(
        eg(c.of("shop", "server")),
        DENY,
        "pods are outside the block"
    );
    assert_eq!(eg(ID_UNMANAGED), DENY);

    // 0.0.0.0/0 selects the world and (whole) pod addresses alike.
    w.np("cidr", |np| {
        np.pod_selector = sel(&[("app", "client")]);
        np.ingress_enforced = false;
        np.egress_enforced = true;
        np.egress = vec![NpRule {
            peers: vec![NpPeer::IpBlock {
                cidr: "0.0.0.0/0".parse().unwrap(),
                except: vec!["198.18.1.2/32".parse().unwrap()],
            }],
            ports: vec![],
        }];
    });
    let c = w.compile("client");
    let eg = |id| c.verdict(id, Direction::Egress, IPPROTO_TCP, 443);
    assert_eq!(eg(ID_WORLD_IPV4), ALLOW);
    assert_eq!(eg(c.of("shop", "server2")), ALLOW);
    assert_eq!(eg(c.of("shop", "server")), DENY, "excepted pod address");
}

fn rule(from: Vec<AuthzSource>, to: Vec<AuthzOperation>, when: Vec<AuthzCondition>) -> AuthzRule {
    AuthzRule { from, to, when }
}

fn ports_op(ports: &[u16]) -> AuthzOperation {
    AuthzOperation {
        ports: ports.to_vec(),
        ..Default::default()
    }
}

#[test]
fn authz_allow_nothing_and_tcp_only() {
    let mut w = World::new();
    w.ap("allow-nothing", AuthzAction::Allow, vec![]);
    let c = w.compile("server");
    let client = c.of("shop", "client");
    assert_eq!(c.ingress(client, 80), DENY);
    let v = lookup(&c.c.entries, client, Direction::Ingress, IPPROTO_TCP, 80).unwrap();
    assert_eq!(v.reason, Reason::AuthzNoAllow);
    assert_eq!(
        c.verdict(client, Direction::Ingress, IPPROTO_UDP, 53),
        ALLOW,
        "AuthorizationPolicy governs TCP"
    );
    assert_eq!(c.verdict(client, Direction::Egress, IPPROTO_TCP, 80), None);
}

#[test]
fn authz_deny_wins_over_allow() {
    let mut w = World::new();
    w.ap(
        "allow-shop",
        AuthzAction::Allow,
        vec![rule(
            vec![AuthzSource {
                namespaces: vec!["shop".into(), "ops".into()],
                ..Default::default()
            }],
            vec![ports_op(&[80, 443])],
            vec![],
        )],
    );
    w.ap(
        "deny-admin",
        AuthzAction::Deny,
        vec![rule(
            vec![AuthzSource {
                principals: vec!["cluster.local/ns/ops/sa/admin".into()],
                ..Default::default()
            }],
            vec![],
            vec![],
        )],
    );
    let c = w.compile("server");
    assert_eq!(c.ingress(c.of("shop", "client"), 80), ALLOW);
    assert_eq!(c.ingress(c.of("shop", "client"), 8080), DENY);
    assert_eq!(c.ingress(c.of("ops", "admin"), 80), DENY);
    let v = lookup(
        &c.c.entries,
        c.of("ops", "admin"),
        Direction::Ingress,
        IPPROTO_TCP,
        80,
    )
    .unwrap();
    assert_eq!(v.reason, Reason::AuthzDeny);
    // Unknown identities could be the denied principal: fail closed.
    assert_eq!(c.ingress(123_456, 80), DENY);
    assert_eq!(
        c.ingress(ID_WORLD_IPV4, 80),
        DENY,
        "no namespace: the ALLOW does not match"
    );
}

#[test]
fn authz_and_network_policy_must_both_allow() {
    let mut w = World::new();
    w.np("np", |np| {
        np.ingress = vec![NpRule {
            peers: vec![],
            ports: vec![tcp(80)],
        }];
    });
    w.ap(
        "ap",
        AuthzAction::Allow,
        vec![rule(vec![], vec![ports_op(&[80, 81])], vec![])],
    );
    let c = w.compile("server");
    let client = c.of("shop", "client");
    assert_eq!(c.ingress(client, 80), ALLOW);
    assert_eq!(
        c.ingress(client, 81),
        DENY,
        "NetworkPolicy does not allow 81"
    );
    assert_eq!(c.ingress(client, 82), DENY);
}

#[test]
fn l7_rules_redirect_and_never_widen() {
    let mut w = World::new();
    let get = AuthzOperation {
        ports: vec![80],
        methods: vec!["GET".into()],
        ..Default::default()
    };
    w.ap(
        "l7",
        AuthzAction::Allow,
        vec![rule(vec![], vec![get], vec![])],
    );
    let c = w.compile("server");
    let client = c.of("shop", "client");
    assert_eq!(c.ingress(client, 80), REDIRECT, "the proxy judges GET");
    assert_eq!(
        c.ingress(client, 81),
        DENY,
        "outside the L4 part: allow nothing"
    );

    // A DENY with L7 fields sends its flows to the proxy; a plain ALLOW does not override it.
    let mut w = World::new();
    w.ap(
        "allow-all",
        AuthzAction::Allow,
        vec![rule(vec![], vec![], vec![])],
    );
    w.ap(
        "deny-header",
        AuthzAction::Deny,
        vec![rule(
            vec![],
            vec![],
            vec![AuthzCondition {
                key: "request.headers[x-evil]".into(),
                values: vec!["1".into()],
                not_values: vec![],
            }],
        )],
    );
    let c = w.compile("server");
    assert_eq!(c.ingress(c.of("shop", "client"), 80), REDIRECT);
    assert_eq!(
        c.verdict(c.of("shop", "client"), Direction::Ingress, IPPROTO_UDP, 80),
        ALLOW
    );
}

#[test]
fn audit_changes_nothing_and_root_namespace_applies_everywhere() {
    let mut w = World::new();
    w.ap(
        "audit",
        AuthzAction::Audit,
        vec![rule(vec![], vec![], vec![])],
    );
    let c = w.compile("server");
    assert!(c.c.entries.is_empty(), "AUDIT alone enforces nothing");

    let mut w = World::new();
    let ap = AuthorizationPolicy {
        key: ObjKey::new(ISTIO_ROOT_NAMESPACE, "mesh-deny-ops"),
        selector: None,
        action: AuthzAction::Deny,
        rules: vec![rule(
            vec![AuthzSource {
                namespaces: vec!["ops".into()],
                ..Default::default()
            }],
            vec![],
            vec![],
        )],
    };
    w.snap.authorization_policies.insert(ap.key.clone(), ap);
    let c = w.compile("client");
    assert_eq!(c.ingress(c.of("ops", "admin"), 80), DENY);
    assert_eq!(c.ingress(c.of("shop", "server"), 80), ALLOW);
}

#[test]
fn authz_source_ip_blocks_and_when_conditions() {
    let mut w = World::new();
    w.ap(
        "ips",
        AuthzAction::Allow,
        vec![rule(
            vec![AuthzSource {
                ip_blocks: vec!["198.18.1.0/30".parse().unwrap()],
                ..Default::default()
            }],
            vec![],
            vec![AuthzCondition {
                key: "destination.port".into(),
                values: vec!["8080".into()],
                not_values: vec![],
            }],
        )],
    );
    let c = w.compile("server");
    // client (198.18.1.3) is inside /30; client-b (198.18.1.4) shares its identity but is
    // outside: the identity is only partly inside, which an ALLOW does not count.
    assert_eq!(c.ingress(c.of("shop", "client"), 8080), DENY);
    w.snap.pods.remove(&ObjKey::new("shop", "client-b"));
    let c = w.compile("server");
    assert_eq!(c.ingress(c.of("shop", "client"), 8080), ALLOW);
    assert_eq!(
        c.ingress(c.of("shop", "client"), 80),
        DENY,
        "when destination.port"
    );
}

#[test]
fn policy_ids_are_stable_and_non_zero() {
    let a = policy_id("NetworkPolicy", &ObjKey::new("a", "b"));
    assert_eq!(a, policy_id("NetworkPolicy", &ObjKey::new("a", "b")));
    assert_ne!(a, policy_id("AuthorizationPolicy", &ObjKey::new("a", "b")));
    assert_ne!(a, 0);
}

#[test]
fn entries_stay_few_for_many_identities() {
    // 200 client identities, one rule each on its own port: each identity gets its own
    // small function, the others share ANY.
    let mut w = World::new();
    for i in 0..200u16 {
        let p = pod(
            "shop",
            &format!("c{i}"),
            &[("app", "client"), ("n", &i.to_string())],
            &format!("198.18.{}.{}", 10 + i / 200, 2 + i % 200),
        );
        w.snap.pods.insert(p.key.clone(), p);
        w.np(&format!("p{i}"), |np| {
            np.ingress = vec![NpRule {
                peers: vec![pods_peer(None, Some(sel(&[("n", &i.to_string())])))],
                ports: vec![tcp(1000 + i)],
            }];
        });
    }
    let c = w.compile("server");
    assert!(
        c.c.entries.len() < 200 * 4 + 20,
        "{} entries",
        c.c.entries.len()
    );
}

fn annotate_l7(w: &mut World, ns: Option<&str>, pod: Option<&str>, value: &str) {
    let a = (crate::ANNOTATION_L7.to_string(), value.to_string());
    if let Some(ns) = ns {
        w.snap
            .namespaces
            .get_mut(ns)
            .unwrap()
            .annotations
            .extend([a.clone()]);
    }
    if let Some(pod) = pod {
        let key = ObjKey::new("shop", pod);
        w.snap.pods.get_mut(&key).unwrap().annotations.extend([a]);
    }
}

#[test]
fn visibility_without_policies_redirects_tcp_only() {
    let mut w = World::new();
    annotate_l7(&mut w, None, Some("server"), "true");
    let c = w.compile("server");
    assert!(c.c.ingress_enforced && !c.c.egress_enforced);
    assert!(c.c.l7_visibility && c.c.redirects_ingress());
    let client = c.of("shop", "client");
    for id in [client, c.of("ops", "admin"), ID_WORLD_IPV4, 123_456] {
        let v = lookup(&c.c.entries, id, Direction::Ingress, IPPROTO_TCP, 8080).unwrap();
        assert_eq!(
            (v.verdict, v.reason, v.policy),
            (Verdict::Redirect, Reason::L7Visibility, 0),
            "identity {id}"
        );
        assert_eq!(c.verdict(id, Direction::Ingress, IPPROTO_UDP, 53), ALLOW);
        assert_eq!(c.verdict(id, Direction::Ingress, 1, 0), ALLOW, "ICMP");
    }
    let host = lookup(&c.c.entries, ID_HOST, Direction::Ingress, IPPROTO_TCP, 8080).unwrap();
    assert_eq!((host.verdict, host.reason), (Verdict::Allow, Reason::Host));
    assert!(
        c.c.entries.len() <= 4,
        "one function for everyone plus the host: {:?}",
        c.c.entries
    );
    // Other pods are untouched.
    let other = w.compile("server2");
    assert!(other.c.entries.is_empty() && !other.c.l7_visibility);
}

#[test]
fn visibility_from_the_namespace_and_the_pods_false_wins() {
    let mut w = World::new();
    annotate_l7(&mut w, Some("shop"), None, "true");
    let c = w.compile("server2");
    assert_eq!(c.ingress(c.of("shop", "client"), 80), REDIRECT);
    annotate_l7(&mut w, None, Some("server2"), "false");
    let c = w.compile("server2");
    assert!(c.c.entries.is_empty() && !c.c.ingress_enforced);
    // An invalid value (comb-config rejects it) counts as unset: the namespace decides.
    annotate_l7(&mut w, None, Some("server2"), "yes");
    assert_eq!(
        w.compile("server2").ingress(c.of("shop", "client"), 80),
        REDIRECT
    );
    annotate_l7(&mut w, Some("shop"), None, "false");
    annotate_l7(&mut w, None, Some("server"), "true");
    assert!(w.compile("server2").c.entries.is_empty());
    assert!(w.compile("server").c.l7_visibility);
}

#[test]
fn visibility_only_turns_allows_into_redirects() {
    let mut w = World::new();
    annotate_l7(&mut w, None, Some("server"), "true");
    w.np("allow-client", |np| {
        np.ingress = vec![NpRule {
            peers: vec![pods_peer(None, Some(sel(&[("app", "client")])))],
            ports: vec![tcp(80), tcp(8080)],
        }];
    });
    w.ap(
        "deny-admin",
        AuthzAction::Deny,
        vec![rule(
            vec![AuthzSource {
                namespaces: vec!["ops".into()],
                ..Default::default()
            }],
            vec![],
            vec![],
        )],
    );
    let get = AuthzOperation {
        ports: vec![8080],
        methods: vec!["GET".into()],
        ..Default::default()
    };
    w.ap(
        "allow",
        AuthzAction::Allow,
        vec![
            rule(vec![], vec![ports_op(&[80])], vec![]),
            rule(vec![], vec![get], vec![]),
        ],
    );
    let c = w.compile("server");
    let client = c.of("shop", "client");
    let at = |id, port| lookup(&c.c.entries, id, Direction::Ingress, IPPROTO_TCP, port).unwrap();
    let np_id = policy_id(KIND_NETWORK_POLICY, &ObjKey::new("shop", "allow-client"));
    let allow_id = policy_id(KIND_AUTHORIZATION_POLICY, &ObjKey::new("shop", "allow"));
    assert_eq!(
        (
            at(client, 80).verdict,
            at(client, 80).reason,
            at(client, 80).policy
        ),
        (Verdict::Redirect, Reason::L7Visibility, np_id),
        "allowed by both layers, keeps the allowing policy"
    );
    assert_eq!(
        (
            at(client, 8080).verdict,
            at(client, 8080).reason,
            at(client, 8080).policy
        ),
        (Verdict::Redirect, Reason::ProxyUnavailable, allow_id),
        "an L7 rule still needs the proxy (fail closed)"
    );
    assert_eq!(at(client, 81).verdict, Verdict::Deny);
    assert_eq!(at(c.of("ops", "admin"), 80).verdict, Verdict::Deny);
    assert_eq!(at(c.of("ops", "admin"), 80).reason, Reason::PolicyDenied);
    assert_eq!(at(ID_HOST, 80).reason, Reason::Host);
    assert_eq!(c.verdict(client, Direction::Ingress, IPPROTO_UDP, 80), DENY);
}
