//! Policies as State holds them: Kubernetes NetworkPolicy and Istio AuthorizationPolicy,
//! validated by the source and reduced to what the compiler needs. Semantics live in
//! [`crate::policy_compile`]; this module only holds data and label-selector matching.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::objects::{ObjKey, Protocol};

/// Istio's root namespace: an AuthorizationPolicy there without a selector applies to every
/// workload of the mesh (Istio's default `rootNamespace`).
pub const ISTIO_ROOT_NAMESPACE: &str = "istio-system";
/// Trust domain of the principals Comb derives from service accounts
/// (`cluster.local/ns/<ns>/sa/<sa>`), Istio's default.
pub const TRUST_DOMAIN: &str = "cluster.local";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SelectorOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOp,
    pub values: Vec<String>,
}

/// A Kubernetes label selector. The empty selector selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<SelectorRequirement>,
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let have = labels.get(&r.key);
                match r.operator {
                    SelectorOp::In => have.is_some_and(|v| r.values.contains(v)),
                    SelectorOp::NotIn => have.is_none_or(|v| !r.values.contains(v)),
                    SelectorOp::Exists => have.is_some(),
                    SelectorOp::DoesNotExist => have.is_none(),
                }
            })
    }
}

/// A port of a NetworkPolicy rule. `port: None` = every port of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NpPort {
    pub protocol: Protocol,
    pub port: Option<NpPortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NpPortSpec {
    /// `port` with optional `endPort` (inclusive; `end >= port`).
    Range { port: u16, end: u16 },
    /// A named container port, resolved against the pods on the port's side.
    Name(String),
}

/// One peer of a NetworkPolicy rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NpPeer {
    /// `podSelector` and/or `namespaceSelector`. `namespaces: None` = the policy's own
    /// namespace; `pods: None` = every pod of the selected namespaces.
    Pods {
        namespaces: Option<LabelSelector>,
        pods: Option<LabelSelector>,
    },
    IpBlock {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
}

/// One ingress or egress rule. Empty `peers` = every peer; empty `ports` = every port and
/// protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NpRule {
    pub peers: Vec<NpPeer>,
    pub ports: Vec<NpPort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub key: ObjKey,
    pub pod_selector: LabelSelector,
    /// `policyTypes` as Kubernetes defaults it: Ingress always unless listed otherwise,
    /// Egress when listed or when egress rules are present.
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub ingress: Vec<NpRule>,
    pub egress: Vec<NpRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AuthzAction {
    Allow,
    Deny,
    /// Only logs (node proxy); never changes a verdict.
    Audit,
}

/// `rules[].from[].source`. Every non-empty field must match (AND); within a field any value
/// (OR); `not_*` fields must not match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzSource {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    pub remote_ip_blocks: Vec<IpNet>,
    pub not_remote_ip_blocks: Vec<IpNet>,
    /// Request (JWT) principals: L7 only.
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
}

/// `rules[].to[].operation`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzOperation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// `rules[].when[]`: `key` must have one of `values` and none of `not_values`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzCondition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// A rule matches when any `from` matches (or there is none), any `to` matches (or there is
/// none) and every `when` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzRule {
    pub from: Vec<AuthzSource>,
    pub to: Vec<AuthzOperation>,
    pub when: Vec<AuthzCondition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    pub key: ObjKey,
    /// `selector.matchLabels`; `None` = every workload of the namespace (of the mesh in
    /// [`ISTIO_ROOT_NAMESPACE`]).
    pub selector: Option<BTreeMap<String, String>>,
    pub action: AuthzAction,
    pub rules: Vec<AuthzRule>,
}

impl AuthzOperation {
    /// Fields only the L7 proxy can judge.
    pub fn needs_l7(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

impl AuthzSource {
    pub fn needs_l7(&self) -> bool {
        !(self.request_principals.is_empty() && self.not_request_principals.is_empty())
    }
}

/// `when` keys the kernel can judge from addresses, ports and identities.
pub const L4_CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
];

impl AuthzCondition {
    pub fn needs_l7(&self) -> bool {
        !L4_CONDITION_KEYS.contains(&self.key.as_str())
    }
}

impl AuthzRule {
    /// A rule with any L7 field is judged by the node proxy: the kernel sends the flows its
    /// L4 part matches there (never allows or drops them on the L4 part alone).
    pub fn needs_l7(&self) -> bool {
        self.from.iter().any(AuthzSource::needs_l7)
            || self.to.iter().any(AuthzOperation::needs_l7)
            || self.when.iter().any(AuthzCondition::needs_l7)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: SelectorOp, values: &[&str]) -> SelectorRequirement {
        SelectorRequirement {
            key: key.into(),
            operator: op,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn empty_selector_selects_everything() {
        assert!(LabelSelector::default().matches(&labels(&[])));
        assert!(LabelSelector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn selector_operators() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let sel = |r| LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![r],
        };
        assert!(sel(req("app", SelectorOp::In, &["web", "db"])).matches(&l));
        assert!(!sel(req("app", SelectorOp::In, &["db"])).matches(&l));
        assert!(!sel(req("x", SelectorOp::In, &["db"])).matches(&l));
        assert!(sel(req("app", SelectorOp::NotIn, &["db"])).matches(&l));
        assert!(sel(req("x", SelectorOp::NotIn, &["db"])).matches(&l));
        assert!(!sel(req("app", SelectorOp::NotIn, &["web"])).matches(&l));
        assert!(sel(req("tier", SelectorOp::Exists, &[])).matches(&l));
        assert!(!sel(req("x", SelectorOp::Exists, &[])).matches(&l));
        assert!(sel(req("x", SelectorOp::DoesNotExist, &[])).matches(&l));
        assert!(!sel(req("app", SelectorOp::DoesNotExist, &[])).matches(&l));
        let both = LabelSelector {
            match_labels: labels(&[("app", "web")]),
            match_expressions: vec![req("tier", SelectorOp::In, &["back"])],
        };
        assert!(!both.matches(&l), "matchLabels and expressions are ANDed");
    }

    #[test]
    fn l7_fields_are_recognised() {
        let mut r = AuthzRule::default();
        assert!(!r.needs_l7());
        r.to.push(AuthzOperation {
            ports: vec![80],
            ..Default::default()
        });
        assert!(!r.needs_l7());
        r.to[0].methods.push("GET".into());
        assert!(r.needs_l7());
        let w = |k: &str| AuthzRule {
            when: vec![AuthzCondition {
                key: k.into(),
                values: vec!["x".into()],
                not_values: vec![],
            }],
            ..Default::default()
        };
        assert!(!w("source.namespace").needs_l7());
        assert!(w("request.headers[x-user]").needs_l7());
    }
}
