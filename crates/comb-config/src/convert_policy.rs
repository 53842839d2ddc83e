//! NetworkPolicy and AuthorizationPolicy: validated the way the Kubernetes API server and
//! istiod validate them, then reduced to Comb's policy model.
//!
//! Like [`crate::convert`], every problem goes to the [`Sink`] and an object with any problem
//! converts to `None`: a half-understood policy must never be enforced.
//!
//! Mapping, where it is not one to one:
//! - NetworkPolicy `spec` is required (Kubernetes would treat a missing one as deny-all
//!   ingress); `podSelector` absent = `{}`. `policyTypes` defaulting is Kubernetes' (see
//!   [`policy_types`]); rules of a direction that is not enforced are validated, then dropped.
//! - A port without `port` is every port of its protocol (`port: None`); a numeric port is
//!   `Range { port, end }` with `end = endPort` or `port`. CIDRs with host bits are truncated
//!   to the network.
//! - AuthorizationPolicy: no `spec` = `{}` (allow nothing); `action` defaults to ALLOW;
//!   an empty `matchLabels` is `selector: None`; single addresses in ip lists become /32 or
//!   /128; ports are parsed to numbers; `when` values are kept as written (checked only).
//! - Not supported yet, refused by name: action CUSTOM, `targetRef(s)`, `serviceAccounts`,
//!   `notServiceAccounts` and the `source.serviceAccount` condition.

use std::collections::BTreeMap;
use std::net::IpAddr;

use comb_model::ObjKey;
use comb_model::policy as model;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::convert::{checked, is_port_name, protocol};
use crate::error::Sink;
use crate::istio;

// ---------------------------------------------------------------------------------------------
// Kubernetes NetworkPolicy

pub(crate) fn network_policy(
    o: &networking::NetworkPolicy,
    key: ObjKey,
    s: &mut Sink<'_>,
) -> Option<model::NetworkPolicy> {
    let Some(spec) = &o.spec else {
        // Kubernetes would read a missing spec as "isolate every pod of the namespace for
        // ingress". A manifest without a spec is far likelier a mistake than that intent, so
        // we ask for it to be spelled out (`spec: {podSelector: {}}`).
        s.field("spec", "required field is missing");
        return None;
    };
    checked(s, |s| {
        let pod_selector = match &spec.pod_selector {
            // Optional since Kubernetes 1.31; absent is the empty selector (every pod).
            None => model::LabelSelector::default(),
            Some(sel) => label_selector(sel, "spec.podSelector", s),
        };
        let (ingress_enforced, egress_enforced) = policy_types(spec, s);
        let mut ingress = Vec::new();
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let at = format!("spec.ingress[{i}]");
            ingress.push(np_rule(
                r.from.as_deref(),
                "from",
                r.ports.as_deref(),
                &at,
                s,
            ));
        }
        let mut egress = Vec::new();
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let at = format!("spec.egress[{i}]");
            egress.push(np_rule(r.to.as_deref(), "to", r.ports.as_deref(), &at, s));
        }
        // Rules of a direction the policy does not enforce are validated (the API server
        // does) but have no effect in Kubernetes, so the model does not carry them.
        if !ingress_enforced {
            ingress.clear();
        }
        if !egress_enforced {
            egress.clear();
        }
        model::NetworkPolicy {
            key,
            pod_selector,
            ingress_enforced,
            egress_enforced,
            ingress,
            egress,
        }
    })
}

/// `(ingress_enforced, egress_enforced)`.
///
/// Defaulting is Kubernetes' `SetDefaults_NetworkPolicy`: when `policyTypes` is absent or
/// empty the policy is an Ingress policy, and also an Egress policy when `egress` holds at
/// least one rule (`len(spec.Egress) != 0`). So `egress: []` without `policyTypes` does NOT
/// isolate egress; writing `policyTypes: [Egress]` does. When `policyTypes` is given, exactly
/// the listed directions are enforced.
fn policy_types(spec: &networking::NetworkPolicySpec, s: &mut Sink<'_>) -> (bool, bool) {
    let listed = spec.policy_types.as_deref().unwrap_or_default();
    if listed.is_empty() {
        return (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()));
    }
    let (mut ingress, mut egress) = (false, false);
    for (i, t) in listed.iter().enumerate() {
        let field = format!("spec.policyTypes[{i}]");
        let seen = match t.as_str() {
            "Ingress" => &mut ingress,
            "Egress" => &mut egress,
            other => {
                s.field(field, format!("{other:?} must be Ingress or Egress"));
                continue;
            }
        };
        // Kubernetes lets a duplicate through; it is always a slip, so we say so.
        if *seen {
            s.field(field, format!("{t} is listed twice"));
        }
        *seen = true;
    }
    (ingress, egress)
}

fn np_rule(
    peers: Option<&[networking::NetworkPolicyPeer]>,
    peers_name: &str,
    ports: Option<&[networking::NetworkPolicyPort]>,
    at: &str,
    s: &mut Sink<'_>,
) -> model::NpRule {
    let mut rule = model::NpRule::default();
    for (i, p) in peers.unwrap_or_default().iter().enumerate() {
        if let Some(peer) = np_peer(p, &format!("{at}.{peers_name}[{i}]"), s) {
            rule.peers.push(peer);
        }
    }
    for (i, p) in ports.unwrap_or_default().iter().enumerate() {
        rule.ports.push(np_port(p, &format!("{at}.ports[{i}]"), s));
    }
    rule
}

fn np_peer(p: &networking::NetworkPolicyPeer, at: &str, s: &mut Sink<'_>) -> Option<model::NpPeer> {
    let pods = p
        .pod_selector
        .as_ref()
        .map(|sel| label_selector(sel, &format!("{at}.podSelector"), s));
    let namespaces = p
        .namespace_selector
        .as_ref()
        .map(|sel| label_selector(sel, &format!("{at}.namespaceSelector"), s));
    let block = p
        .ip_block
        .as_ref()
        .map(|b| ip_block(b, &format!("{at}.ipBlock"), s));
    match block {
        Some(_) if pods.is_some() || namespaces.is_some() => {
            s.field(
                at,
                "ipBlock may not be combined with podSelector or namespaceSelector",
            );
            None
        }
        Some(block) => block,
        None if pods.is_none() && namespaces.is_none() => {
            s.field(
                at,
                "must set one of podSelector, namespaceSelector, ipBlock",
            );
            None
        }
        None => Some(model::NpPeer::Pods { namespaces, pods }),
    }
}

fn ip_block(b: &networking::IPBlock, at: &str, s: &mut Sink<'_>) -> Option<model::NpPeer> {
    // k8s-openapi turns a missing required string into "".
    let cidr = if b.cidr.is_empty() {
        s.field(format!("{at}.cidr"), "required field is missing");
        None
    } else {
        strict_cidr(&b.cidr, &format!("{at}.cidr"), s)
    };
    let mut except = Vec::new();
    for (i, text) in b.except.iter().flatten().enumerate() {
        let field = format!("{at}.except[{i}]");
        let Some(net) = strict_cidr(text, &field, s) else {
            continue;
        };
        if let Some(c) = cidr {
            if net.addr().is_ipv4() != c.addr().is_ipv4() {
                s.field(
                    field,
                    format!("{net} is not of the same IP family as cidr {c}"),
                );
            } else if !(c.contains(&net) && net.prefix_len() > c.prefix_len()) {
                s.field(field, format!("{net} must be strictly inside cidr {c}"));
            }
        }
        except.push(net);
    }
    Some(model::NpPeer::IpBlock {
        cidr: cidr?,
        except,
    })
}

/// Kubernetes requires CIDR notation in `ipBlock` (a bare address is refused) but accepts
/// host bits (`10.0.0.1/8`, only warned about since 1.33) and means the network, so we
/// normalize to it.
fn strict_cidr(text: &str, field: &str, s: &mut Sink<'_>) -> Option<IpNet> {
    match text.parse::<IpNet>() {
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            s.field(
                field,
                format!("{text:?} is not a valid CIDR (address/prefix-length)"),
            );
            None
        }
    }
}

fn np_port(p: &networking::NetworkPolicyPort, at: &str, s: &mut Sink<'_>) -> model::NpPort {
    let protocol = if p.protocol.as_deref() == Some("") {
        // Kubernetes only defaults an absent protocol; an empty one is invalid there.
        s.field(
            format!("{at}.protocol"),
            "\"\" must be one of TCP, UDP, SCTP",
        );
        comb_model::Protocol::Tcp
    } else {
        protocol(&p.protocol, &format!("{at}.protocol"), s)
    };
    let end_field = format!("{at}.endPort");
    let port = match &p.port {
        None => {
            if p.end_port.is_some() {
                s.field(end_field, "may not be set without port");
            }
            None
        }
        Some(IntOrString::Int(n)) => {
            let port = valid_port(*n, &format!("{at}.port"), s);
            let end = match p.end_port {
                None => port,
                Some(e) => {
                    let end = valid_port(e, &end_field, s);
                    if port.zip(end).is_some_and(|(p, e)| e < p) {
                        s.field(&end_field, format!("{e} must be >= port ({n})"));
                    }
                    end
                }
            };
            port.zip(end)
                .map(|(port, end)| model::NpPortSpec::Range { port, end })
        }
        Some(IntOrString::String(name)) => {
            if p.end_port.is_some() {
                s.field(end_field, "may not be set when port is a name");
            }
            if !is_port_name(name) {
                s.field(
                    format!("{at}.port"),
                    format!("{name:?} is neither a port number nor a port name (IANA_SVC_NAME)"),
                );
            }
            Some(model::NpPortSpec::Name(name.clone()))
        }
    };
    model::NpPort { protocol, port }
}

fn valid_port(v: i32, field: &str, s: &mut Sink<'_>) -> Option<u16> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            s.field(field, format!("{v} is not a valid port (1..=65535)"));
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Label selectors and label syntax

/// Checks a selector as `ValidateLabelSelector` does: keys are qualified names, values label
/// values, In/NotIn need values and Exists/DoesNotExist take none.
fn label_selector(sel: &meta::LabelSelector, at: &str, s: &mut Sink<'_>) -> model::LabelSelector {
    let match_labels = match_labels(sel.match_labels.as_ref(), &format!("{at}.matchLabels"), s);
    let mut match_expressions = Vec::new();
    for (i, r) in sel.match_expressions.iter().flatten().enumerate() {
        let at = format!("{at}.matchExpressions[{i}]");
        if r.key.is_empty() {
            s.field(format!("{at}.key"), "required field is missing");
        } else if let Some(msg) = label_key_problem(&r.key) {
            s.field(format!("{at}.key"), msg);
        }
        let values = r.values.clone().unwrap_or_default();
        let operator = match r.operator.as_str() {
            "In" => Some(model::SelectorOp::In),
            "NotIn" => Some(model::SelectorOp::NotIn),
            "Exists" => Some(model::SelectorOp::Exists),
            "DoesNotExist" => Some(model::SelectorOp::DoesNotExist),
            "" => {
                s.field(format!("{at}.operator"), "required field is missing");
                None
            }
            other => {
                s.field(
                    format!("{at}.operator"),
                    format!("{other:?} must be one of In, NotIn, Exists, DoesNotExist"),
                );
                None
            }
        };
        match operator {
            Some(model::SelectorOp::In | model::SelectorOp::NotIn) if values.is_empty() => s.field(
                format!("{at}.values"),
                format!("required when operator is {}", r.operator),
            ),
            Some(model::SelectorOp::Exists | model::SelectorOp::DoesNotExist)
                if !values.is_empty() =>
            {
                s.field(
                    format!("{at}.values"),
                    format!("must be empty when operator is {}", r.operator),
                )
            }
            _ => {}
        }
        for (j, v) in values.iter().enumerate() {
            if !is_label_value(v) {
                s.field(format!("{at}.values[{j}]"), label_value_message(v));
            }
        }
        if let Some(operator) = operator {
            match_expressions.push(model::SelectorRequirement {
                key: r.key.clone(),
                operator,
                values,
            });
        }
    }
    model::LabelSelector {
        match_labels,
        match_expressions,
    }
}

pub(crate) fn match_labels(
    labels: Option<&BTreeMap<String, String>>,
    at: &str,
    s: &mut Sink<'_>,
) -> BTreeMap<String, String> {
    let labels = labels.cloned().unwrap_or_default();
    for (k, v) in &labels {
        let field = format!("{at}[{k:?}]");
        if let Some(msg) = label_key_problem(k) {
            s.field(&field, msg);
        }
        if !is_label_value(v) {
            s.field(&field, label_value_message(v));
        }
    }
    labels
}

/// A label key as Kubernetes' `IsQualifiedName` checks it: `[prefix/]name`, the prefix a DNS
/// subdomain, the name 1..=63 alphanumerics, '-', '_' and '.', beginning and ending with an
/// alphanumeric.
fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns_subdomain(p)
    {
        return Some(format!(
            "{key:?} is not a valid label key: the prefix before '/' must be a DNS subdomain \
             (lowercase alphanumerics, '-' and '.', at most 253 characters)"
        ));
    }
    if !is_label_name(name) {
        return Some(format!(
            "{key:?} is not a valid label key: the name must be 1-63 alphanumerics, '-', '_' \
             or '.', beginning and ending with an alphanumeric"
        ));
    }
    None
}

fn label_value_message(v: &str) -> String {
    format!(
        "{v:?} is not a valid label value: at most 63 alphanumerics, '-', '_' or '.', \
         beginning and ending with an alphanumeric"
    )
}

fn is_label_name(n: &str) -> bool {
    let alnum = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    n.len() <= 63
        && alnum(n.as_bytes().first())
        && alnum(n.as_bytes().last())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_label_value(v: &str) -> bool {
    v.is_empty() || is_label_name(v)
}

fn is_dns_subdomain(p: &str) -> bool {
    p.len() <= 253
        && p.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

// ---------------------------------------------------------------------------------------------
// Istio AuthorizationPolicy

pub(crate) fn authorization_policy(
    o: &istio::AuthorizationPolicy,
    key: ObjKey,
    s: &mut Sink<'_>,
) -> Option<model::AuthorizationPolicy> {
    checked(s, |s| {
        // istiod reads a missing spec as `{}`: ALLOW with no rules, i.e. allow nothing.
        let spec = o.spec.clone().unwrap_or_default();
        if spec.target_ref.is_some() {
            s.field(
                "spec.targetRef",
                "not supported yet: select workloads with spec.selector",
            );
        }
        if spec.target_refs.as_ref().is_some_and(|t| !t.is_empty()) {
            s.field(
                "spec.targetRefs",
                "not supported yet: select workloads with spec.selector",
            );
        }
        let action = match spec.action.unwrap_or(istio::Action::Allow) {
            istio::Action::Allow => model::AuthzAction::Allow,
            istio::Action::Deny => model::AuthzAction::Deny,
            istio::Action::Audit => model::AuthzAction::Audit,
            istio::Action::Custom => {
                s.field(
                    "spec.action",
                    "action CUSTOM (external authorization) is not supported",
                );
                model::AuthzAction::Allow
            }
        };
        if spec.provider.is_some() && spec.action != Some(istio::Action::Custom) {
            s.field("spec.provider", "only allowed with action CUSTOM");
        }
        let selector = spec.selector.as_ref().and_then(|sel| {
            let labels = match_labels(sel.match_labels.as_ref(), "spec.selector.matchLabels", s);
            // An empty selector selects every workload, exactly like no selector.
            (!labels.is_empty()).then_some(labels)
        });
        let rules = spec.rules.unwrap_or_default();
        if rules.is_empty() && action == model::AuthzAction::Deny {
            // istiod refuses this: a DENY policy without rules can never match.
            s.field(
                "spec.rules",
                "required when action is DENY (add an empty rule `{}` to deny everything)",
            );
        }
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| authz_rule(r, &format!("spec.rules[{i}]"), s))
            .collect();
        model::AuthorizationPolicy {
            key,
            selector,
            action,
            rules,
        }
    })
}

fn authz_rule(r: &istio::Rule, at: &str, s: &mut Sink<'_>) -> model::AuthzRule {
    let mut rule = model::AuthzRule::default();
    // istiod: an absent `from`/`to` matches everything, an empty list is an error.
    if r.from.as_ref().is_some_and(Vec::is_empty) {
        s.field(
            format!("{at}.from"),
            "must not be empty (omit it to match every source)",
        );
    }
    for (i, f) in r.from.iter().flatten().enumerate() {
        let at = format!("{at}.from[{i}].source");
        match &f.source {
            None => s.field(at, "required field is missing"),
            Some(src) => rule.from.push(authz_source(src, &at, s)),
        }
    }
    if r.to.as_ref().is_some_and(Vec::is_empty) {
        s.field(
            format!("{at}.to"),
            "must not be empty (omit it to match every operation)",
        );
    }
    for (i, t) in r.to.iter().flatten().enumerate() {
        let at = format!("{at}.to[{i}].operation");
        match &t.operation {
            None => s.field(at, "required field is missing"),
            Some(op) => rule.to.push(authz_operation(op, &at, s)),
        }
    }
    for (i, c) in r.when.iter().flatten().enumerate() {
        rule.when
            .push(authz_condition(c, &format!("{at}.when[{i}]"), s));
    }
    rule
}

fn authz_source(src: &istio::Source, at: &str, s: &mut Sink<'_>) -> model::AuthzSource {
    let f = |name: &str| format!("{at}.{name}");
    for (name, list) in [
        ("serviceAccounts", &src.service_accounts),
        ("notServiceAccounts", &src.not_service_accounts),
    ] {
        if list.as_ref().is_some_and(|l| !l.is_empty()) {
            s.field(
                f(name),
                "not supported yet: use principals (cluster.local/ns/NAMESPACE/sa/NAME)",
            );
        }
    }
    let out = model::AuthzSource {
        principals: strings(&src.principals, &f("principals"), s),
        not_principals: strings(&src.not_principals, &f("notPrincipals"), s),
        namespaces: strings(&src.namespaces, &f("namespaces"), s),
        not_namespaces: strings(&src.not_namespaces, &f("notNamespaces"), s),
        ip_blocks: ip_blocks(&src.ip_blocks, &f("ipBlocks"), s),
        not_ip_blocks: ip_blocks(&src.not_ip_blocks, &f("notIpBlocks"), s),
        remote_ip_blocks: ip_blocks(&src.remote_ip_blocks, &f("remoteIpBlocks"), s),
        not_remote_ip_blocks: ip_blocks(&src.not_remote_ip_blocks, &f("notRemoteIpBlocks"), s),
        request_principals: strings(&src.request_principals, &f("requestPrincipals"), s),
        not_request_principals: strings(&src.not_request_principals, &f("notRequestPrincipals"), s),
    };
    let listed = [
        &src.principals,
        &src.not_principals,
        &src.namespaces,
        &src.not_namespaces,
        &src.service_accounts,
        &src.not_service_accounts,
        &src.ip_blocks,
        &src.not_ip_blocks,
        &src.remote_ip_blocks,
        &src.not_remote_ip_blocks,
        &src.request_principals,
        &src.not_request_principals,
    ];
    if all_empty(&listed) {
        s.field(at, "must set at least one field");
    }
    out
}

fn all_empty(lists: &[&Option<Vec<String>>]) -> bool {
    lists.iter().all(|l| l.as_ref().is_none_or(Vec::is_empty))
}

fn authz_operation(op: &istio::Operation, at: &str, s: &mut Sink<'_>) -> model::AuthzOperation {
    let f = |name: &str| format!("{at}.{name}");
    let out = model::AuthzOperation {
        ports: string_ports(&op.ports, &f("ports"), s),
        not_ports: string_ports(&op.not_ports, &f("notPorts"), s),
        hosts: strings(&op.hosts, &f("hosts"), s),
        not_hosts: strings(&op.not_hosts, &f("notHosts"), s),
        methods: strings(&op.methods, &f("methods"), s),
        not_methods: strings(&op.not_methods, &f("notMethods"), s),
        paths: strings(&op.paths, &f("paths"), s),
        not_paths: strings(&op.not_paths, &f("notPaths"), s),
    };
    let listed = [
        &op.ports,
        &op.not_ports,
        &op.hosts,
        &op.not_hosts,
        &op.methods,
        &op.not_methods,
        &op.paths,
        &op.not_paths,
    ];
    if all_empty(&listed) {
        s.field(at, "must set at least one field");
    }
    out
}

/// What a `when` key's values must look like.
enum ValueKind {
    Ip,
    Port,
    Any,
}

/// The keys istiod accepts (`security.ValidateAttribute`), see Istio's "Authorization Policy
/// Conditions" reference.
fn condition_key(key: &str) -> Result<ValueKind, String> {
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('['))
            .and_then(|r| r.strip_suffix(']'))
            .is_some_and(|name| !name.is_empty())
    };
    match key {
        "source.ip" | "remote.ip" | "destination.ip" => Ok(ValueKind::Ip),
        "destination.port" => Ok(ValueKind::Port),
        "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => Ok(ValueKind::Any),
        "source.serviceAccount" => Err(
            "not supported yet: use source.principal (cluster.local/ns/NAMESPACE/sa/NAME)".into(),
        ),
        "destination.namespace" => {
            Err("destination.namespace is replaced by the policy's metadata.namespace".into())
        }
        "destination.name" | "destination.user" => {
            Err(format!("{key} is deprecated (Istio v1alpha1 only)"))
        }
        _ if key.starts_with("destination.labels") => {
            Err("destination.labels is replaced by spec.selector".into())
        }
        _ if bracketed("request.headers")
            || bracketed("request.auth.claims")
            || bracketed("request.experimental.inline.headers") =>
        {
            Ok(ValueKind::Any)
        }
        // Envoy filter metadata, `experimental.envoy.filters.<filter>[<path>]`.
        _ if key.starts_with("experimental.envoy.filters.")
            && key.find('[').is_some_and(|i| i > 0 && i + 2 < key.len())
            && key.ends_with(']') =>
        {
            Ok(ValueKind::Any)
        }
        _ if ["request.headers", "request.auth.claims", "experimental."]
            .iter()
            .any(|p| key.starts_with(p)) =>
        {
            Err(format!(
                "{key:?} must have the form NAME[KEY], e.g. request.headers[x-user]"
            ))
        }
        _ => Err(format!(
            "unknown condition key {key:?} (supported: source.ip, remote.ip, source.namespace, \
             source.principal, destination.ip, destination.port, connection.sni, \
             request.headers[NAME], request.auth.principal, request.auth.audiences, \
             request.auth.presenter, request.auth.claims[NAME], experimental.envoy.filters.*)"
        )),
    }
}

fn authz_condition(c: &istio::Condition, at: &str, s: &mut Sink<'_>) -> model::AuthzCondition {
    let key = c.key.clone().unwrap_or_default();
    let values = strings(&c.values, &format!("{at}.values"), s);
    let not_values = strings(&c.not_values, &format!("{at}.notValues"), s);
    let kind = if key.is_empty() {
        s.field(format!("{at}.key"), "required field is missing");
        None
    } else {
        condition_key(&key)
            .inspect_err(|msg| s.field(format!("{at}.key"), msg))
            .ok()
    };
    if values.is_empty() && not_values.is_empty() {
        s.field(at, "values or notValues must have at least one entry");
    }
    for (name, list) in [("values", &values), ("notValues", &not_values)] {
        for (i, v) in list.iter().enumerate() {
            // Empty entries were reported by `strings`.
            if v.is_empty() {
                continue;
            }
            let field = format!("{at}.{name}[{i}]");
            match kind {
                Some(ValueKind::Ip) => {
                    ip_or_cidr(v, &field, s);
                }
                Some(ValueKind::Port) => {
                    string_port(v, &field, s);
                }
                Some(ValueKind::Any) | None => {}
            }
        }
    }
    model::AuthzCondition {
        key,
        values,
        not_values,
    }
}

/// A list of strings in which istiod refuses empty entries.
fn strings(list: &Option<Vec<String>>, at: &str, s: &mut Sink<'_>) -> Vec<String> {
    let list = list.clone().unwrap_or_default();
    for (i, v) in list.iter().enumerate() {
        if v.is_empty() {
            s.field(format!("{at}[{i}]"), "must not be empty");
        }
    }
    list
}

fn ip_blocks(list: &Option<Vec<String>>, at: &str, s: &mut Sink<'_>) -> Vec<IpNet> {
    strings(list, at, s)
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .filter_map(|(i, v)| ip_or_cidr(v, &format!("{at}[{i}]"), s))
        .collect()
}

/// Istio takes a CIDR or a single address (its host prefix); host bits in a CIDR are
/// ignored, as Envoy's CidrRange does, so the network is kept.
fn ip_or_cidr(text: &str, field: &str, s: &mut Sink<'_>) -> Option<IpNet> {
    let parsed = if text.contains('/') {
        text.parse::<IpNet>().ok().map(|n| n.trunc())
    } else {
        text.parse::<IpAddr>().ok().map(IpNet::from)
    };
    if parsed.is_none() {
        s.field(field, format!("{text:?} is not a valid IP address or CIDR"));
    }
    parsed
}

fn string_ports(list: &Option<Vec<String>>, at: &str, s: &mut Sink<'_>) -> Vec<u16> {
    strings(list, at, s)
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .filter_map(|(i, v)| string_port(v, &format!("{at}[{i}]"), s))
        .collect()
}

/// Istio ports are decimal strings; 0 (which istiod lets through) never matches a
/// connection, so it is refused as a slip.
fn string_port(text: &str, field: &str, s: &mut Sink<'_>) -> Option<u16> {
    match text.parse::<u16>() {
        Ok(p) if p != 0 && text.bytes().all(|b| b.is_ascii_digit()) => Some(p),
        _ => {
            s.field(field, format!("{text:?} is not a valid port (1..=65535)"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use comb_model::Protocol;
    use model::{
        AuthorizationPolicy, AuthzAction, AuthzCondition, AuthzOperation, AuthzRule, AuthzSource,
        LabelSelector, NetworkPolicy, NpPeer, NpPort, NpPortSpec, NpRule, SelectorOp,
        SelectorRequirement,
    };

    fn np_ok(spec: &str) -> NetworkPolicy {
        let snap = load(&np_yaml(spec)).unwrap_or_else(|e| panic!("{e}"));
        snap.network_policies[&ObjKey::new("apps", "np")].clone()
    }

    fn ap_ok(spec: &str) -> AuthorizationPolicy {
        let snap = load(&ap_yaml(spec)).unwrap_or_else(|e| panic!("{e}"));
        snap.authorization_policies[&ObjKey::new("apps", "ap")].clone()
    }

    /// The one error of a NetworkPolicy spec, at `field` of document 1.
    #[track_caller]
    fn np_err(spec: &str, field: &str) -> String {
        one_error(&np_yaml(spec), 1, Some(field)).message
    }

    #[track_caller]
    fn ap_err(spec: &str, field: &str) -> String {
        one_error(&ap_yaml(spec), 1, Some(field)).message
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    // --- NetworkPolicy ------------------------------------------------------------------

    #[test]
    fn np_full_conversion() {
        let p = np_ok(
            "  podSelector:
    matchLabels: {app: web}
    matchExpressions: [{key: tier, operator: NotIn, values: [db]}]
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {role: client}}
    - namespaceSelector: {matchLabels: {team: a}}
      podSelector: {}
    - namespaceSelector: {matchExpressions: [{key: env, operator: Exists}]}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports:
    - {port: 80}
    - {protocol: UDP, port: 5353, endPort: 5360}
    - {port: http}
    - {protocol: SCTP}
  egress:
  - {}
",
        );
        let sel = |kv: &[(&str, &str)]| LabelSelector {
            match_labels: labels(kv),
            match_expressions: vec![],
        };
        let want = NetworkPolicy {
            key: ObjKey::new("apps", "np"),
            pod_selector: LabelSelector {
                match_labels: labels(&[("app", "web")]),
                match_expressions: vec![SelectorRequirement {
                    key: "tier".into(),
                    operator: SelectorOp::NotIn,
                    values: strs(&["db"]),
                }],
            },
            ingress_enforced: true,
            egress_enforced: true,
            ingress: vec![NpRule {
                peers: vec![
                    NpPeer::Pods {
                        namespaces: None,
                        pods: Some(sel(&[("role", "client")])),
                    },
                    NpPeer::Pods {
                        namespaces: Some(sel(&[("team", "a")])),
                        pods: Some(LabelSelector::default()),
                    },
                    NpPeer::Pods {
                        namespaces: Some(LabelSelector {
                            match_labels: BTreeMap::new(),
                            match_expressions: vec![SelectorRequirement {
                                key: "env".into(),
                                operator: SelectorOp::Exists,
                                values: vec![],
                            }],
                        }),
                        pods: None,
                    },
                    NpPeer::IpBlock {
                        cidr: net("10.0.0.0/8"),
                        except: vec![net("10.1.0.0/16")],
                    },
                ],
                ports: vec![
                    NpPort {
                        protocol: Protocol::Tcp,
                        port: Some(NpPortSpec::Range { port: 80, end: 80 }),
                    },
                    NpPort {
                        protocol: Protocol::Udp,
                        port: Some(NpPortSpec::Range {
                            port: 5353,
                            end: 5360,
                        }),
                    },
                    NpPort {
                        protocol: Protocol::Tcp,
                        port: Some(NpPortSpec::Name("http".into())),
                    },
                    NpPort {
                        protocol: Protocol::Sctp,
                        port: None,
                    },
                ],
            }],
            egress: vec![NpRule::default()],
        };
        assert_eq!(p, want);
    }

    #[test]
    fn np_empty_selector_and_default_namespace() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny}\nspec: {podSelector: {}}\n";
        let snap = load(text).unwrap();
        let p = &snap.network_policies[&ObjKey::new("default", "deny")];
        assert!(p.pod_selector.is_empty());
        assert!(p.ingress_enforced && !p.egress_enforced);
        assert!(p.ingress.is_empty(), "deny all ingress");
        // podSelector is optional since Kubernetes 1.31: absent = every pod.
        assert!(np_ok("  policyTypes: [Ingress]\n").pod_selector.is_empty());
    }

    #[test]
    fn np_policy_types_defaulting() {
        let cases = [
            ("  podSelector: {}\n", (true, false)),
            ("  ingress: [{}]\n", (true, false)),
            // Kubernetes adds Egress only when `egress` has at least one rule.
            ("  egress: []\n", (true, false)),
            ("  egress: [{}]\n", (true, true)),
            ("  policyTypes: []\n  egress: [{}]\n", (true, true)),
            ("  policyTypes: [Egress]\n", (false, true)),
            ("  policyTypes: [Ingress]\n  egress: [{}]\n", (true, false)),
            ("  policyTypes: [Egress, Ingress]\n", (true, true)),
        ];
        for (spec, want) in cases {
            let p = np_ok(spec);
            assert_eq!((p.ingress_enforced, p.egress_enforced), want, "{spec}");
        }
    }

    #[test]
    fn np_rules_of_unenforced_direction_are_dropped() {
        let p = np_ok(
            "  policyTypes: [Egress]\n  ingress: [{ports: [{port: 80}]}]\n  egress: [{ports: [{port: 53, protocol: UDP}]}]\n",
        );
        assert!(p.ingress.is_empty());
        assert_eq!(p.egress.len(), 1);
        let p = np_ok("  policyTypes: [Ingress]\n  egress: [{}]\n");
        assert!(p.egress.is_empty());
        // They are still validated, as the API server does.
        let e = np_err(
            "  policyTypes: [Egress]\n  ingress: [{ports: [{port: 0}]}]\n",
            "spec.ingress[0].ports[0].port",
        );
        assert_eq!(e, "0 is not a valid port (1..=65535)");
    }

    #[test]
    fn np_spec_required() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\n";
        let e = one_error(text, 1, Some("spec"));
        assert_eq!(e.message, "required field is missing");
    }

    #[test]
    fn np_bad_policy_types() {
        let e = np_err("  policyTypes: [Ingress, Both]\n", "spec.policyTypes[1]");
        assert_eq!(e, "\"Both\" must be Ingress or Egress");
        let e = np_err("  policyTypes: [Egress, Egress]\n", "spec.policyTypes[1]");
        assert_eq!(e, "Egress is listed twice");
        np_err("  policyTypes: [ingress]\n", "spec.policyTypes[0]");
    }

    #[test]
    fn np_ports_valid() {
        let p = np_ok(
            "  egress: [{ports: [{port: 1}, {port: 65535}, {port: 1000, endPort: 1000}, {port: dns-tcp, protocol: TCP}, {}]}]\n",
        );
        let ports: Vec<_> = p.egress[0].ports.iter().map(|p| p.port.clone()).collect();
        assert_eq!(
            ports,
            [
                Some(NpPortSpec::Range { port: 1, end: 1 }),
                Some(NpPortSpec::Range {
                    port: 65535,
                    end: 65535
                }),
                Some(NpPortSpec::Range {
                    port: 1000,
                    end: 1000
                }),
                Some(NpPortSpec::Name("dns-tcp".into())),
                None,
            ]
        );
        assert!(
            p.egress[0]
                .ports
                .iter()
                .all(|p| p.protocol == Protocol::Tcp)
        );
    }

    #[test]
    fn np_bad_ports() {
        let at = "spec.ingress[0].ports[0]";
        let ing = |port: &str| format!("  ingress: [{{ports: [{port}]}}]\n");
        let cases = [
            ("{port: 0}", "port", "0 is not a valid port (1..=65535)"),
            (
                "{port: 70000}",
                "port",
                "70000 is not a valid port (1..=65535)",
            ),
            (
                "{port: \"80\"}",
                "port",
                "\"80\" is neither a port number nor a port name (IANA_SVC_NAME)",
            ),
            (
                "{port: Web_Port}",
                "port",
                "\"Web_Port\" is neither a port number nor a port name (IANA_SVC_NAME)",
            ),
            (
                "{port: 90, endPort: 80}",
                "endPort",
                "80 must be >= port (90)",
            ),
            (
                "{port: 80, endPort: 65536}",
                "endPort",
                "65536 is not a valid port (1..=65535)",
            ),
            ("{endPort: 80}", "endPort", "may not be set without port"),
            (
                "{port: http, endPort: 80}",
                "endPort",
                "may not be set when port is a name",
            ),
            (
                "{port: 80, protocol: ICMP}",
                "protocol",
                "\"ICMP\" must be one of TCP, UDP, SCTP",
            ),
            (
                "{port: 80, protocol: \"\"}",
                "protocol",
                "\"\" must be one of TCP, UDP, SCTP",
            ),
        ];
        for (port, field, msg) in cases {
            assert_eq!(np_err(&ing(port), &format!("{at}.{field}")), msg, "{port}");
        }
    }

    #[test]
    fn np_peer_must_set_something() {
        let e = np_err("  ingress: [{from: [{}]}]\n", "spec.ingress[0].from[0]");
        assert_eq!(e, "must set one of podSelector, namespaceSelector, ipBlock");
        np_err(
            "  egress: [{to: [{podSelector: {}}, {podSelector: null}]}]\n",
            "spec.egress[0].to[1]",
        );
    }

    #[test]
    fn np_ip_block_excludes_selectors() {
        let e = np_err(
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]\n",
            "spec.ingress[0].from[0]",
        );
        assert_eq!(
            e,
            "ipBlock may not be combined with podSelector or namespaceSelector"
        );
        np_err(
            "  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, namespaceSelector: {}}]}]\n",
            "spec.egress[0].to[0]",
        );
    }

    #[test]
    fn np_ip_block_cidrs() {
        let block = |b: &str| {
            let p = np_ok(&format!("  egress: [{{to: [{{ipBlock: {b}}}]}}]\n"));
            p.egress[0].peers[0].clone()
        };
        // Host bits are accepted (as Kubernetes does) and mean the network.
        assert_eq!(
            block("{cidr: 10.1.2.3/8, except: [10.9.9.9/16]}"),
            NpPeer::IpBlock {
                cidr: net("10.0.0.0/8"),
                except: vec![net("10.9.0.0/16")]
            }
        );
        assert_eq!(
            block("{cidr: \"fd00::/64\", except: [\"fd00::1/128\"]}"),
            NpPeer::IpBlock {
                cidr: net("fd00::/64"),
                except: vec![net("fd00::1/128")]
            }
        );
        assert_eq!(
            block("{cidr: 0.0.0.0/0}"),
            NpPeer::IpBlock {
                cidr: net("0.0.0.0/0"),
                except: vec![]
            }
        );
        let at = "spec.egress[0].to[0].ipBlock";
        let bad = |b: &str, field: &str| {
            np_err(
                &format!("  egress: [{{to: [{{ipBlock: {b}}}]}}]\n"),
                &format!("{at}.{field}"),
            )
        };
        assert_eq!(
            bad("{cidr: 10.0.0.1}", "cidr"),
            "\"10.0.0.1\" is not a valid CIDR (address/prefix-length)"
        );
        bad("{cidr: 10.0.0.0/33}", "cidr");
        bad("{cidr: nope}", "cidr");
        assert_eq!(
            bad("{except: [10.0.0.0/8]}", "cidr"),
            "required field is missing"
        );
        assert_eq!(
            bad("{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}", "except[0]"),
            "11.0.0.0/16 must be strictly inside cidr 10.0.0.0/8"
        );
        assert_eq!(
            bad(
                "{cidr: 10.0.0.0/8, except: [10.0.0.0/16, 10.0.0.0/8]}",
                "except[1]"
            ),
            "10.0.0.0/8 must be strictly inside cidr 10.0.0.0/8"
        );
        bad("{cidr: 10.0.0.0/16, except: [10.0.0.0/8]}", "except[0]");
        assert_eq!(
            bad("{cidr: 10.0.0.0/8, except: [\"fd00::/64\"]}", "except[0]"),
            "fd00::/64 is not of the same IP family as cidr 10.0.0.0/8"
        );
        bad("{cidr: 10.0.0.0/8, except: [10.1.0.0]}", "except[0]");
    }

    #[test]
    fn np_label_selectors_valid() {
        let p = np_ok(
            "  podSelector:\n    matchLabels: {app.kubernetes.io/name: web, example.com/empty: \"\", a: A_b-c.d}\n    matchExpressions:\n    - {key: x, operator: In, values: [\"1\", b]}\n    - {key: y, operator: DoesNotExist, values: []}\n",
        );
        assert_eq!(p.pod_selector.match_labels.len(), 3);
        assert_eq!(
            p.pod_selector.match_expressions[1],
            SelectorRequirement {
                key: "y".into(),
                operator: SelectorOp::DoesNotExist,
                values: vec![]
            }
        );
    }

    #[test]
    fn np_label_selectors_invalid() {
        let at = "spec.podSelector.matchExpressions[0]";
        let expr = |e: &str| format!("  podSelector: {{matchExpressions: [{e}]}}\n");
        assert_eq!(
            np_err(&expr("{key: a, operator: In}"), &format!("{at}.values")),
            "required when operator is In"
        );
        np_err(
            &expr("{key: a, operator: NotIn, values: []}"),
            &format!("{at}.values"),
        );
        assert_eq!(
            np_err(
                &expr("{key: a, operator: Exists, values: [b]}"),
                &format!("{at}.values")
            ),
            "must be empty when operator is Exists"
        );
        np_err(
            &expr("{key: a, operator: DoesNotExist, values: [b]}"),
            &format!("{at}.values"),
        );
        assert_eq!(
            np_err(
                &expr("{key: a, operator: Equals, values: [b]}"),
                &format!("{at}.operator")
            ),
            "\"Equals\" must be one of In, NotIn, Exists, DoesNotExist"
        );
        assert_eq!(
            np_err(&expr("{key: a}"), &format!("{at}.operator")),
            "required field is missing"
        );
        assert_eq!(
            np_err(&expr("{operator: Exists}"), &format!("{at}.key")),
            "required field is missing"
        );
        let e = np_err(&expr("{key: -a, operator: Exists}"), &format!("{at}.key"));
        assert!(
            e.starts_with("\"-a\" is not a valid label key: the name"),
            "{e}"
        );
        let e = np_err(
            &expr("{key: Example.com/a, operator: Exists}"),
            &format!("{at}.key"),
        );
        assert!(
            e.contains("the prefix before '/' must be a DNS subdomain"),
            "{e}"
        );
        np_err(
            &expr("{key: a/b/c, operator: Exists}"),
            &format!("{at}.key"),
        );
        np_err(&expr("{key: /a, operator: Exists}"), &format!("{at}.key"));
        np_err(
            &expr(&format!("{{key: {}, operator: Exists}}", "a".repeat(64))),
            &format!("{at}.key"),
        );
        let e = np_err(
            &expr("{key: a, operator: In, values: [ok, \"bad value\"]}"),
            &format!("{at}.values[1]"),
        );
        assert!(
            e.starts_with("\"bad value\" is not a valid label value"),
            "{e}"
        );
        np_err(
            "  podSelector: {matchLabels: {\"a b\": c}}\n",
            "spec.podSelector.matchLabels[\"a b\"]",
        );
        np_err(
            "  podSelector: {matchLabels: {a: c-}}\n",
            "spec.podSelector.matchLabels[\"a\"]",
        );
        // Selectors of peers are checked too, with their own paths.
        np_err(
            "  ingress: [{from: [{namespaceSelector: {matchLabels: {a: \"*\"}}}]}]\n",
            "spec.ingress[0].from[0].namespaceSelector.matchLabels[\"a\"]",
        );
    }

    #[test]
    fn np_label_syntax() {
        assert!(is_label_name("a"));
        assert!(is_label_name("A.b_c-9"));
        assert!(is_label_name(&"a".repeat(63)));
        assert!(!is_label_name(&"a".repeat(64)));
        assert!(!is_label_name(""));
        assert!(!is_label_name("a."));
        assert!(!is_label_name("_a"));
        assert!(is_label_value(""));
        assert!(is_dns_subdomain("kubernetes.io"));
        assert!(is_dns_subdomain("a-1.b"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain("-a.b"));
        assert!(!is_dns_subdomain("A.b"));
        assert!(!is_dns_subdomain(&"a".repeat(254)));
        assert_eq!(label_key_problem("app.kubernetes.io/name"), None);
    }

    #[test]
    fn np_unknown_field() {
        let e = np_err(
            "  ingress: [{from: [{podSelector: {}}], prots: []}]\n",
            "spec.ingress[0].prots",
        );
        assert_eq!(e, "unknown field");
        np_err(
            "  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, excpet: []}}]}]\n",
            "spec.egress[0].to[0].ipBlock.excpet",
        );
    }

    #[test]
    fn np_errors_are_all_collected() {
        let errs = errors(&np_yaml(
            "  policyTypes: [Sideways]\n  ingress: [{from: [{}], ports: [{port: 0}]}]\n",
        ));
        let fields: Vec<_> = errs.iter().map(|e| e.field.clone().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "spec.policyTypes[0]",
                "spec.ingress[0].from[0]",
                "spec.ingress[0].ports[0].port"
            ]
        );
    }

    // --- AuthorizationPolicy -------------------------------------------------------------

    #[test]
    fn ap_full_conversion() {
        let p = ap_ok(
            "  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/apps/sa/client]
        notPrincipals: [\"*/sa/admin\"]
        requestPrincipals: [\"issuer/*\"]
        notRequestPrincipals: [issuer/bad]
        namespaces: [apps]
        notNamespaces: [test]
        ipBlocks: [10.0.0.1, 10.1.2.3/16]
        notIpBlocks: [\"fd00::1\"]
        remoteIpBlocks: [192.0.2.0/24]
        notRemoteIpBlocks: [192.0.2.7]
    - source: {namespaces: [other]}
    to:
    - operation:
        hosts: [web.apps.svc]
        notHosts: [evil]
        ports: [\"80\", \"8080\"]
        notPorts: [\"9090\"]
        methods: [GET]
        notMethods: [DELETE]
        paths: [/api/*]
        notPaths: [/admin]
    when:
    - {key: source.ip, values: [10.0.0.0/8], notValues: [10.0.0.1]}
    - {key: \"request.headers[x-user]\", values: [alice]}
  - {}
",
        );
        let want = AuthorizationPolicy {
            key: ObjKey::new("apps", "ap"),
            selector: Some(labels(&[("app", "web")])),
            action: AuthzAction::Deny,
            rules: vec![
                AuthzRule {
                    from: vec![
                        AuthzSource {
                            principals: strs(&["cluster.local/ns/apps/sa/client"]),
                            not_principals: strs(&["*/sa/admin"]),
                            namespaces: strs(&["apps"]),
                            not_namespaces: strs(&["test"]),
                            ip_blocks: vec![net("10.0.0.1/32"), net("10.1.0.0/16")],
                            not_ip_blocks: vec![net("fd00::1/128")],
                            remote_ip_blocks: vec![net("192.0.2.0/24")],
                            not_remote_ip_blocks: vec![net("192.0.2.7/32")],
                            request_principals: strs(&["issuer/*"]),
                            not_request_principals: strs(&["issuer/bad"]),
                        },
                        AuthzSource {
                            namespaces: strs(&["other"]),
                            ..Default::default()
                        },
                    ],
                    to: vec![AuthzOperation {
                        ports: vec![80, 8080],
                        not_ports: vec![9090],
                        hosts: strs(&["web.apps.svc"]),
                        not_hosts: strs(&["evil"]),
                        methods: strs(&["GET"]),
                        not_methods: strs(&["DELETE"]),
                        paths: strs(&["/api/*"]),
                        not_paths: strs(&["/admin"]),
                    }],
                    when: vec![
                        AuthzCondition {
                            key: "source.ip".into(),
                            values: strs(&["10.0.0.0/8"]),
                            not_values: strs(&["10.0.0.1"]),
                        },
                        AuthzCondition {
                            key: "request.headers[x-user]".into(),
                            values: strs(&["alice"]),
                            not_values: vec![],
                        },
                    ],
                },
                AuthzRule::default(),
            ],
        };
        assert_eq!(p, want);
    }

    #[test]
    fn ap_defaults() {
        let allow_nothing = AuthorizationPolicy {
            key: ObjKey::new("apps", "ap"),
            selector: None,
            action: AuthzAction::Allow,
            rules: vec![],
        };
        // Istio's documented "allow-nothing" policy.
        assert_eq!(ap_ok("  {}\n"), allow_nothing);
        assert_eq!(ap_ok("  selector: {}\n  rules: []\n"), allow_nothing);
        assert_eq!(
            ap_ok("  selector: {matchLabels: {}}\n  action: ALLOW\n"),
            allow_nothing
        );
        let text =
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap}\n";
        let snap = load(text).unwrap();
        assert_eq!(
            snap.authorization_policies[&ObjKey::new("default", "ap")].rules,
            []
        );
        let p = ap_ok("  action: AUDIT\n");
        assert_eq!(p.action, AuthzAction::Audit);
        let p = ap_ok("  action: DENY\n  rules: [{}]\n");
        assert_eq!((p.action, p.rules.len()), (AuthzAction::Deny, 1));
    }

    #[test]
    fn ap_v1beta1_is_the_same_schema() {
        let text = ap_yaml("  rules: [{to: [{operation: {ports: [\"80\"]}}]}]\n")
            .replace("security.istio.io/v1", "security.istio.io/v1beta1");
        let snap = load(&text).unwrap_or_else(|e| panic!("{e}"));
        let p = &snap.authorization_policies[&ObjKey::new("apps", "ap")];
        assert_eq!(p.rules[0].to[0].ports, [80]);
        let e = one_error(
            &ap_yaml("  {}\n").replace("security.istio.io/v1", "security.istio.io/v2"),
            1,
            Some("apiVersion"),
        );
        assert_eq!(
            e.message,
            "unsupported apiVersion \"security.istio.io/v2\" for AuthorizationPolicy (expected security.istio.io/v1 or security.istio.io/v1beta1)"
        );
    }

    #[test]
    fn ap_custom_and_provider() {
        let e = ap_err(
            "  action: CUSTOM\n  provider: {name: ext-authz}\n  rules: [{}]\n",
            "spec.action",
        );
        assert_eq!(e, "action CUSTOM (external authorization) is not supported");
        let e = ap_err("  provider: {name: ext-authz}\n", "spec.provider");
        assert_eq!(e, "only allowed with action CUSTOM");
        ap_err(
            "  action: DENY\n  provider: {}\n  rules: [{}]\n",
            "spec.provider",
        );
        let e = ap_err("  action: allow\n", "spec.action");
        assert!(e.starts_with("unknown variant `allow`"), "{e}");
    }

    #[test]
    fn ap_target_refs_not_supported() {
        let e = ap_err(
            "  targetRef: {kind: Service, group: \"\", name: web}\n",
            "spec.targetRef",
        );
        assert_eq!(e, "not supported yet: select workloads with spec.selector");
        ap_err(
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n",
            "spec.targetRefs",
        );
        ap_err("  targetRefs: [{nme: gw}]\n", "spec.targetRefs[0].nme");
    }

    #[test]
    fn ap_deny_needs_rules() {
        let e = ap_err("  action: DENY\n", "spec.rules");
        assert_eq!(
            e,
            "required when action is DENY (add an empty rule `{}` to deny everything)"
        );
        ap_err("  action: DENY\n  rules: []\n", "spec.rules");
    }

    #[test]
    fn ap_selector_labels_checked() {
        ap_err(
            "  selector: {matchLabels: {app: \"web*\"}}\n",
            "spec.selector.matchLabels[\"app\"]",
        );
        ap_err(
            "  selector: {matchLabels: {\"\": web}}\n",
            "spec.selector.matchLabels[\"\"]",
        );
        ap_err(
            "  selector: {matchExpressions: []}\n",
            "spec.selector.matchExpressions",
        );
    }

    #[test]
    fn ap_from_and_to_entries() {
        let r = "spec.rules[0]";
        assert_eq!(
            ap_err("  rules: [{from: []}]\n", &format!("{r}.from")),
            "must not be empty (omit it to match every source)"
        );
        assert_eq!(
            ap_err("  rules: [{from: [{}]}]\n", &format!("{r}.from[0].source")),
            "required field is missing"
        );
        assert_eq!(
            ap_err(
                "  rules: [{from: [{source: {principals: []}}]}]\n",
                &format!("{r}.from[0].source")
            ),
            "must set at least one field"
        );
        ap_err("  rules: [{to: []}]\n", &format!("{r}.to"));
        ap_err(
            "  rules: [{to: [{operation: {ports: [\"80\"]}}, {}]}]\n",
            &format!("{r}.to[1].operation"),
        );
        assert_eq!(
            ap_err(
                "  rules: [{to: [{operation: {}}]}]\n",
                &format!("{r}.to[0].operation")
            ),
            "must set at least one field"
        );
    }

    #[test]
    fn ap_empty_strings_refused() {
        let src = "spec.rules[0].from[0].source";
        for field in [
            "principals",
            "notPrincipals",
            "requestPrincipals",
            "notRequestPrincipals",
            "namespaces",
            "notNamespaces",
            "ipBlocks",
            "notIpBlocks",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
        ] {
            let e = ap_err(
                &format!("  rules: [{{from: [{{source: {{{field}: [10.0.0.1, \"\"]}}}}]}}]\n"),
                &format!("{src}.{field}[1]"),
            );
            assert_eq!(e, "must not be empty");
        }
        let op = "spec.rules[0].to[0].operation";
        for field in [
            "hosts",
            "notHosts",
            "ports",
            "notPorts",
            "methods",
            "notMethods",
            "paths",
            "notPaths",
        ] {
            let e = ap_err(
                &format!("  rules: [{{to: [{{operation: {{{field}: [\"\"]}}}}]}}]\n"),
                &format!("{op}.{field}[0]"),
            );
            assert_eq!(e, "must not be empty");
        }
    }

    #[test]
    fn ap_ip_blocks() {
        let blocks = |list: &str| {
            ap_ok(&format!(
                "  rules: [{{from: [{{source: {{ipBlocks: {list}}}}}]}}]\n"
            ))
            .rules[0]
                .from[0]
                .ip_blocks
                .clone()
        };
        assert_eq!(
            blocks("[10.0.0.1, \"fd00::1\", 10.1.2.3/16, \"fd00::1/64\"]"),
            [
                net("10.0.0.1/32"),
                net("fd00::1/128"),
                net("10.1.0.0/16"),
                net("fd00::/64")
            ]
        );
        let src = "spec.rules[0].from[0].source";
        for (field, bad) in [
            ("ipBlocks", "nope"),
            ("notIpBlocks", "10.0.0.0/33"),
            ("remoteIpBlocks", "10.0.0"),
            ("notRemoteIpBlocks", "10.0.0.0/"),
        ] {
            let e = ap_err(
                &format!("  rules: [{{from: [{{source: {{{field}: [\"{bad}\"]}}}}]}}]\n"),
                &format!("{src}.{field}[0]"),
            );
            assert_eq!(e, format!("{bad:?} is not a valid IP address or CIDR"));
        }
    }

    #[test]
    fn ap_ports() {
        let op = "spec.rules[0].to[0].operation";
        for bad in ["0", "65536", "http", "+80", "-1", " 80"] {
            let e = ap_err(
                &format!("  rules: [{{to: [{{operation: {{notPorts: [\"{bad}\"]}}}}]}}]\n"),
                &format!("{op}.notPorts[0]"),
            );
            assert_eq!(e, format!("{bad:?} is not a valid port (1..=65535)"));
        }
        // Istio's schema has strings, so a YAML number is a type error (as the API server
        // says for the CRD).
        let e = ap_err(
            "  rules: [{to: [{operation: {ports: [80]}}]}]\n",
            &format!("{op}.ports[0]"),
        );
        assert!(
            e.starts_with("invalid type: integer `80`, expected a string"),
            "{e}"
        );
        let p = ap_ok("  rules: [{to: [{operation: {ports: [\"1\", \"65535\", \"0443\"]}}]}]\n");
        assert_eq!(p.rules[0].to[0].ports, [1, 65535, 443]);
    }

    #[test]
    fn ap_service_accounts_not_supported() {
        let e = ap_err(
            "  rules: [{from: [{source: {serviceAccounts: [apps/client]}}]}]\n",
            "spec.rules[0].from[0].source.serviceAccounts",
        );
        assert_eq!(
            e,
            "not supported yet: use principals (cluster.local/ns/NAMESPACE/sa/NAME)"
        );
        ap_err(
            "  rules: [{from: [{source: {notServiceAccounts: [client]}}]}]\n",
            "spec.rules[0].from[0].source.notServiceAccounts",
        );
    }

    #[test]
    fn ap_condition_keys() {
        let ok = [
            "source.ip",
            "remote.ip",
            "source.namespace",
            "source.principal",
            "destination.ip",
            "destination.port",
            "connection.sni",
            "request.headers[User-Agent]",
            "request.auth.principal",
            "request.auth.audiences",
            "request.auth.presenter",
            "request.auth.claims[iss]",
            "request.auth.claims[nested.claim]",
            "request.experimental.inline.headers[x-a]",
            "experimental.envoy.filters.network.mysql_proxy[db.table]",
        ];
        for key in ok {
            let value = match key {
                "source.ip" | "remote.ip" | "destination.ip" => "10.0.0.0/8",
                "destination.port" => "443",
                _ => "x",
            };
            let p = ap_ok(&format!(
                "  rules: [{{when: [{{key: \"{key}\", values: [\"{value}\"]}}]}}]\n"
            ));
            assert_eq!(p.rules[0].when[0].key, key);
        }
        let at = "spec.rules[0].when[0].key";
        let bad = |key: &str| {
            ap_err(
                &format!("  rules: [{{when: [{{key: \"{key}\", values: [x]}}]}}]\n"),
                at,
            )
        };
        assert!(
            bad("source.user").starts_with("unknown condition key \"source.user\""),
            "{}",
            bad("source.user")
        );
        assert_eq!(
            bad("request.headers[]"),
            "\"request.headers[]\" must have the form NAME[KEY], e.g. request.headers[x-user]"
        );
        bad("request.headers");
        bad("request.auth.claims[iss");
        bad("experimental.envoy.filters.x");
        bad("experimental.foo[x]");
        assert_eq!(
            bad("destination.labels[app]"),
            "destination.labels is replaced by spec.selector"
        );
        bad("destination.namespace");
        bad("destination.user");
        assert_eq!(
            bad("source.serviceAccount"),
            "not supported yet: use source.principal (cluster.local/ns/NAMESPACE/sa/NAME)"
        );
        assert_eq!(
            ap_err("  rules: [{when: [{values: [x]}]}]\n", at),
            "required field is missing"
        );
    }

    #[test]
    fn ap_condition_values() {
        let w = "spec.rules[0].when[0]";
        assert_eq!(
            ap_err("  rules: [{when: [{key: source.namespace}]}]\n", w),
            "values or notValues must have at least one entry"
        );
        ap_err(
            "  rules: [{when: [{key: source.namespace, values: [], notValues: []}]}]\n",
            w,
        );
        let p = ap_ok("  rules: [{when: [{key: source.namespace, notValues: [test]}]}]\n");
        assert_eq!(p.rules[0].when[0].not_values, ["test"]);
        ap_err(
            "  rules: [{when: [{key: source.namespace, values: [a, \"\"]}]}]\n",
            &format!("{w}.values[1]"),
        );
        let e = ap_err(
            "  rules: [{when: [{key: source.ip, values: [10.0.0.1], notValues: [bogus]}]}]\n",
            &format!("{w}.notValues[0]"),
        );
        assert_eq!(e, "\"bogus\" is not a valid IP address or CIDR");
        ap_err(
            "  rules: [{when: [{key: destination.ip, values: [\"10.0.0.0/40\"]}]}]\n",
            &format!("{w}.values[0]"),
        );
        let e = ap_err(
            "  rules: [{when: [{key: destination.port, values: [\"80\", \"99999\"]}]}]\n",
            &format!("{w}.values[1]"),
        );
        assert_eq!(e, "\"99999\" is not a valid port (1..=65535)");
    }

    #[test]
    fn ap_unknown_fields() {
        assert_eq!(
            ap_err(
                "  rules: [{from: [{source: {principal: [a]}}]}]\n",
                "spec.rules[0].from[0].source.principal"
            ),
            "unknown field"
        );
        ap_err("  rule: []\n", "spec.rule");
        ap_err(
            "  rules: [{to: [{operation: {port: [\"80\"]}}]}]\n",
            "spec.rules[0].to[0].operation.port",
        );
        ap_err(
            "  rules: [{when: [{key: source.ip, value: [a]}]}]\n",
            "spec.rules[0].when[0].value",
        );
        ap_err("  selector: {labels: {a: b}}\n", "spec.selector.labels");
        let text = ap_yaml("  {}\n").replace("spec:", "status: {}\nspec:");
        one_error(&text, 1, Some("status"));
    }

    #[test]
    fn ap_errors_are_all_collected() {
        let errs = errors(&ap_yaml(
            "  action: DENY\n  provider: {name: x}\n  rules:\n  - from: [{}]\n    to: [{operation: {ports: [\"0\"]}}]\n    when: [{key: nope, values: [x]}]\n",
        ));
        let fields: Vec<_> = errs.iter().map(|e| e.field.clone().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "spec.provider",
                "spec.rules[0].from[0].source",
                "spec.rules[0].to[0].operation.ports[0]",
                "spec.rules[0].when[0].key"
            ]
        );
    }

    #[test]
    fn policies_with_the_same_name_as_other_kinds() {
        let text = format!(
            "{}---\n{}---\n{}",
            np_yaml("  podSelector: {}\n"),
            ap_yaml("  {}\n"),
            ap_yaml("  {}\n").replace("name: ap", "name: np")
        );
        let snap = load(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(snap.network_policies.len(), 1);
        assert_eq!(snap.authorization_policies.len(), 2);
        let e = one_error(
            &format!("{}---\n{}", np_yaml("  {}\n"), np_yaml("  {}\n")),
            2,
            Some("metadata.name"),
        );
        assert!(e.message.contains("duplicate NetworkPolicy apps/np"), "{e}");
    }

    #[test]
    fn one_bad_policy_fails_the_whole_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            format!("{NODE_A}---\n{}", pod_yaml("web-0", "198.18.1.2", "")),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            format!(
                "{}---\n{}",
                np_yaml("  podSelector: {}\n"),
                ap_yaml("  rules: [{to: [{operation: {ports: [\"80\"]}}]}]\n")
            ),
        )
        .unwrap();
        let snap = crate::load_snapshot(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(snap.network_policies.len(), 1);
        assert_eq!(snap.authorization_policies.len(), 1);
        std::fs::write(
            dir.path().join("c.yaml"),
            ap_yaml("  action: CUSTOM\n  rules: [{}]\n").replace("name: ap", "name: ext"),
        )
        .unwrap();
        let errs = crate::load_snapshot(dir.path()).unwrap_err();
        assert_eq!(
            errs.to_string(),
            format!(
                "{}: document 1: spec.action: action CUSTOM (external authorization) is not supported",
                dir.path().join("c.yaml").display()
            )
        );
    }

    /// The committed fuzz seeds are meant to start the fuzzer from valid policies; keep them
    /// so (and cover them here on the stable toolchain).
    #[test]
    fn fuzz_seeds_are_valid_policies() {
        let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
        let snap = crate::load_snapshot(&fuzz.join("manifest")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            snap.network_policies.len() + snap.authorization_policies.len(),
            5
        );
        assert_eq!(snap.peer_authentications.len(), 2);
        // The policy target's seeds are the same specs, without the document header.
        for f in crate::manifest_files(&fuzz.join("policy")).unwrap() {
            let spec = std::fs::read_to_string(&f).unwrap();
            let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
            let name = f.file_name().unwrap().to_str().unwrap();
            let text = if name.starts_with("np-") {
                np_yaml(&spec)
            } else if name.starts_with("pa-") {
                format!(
                    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa, namespace: apps}}\nspec:\n{spec}"
                )
            } else {
                ap_yaml(&spec)
            };
            load(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// Stable-toolchain stand-in for the fuzz targets: every prefix of a policy file, and
    /// single-character mutations of it, must not panic.
    #[test]
    fn mangled_policies_never_panic() {
        let text = format!(
            "{}---\n{}",
            np_yaml(
                "  podSelector: {matchExpressions: [{key: a, operator: In, values: [b]}]}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], ports: [{port: 80, endPort: 90}]}]\n"
            ),
            ap_yaml(
                "  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.0.0.1]}}], to: [{operation: {ports: [\"80\"]}}], when: [{key: destination.port, values: [\"80\"]}]}]\n"
            ),
        );
        load(&text).unwrap_or_else(|e| panic!("{e}"));
        for (i, _) in text.char_indices() {
            let _ = load(&text[..i]);
        }
        for (i, _) in text.char_indices().step_by(3) {
            for c in [' ', ':', '-', '[', '{', '0', '/', '\n'] {
                let mut t = text.clone();
                t.replace_range(i..i + 1, &c.to_string());
                let _ = load(&t);
            }
        }
    }
}
