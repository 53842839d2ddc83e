//! k8s objects → YAML, for tools (the lab, `comb apply`) that write manifests the agents read.

use std::io::Write;
use std::path::Path;

use crate::object::Object;

/// Serializes objects as a multi-document YAML stream (`---` between documents).
pub fn to_yaml_documents(objects: &[Object]) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        // k8s-openapi types are plain data with string keys; serializing them cannot fail.
        out.push_str(&serde_yaml_ng::to_string(o).expect("k8s objects serialize to YAML"));
    }
    out
}

/// Writes a manifest file atomically (temporary file in the same directory, then rename), so an
/// agent hot-reloading the directory never reads half a file. The temporary name starts with
/// `.` and so is skipped by [`load_dir`](crate::load_dir).
pub fn write_manifest_file(path: &Path, objects: &[Object]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("manifest path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(to_yaml_documents(objects).as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::{load_dir, parse_file_text};

    fn sample() -> Vec<Object> {
        let text = format!(
            "{NODE_A}---\n{}---\n{}---\n{}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: apps}}\n---\n{}---\n{}",
            pod_yaml("p", "198.18.1.2", "comb.dev/splice: \"off\""),
            service_yaml("  clusterIP: None\n  ports: [{port: 80, targetPort: http}]\n"),
            slice_yaml(
                "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [198.18.1.2], conditions: {ready: true}}]\n"
            ),
            np_yaml(
                "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], ports: [{port: http}, {port: 80, endPort: 90, protocol: UDP}]}]\n  egress: []\n"
            ),
            // v1beta1 must be written back as v1beta1.
            ap_yaml(
                "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{from: [{source: {principals: [a], ipBlocks: []}}], to: [{operation: {ports: [\"80\"]}}], when: [{key: source.ip, notValues: [10.0.0.1]}]}]\n"
            )
            .replace("security.istio.io/v1", "security.istio.io/v1beta1"),
        );
        parse_file_text(Path::new(FILE), &text)
            .unwrap()
            .into_iter()
            .map(|d| d.object)
            .collect()
    }

    #[test]
    fn round_trip() {
        let objects = sample();
        let yaml = to_yaml_documents(&objects);
        let back =
            parse_file_text(Path::new("out.yaml"), &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let back: Vec<_> = back.into_iter().map(|d| d.object).collect();
        assert_eq!(back, objects);
        assert!(to_yaml_documents(&[]).is_empty());
        assert!(
            yaml.contains("apiVersion: security.istio.io/v1beta1"),
            "{yaml}"
        );
        assert!(yaml.contains("kind: NetworkPolicy"), "{yaml}");
    }

    #[test]
    fn write_manifest_file_is_loadable() {
        let dir = tempfile::tempdir().unwrap();
        let objects = sample();
        write_manifest_file(&dir.path().join("lab.yaml"), &objects).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["lab.yaml"], "no temporary file left behind");
        let docs = load_dir(dir.path()).unwrap();
        assert_eq!(docs.len(), objects.len());
        crate::load_snapshot(dir.path()).unwrap();
    }
}
