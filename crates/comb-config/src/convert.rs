//! Per-object validation and conversion from k8s-openapi types to Comb's model.
//!
//! Each function reports every problem it finds to the [`Sink`] and returns `None` if there
//! was any, so one bad field never produces a half-converted object.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use comb_model as model;
use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::error::Sink;

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10800;
const MAX_AFFINITY_TIMEOUT_SECS: i32 = 86400;

/// Runs `f` and turns "reported any error" into `None`.
pub(crate) fn checked<T>(s: &mut Sink<'_>, f: impl FnOnce(&mut Sink<'_>) -> T) -> Option<T> {
    let before = s.errors.len();
    let out = f(s);
    (s.errors.len() == before).then_some(out)
}

fn map_or_empty(m: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    m.clone().unwrap_or_default()
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.clone().filter(|s| !s.is_empty())
}

pub(crate) fn namespace(o: &core::Namespace, s: &mut Sink<'_>) -> Option<model::Namespace> {
    checked(s, |s| {
        let annotations = map_or_empty(&o.metadata.annotations);
        l7_annotation(&annotations, s);
        model::Namespace {
            name: o.metadata.name.clone().unwrap_or_default(),
            labels: map_or_empty(&o.metadata.labels),
            annotations,
        }
    })
}

/// `comb.dev/l7` takes `"true"` or `"false"` (the pod's `"false"` overrides its namespace's
/// `"true"`, so both words mean something).
fn l7_annotation(annotations: &BTreeMap<String, String>, s: &mut Sink<'_>) {
    if let Some(v) = annotations.get(model::ANNOTATION_L7)
        && v != "true"
        && v != "false"
    {
        s.field(
            format!("metadata.annotations[\"{}\"]", model::ANNOTATION_L7),
            format!("{v:?} must be \"true\" or \"false\""),
        );
    }
}

/// The controller owner reference; Kubernetes allows at most one.
fn pod_owner(o: &core::Pod, s: &mut Sink<'_>) -> Option<model::PodOwner> {
    let refs = o.metadata.owner_references.as_deref().unwrap_or(&[]);
    let mut out: Option<model::PodOwner> = None;
    for (i, r) in refs.iter().enumerate() {
        if r.controller != Some(true) {
            continue;
        }
        let at = format!("metadata.ownerReferences[{i}]");
        for (field, v) in [("kind", &r.kind), ("name", &r.name)] {
            if v.is_empty() {
                s.field(format!("{at}.{field}"), "required field is missing");
            }
        }
        if let Some(first) = &out {
            s.field(
                format!("{at}.controller"),
                format!(
                    "only one owner reference can be the controller (already {} {})",
                    first.kind, first.name
                ),
            );
            continue;
        }
        out = Some(model::PodOwner {
            kind: r.kind.clone(),
            name: r.name.clone(),
        });
    }
    out
}

pub(crate) fn node(o: &core::Node, s: &mut Sink<'_>) -> Option<model::Node> {
    checked(s, |s| {
        let spec = o.spec.as_ref();
        let cidrs = spec.and_then(|sp| sp.pod_cidrs.clone()).unwrap_or_default();
        let single = spec.and_then(|sp| non_empty(&sp.pod_cidr));
        let mut pod_cidrs = Vec::new();
        // podCIDRs wins when set; podCIDR is its older single-value form.
        let fields: Vec<(String, String)> = if cidrs.is_empty() {
            single
                .into_iter()
                .map(|c| ("spec.podCIDR".to_owned(), c))
                .collect()
        } else {
            if let Some(single) = single
                && single != cidrs[0]
            {
                s.field(
                    "spec.podCIDR",
                    format!("{single} must equal spec.podCIDRs[0] ({})", cidrs[0]),
                );
            }
            cidrs
                .into_iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c))
                .collect()
        };
        for (field, text) in fields {
            match text.parse::<IpNet>() {
                Ok(net) => pod_cidrs.push(net.trunc()),
                Err(_) => s.field(field, format!("{text:?} is not a valid CIDR")),
            }
        }
        let mut addresses = Vec::new();
        let listed = o.status.as_ref().and_then(|st| st.addresses.as_ref());
        for (i, a) in listed.into_iter().flatten().enumerate() {
            // Hostname and DNS entries are names, not addresses.
            if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
                continue;
            }
            match a.address.parse::<IpAddr>() {
                Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
                Ok(_) => {}
                Err(_) => s.field(
                    format!("status.addresses[{i}].address"),
                    format!("{:?} is not a valid IP address", a.address),
                ),
            }
        }
        model::Node {
            name: o.metadata.name.clone().unwrap_or_default(),
            pod_cidrs,
            addresses,
            annotations: o.metadata.annotations.clone().unwrap_or_default(),
        }
    })
}

/// The pod's addresses with the field each came from, for later error messages.
pub(crate) fn pod_ips(o: &core::Pod, s: &mut Sink<'_>) -> Vec<(IpAddr, String)> {
    let status = o.status.as_ref();
    let list = status.and_then(|st| st.pod_ips.clone()).unwrap_or_default();
    let single = status.and_then(|st| non_empty(&st.pod_ip));
    let mut out = Vec::new();
    let fields: Vec<(String, String)> = if list.is_empty() {
        single
            .into_iter()
            .map(|ip| ("status.podIP".to_owned(), ip))
            .collect()
    } else {
        if let Some(single) = &single
            && *single != list[0].ip
        {
            s.field(
                "status.podIP",
                format!("{single} must equal status.podIPs[0].ip ({})", list[0].ip),
            );
        }
        list.into_iter()
            .enumerate()
            .map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip))
            .collect()
    };
    for (field, text) in fields {
        match text.parse::<IpAddr>() {
            Ok(ip) if out.iter().any(|(seen, _)| *seen == ip) => {
                s.field(field, format!("{ip} is listed twice"))
            }
            Ok(ip) => out.push((ip, field)),
            Err(_) => s.field(field, format!("{text:?} is not a valid IP address")),
        }
    }
    out
}

pub(crate) fn pod(o: &core::Pod, key: model::ObjKey, s: &mut Sink<'_>) -> Option<model::Pod> {
    checked(s, |s| {
        let annotations = map_or_empty(&o.metadata.annotations);
        let splice = match annotations
            .get(model::ANNOTATION_SPLICE)
            .map(String::as_str)
        {
            None | Some("on" | "true") => true,
            Some("off" | "false") => false,
            Some(other) => {
                s.field(
                    format!("metadata.annotations[\"{}\"]", model::ANNOTATION_SPLICE),
                    format!("{other:?} must be one of on, off, true, false"),
                );
                true
            }
        };
        l7_annotation(&annotations, s);
        let spec = o.spec.as_ref();
        let service_account = spec
            .and_then(|sp| {
                non_empty(&sp.service_account_name).or_else(|| non_empty(&sp.service_account))
            })
            .unwrap_or_else(|| "default".to_owned());
        model::Pod {
            key,
            labels: map_or_empty(&o.metadata.labels),
            cgroup: annotations.get(model::ANNOTATION_CGROUP).cloned(),
            interface: annotations.get(model::ANNOTATION_INTERFACE).cloned(),
            annotations,
            node_name: spec.and_then(|sp| non_empty(&sp.node_name)),
            service_account,
            ips: pod_ips(o, s).into_iter().map(|(ip, _)| ip).collect(),
            splice,
            ports: container_ports(o, s),
            owner: pod_owner(o, s),
        }
    })
}

/// Every container's `ports`, named ones checked for IANA_SVC_NAME syntax and uniqueness
/// per protocol (what NetworkPolicy named ports resolve to).
fn container_ports(o: &core::Pod, s: &mut Sink<'_>) -> Vec<model::ContainerPort> {
    let mut out: Vec<model::ContainerPort> = Vec::new();
    let containers = o
        .spec
        .as_ref()
        .map(|sp| sp.containers.as_slice())
        .unwrap_or(&[]);
    for (ci, c) in containers.iter().enumerate() {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let at = format!("spec.containers[{ci}].ports[{pi}]");
            let port = port_number(p.container_port, &format!("{at}.containerPort"), s);
            let protocol = protocol(&p.protocol, &format!("{at}.protocol"), s);
            let name = non_empty(&p.name);
            if let Some(n) = &name {
                if !is_port_name(n) {
                    s.field(
                        format!("{at}.name"),
                        format!("{n:?} is not a valid port name (IANA_SVC_NAME: at most 15 lowercase letters, digits and '-')"),
                    );
                } else if out.iter().any(|q| q.name.as_deref() == Some(n)) {
                    s.field(
                        format!("{at}.name"),
                        format!("port name {n:?} is used twice"),
                    );
                }
            }
            out.push(model::ContainerPort {
                name,
                protocol,
                port,
            });
        }
    }
    out
}

fn port_number(v: i32, field: &str, s: &mut Sink<'_>) -> u16 {
    match u16::try_from(v) {
        Ok(p) if p != 0 => p,
        // k8s-openapi turns a missing required port into 0.
        _ if v == 0 => {
            s.field(field, "required: a port in 1..=65535");
            0
        }
        _ => {
            s.field(field, format!("{v} is not a valid port (1..=65535)"));
            0
        }
    }
}

pub(crate) fn protocol(p: &Option<String>, field: &str, s: &mut Sink<'_>) -> model::Protocol {
    match p.as_deref() {
        None | Some("" | "TCP") => model::Protocol::Tcp,
        Some("UDP") => model::Protocol::Udp,
        Some("SCTP") => model::Protocol::Sctp,
        Some(other) => {
            s.field(field, format!("{other:?} must be one of TCP, UDP, SCTP"));
            model::Protocol::Tcp
        }
    }
}

/// IANA_SVC_NAME as Kubernetes checks it: ≤15 chars, lowercase alphanumerics and '-', at least
/// one letter, no leading/trailing/double '-'.
pub(crate) fn is_port_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && n.bytes().any(|b| b.is_ascii_lowercase())
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--")
}

fn service_ports(spec: &core::ServiceSpec, s: &mut Sink<'_>) -> Vec<model::ServicePort> {
    let ports = spec.ports.clone().unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let several = ports.len() > 1;
    for (i, p) in ports.iter().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}].{f}");
        let port = port_number(p.port, &at("port"), s);
        let protocol = protocol(&p.protocol, &at("protocol"), s);
        let name = non_empty(&p.name);
        match &name {
            None if several => s.field(at("name"), "required when a Service has several ports"),
            Some(n) if !names.insert(n.clone()) => {
                s.field(at("name"), format!("{n:?} is used twice"))
            }
            _ => {}
        }
        if port != 0 && !seen.insert((port, protocol)) {
            s.field(at("port"), format!("{port}/{protocol:?} is listed twice"));
        }
        // Kubernetes defaults an unset, 0 or "" targetPort to the port itself.
        let target_port = match &p.target_port {
            None | Some(IntOrString::Int(0)) => model::TargetPort::Number(port),
            Some(IntOrString::String(n)) if n.is_empty() => model::TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                model::TargetPort::Number(port_number(*n, &at("targetPort"), s))
            }
            Some(IntOrString::String(n)) if is_port_name(n) => model::TargetPort::Name(n.clone()),
            Some(IntOrString::String(n)) => {
                s.field(
                    at("targetPort"),
                    format!("{n:?} is neither a port number nor a port name (IANA_SVC_NAME)"),
                );
                model::TargetPort::Number(port)
            }
        };
        out.push(model::ServicePort {
            name,
            protocol,
            port,
            target_port,
        });
    }
    out
}

fn cluster_ips(spec: &core::ServiceSpec, s: &mut Sink<'_>) -> Vec<IpAddr> {
    let list = spec.cluster_ips.clone().unwrap_or_default();
    let single = non_empty(&spec.cluster_ip);
    let fields: Vec<(String, String)> = if list.is_empty() {
        single
            .into_iter()
            .map(|ip| ("spec.clusterIP".to_owned(), ip))
            .collect()
    } else {
        if let Some(single) = &single
            && *single != list[0]
        {
            s.field(
                "spec.clusterIP",
                format!("{single} must equal spec.clusterIPs[0] ({})", list[0]),
            );
        }
        list.into_iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip))
            .collect()
    };
    let headless = fields.iter().any(|(_, ip)| ip == "None");
    let mut out: Vec<IpAddr> = Vec::new();
    for (field, text) in &fields {
        if text == "None" {
            if fields.len() > 1 {
                s.field(field, "\"None\" (headless) must be the only cluster IP");
            }
            continue;
        }
        match text.parse::<IpAddr>() {
            Ok(ip) if out.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) => {
                s.field(field, format!("{ip}: at most one cluster IP per IP family"))
            }
            Ok(ip) => out.push(ip),
            Err(_) => s.field(
                field,
                format!("{text:?} is not a valid IP address or \"None\""),
            ),
        }
    }
    if headless { Vec::new() } else { out }
}

pub(crate) fn service(
    o: &core::Service,
    key: model::ObjKey,
    s: &mut Sink<'_>,
) -> Option<model::Service> {
    checked(s, |s| {
        let spec = o.spec.clone().unwrap_or_default();
        let affinity_timeout_secs = match spec.session_affinity.as_deref() {
            None | Some("" | "None") => None,
            Some("ClientIP") => {
                let t = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                match t {
                    None => Some(DEFAULT_AFFINITY_TIMEOUT_SECS),
                    Some(t) if (1..=MAX_AFFINITY_TIMEOUT_SECS).contains(&t) => {
                        Some(t.unsigned_abs())
                    }
                    Some(t) => {
                        s.field(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!("{t} must be in 1..={MAX_AFFINITY_TIMEOUT_SECS}"),
                        );
                        None
                    }
                }
            }
            Some(other) => {
                s.field(
                    "spec.sessionAffinity",
                    format!("{other:?} must be None or ClientIP"),
                );
                None
            }
        };
        let annotations = map_or_empty(&o.metadata.annotations);
        if let Some(v) = annotations.get(model::lb::ANNOTATION_LB)
            && !matches!(v.as_str(), "random" | "maglev")
        {
            s.field(
                format!("metadata.annotations[\"{}\"]", model::lb::ANNOTATION_LB),
                format!("{v:?} must be random or maglev"),
            );
        }
        let internal_local = match spec.internal_traffic_policy.as_deref() {
            None | Some("" | "Cluster") => false,
            Some("Local") => true,
            Some(other) => {
                s.field(
                    "spec.internalTrafficPolicy",
                    format!("{other:?} must be Cluster or Local"),
                );
                false
            }
        };
        model::Service {
            key,
            cluster_ips: cluster_ips(&spec, s),
            ports: service_ports(&spec, s),
            annotations,
            affinity_timeout_secs,
            internal_local,
        }
    })
}

pub(crate) fn endpoint_slice(
    o: &discovery::EndpointSlice,
    key: model::ObjKey,
    s: &mut Sink<'_>,
) -> Option<model::EndpointSlice> {
    checked(s, |s| {
        let labels = map_or_empty(&o.metadata.labels);
        let service_name = labels.get(LABEL_SERVICE_NAME).cloned().unwrap_or_default();
        if service_name.is_empty() {
            s.field(
                format!("metadata.labels[\"{LABEL_SERVICE_NAME}\"]"),
                "required: names the Service this slice belongs to",
            );
        }
        let want_v4 = match o.address_type.as_str() {
            "IPv4" => Some(true),
            "IPv6" => Some(false),
            other => {
                s.field(
                    "addressType",
                    format!("{other:?} is not supported (IPv4 or IPv6)"),
                );
                None
            }
        };
        let mut ports = Vec::new();
        for (i, p) in o.ports.iter().flatten().enumerate() {
            let field = format!("ports[{i}].port");
            let port = match p.port {
                Some(v) => port_number(v, &field, s),
                None => {
                    s.field(
                        field,
                        "required: Comb does not support unrestricted (port-less) slices",
                    );
                    0
                }
            };
            let protocol = protocol(&p.protocol, &format!("ports[{i}].protocol"), s);
            ports.push(model::EndpointPort {
                name: non_empty(&p.name),
                protocol,
                port,
            });
        }
        let mut endpoints = Vec::new();
        for (i, e) in o.endpoints.iter().enumerate() {
            if e.addresses.is_empty() {
                s.field(
                    format!("endpoints[{i}].addresses"),
                    "at least one address is required",
                );
            }
            let mut addresses = Vec::new();
            for (j, text) in e.addresses.iter().enumerate() {
                let field = format!("endpoints[{i}].addresses[{j}]");
                match text.parse::<IpAddr>() {
                    Ok(ip) if want_v4.is_some_and(|v4| v4 != ip.is_ipv4()) => s.field(
                        field,
                        format!("{ip} does not match addressType {}", o.address_type),
                    ),
                    Ok(ip) => addresses.push(ip),
                    Err(_) => s.field(field, format!("{text:?} is not a valid IP address")),
                }
            }
            // Per the API docs an unknown (absent) ready condition is interpreted as ready,
            // serving mirrors ready, and terminating is false.
            let c = e.conditions.clone().unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            endpoints.push(model::Endpoint {
                addresses,
                ready,
                serving: c.serving.unwrap_or(ready),
                terminating: c.terminating.unwrap_or(false),
                node_name: non_empty(&e.node_name),
            });
        }
        model::EndpointSlice {
            key,
            service_name,
            ports,
            endpoints,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use comb_model::{ObjKey, Protocol, TargetPort};

    fn svc_ok(spec: &str) -> model::Service {
        let snap = load(&service_yaml(spec)).unwrap_or_else(|e| panic!("{e}"));
        snap.services[&ObjKey::new("apps", "web")].clone()
    }

    fn slice_ok(body: &str) -> model::EndpointSlice {
        let snap = load(&slice_yaml(body)).unwrap_or_else(|e| panic!("{e}"));
        snap.endpoint_slices[&ObjKey::new("apps", "web-1")].clone()
    }

    #[test]
    fn node_cidrs_parse() {
        let snap = load(NODE_A).unwrap();
        assert_eq!(
            snap.nodes["node-a"].pod_cidrs,
            ["198.18.1.0/24".parse::<IpNet>().unwrap()]
        );
        let e = one_error(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDRs: [10.0.0.0/8, bogus]}\n",
            1,
            Some("spec.podCIDRs[1]"),
        );
        assert!(e.message.contains("not a valid CIDR"), "{e}");
    }

    #[test]
    fn pod_defaults_and_annotations() {
        let text = pod_yaml(
            "p",
            "198.18.1.2",
            "comb.dev/splice: \"off\", comb.dev/cgroup: comb-lab-x/node-a/apps_p",
        );
        let snap = load(&text).unwrap();
        let p = &snap.pods[&ObjKey::new("apps", "p")];
        assert!(!p.splice);
        assert_eq!(p.cgroup.as_deref(), Some("comb-lab-x/node-a/apps_p"));
        assert_eq!(p.service_account, "default");
        assert_eq!(p.node_name.as_deref(), Some("node-a"));
        assert_eq!(p.ips, ["198.18.1.2".parse::<IpAddr>().unwrap()]);
        for (v, want) in [("on", true), ("true", true), ("false", false)] {
            let snap = load(&pod_yaml(
                "p",
                "198.18.1.2",
                &format!("comb.dev/splice: \"{v}\""),
            ))
            .unwrap();
            assert_eq!(snap.pods[&ObjKey::new("apps", "p")].splice, want, "{v}");
        }
    }

    #[test]
    fn pod_bad_splice_annotation() {
        let e = one_error(
            &pod_yaml("p", "198.18.1.2", "comb.dev/splice: maybe"),
            1,
            Some("metadata.annotations[\"comb.dev/splice\"]"),
        );
        assert!(e.message.contains("on, off, true, false"), "{e}");
    }

    #[test]
    fn l7_annotation_on_pods_and_namespaces() {
        let ns = |a: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: apps, annotations: {{{a}}}}}\n"
            )
        };
        let snap = load(&format!(
            "{}---\n{}",
            ns("comb.dev/l7: \"true\""),
            pod_yaml("p", "198.18.1.2", "comb.dev/l7: \"false\"")
        ))
        .unwrap();
        assert_eq!(snap.namespaces["apps"].annotations["comb.dev/l7"], "true");
        assert_eq!(
            snap.pods[&ObjKey::new("apps", "p")].annotations["comb.dev/l7"],
            "false"
        );
        let field = Some("metadata.annotations[\"comb.dev/l7\"]");
        let e = one_error(
            &pod_yaml("p", "198.18.1.2", "comb.dev/l7: \"yes\""),
            1,
            field,
        );
        assert!(
            e.message.contains("\"yes\" must be \"true\" or \"false\""),
            "{e}"
        );
        let e = one_error(&ns("comb.dev/l7: \"on\""), 1, field);
        assert!(e.message.contains("\"on\""), "{e}");
        let e = one_error(
            &format!("{NODE_A}---\n{}", ns("comb.dev/l7: \"TRUE\"")),
            2,
            field,
        );
        assert!(e.to_string().starts_with("m.yaml: document 2: "), "{e}");
    }

    fn owned_pod(refs: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-5d9c-x2x\n  namespace: apps\n  ownerReferences:\n{refs}spec: {{containers: []}}\n"
        )
    }

    #[test]
    fn pod_owner_is_the_controller_reference() {
        let text = owned_pod(
            "  - {apiVersion: v1, kind: Node, name: n1, uid: a}\n  - {apiVersion: apps/v1, kind: ReplicaSet, name: web-5d9c, uid: b, controller: true}\n",
        );
        let snap = load(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            snap.pods[&ObjKey::new("apps", "web-5d9c-x2x")].owner,
            Some(model::PodOwner {
                kind: "ReplicaSet".into(),
                name: "web-5d9c".into()
            })
        );
        let text = owned_pod("  - {apiVersion: v1, kind: Node, name: n1, uid: a}\n");
        let snap = load(&text).unwrap();
        assert_eq!(snap.pods[&ObjKey::new("apps", "web-5d9c-x2x")].owner, None);
        // Hand-written manifests may leave out the uid.
        let text = owned_pod("  - {kind: StatefulSet, name: db, controller: true}\n");
        let snap = load(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            snap.pods[&ObjKey::new("apps", "web-5d9c-x2x")]
                .owner
                .as_ref()
                .map(|o| o.name.as_str()),
            Some("db")
        );
        let e = one_error(
            &owned_pod(
                "  - {kind: A, name: a, controller: true}\n  - {kind: B, name: b, controller: true}\n",
            ),
            1,
            Some("metadata.ownerReferences[1].controller"),
        );
        assert!(e.message.contains("only one"), "{e}");
        one_error(
            &owned_pod("  - {kind: A, name: \"\", controller: true}\n"),
            1,
            Some("metadata.ownerReferences[0].name"),
        );
    }

    #[test]
    fn pod_bad_ip() {
        let e = one_error(
            &pod_yaml("p", "198.18.1.300", ""),
            1,
            Some("status.podIPs[0].ip"),
        );
        assert!(e.message.contains("not a valid IP"), "{e}");
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n";
        one_error(text, 1, Some("status.podIP"));
    }

    #[test]
    fn pod_ip_must_match_first_pod_ips() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.2}]}\n";
        one_error(text, 1, Some("status.podIP"));
    }

    #[test]
    fn pod_without_status_has_no_ips() {
        let snap = load("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [], serviceAccountName: sa}\n").unwrap();
        let p = &snap.pods[&ObjKey::new("default", "p")];
        assert!(p.ips.is_empty());
        assert_eq!(p.service_account, "sa");
        assert!(p.splice);
    }

    #[test]
    fn service_defaults() {
        let s = svc_ok("  clusterIP: 10.96.0.10\n  ports: [{port: 80}]\n");
        assert_eq!(s.cluster_ips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
        assert_eq!(s.ports[0].target_port, TargetPort::Number(80));
        assert_eq!(s.affinity_timeout_secs, None);
        assert!(!s.internal_local);
    }

    #[test]
    fn service_bad_lb_annotation() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: apps, annotations: {comb.dev/lb: roundrobin}}\nspec:\n  ports: [{port: 80}]\n";
        let e = one_error(text, 1, Some("metadata.annotations[\"comb.dev/lb\"]"));
        assert!(e.message.contains("random or maglev"), "{e}");
    }

    #[test]
    fn service_full() {
        let s = svc_ok(
            "  clusterIPs: [10.96.0.10, fd00::10]\n  ports:\n  - {name: http, port: 80, targetPort: web, protocol: TCP}\n  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}\n  sessionAffinity: ClientIP\n  internalTrafficPolicy: Local\n",
        );
        assert_eq!(s.cluster_ips.len(), 2);
        assert_eq!(s.ports[0].target_port, TargetPort::Name("web".into()));
        assert_eq!(s.ports[1].target_port, TargetPort::Number(5353));
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        assert_eq!(s.affinity_timeout_secs, Some(DEFAULT_AFFINITY_TIMEOUT_SECS));
        assert!(s.internal_local);
        let s = svc_ok(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        );
        assert_eq!(s.affinity_timeout_secs, Some(60));
    }

    #[test]
    fn service_headless() {
        assert!(
            svc_ok("  clusterIP: None\n  ports: [{port: 80}]\n")
                .cluster_ips
                .is_empty()
        );
        assert!(
            svc_ok("  clusterIP: None\n  clusterIPs: [None]\n")
                .cluster_ips
                .is_empty()
        );
    }

    #[test]
    fn service_port_out_of_range() {
        let e = one_error(
            &service_yaml("  ports: [{port: 70000}]\n"),
            1,
            Some("spec.ports[0].port"),
        );
        assert!(e.message.contains("70000 is not a valid port"), "{e}");
        one_error(
            &service_yaml("  ports: [{port: 80, targetPort: -1}]\n"),
            1,
            Some("spec.ports[0].targetPort"),
        );
    }

    #[test]
    fn service_bad_protocol() {
        let e = one_error(
            &service_yaml("  ports: [{port: 80, protocol: tcp}]\n"),
            1,
            Some("spec.ports[0].protocol"),
        );
        assert!(e.message.contains("TCP, UDP, SCTP"), "{e}");
    }

    #[test]
    fn service_bad_target_port_name() {
        one_error(
            &service_yaml("  ports: [{port: 80, targetPort: \"8080\"}]\n"),
            1,
            Some("spec.ports[0].targetPort"),
        );
        one_error(
            &service_yaml("  ports: [{port: 80, targetPort: Web_Port}]\n"),
            1,
            Some("spec.ports[0].targetPort"),
        );
    }

    #[test]
    fn service_port_names_required_and_unique() {
        one_error(
            &service_yaml("  ports: [{name: a, port: 80}, {port: 81}]\n"),
            1,
            Some("spec.ports[1].name"),
        );
        one_error(
            &service_yaml("  ports: [{name: a, port: 80}, {name: a, port: 81}]\n"),
            1,
            Some("spec.ports[1].name"),
        );
        one_error(
            &service_yaml("  ports: [{name: a, port: 80}, {name: b, port: 80}]\n"),
            1,
            Some("spec.ports[1].port"),
        );
    }

    #[test]
    fn service_bad_cluster_ips() {
        let e = one_error(
            &service_yaml("  clusterIP: 10.96.0.300\n"),
            1,
            Some("spec.clusterIP"),
        );
        assert!(e.message.contains("not a valid IP"), "{e}");
        one_error(
            &service_yaml("  clusterIPs: [10.96.0.1, nope]\n"),
            1,
            Some("spec.clusterIPs[1]"),
        );
        one_error(
            &service_yaml("  clusterIPs: [10.96.0.1, 10.96.0.2]\n"),
            1,
            Some("spec.clusterIPs[1]"),
        );
        one_error(
            &service_yaml("  clusterIP: 10.96.0.9\n  clusterIPs: [10.96.0.1]\n"),
            1,
            Some("spec.clusterIP"),
        );
        one_error(
            &service_yaml("  clusterIPs: [10.96.0.1, None]\n"),
            1,
            Some("spec.clusterIPs[1]"),
        );
    }

    #[test]
    fn service_bad_affinity_and_policy() {
        one_error(
            &service_yaml("  sessionAffinity: Sticky\n"),
            1,
            Some("spec.sessionAffinity"),
        );
        one_error(
            &service_yaml(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
            ),
            1,
            Some("spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
        );
        one_error(
            &service_yaml("  internalTrafficPolicy: Nearby\n"),
            1,
            Some("spec.internalTrafficPolicy"),
        );
    }

    #[test]
    fn service_errors_are_all_collected() {
        let errs = errors(&service_yaml(
            "  clusterIP: x\n  ports: [{port: 0, protocol: ICMP}]\n  internalTrafficPolicy: y\n",
        ));
        assert_eq!(errs.len(), 4, "{errs:#?}");
    }

    #[test]
    fn slice_conditions_default() {
        let s = slice_ok(
            "addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [198.18.1.2]\n  nodeName: node-a\n- addresses: [198.18.1.3]\n  conditions: {ready: false}\n- addresses: [198.18.1.4]\n  conditions: {ready: false, serving: true, terminating: true}\n",
        );
        assert_eq!(s.service_name, "web");
        assert_eq!(
            s.ports,
            [model::EndpointPort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 8080
            }]
        );
        let e = &s.endpoints;
        assert_eq!(
            (e[0].ready, e[0].serving, e[0].terminating),
            (true, true, false)
        );
        assert_eq!(e[0].node_name.as_deref(), Some("node-a"));
        assert_eq!(
            (e[1].ready, e[1].serving, e[1].terminating),
            (false, false, false)
        );
        assert_eq!(
            (e[2].ready, e[2].serving, e[2].terminating),
            (false, true, true)
        );
    }

    #[test]
    fn slice_ipv6() {
        let s = slice_ok("addressType: IPv6\nendpoints: [{addresses: [\"fd00::2\"]}]\n");
        assert!(s.endpoints[0].addresses[0].is_ipv6());
    }

    #[test]
    fn slice_requires_service_name_label() {
        let text = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\n";
        let e = one_error(
            text,
            1,
            Some("metadata.labels[\"kubernetes.io/service-name\"]"),
        );
        assert!(e.message.starts_with("required"), "{e}");
    }

    #[test]
    fn slice_bad_address_type() {
        let e = one_error(
            &slice_yaml("addressType: FQDN\nendpoints: []\n"),
            1,
            Some("addressType"),
        );
        assert!(e.message.contains("not supported"), "{e}");
    }

    #[test]
    fn slice_address_family_mismatch() {
        let e = one_error(
            &slice_yaml("addressType: IPv4\nendpoints: [{addresses: [\"fd00::2\"]}]\n"),
            1,
            Some("endpoints[0].addresses[0]"),
        );
        assert!(e.message.contains("does not match addressType IPv4"), "{e}");
        one_error(
            &slice_yaml("addressType: IPv4\nendpoints: [{addresses: [1.2.3]}]\n"),
            1,
            Some("endpoints[0].addresses[0]"),
        );
        one_error(
            &slice_yaml("addressType: IPv4\nendpoints: [{addresses: []}]\n"),
            1,
            Some("endpoints[0].addresses"),
        );
    }

    #[test]
    fn slice_bad_ports() {
        one_error(
            &slice_yaml("addressType: IPv4\nports: [{name: a}]\nendpoints: []\n"),
            1,
            Some("ports[0].port"),
        );
        one_error(
            &slice_yaml("addressType: IPv4\nports: [{port: 99999}]\nendpoints: []\n"),
            1,
            Some("ports[0].port"),
        );
        one_error(
            &slice_yaml("addressType: IPv4\nports: [{port: 80, protocol: QUIC}]\nendpoints: []\n"),
            1,
            Some("ports[0].protocol"),
        );
    }

    #[test]
    fn port_names() {
        assert!(is_port_name("http"));
        assert!(is_port_name("h2-c"));
        assert!(!is_port_name("8080"));
        assert!(!is_port_name("-a"));
        assert!(!is_port_name("a--b"));
        assert!(!is_port_name("abcdefghijklmnop"));
    }
}
