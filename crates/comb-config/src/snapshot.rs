//! Documents → [`Snapshot`]: identity, duplicates, per-object conversion and the checks that
//! need more than one object (pod IPs against their node's pod CIDRs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use comb_model::{ObjKey, Snapshot};

use crate::error::{ConfigError, ConfigErrors, Sink};
use crate::object::{Document, Object};
use crate::parse::load_dir_partial;
use crate::{convert, convert_policy, istio_peer_auth};

/// Namespace for namespaced objects that name none, as `kubectl apply` would use.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Validates across objects and converts to Comb's model. All errors are collected.
pub fn build_snapshot(docs: &[Document]) -> Result<Snapshot, ConfigErrors> {
    let mut errors = Vec::new();
    let snapshot = build_partial(docs.iter(), &mut errors);
    if errors.is_empty() {
        Ok(snapshot)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// [`load_dir`](crate::load_dir) then [`build_snapshot`], reporting the errors of both steps
/// together (documents that parsed are still cross-checked when others did not).
pub fn load_snapshot(dir: &Path) -> Result<Snapshot, ConfigErrors> {
    let mut errors = Vec::new();
    let docs = load_dir_partial(dir, &mut errors);
    let snapshot = build_partial(docs.iter(), &mut errors);
    if errors.is_empty() {
        Ok(snapshot)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The object's namespace/name, `None` (with an error) when it has no name.
fn identity(doc: &Document, errors: &mut Vec<ConfigError>) -> Option<ObjKey> {
    let meta = doc.object.metadata();
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        errors.push(ConfigError::new(
            &doc.file,
            doc.index,
            Some("metadata.name".into()),
            "required field is missing",
        ));
        return None;
    };
    let namespace = if doc.object.is_namespaced() {
        meta.namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
    } else {
        String::new()
    };
    Some(ObjKey { namespace, name })
}

pub(crate) fn build_partial<'d>(
    docs: impl IntoIterator<Item = &'d Document>,
    errors: &mut Vec<ConfigError>,
) -> Snapshot {
    let mut seen: HashMap<(&'static str, ObjKey), (&PathBuf, usize)> = HashMap::new();
    let mut unique = Vec::new();
    for doc in docs {
        let Some(key) = identity(doc, errors) else {
            continue;
        };
        let kind = doc.object.kind();
        match seen.get(&(kind, key.clone())) {
            Some((file, index)) => {
                let what = if key.namespace.is_empty() {
                    key.name.clone()
                } else {
                    key.to_string()
                };
                errors.push(ConfigError::new(
                    &doc.file,
                    doc.index,
                    Some("metadata.name".into()),
                    format!(
                        "duplicate {kind} {what}: already defined in {}: document {index}",
                        file.display()
                    ),
                ));
            }
            None => {
                seen.insert((kind, key.clone()), (&doc.file, doc.index));
                unique.push((doc, key));
            }
        }
    }

    let mut snap = Snapshot::default();
    // A cluster IP belongs to one Service (Kubernetes' allocator guarantees it; here two
    // manifests could claim the same one).
    let mut cluster_ips: HashMap<std::net::IpAddr, (ObjKey, &PathBuf, usize)> = HashMap::new();
    // Pods last: their IPs are checked against the nodes' pod CIDRs.
    unique.sort_by_key(|(doc, _)| matches!(doc.object, Object::Pod(_)));
    for (doc, key) in unique {
        let mut s = Sink {
            file: &doc.file,
            document: doc.index,
            errors,
        };
        match &doc.object {
            Object::Namespace(o) => {
                if let Some(ns) = convert::namespace(o, &mut s) {
                    snap.namespaces.insert(key.name, ns);
                }
            }
            Object::Node(o) => {
                if let Some(n) = convert::node(o, &mut s) {
                    snap.nodes.insert(key.name, n);
                }
            }
            Object::Service(o) => {
                if let Some(v) = convert::service(o, key.clone(), &mut s) {
                    let mut taken = false;
                    for ip in &v.cluster_ips {
                        if let Some((other, file, index)) = cluster_ips.get(ip) {
                            s.field(
                                "spec.clusterIP",
                                format!(
                                    "{ip} is already the cluster IP of Service {other} ({}: document {index})",
                                    file.display()
                                ),
                            );
                            taken = true;
                        }
                    }
                    if !taken {
                        for ip in &v.cluster_ips {
                            cluster_ips.insert(*ip, (key.clone(), &doc.file, doc.index));
                        }
                        snap.services.insert(key, v);
                    }
                }
            }
            Object::EndpointSlice(o) => {
                if let Some(v) = convert::endpoint_slice(o, key.clone(), &mut s) {
                    snap.endpoint_slices.insert(key, v);
                }
            }
            Object::NetworkPolicy(o) => {
                if let Some(v) = convert_policy::network_policy(o, key.clone(), &mut s) {
                    snap.network_policies.insert(key, v);
                }
            }
            Object::AuthorizationPolicy(o) => {
                if let Some(v) = convert_policy::authorization_policy(o, key.clone(), &mut s) {
                    snap.authorization_policies.insert(key, v);
                }
            }
            Object::PeerAuthentication(o) => {
                if let Some(v) = istio_peer_auth::peer_authentication(o, key.clone(), &mut s) {
                    snap.peer_authentications.insert(key, v);
                }
            }
            Object::Pod(o) => {
                let Some(pod) = convert::pod(o, key.clone(), &mut s) else {
                    continue;
                };
                if !check_pod_cidrs(o, &pod, &snap, &mut s) {
                    continue;
                }
                snap.pods.insert(key, pod);
            }
        }
    }
    snap
}

/// A pod on a known node with pod CIDRs must have its addresses inside them; a pod naming a
/// node we have no Node object for is accepted (standalone mode is lenient).
fn check_pod_cidrs(
    o: &k8s_openapi::api::core::v1::Pod,
    pod: &comb_model::Pod,
    snap: &Snapshot,
    s: &mut Sink<'_>,
) -> bool {
    let Some(node) = pod.node_name.as_ref().and_then(|n| snap.nodes.get(n)) else {
        return true;
    };
    if node.pod_cidrs.is_empty() {
        return true;
    }
    let mut ok = true;
    let mut scratch = Vec::new();
    let ips = convert::pod_ips(
        o,
        &mut Sink {
            file: s.file,
            document: s.document,
            errors: &mut scratch,
        },
    );
    for (ip, field) in ips {
        if !node.pod_cidrs.iter().any(|c| c.contains(&ip)) {
            let cidrs: Vec<String> = node.pod_cidrs.iter().map(ToString::to_string).collect();
            s.field(
                field,
                format!(
                    "{ip} is outside node {}'s pod CIDRs {}",
                    node.name,
                    cidrs.join(", ")
                ),
            );
            ok = false;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn happy_path_every_kind() {
        let text = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: apps, labels: {{team: a}}}}\n---\n{NODE_A}---\n{}---\n{}---\n{}",
            pod_yaml(
                "web-0",
                "198.18.1.2",
                "comb.dev/cgroup: lab/node-a/apps_web-0"
            ),
            service_yaml("  clusterIP: 10.96.0.10\n  ports: [{port: 80, targetPort: 8080}]\n"),
            slice_yaml(
                "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [198.18.1.2], nodeName: node-a}]\n"
            ),
        );
        let snap = load(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(snap.namespaces["apps"].labels["team"], "a");
        assert_eq!(snap.nodes.len(), 1);
        let key = ObjKey::new("apps", "web-0");
        assert_eq!(snap.pods[&key].labels["app"], "web");
        assert_eq!(snap.services[&ObjKey::new("apps", "web")].ports[0].port, 80);
        assert_eq!(
            snap.endpoint_slices[&ObjKey::new("apps", "web-1")]
                .endpoints
                .len(),
            1
        );
    }

    #[test]
    fn namespace_defaults_to_default() {
        let snap = load("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n").unwrap();
        assert!(
            snap.services
                .contains_key(&ObjKey::new(DEFAULT_NAMESPACE, "s"))
        );
        assert!(snap.namespaces.is_empty(), "namespaces need not exist");
    }

    #[test]
    fn duplicate_names_both_locations() {
        let text = format!(
            "{NODE_A}---\n{}---\n{}",
            pod_yaml("p", "198.18.1.2", ""),
            pod_yaml("p", "198.18.1.3", "")
        );
        let e = one_error(&text, 3, Some("metadata.name"));
        assert!(
            e.message
                .contains("duplicate Pod apps/p: already defined in m.yaml: document 2"),
            "{e}"
        );
        let e = one_error(&format!("{NODE_A}---\n{NODE_A}"), 2, Some("metadata.name"));
        assert!(e.message.contains("duplicate Node node-a"), "{e}");
    }

    #[test]
    fn cluster_ip_claimed_twice() {
        let svc = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: apps}}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{{port: 80}}]\n"
            )
        };
        let e = one_error(
            &format!("{}---\n{}", svc("a"), svc("b")),
            2,
            Some("spec.clusterIP"),
        );
        assert!(
            e.message.contains(
                "198.19.0.10 is already the cluster IP of Service apps/a (m.yaml: document 1)"
            ),
            "{e}"
        );
    }

    #[test]
    fn same_name_other_kind_or_namespace_is_fine() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: other}\n";
        let snap = load(text).unwrap();
        assert_eq!(snap.pods.len(), 2);
    }

    #[test]
    fn duplicates_across_files() {
        let docs_a = crate::parse_file_text(Path::new("a.yaml"), NODE_A).unwrap();
        let docs_b = crate::parse_file_text(Path::new("b.yaml"), NODE_A).unwrap();
        let errs = build_snapshot(&[docs_a, docs_b].concat()).unwrap_err();
        assert_eq!(
            errs.to_string(),
            "b.yaml: document 1: metadata.name: duplicate Node node-a: already defined in a.yaml: document 1"
        );
    }

    #[test]
    fn pod_ip_outside_node_cidrs() {
        // The pod comes first in the file: order must not matter.
        let text = format!("{}---\n{NODE_A}", pod_yaml("p", "198.18.9.5", ""));
        let e = one_error(&text, 1, Some("status.podIPs[0].ip"));
        assert_eq!(
            e.message,
            "198.18.9.5 is outside node node-a's pod CIDRs 198.18.1.0/24"
        );
    }

    #[test]
    fn pod_on_unknown_node_or_node_without_cidrs_is_fine() {
        load(&pod_yaml("p", "203.0.113.7", "")).unwrap();
        let text = format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\n---\n{}",
            pod_yaml("p", "203.0.113.7", "")
        );
        load(&text).unwrap();
    }

    #[test]
    fn programmatic_document_without_name() {
        let pod = k8s_openapi::api::core::v1::Pod::default();
        let doc = Document {
            file: "x".into(),
            index: 4,
            object: Object::Pod(pod),
        };
        let errs = build_snapshot(&[doc]).unwrap_err();
        assert_eq!(
            errs.to_string(),
            "x: document 4: metadata.name: required field is missing"
        );
    }

    /// A cheap stable-toolchain stand-in for the fuzz target: every prefix of a realistic
    /// file, and every single-character mutation of its first lines, must not panic.
    #[test]
    fn mangled_input_never_panics() {
        let text = format!(
            "{NODE_A}---\n{}---\n{}---\n{}",
            pod_yaml("web-0", "198.18.1.2", "comb.dev/splice: \"off\""),
            service_yaml("  clusterIP: 10.96.0.10\n  ports: [{port: 80, targetPort: http}]\n"),
            slice_yaml(
                "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [198.18.1.2]}]\n"
            ),
        );
        for (i, _) in text.char_indices() {
            let _ = load(&text[..i]);
        }
        for (i, _) in text.char_indices().take(200) {
            for c in [' ', ':', '-', '[', '{', '&', '*', '!', '0', '\n'] {
                let mut t = text.clone();
                t.replace_range(
                    i..i + t[i..].chars().next().unwrap().len_utf8(),
                    &c.to_string(),
                );
                let _ = load(&t);
            }
        }
    }
}
