//! Documents → [`Snapshot`]: identity, duplicates, per-object conversion and the checks that
//! need more than one object (pod IPs against their node's pod CIDRs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use comb_model::{ObjKey, Snapshot};

use crate::convert;
use crate::error::{ConfigError, ConfigErrors, Sink};
use crate::object::{Document, Object};
use crate::parse::load_dir_partial;

/// Namespace for namespaced objects that name none, as `kubectl apply` would use.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Validates across objects and converts to Comb's model. All errors are collected.
pub fn build_snapshot(docs: &[Document]) -> Result<Snapshot, ConfigErrors> {
    let mut errors = Vec::new();
    let snapshot = build_partial(docs, &mut errors);
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
    let snapshot = build_partial(&docs, &mut errors);
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

fn build_partial(docs: &[Document], errors: &mut Vec<ConfigError>) -> Snapshot {
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
                snap.namespaces.insert(key.name, convert::namespace(o));
            }
            Object::Node(o) => {
                if let Some(n) = convert::node(o, &mut s) {
                    snap.nodes.insert(key.name, n);
                }
            }
            Object::Service(o) => {
                if let Some(v) = convert::service(o, key.clone(), &mut s) {
                    snap.services.insert(key, v);
                }
            }
            Object::EndpointSlice(o) => {
                if let Some(v) = convert::endpoint_slice(o, key.clone(), &mut s) {
                    snap.endpoint_slices.insert(key, v);
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
