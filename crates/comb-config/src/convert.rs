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
fn checked<T>(s: &mut Sink<'_>, f: impl FnOnce(&mut Sink<'_>) -> T) -> Option<T> {
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

pub(crate) fn namespace(o: &core::Namespace) -> model::Namespace {
    model::Namespace {
        name: o.metadata.name.clone().unwrap_or_default(),
        labels: map_or_empty(&o.metadata.labels),
    }
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
        model::Node {
            name: o.metadata.name.clone().unwrap_or_default(),
            pod_cidrs,
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
            annotations,
            node_name: spec.and_then(|sp| non_empty(&sp.node_name)),
            service_account,
            ips: pod_ips(o, s).into_iter().map(|(ip, _)| ip).collect(),
            splice,
        }
    })
}

fn port_number(v: i32, field: &str, s: &mut Sink<'_>) -> u16 {
    match u16::try_from(v) {
        Ok(p) if p != 0 => p,
        _ => {
            s.field(field, format!("{v} is not a valid port (1..=65535)"));
            0
        }
    }
}

fn protocol(p: &Option<String>, field: &str, s: &mut Sink<'_>) -> model::Protocol {
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
fn is_port_name(n: &str) -> bool {
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
            annotations: map_or_empty(&o.metadata.annotations),
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
