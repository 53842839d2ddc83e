//! The lab's manifests as objects for an API server (Kubernetes mode): Namespaces first
//! (declared ones, and one for every namespace an object names without declaring it), then
//! everything else, then each Pod. EndpointSlices written as `discovery.k8s.io/v1` are
//! given as `v1beta1` to a server that serves only that (Kubernetes ≤ 1.20), so the same
//! lab files work against old and new servers.

use std::collections::BTreeSet;

use anyhow::Result;
use serde_yaml_ng::{Mapping, Value};

use crate::spec::PodSpec;

pub struct Prepared {
    /// Multi-document YAML; empty when there is nothing.
    pub namespaces: String,
    pub others: String,
    /// One document per Pod, in input order.
    pub pods: Vec<String>,
}

const SLICE_V1: &str = "discovery.k8s.io/v1";
const SLICE_V1BETA1: &str = "discovery.k8s.io/v1beta1";
/// Namespaces every API server has.
const BUILT_IN: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

/// `served`: `kubectl api-versions` output.
pub fn prepare(others: &[Value], pods: &[PodSpec], served: &str) -> Result<Prepared> {
    let slices_v1 = served.lines().any(|l| l.trim() == SLICE_V1);
    let mut declared = BTreeSet::new();
    let mut referenced = BTreeSet::new();
    let mut ns_docs = Vec::new();
    let mut other_docs = Vec::new();
    for o in others {
        if str_at(o, &["kind"]) == Some("Namespace") {
            if let Some(n) = str_at(o, &["metadata", "name"]) {
                declared.insert(n.to_owned());
            }
            ns_docs.push(o.clone());
            continue;
        }
        if let Some(n) = str_at(o, &["metadata", "namespace"]) {
            referenced.insert(n.to_owned());
        }
        let is_v1_slice = str_at(o, &["kind"]) == Some("EndpointSlice")
            && str_at(o, &["apiVersion"]) == Some(SLICE_V1);
        other_docs.push(if is_v1_slice && !slices_v1 {
            slice_to_v1beta1(o)
        } else {
            o.clone()
        });
    }
    referenced.extend(pods.iter().map(|p| p.namespace.clone()));
    for n in referenced {
        if !declared.contains(&n) && !BUILT_IN.contains(&n.as_str()) {
            ns_docs.push(serde_yaml_ng::from_str(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n"
            ))?);
        }
    }
    let pods = pods
        .iter()
        .map(|p| {
            let mut pod = p.manifest.clone();
            pod.status = None;
            // No kubectl here is told which namespace to use: say it in the object.
            pod.metadata.namespace = Some(p.namespace.clone());
            Ok(serde_json::to_string(&pod)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Prepared {
        namespaces: multi(&ns_docs)?,
        others: multi(&other_docs)?,
        pods,
    })
}

fn multi(docs: &[Value]) -> Result<String> {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(d)?);
    }
    Ok(out)
}

/// `discovery.k8s.io/v1` → `v1beta1`: an endpoint's `nodeName` and `zone` become its
/// `topology` labels (`hints` has no v1beta1 form in 1.20 and is dropped).
fn slice_to_v1beta1(slice: &Value) -> Value {
    let mut s = slice.clone();
    s["apiVersion"] = Value::from(SLICE_V1BETA1);
    if let Some(eps) = s.get_mut("endpoints").and_then(Value::as_sequence_mut) {
        for ep in eps {
            let Some(m) = ep.as_mapping_mut() else {
                continue;
            };
            let mut topology = Mapping::new();
            if let Some(node) = m.remove("nodeName") {
                topology.insert("kubernetes.io/hostname".into(), node);
            }
            if let Some(zone) = m.remove("zone") {
                topology.insert("topology.kubernetes.io/zone".into(), zone);
            }
            m.remove("hints");
            if !topology.is_empty() {
                m.insert("topology".into(), Value::Mapping(topology));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn inputs(text: &str) -> crate::spec::Inputs {
        crate::spec::parse(&[(PathBuf::from("lab.yaml"), text.to_owned())]).unwrap()
    }

    const LAB: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod}
spec: {nodeName: n1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: dev}
spec: {nodeName: n2, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other}
spec: {nodeName: n2, containers: [{name: c}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [198.18.1.2]
  conditions: {ready: true}
  nodeName: n1
  zone: z1
"#;

    #[test]
    fn namespaces_come_first_declared_or_made() {
        let i = inputs(LAB);
        let p = prepare(&i.others, &i.pods, "v1\ndiscovery.k8s.io/v1\n").unwrap();
        // prod as declared (with its labels); dev and shop made; default exists already.
        assert!(p.namespaces.contains("env: prod"), "{}", p.namespaces);
        assert_eq!(p.namespaces.matches("kind: Namespace").count(), 3);
        assert!(p.namespaces.contains("name: dev") && p.namespaces.contains("name: shop"));
        assert!(!p.namespaces.contains("name: default"));
        assert_eq!(p.pods.len(), 3);
        assert!(
            p.pods[2].contains(r#""namespace":"default""#),
            "{}",
            p.pods[2]
        );
        // Served as v1: unchanged.
        assert!(p.others.contains("apiVersion: discovery.k8s.io/v1\n"));
        assert!(p.others.contains("nodeName: n1"));
    }

    #[test]
    fn v1_slices_become_v1beta1_for_an_old_server() {
        let i = inputs(LAB);
        let p = prepare(&i.others, &i.pods, "v1\ndiscovery.k8s.io/v1beta1\n").unwrap();
        let slice: Value = serde_yaml_ng::from_str(p.others.trim_start_matches("---\n")).unwrap();
        assert_eq!(slice["apiVersion"], Value::from("discovery.k8s.io/v1beta1"));
        let ep = &slice["endpoints"][0];
        assert!(ep.get("nodeName").is_none() && ep.get("zone").is_none());
        assert_eq!(ep["topology"]["kubernetes.io/hostname"], Value::from("n1"));
        assert_eq!(
            ep["topology"]["topology.kubernetes.io/zone"],
            Value::from("z1")
        );
        assert_eq!(ep["conditions"]["ready"], Value::from(true));
    }
}
