//! Objects read from the Kubernetes API, into the same parse and validation path as
//! manifests. The API gives one object at a time, without a file: the object's kind and
//! namespace/name stand where a manifest error names its file and document, and a source
//! builds State from every object's last good version ([`build_objects`]).
//!
//! What the server adds (metadata.managedFields, resourceVersion, uid, defaulted spec
//! fields, status) is all known to k8s-openapi's types and passes the unknown-field check;
//! the two things that need translating first are done here: EndpointSlices served as
//! `discovery.k8s.io/v1beta1` (Kubernetes ≤ 1.24) and the `status` the Istio CRDs carry.

use std::path::{Path, PathBuf};

use comb_model::Snapshot;
use serde_json::Value;

use crate::error::{ConfigError, ConfigErrors};
use crate::object::Document;
use crate::parse::parse_object;
use crate::snapshot::build_partial;
use crate::{istio, istio_peer_auth};

/// Where an API object's errors point: `Pod apps/web-0`, `Namespace apps`. Used as the
/// error's `file`, with document 0, so messages read `Pod apps/web-0: spec.x: ...`.
pub fn api_origin(kind: &str, namespace: Option<&str>, name: &str) -> PathBuf {
    match namespace.filter(|n| !n.is_empty()) {
        Some(ns) => PathBuf::from(format!("{kind} {ns}/{name}")),
        None => PathBuf::from(format!("{kind} {name}")),
    }
}

/// One object as the API server returned it (`apiVersion` and `kind` set), parsed and
/// checked as a manifest document would be. Errors name `origin`.
pub fn parse_api_object(origin: &Path, mut json: Value) -> Result<Document, ConfigErrors> {
    normalize(&mut json);
    let mut errors = Vec::new();
    match parse_object(origin, 0, &json, &mut errors) {
        Some(object) if errors.is_empty() => Ok(Document {
            file: origin.to_path_buf(),
            index: 0,
            object,
        }),
        _ => Err(ConfigErrors(errors)),
    }
}

/// State from documents that each parsed on their own, and the cross-object and conversion
/// errors of those that were left out (the rest of State is built regardless).
pub fn build_objects<'d>(
    docs: impl IntoIterator<Item = &'d Document>,
) -> (Snapshot, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let snapshot = build_partial(docs, &mut errors);
    (snapshot, errors)
}

/// Server-side shapes → the shapes the manifests parser reads.
fn normalize(json: &mut Value) {
    let Value::Object(map) = json else {
        return;
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("");
    match (api_version, kind) {
        ("discovery.k8s.io/v1beta1", "EndpointSlice") => endpoint_slice_v1beta1(map),
        // Written by Istio's controllers, not by the policy's author; Comb does not read it.
        (_, istio::KIND | istio_peer_auth::KIND) => {
            map.remove("status");
        }
        _ => {}
    }
}

/// discovery.k8s.io/v1beta1 → v1 as the API server converts it: `endpoints[].topology`
/// becomes `deprecatedTopology`, except its `kubernetes.io/hostname` and
/// `topology.kubernetes.io/zone`, which become `nodeName` and `zone` (1.20's controller
/// fills only the topology); everything else has the same name and meaning.
fn endpoint_slice_v1beta1(map: &mut serde_json::Map<String, Value>) {
    map.insert("apiVersion".into(), "discovery.k8s.io/v1".into());
    let Some(Value::Array(endpoints)) = map.get_mut("endpoints") else {
        return;
    };
    for ep in endpoints {
        let Value::Object(ep) = ep else { continue };
        let Some(mut topology) = ep.remove("topology") else {
            continue;
        };
        if let Value::Object(t) = &mut topology {
            for (label, field) in [
                ("kubernetes.io/hostname", "nodeName"),
                ("topology.kubernetes.io/zone", "zone"),
            ] {
                if let Some(v) = t.remove(label)
                    && !ep.contains_key(field)
                {
                    ep.insert(field.into(), v);
                }
            }
            if t.is_empty() {
                continue;
            }
        }
        ep.insert("deprecatedTopology".into(), topology);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Object;
    use comb_model::ObjKey;
    use serde_json::json;

    /// A Pod as kube-apiserver 1.20 returns it after `kubectl apply` and a status write:
    /// managedFields, defaulted spec fields, status with conditions.
    fn api_pod() -> Value {
        json!({
          "apiVersion": "v1", "kind": "Pod",
          "metadata": {
            "name": "web-0", "namespace": "apps", "uid": "5f1c0d1e-8a43-4b0c-9f55-0d8e3cfc2a11",
            "resourceVersion": "1234", "creationTimestamp": "2026-12-04T23:50:00Z",
            "labels": {"app": "web"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\"}\n"},
            "managedFields": [{
              "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
              "time": "2026-12-04T23:50:00Z", "fieldsType": "FieldsV1",
              "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                           "f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}}}}}
            }]
          },
          "spec": {
            "nodeName": "node1",
            "containers": [{"name": "c", "image": "none", "resources": {},
              "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
              "terminationMessagePath": "/dev/termination-log",
              "terminationMessagePolicy": "File", "imagePullPolicy": "Always"}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst", "serviceAccountName": "default",
            "serviceAccount": "default", "securityContext": {}, "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"
          },
          "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null,
                            "lastTransitionTime": "2026-12-04T23:50:01Z"}],
            "podIP": "198.18.1.2", "podIPs": [{"ip": "198.18.1.2"}], "qosClass": "BestEffort"
          }
        })
    }

    fn origin() -> PathBuf {
        api_origin("Pod", Some("apps"), "web-0")
    }

    #[test]
    fn server_populated_pod_converts() {
        let doc = parse_api_object(&origin(), api_pod()).unwrap_or_else(|e| panic!("{e}"));
        let (snap, errors) = build_objects([&doc]);
        assert!(errors.is_empty(), "{errors:?}");
        let pod = &snap.pods[&ObjKey::new("apps", "web-0")];
        assert_eq!(pod.node_name.as_deref(), Some("node1"));
        assert_eq!(pod.ips, ["198.18.1.2".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(pod.labels["app"], "web");
    }

    #[test]
    fn errors_name_the_object() {
        let mut pod = api_pod();
        pod["status"]["podIPs"][0]["ip"] = json!("not-an-ip");
        pod["status"]["podIP"] = json!("not-an-ip");
        let doc = parse_api_object(&origin(), pod).unwrap();
        let (snap, errors) = build_objects([&doc]);
        assert!(snap.pods.is_empty());
        assert!(
            errors.iter().any(|e| e
                .to_string()
                .starts_with("Pod apps/web-0: status.podIPs[0].ip: ")),
            "{errors:?}"
        );
        let mut pod = api_pod();
        pod["spec"]["nodeNme"] = json!("x");
        let e = parse_api_object(&origin(), pod).unwrap_err();
        assert_eq!(e.to_string(), "Pod apps/web-0: spec.nodeNme: unknown field");
    }

    fn slice(api_version: &str, topology_key: &str) -> Value {
        json!({
          "apiVersion": api_version, "kind": "EndpointSlice",
          "metadata": {"name": "web-abcde", "namespace": "apps", "generateName": "web-",
            "resourceVersion": "99", "generation": 1,
            "labels": {"kubernetes.io/service-name": "web",
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
              "uid": "0d6f5c64-5f1e-4a0a-9c7e-6c2b0c5d9e01", "controller": true,
              "blockOwnerDeletion": true}]},
          "addressType": "IPv4",
          "endpoints": [{"addresses": ["198.18.1.2"],
                         "conditions": {"ready": true, "serving": true, "terminating": false},
                         topology_key: {"kubernetes.io/hostname": "node1", "rack": "r1"},
                         "nodeName": "node1",
                         "targetRef": {"kind": "Pod", "namespace": "apps", "name": "web-0",
                                       "uid": "5f1c0d1e-8a43-4b0c-9f55-0d8e3cfc2a11",
                                       "resourceVersion": "1234"}}],
          "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
        })
    }

    #[test]
    fn endpoint_slice_v1beta1_and_v1_read_the_same() {
        let o = api_origin("EndpointSlice", Some("apps"), "web-abcde");
        let beta = parse_api_object(&o, slice("discovery.k8s.io/v1beta1", "topology")).unwrap();
        let v1 = parse_api_object(&o, slice("discovery.k8s.io/v1", "deprecatedTopology")).unwrap();
        let Object::EndpointSlice(b) = &beta.object else {
            panic!("{beta:?}")
        };
        assert_eq!(b.endpoints[0].node_name.as_deref(), Some("node1"));
        let rest = b.endpoints[0].deprecated_topology.as_ref().unwrap();
        assert_eq!(rest.len(), 1, "{rest:?}");
        assert_eq!(rest["rack"], "r1");
        let (snap_b, eb) = build_objects([&beta]);
        let (snap_1, e1) = build_objects([&v1]);
        assert!(eb.is_empty() && e1.is_empty(), "{eb:?} {e1:?}");
        assert_eq!(snap_b, snap_1);
        let key = ObjKey::new("apps", "web-abcde");
        assert_eq!(snap_b.endpoint_slices[&key].endpoints.len(), 1);
        // A v1 slice still refuses the beta field name: nothing is renamed there.
        let e = parse_api_object(&o, slice("discovery.k8s.io/v1", "topology")).unwrap_err();
        assert!(
            e.to_string()
                .contains("endpoints[0].topology: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn istio_status_is_ignored_and_spec_checked() {
        let o = api_origin("AuthorizationPolicy", Some("apps"), "deny-all");
        let ap = json!({
          "apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
          "metadata": {"name": "deny-all", "namespace": "apps", "generation": 2,
                       "resourceVersion": "7", "uid": "1b9a0c9e-2f0d-4a55-8d7e-5d0c4b3a2f10"},
          "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                   "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]},
          "status": {"validationMessages": [{"type": {"code": "IST0101"}}]}
        });
        let doc = parse_api_object(&o, ap.clone()).unwrap_or_else(|e| panic!("{e}"));
        let (snap, errors) = build_objects([&doc]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(snap.authorization_policies.len(), 1);
        let mut bad = ap;
        bad["spec"]["action"] = json!("MAYBE");
        let e = parse_api_object(&o, bad).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("AuthorizationPolicy apps/deny-all: spec.action: unknown variant"),
            "{e}"
        );
    }

    #[test]
    fn cluster_scoped_origin_has_no_namespace() {
        assert_eq!(
            api_origin("Namespace", None, "apps"),
            Path::new("Namespace apps")
        );
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
          "metadata": {"name": "apps", "resourceVersion": "5", "labels": {"kubernetes.io/metadata.name": "apps"}},
          "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        let doc = parse_api_object(&api_origin("Namespace", None, "apps"), ns).unwrap();
        let (snap, errors) = build_objects([&doc]);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(snap.namespaces.contains_key("apps"));
    }

    /// Objects exactly as kube-apiserver 1.20.2 served them (`kubectl get -o json` after
    /// `kubectl apply`, the pod's status written as a kubelet does, the slice made by the
    /// EndpointSlice controller): they convert together without an error.
    #[test]
    fn objects_served_by_kube_apiserver_1_20() {
        let fixtures = [
            include_str!("testdata/api-1.20/namespace.json"),
            include_str!("testdata/api-1.20/pod.json"),
            include_str!("testdata/api-1.20/service.json"),
            include_str!("testdata/api-1.20/endpointslice-v1beta1.json"),
            include_str!("testdata/api-1.20/networkpolicy.json"),
            include_str!("testdata/api-1.20/authorizationpolicy.json"),
        ];
        let docs: Vec<Document> = fixtures
            .iter()
            .map(|text| {
                let json: Value = serde_json::from_str(text).unwrap();
                assert!(json["metadata"]["managedFields"].is_array());
                let meta = &json["metadata"];
                let origin = api_origin(
                    json["kind"].as_str().unwrap(),
                    meta["namespace"].as_str(),
                    meta["name"].as_str().unwrap(),
                );
                parse_api_object(&origin, json).unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        let (snap, errors) = build_objects(&docs);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(snap.namespaces.contains_key("apps"));
        let pod = &snap.pods[&ObjKey::new("apps", "web-0")];
        assert_eq!(pod.node_name.as_deref(), Some("node1"));
        assert_eq!(pod.ips.len(), 1);
        assert_eq!(pod.ports[0].name.as_deref(), Some("http"));
        let svc = &snap.services[&ObjKey::new("apps", "web")];
        assert_eq!(svc.cluster_ips.len(), 1);
        let slice = snap.endpoint_slices.values().next().unwrap();
        assert_eq!(slice.service_name, "web");
        assert_eq!(slice.endpoints[0].addresses, pod.ips);
        // From the v1beta1 topology, as the API server's own conversion does.
        assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("node1"));
        assert_eq!(snap.network_policies.len(), 1);
        assert_eq!(snap.authorization_policies.len(), 1);
    }
}
