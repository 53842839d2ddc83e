//! Reading the lab's input: multi-document Kubernetes YAML. Pods become lab pods; any other
//! object (Services, ...) is passed through to the manifests directory untouched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

use crate::naming::validate_object_name;

/// One pod as the lab needs it, plus the manifest it came from (written back with status).
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// containers[0].command followed by containers[0].args; empty = no process.
    pub command: Vec<String>,
    /// containers[0].env entries with a literal value.
    pub env: Vec<(String, String)>,
    pub manifest: Pod,
}

impl PodSpec {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Default)]
pub struct Inputs {
    pub pods: Vec<PodSpec>,
    /// Non-Pod documents, as YAML values.
    pub others: Vec<serde_yaml_ng::Value>,
    /// Annotations of Node manifests, by node name (the lab writes the Node objects itself).
    pub node_annotations: BTreeMap<String, BTreeMap<String, String>>,
}

/// Parse every document of every text; errors name the file and the 1-based document number.
pub fn parse(texts: &[(PathBuf, String)]) -> Result<Inputs> {
    let mut inputs = Inputs::default();
    for (path, text) in texts {
        parse_text(path, text, &mut inputs)?;
    }
    let mut seen = BTreeMap::new();
    for p in &inputs.pods {
        if seen.insert(p.key(), ()).is_some() {
            bail!("pod {} is defined twice", p.key());
        }
    }
    Ok(inputs)
}

fn parse_text(path: &Path, text: &str, inputs: &mut Inputs) -> Result<()> {
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let at = || format!("{} document {}", path.display(), i + 1);
        let value = serde_yaml_ng::Value::deserialize(doc)
            .with_context(|| format!("{}: invalid YAML", at()))?;
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default();
        if kind == "Node" {
            let node: k8s_openapi::api::core::v1::Node = serde_yaml_ng::from_value(value)
                .with_context(|| format!("{}: invalid Node", at()))?;
            let name = node
                .metadata
                .name
                .with_context(|| format!("{}: Node without metadata.name", at()))?;
            inputs
                .node_annotations
                .insert(name, node.metadata.annotations.unwrap_or_default());
            continue;
        }
        if kind != "Pod" {
            if kind.is_empty() {
                bail!("{}: missing `kind`", at());
            }
            inputs.others.push(value);
            continue;
        }
        let pod: Pod =
            serde_yaml_ng::from_value(value).with_context(|| format!("{}: invalid Pod", at()))?;
        inputs.pods.push(pod_spec(pod).with_context(at)?);
    }
    Ok(())
}

pub(crate) fn pod_spec(pod: Pod) -> Result<PodSpec> {
    let meta = &pod.metadata;
    let name = meta.name.clone().context("Pod without metadata.name")?;
    validate_object_name("pod name", &name)?;
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    validate_object_name("namespace", &namespace)?;
    let spec = pod.spec.as_ref();
    let node = spec
        .and_then(|s| s.node_name.clone())
        .with_context(|| format!("pod {namespace}/{name}: spec.nodeName is required in the lab"))?;
    validate_object_name("spec.nodeName", &node)
        .with_context(|| format!("pod {namespace}/{name}"))?;
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_string());
    let container = spec.and_then(|s| s.containers.first());
    let mut command: Vec<String> = container
        .and_then(|c| c.command.clone())
        .unwrap_or_default();
    let args = container.and_then(|c| c.args.clone()).unwrap_or_default();
    if command.is_empty() && !args.is_empty() {
        bail!("pod {namespace}/{name}: containers[0].args without command (the lab has no images)");
    }
    command.extend(args);
    let env = container
        .and_then(|c| c.env.as_ref())
        .map(|env| {
            env.iter()
                .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                .collect()
        })
        .unwrap_or_default();
    Ok(PodSpec {
        labels: meta.labels.clone().unwrap_or_default(),
        namespace,
        name,
        node,
        service_account,
        command,
        env,
        manifest: pod,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one(text: &str) -> Result<Inputs> {
        parse(&[(PathBuf::from("pods.yaml"), text.to_string())])
    }

    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  nodeName: n1
  containers:
  - name: c
    command: [python3, -m]
    args: [http.server, "8080"]
    env: [{name: A, value: b}]
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: prod}
spec:
  nodeName: n2
  serviceAccountName: dbsa
  containers: [{name: c}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80}]}
---
"#;

    #[test]
    fn parses_pods_and_keeps_others() {
        let inputs = parse_one(PODS).unwrap();
        assert_eq!(inputs.pods.len(), 2);
        let web = &inputs.pods[0];
        assert_eq!(web.key(), "default/web");
        assert_eq!(web.node, "n1");
        assert_eq!(web.service_account, "default");
        assert_eq!(web.labels["app"], "web");
        assert_eq!(web.command, ["python3", "-m", "http.server", "8080"]);
        assert_eq!(web.env, [("A".to_string(), "b".to_string())]);
        let db = &inputs.pods[1];
        assert_eq!(db.key(), "prod/db");
        assert_eq!(db.service_account, "dbsa");
        assert!(db.command.is_empty());
        assert_eq!(inputs.others.len(), 1);
    }

    #[test]
    fn missing_node_name_names_the_pod() {
        let err =
            parse_one("kind: Pod\nmetadata: {name: web}\nspec: {containers: []}\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("default/web") && msg.contains("nodeName"),
            "{msg}"
        );
        assert!(msg.contains("pods.yaml document 1"), "{msg}");
    }

    #[test]
    fn node_manifests_give_annotations_not_objects() {
        let text = format!(
            "{PODS}apiVersion: v1\nkind: Node\nmetadata:\n  name: n2\n  annotations: {{comb.dev/agent: \"false\"}}\n"
        );
        let inputs = parse_one(&text).unwrap();
        assert_eq!(inputs.others.len(), 1, "the Node is not passed through");
        assert_eq!(inputs.node_annotations["n2"]["comb.dev/agent"], "false");
        let err = parse_one("kind: Node\nmetadata: {}\n").unwrap_err();
        assert!(format!("{err:#}").contains("metadata.name"), "{err:#}");
    }

    #[test]
    fn duplicate_pods_are_rejected() {
        let doc = "kind: Pod\nmetadata: {name: web}\nspec: {nodeName: n1, containers: []}\n";
        let err = parse_one(&format!("{doc}---\n{doc}")).unwrap_err();
        assert!(format!("{err:#}").contains("twice"));
    }

    #[test]
    fn bad_yaml_names_document() {
        let err = parse_one("kind: Pod\n---\nkind: Pod\nmetadata: [\n").unwrap_err();
        assert!(format!("{err:#}").contains("document"), "{err:#}");
    }
}
