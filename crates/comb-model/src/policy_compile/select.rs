//! Does a policy's peer or source describe an identity? Answers are three-valued: an identity
//! stands for several addresses (pods, node addresses) and a CIDR can cover some of them, and
//! an identity the compiler has not seen (`None`) could be anything. The caller resolves
//! `Partial` towards failing closed: it does not count for an ALLOW, and it does for a DENY.

use std::net::IpAddr;

use ipnet::IpNet;

use std::collections::BTreeMap;

use crate::identity::Identity;
use crate::policy::{AuthzCondition, AuthzSource, NpPeer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum M {
    No,
    Partial,
    Yes,
}

impl M {
    pub(crate) fn and(self, o: M) -> M {
        self.min(o)
    }
    pub(crate) fn or(self, o: M) -> M {
        self.max(o)
    }
    pub(crate) fn not(self) -> M {
        match self {
            M::No => M::Yes,
            M::Partial => M::Partial,
            M::Yes => M::No,
        }
    }
    fn from_bool(b: bool) -> M {
        if b { M::Yes } else { M::No }
    }
    /// Counts for a DENY (fail closed): a possible match is a match.
    pub(crate) fn maybe(self) -> bool {
        self != M::No
    }
}

/// Per address prefix of the identity: is it inside one of `nets` and outside every
/// `except`? An ipcache prefix strictly inside another belongs to its own identity, so a
/// prefix identity never partly overlaps a policy CIDR (those are in the ipcache too).
fn prefixes_in(ident: Option<&Identity>, nets: &[IpNet], except: &[IpNet]) -> M {
    let Some(ident) = ident else {
        return M::Partial;
    };
    let mut result: Option<M> = None;
    for p in &ident.prefixes {
        let inside = nets.iter().any(|n| n.contains(p)) && !except.iter().any(|e| e.contains(p));
        let m = M::from_bool(inside);
        result = Some(match result {
            None => m,
            Some(r) if r == m => r,
            Some(_) => M::Partial,
        });
    }
    result.unwrap_or(M::No)
}

/// `ns_labels`: every namespace's labels as selectors see them.
pub(crate) fn np_peer(
    peer: &NpPeer,
    policy_ns: &str,
    ident: Option<&Identity>,
    ns_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> M {
    match peer {
        NpPeer::IpBlock { cidr, except } => prefixes_in(ident, std::slice::from_ref(cidr), except),
        NpPeer::Pods { namespaces, pods } => {
            let Some(ident) = ident else {
                return M::Partial;
            };
            let crate::identity::IdentityKind::Workload {
                namespace, labels, ..
            } = &ident.kind
            else {
                return M::No;
            };
            let ns_ok = match namespaces {
                None => namespace == policy_ns,
                Some(sel) => ns_labels.get(namespace).is_some_and(|l| sel.matches(l)),
            };
            M::from_bool(ns_ok && pods.as_ref().is_none_or(|sel| sel.matches(labels)))
        }
    }
}

/// Istio string match: exact, `prefix*`, `*suffix`, or `*` (any non-empty value). A missing
/// value (no principal, no namespace) matches nothing.
pub(crate) fn istio_str(pattern: &str, value: Option<&str>) -> bool {
    let Some(v) = value else {
        return false;
    };
    if pattern == "*" {
        !v.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        // Istio checks a leading `*` first: `*foo*` is a suffix match, as in the proxy.
        v.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        v.starts_with(prefix)
    } else {
        pattern == v
    }
}

fn any_str(patterns: &[String], value: Option<&str>) -> bool {
    patterns.iter().any(|p| istio_str(p, value))
}

/// An identity-only string field: `None` identity is unknown.
fn str_field(
    patterns: &[String],
    ident: Option<&Identity>,
    get: fn(&Identity) -> Option<String>,
) -> M {
    match ident {
        None => M::Partial,
        Some(i) => M::from_bool(any_str(patterns, get(i).as_deref())),
    }
}

fn principal(i: &Identity) -> Option<String> {
    i.principal()
}

fn namespace(i: &Identity) -> Option<String> {
    i.namespace().map(str::to_owned)
}

/// Istio's `ipBlocks` entries (and `source.ip` values): a CIDR or one address.
pub(crate) fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

/// `from.source`, L4 fields only (request principals are the proxy's to judge).
pub(crate) fn authz_source(src: &AuthzSource, ident: Option<&Identity>) -> M {
    let mut m = M::Yes;
    let mut field = |non_empty: bool, r: M| {
        if non_empty {
            m = m.and(r);
        }
    };
    field(
        !src.principals.is_empty(),
        str_field(&src.principals, ident, principal),
    );
    field(
        !src.not_principals.is_empty(),
        str_field(&src.not_principals, ident, principal).not(),
    );
    field(
        !src.namespaces.is_empty(),
        str_field(&src.namespaces, ident, namespace),
    );
    field(
        !src.not_namespaces.is_empty(),
        str_field(&src.not_namespaces, ident, namespace).not(),
    );
    for (blocks, negate) in [
        (&src.ip_blocks, false),
        (&src.not_ip_blocks, true),
        // No proxy sits in front of the workloads: the remote address is the source address.
        (&src.remote_ip_blocks, false),
        (&src.not_remote_ip_blocks, true),
    ] {
        if !blocks.is_empty() {
            let r = prefixes_in(ident, blocks, &[]);
            field(true, if negate { r.not() } else { r });
        }
    }
    m
}

/// One `when` condition at `port`. L7 keys hold at L4 (the proxy judges them).
pub(crate) fn authz_condition(c: &AuthzCondition, ident: Option<&Identity>, port: u16) -> M {
    let pos_neg = |test: &dyn Fn(&[String]) -> M| {
        let mut m = M::Yes;
        if !c.values.is_empty() {
            m = m.and(test(&c.values));
        }
        if !c.not_values.is_empty() {
            m = m.and(test(&c.not_values).not());
        }
        m
    };
    match c.key.as_str() {
        "source.ip" | "remote.ip" => pos_neg(&|vals| {
            // An unparsable value cannot be judged: count it as unknown (fail closed).
            let nets: Option<Vec<IpNet>> = vals.iter().map(|v| parse_net(v)).collect();
            match nets {
                Some(nets) => prefixes_in(ident, &nets, &[]),
                None => M::Partial,
            }
        }),
        "source.namespace" => pos_neg(&|vals| str_field(vals, ident, namespace)),
        "source.principal" => pos_neg(&|vals| str_field(vals, ident, principal)),
        "destination.port" => {
            pos_neg(&|vals| M::from_bool(vals.iter().any(|v| v.parse::<u16>().ok() == Some(port))))
        }
        _ => M::Yes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKind;

    fn ident(prefixes: &[&str]) -> Identity {
        Identity {
            id: 300,
            kind: IdentityKind::Workload {
                namespace: "shop".into(),
                service_account: "web".into(),
                labels: BTreeMap::new(),
            },
            prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn cidr_containment_is_three_valued() {
        let two = ident(&["10.0.0.1/32", "10.1.0.1/32"]);
        assert_eq!(prefixes_in(Some(&two), &nets(&["10.0.0.0/8"]), &[]), M::Yes);
        assert_eq!(
            prefixes_in(Some(&two), &nets(&["10.0.0.0/16"]), &[]),
            M::Partial
        );
        assert_eq!(
            prefixes_in(Some(&two), &nets(&["10.0.0.0/8"]), &nets(&["10.1.0.0/16"])),
            M::Partial
        );
        assert_eq!(
            prefixes_in(Some(&two), &nets(&["192.168.0.0/16"]), &[]),
            M::No
        );
        assert_eq!(prefixes_in(None, &nets(&["10.0.0.0/8"]), &[]), M::Partial);
        let world = ident(&["0.0.0.0/0"]);
        assert_eq!(
            prefixes_in(Some(&world), &nets(&["0.0.0.0/0"]), &[]),
            M::Yes
        );
        assert_eq!(
            prefixes_in(Some(&world), &nets(&["10.0.0.0/8"]), &[]),
            M::No
        );
        assert_eq!(prefixes_in(Some(&world), &nets(&["::/0"]), &[]), M::No);
    }

    #[test]
    fn istio_string_forms() {
        assert!(istio_str("*", Some("x")));
        assert!(!istio_str("*", Some("")));
        assert!(!istio_str("*", None));
        assert!(istio_str(
            "cluster.local/ns/shop/*",
            Some("cluster.local/ns/shop/sa/a")
        ));
        assert!(istio_str("*/sa/a", Some("cluster.local/ns/shop/sa/a")));
        assert!(!istio_str("*/sa/b", Some("cluster.local/ns/shop/sa/a")));
        assert!(istio_str("shop", Some("shop")));
    }

    #[test]
    fn sources_and_conditions() {
        let i = ident(&["10.0.0.1/32"]);
        let src = AuthzSource {
            namespaces: vec!["shop".into()],
            not_principals: vec!["*/sa/admin".into()],
            ..Default::default()
        };
        assert_eq!(authz_source(&src, Some(&i)), M::Yes);
        assert_eq!(authz_source(&src, None), M::Partial);
        let cond = AuthzCondition {
            key: "destination.port".into(),
            values: vec!["80".into(), "8080".into()],
            not_values: vec![],
        };
        assert_eq!(authz_condition(&cond, Some(&i), 8080), M::Yes);
        assert_eq!(authz_condition(&cond, Some(&i), 81), M::No);
        let cond = AuthzCondition {
            key: "source.ip".into(),
            values: vec![],
            not_values: vec!["10.0.0.1".into()],
        };
        assert_eq!(authz_condition(&cond, Some(&i), 80), M::No);
        assert_eq!(parse_net("10.0.0.7/8"), Some("10.0.0.0/8".parse().unwrap()));
    }
}
