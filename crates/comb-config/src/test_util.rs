//! Helpers shared by the unit tests.

use std::path::Path;

use comb_model::Snapshot;

use crate::{ConfigError, ConfigErrors, build_snapshot, parse_file_text};

pub const FILE: &str = "m.yaml";

/// Parses and builds `text` as file `m.yaml`.
pub fn load(text: &str) -> Result<Snapshot, ConfigErrors> {
    build_snapshot(&parse_file_text(Path::new(FILE), text)?)
}

/// All errors `text` produces (parse or build).
pub fn errors(text: &str) -> Vec<ConfigError> {
    match load(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    }
}

/// The one error `text` produces, checked to name the file, `document` and `field`.
#[track_caller]
pub fn one_error(text: &str, document: usize, field: Option<&str>) -> ConfigError {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    let e = errs.into_iter().next().unwrap();
    assert_eq!(e.file, Path::new(FILE));
    assert_eq!(e.document, document, "{e}");
    assert_eq!(e.field.as_deref(), field, "{e}");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("{FILE}: document {document}")),
        "{shown}"
    );
    if let Some(f) = field {
        assert!(shown.contains(f), "{shown}");
    }
    e
}

pub const NODE_A: &str = "apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 198.18.1.0/24, podCIDRs: [198.18.1.0/24]}
";

/// A Pod manifest on node-a with one IP.
pub fn pod_yaml(name: &str, ip: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: apps
  labels: {{app: web}}
  annotations: {{{annotations}}}
spec:
  nodeName: node-a
  containers: [{{name: c, image: busybox}}]
status:
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
"
    )
}

/// A Service manifest with the given `spec` body (indented by two spaces).
pub fn service_yaml(spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: apps}}\nspec:\n{spec}"
    )
}

/// An EndpointSlice manifest with the given body after metadata.
pub fn slice_yaml(body: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: apps\n  labels: {{kubernetes.io/service-name: web}}\n{body}"
    )
}

/// A NetworkPolicy `np` in namespace `apps` with the given `spec` body (indented by two
/// spaces).
pub fn np_yaml(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: apps}}\nspec:\n{spec}"
    )
}

/// An Istio AuthorizationPolicy `ap` in namespace `apps` with the given `spec` body
/// (indented by two spaces).
pub fn ap_yaml(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ap, namespace: apps}}\nspec:\n{spec}"
    )
}
