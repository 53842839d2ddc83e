//! NetworkPolicy and AuthorizationPolicy: validated the way the Kubernetes API server and
//! istiod validate them, then reduced to Comb's policy model.
//!
//! Like [`crate::convert`], every problem goes to the [`Sink`] and an object with any problem
//! converts to `None`: a half-understood policy must never be enforced.

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

fn match_labels(
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
