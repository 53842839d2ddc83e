//! Text → typed k8s objects: YAML splitting, apiVersion/kind dispatch, typed deserialization
//! with field paths, unknown-field detection.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::{Deserialize, DeserializeOwned};
use serde_json::Value;

use crate::error::{ConfigError, ConfigErrors};
use crate::object::{Document, KINDS, Object};
use crate::unknown_fields::first_unknown;

/// Parses every document of one file. Empty documents (e.g. a trailing `---`) are skipped but
/// still counted, so document numbers match what an editor shows between `---` lines.
pub fn parse_file_text(file: &Path, text: &str) -> Result<Vec<Document>, ConfigErrors> {
    let mut errors = Vec::new();
    let docs = parse_partial(file, text, &mut errors);
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Reads `*.yaml` / `*.yml` in `dir` (not recursive, hidden files skipped), sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<Document>, ConfigErrors> {
    let mut errors = Vec::new();
    let docs = load_dir_partial(dir, &mut errors);
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The manifest files of `dir`, sorted by file name. Dotfiles are skipped: editors and
/// Kubernetes volume mounts (`..data`) leave them around.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let ext_ok = name.ends_with(".yaml") || name.ends_with(".yml");
        // fs::metadata follows symlinks, so a symlinked manifest counts as a file.
        if ext_ok && !name.starts_with('.') && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Like [`load_dir`] but keeps the documents that parsed, so callers can go on validating.
pub(crate) fn load_dir_partial(dir: &Path, errors: &mut Vec<ConfigError>) -> Vec<Document> {
    let files = match manifest_files(dir) {
        Ok(f) => f,
        Err(e) => {
            errors.push(ConfigError::new(
                dir,
                0,
                None,
                format!("cannot read directory: {e}"),
            ));
            return Vec::new();
        }
    };
    let mut docs = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => docs.extend(parse_partial(&file, &text, errors)),
            Err(e) => errors.push(ConfigError::new(
                &file,
                0,
                None,
                format!("cannot read: {e}"),
            )),
        }
    }
    docs
}

pub(crate) fn parse_partial(
    file: &Path,
    text: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<Document> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let mut value = match serde_yaml_ng::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                // After a YAML error the stream cannot be resynchronised (the iterator would
                // repeat the error forever), so the rest of the file is not read.
                errors.push(yaml_error(file, index, &e));
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        if let Err(e) = value.apply_merge() {
            errors.push(yaml_error(file, index, &e));
            continue;
        }
        let json = match yaml_to_json(&value, &mut String::new()) {
            Ok(j) => j,
            Err((field, msg)) => {
                errors.push(ConfigError::new(file, index, non_root(field), msg));
                continue;
            }
        };
        if let Some(object) = parse_object(file, index, &json, errors) {
            docs.push(Document {
                file: file.to_path_buf(),
                index,
                object,
            });
        }
    }
    docs
}

fn yaml_error(file: &Path, index: usize, e: &serde_yaml_ng::Error) -> ConfigError {
    let mut msg = format!("invalid YAML: {e}");
    if let Some(loc) = e.location()
        && !msg.contains("line")
    {
        msg.push_str(&format!(" (line {}, column {})", loc.line(), loc.column()));
    }
    ConfigError::new(file, index, None, msg)
}

fn non_root(path: String) -> Option<String> {
    (!path.is_empty() && path != ".").then_some(path)
}

/// Converts to JSON's data model, which is what Kubernetes itself does with YAML
/// (sigs.k8s.io/yaml): scalar keys become strings; tags and non-finite floats are refused.
fn yaml_to_json(v: &serde_yaml_ng::Value, path: &mut String) -> Result<Value, (String, String)> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                match serde_json::Number::from_f64(f) {
                    Some(n) => Value::Number(n),
                    None => return Err((path.clone(), format!("unsupported number {n}"))),
                }
            }
        }
        Y::String(s) => Value::String(s.clone()),
        Y::Sequence(seq) => {
            let mut out = Vec::with_capacity(seq.len());
            for (i, item) in seq.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(yaml_to_json(item, path)?);
                path.truncate(len);
            }
            Value::Array(out)
        }
        Y::Mapping(map) => {
            let mut out = serde_json::Map::new();
            for (k, item) in map {
                let key = match k {
                    Y::String(s) => s.clone(),
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    _ => return Err((path.clone(), "mapping keys must be scalars".into())),
                };
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key);
                let value = yaml_to_json(item, path)?;
                path.truncate(len);
                if out.insert(key.clone(), value).is_some() {
                    return Err((path.clone(), format!("duplicate key {key:?}")));
                }
            }
            Value::Object(out)
        }
        Y::Tagged(t) => return Err((path.clone(), format!("YAML tag {} is not supported", t.tag))),
    })
}

pub(crate) fn parse_object(
    file: &Path,
    index: usize,
    json: &Value,
    errors: &mut Vec<ConfigError>,
) -> Option<Object> {
    let err = |field: Option<&str>, msg: String| {
        ConfigError::new(file, index, field.map(str::to_owned), msg)
    };
    let Value::Object(map) = json else {
        errors.push(err(None, "document is not a mapping".into()));
        return None;
    };
    let mut header = |name: &str| match map.get(name) {
        None | Some(Value::Null) => {
            errors.push(err(Some(name), "required field is missing".into()));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            errors.push(err(
                Some(name),
                format!("must be a string, not {}", type_name(other)),
            ));
            None
        }
    };
    let (api_version, kind) = (header("apiVersion"), header("kind"));
    let (api_version, kind) = (api_version?, kind?);
    let Some(&(_, versions)) = KINDS.iter().find(|(k, _)| *k == kind) else {
        let supported: Vec<_> = KINDS.iter().map(|(k, _)| *k).collect();
        errors.push(err(
            Some("kind"),
            format!(
                "unknown kind {kind:?} (supported: {})",
                supported.join(", ")
            ),
        ));
        return None;
    };
    if !versions.contains(&api_version.as_str()) {
        errors.push(err(
            Some("apiVersion"),
            format!(
                "unsupported apiVersion {api_version:?} for {kind} (expected {})",
                versions.join(" or ")
            ),
        ));
        return None;
    }
    let object = match kind.as_str() {
        "Namespace" => typed(json).map(Object::Namespace),
        "Node" => typed(json).map(Object::Node),
        "Pod" => typed(json).map(Object::Pod),
        "Service" => typed(json).map(Object::Service),
        "NetworkPolicy" => typed(json).map(Object::NetworkPolicy),
        "AuthorizationPolicy" => typed(json).map(Object::AuthorizationPolicy),
        "PeerAuthentication" => typed(json).map(Object::PeerAuthentication),
        _ => typed(json).map(Object::EndpointSlice),
    };
    match object {
        Ok(o) => {
            if o.metadata().name.as_deref().unwrap_or("").is_empty() {
                errors.push(err(
                    Some("metadata.name"),
                    "required field is missing".into(),
                ));
                return None;
            }
            Some(o)
        }
        Err((field, msg)) => {
            errors.push(ConfigError::new(file, index, field, msg));
            None
        }
    }
}

/// Deserializes with the failing field's path, then refuses fields the type does not know.
fn typed<T: DeserializeOwned + Serialize>(json: &Value) -> Result<T, (Option<String>, String)> {
    let t: T = serde_path_to_error::deserialize(json)
        .map_err(|e| (non_root(e.path().to_string()), e.inner().to_string()))?;
    match first_unknown(json, &t) {
        Some(path) => Err((Some(path), "unknown field".into())),
        None => Ok(t),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn broken_yaml_names_document_and_line() {
        let text = format!("{NODE_A}---\nkind: Pod\nmetadata: [unclosed\n");
        let e = one_error(&text, 2, None);
        assert!(e.message.starts_with("invalid YAML"), "{e}");
        assert!(e.message.contains("line 7"), "{e}");
    }

    #[test]
    fn not_a_mapping() {
        let e = one_error("- a\n- b\n", 1, None);
        assert_eq!(e.message, "document is not a mapping");
        let e = one_error(&format!("{NODE_A}---\njust a string\n"), 2, None);
        assert_eq!(e.message, "document is not a mapping");
    }

    #[test]
    fn empty_documents_are_skipped_but_counted() {
        let text = format!("---\n# only a comment\n---\n{NODE_A}---\n");
        let docs = parse_file_text(Path::new(FILE), &text).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].index, 2);
        assert!(parse_file_text(Path::new(FILE), "").unwrap().is_empty());
    }

    #[test]
    fn missing_api_version_and_kind_both_reported() {
        let errs = errors("metadata: {name: x}\n");
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_deref()).collect();
        assert_eq!(fields, [Some("apiVersion"), Some("kind")]);
        assert!(
            errs[0]
                .to_string()
                .contains("m.yaml: document 1: apiVersion: required")
        );
    }

    #[test]
    fn non_string_kind() {
        let e = one_error(
            "apiVersion: v1\nkind: 3\nmetadata: {name: x}\n",
            1,
            Some("kind"),
        );
        assert!(e.message.contains("must be a string"), "{e}");
    }

    #[test]
    fn unknown_kind() {
        let e = one_error(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n",
            1,
            Some("kind"),
        );
        assert!(e.message.contains("unknown kind \"Deployment\""), "{e}");
    }

    #[test]
    fn unsupported_api_version() {
        let e = one_error(
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: x}\n",
            1,
            Some("apiVersion"),
        );
        assert!(e.message.contains("expected discovery.k8s.io/v1"), "{e}");
        one_error(
            "apiVersion: v2\nkind: Pod\nmetadata: {name: x}\n",
            1,
            Some("apiVersion"),
        );
    }

    #[test]
    fn wrong_type_names_field_path() {
        let e = one_error(
            &service_yaml("  ports: [{port: x}]\n"),
            1,
            Some("spec.ports[0].port"),
        );
        assert!(
            e.message
                .contains("invalid type: string \"x\", expected i32"),
            "{e}"
        );
    }

    #[test]
    fn missing_required_k8s_field() {
        // k8s-openapi defaults a missing required scalar, so the range check reports it.
        let e = one_error(
            &service_yaml("  ports: [{name: http}]\n"),
            1,
            Some("spec.ports[0].port"),
        );
        assert!(e.message.contains("required"), "{e}");
    }

    #[test]
    fn unknown_field_reported() {
        let text = format!(
            "{NODE_A}---\n{}",
            pod_yaml("a", "198.18.1.2", "").replace("nodeName", "nodeNme")
        );
        let e = one_error(&text, 2, Some("spec.nodeNme"));
        assert_eq!(
            e.to_string(),
            "m.yaml: document 2: spec.nodeNme: unknown field"
        );
    }

    #[test]
    fn unknown_top_level_field() {
        one_error(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\nspce: {}\n",
            1,
            Some("spce"),
        );
    }

    #[test]
    fn missing_name() {
        one_error(
            "apiVersion: v1\nkind: Namespace\nmetadata: {labels: {a: b}}\n",
            1,
            Some("metadata.name"),
        );
        one_error(
            "apiVersion: v1\nkind: Namespace\n",
            1,
            Some("metadata.name"),
        );
    }

    #[test]
    fn yaml_tags_and_complex_keys_refused() {
        let e = one_error(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: !custom x}\n",
            1,
            Some("metadata.name"),
        );
        assert!(e.message.contains("tag"), "{e}");
        one_error(
            "apiVersion: v1\nkind: Namespace\nmetadata: {? [a]: b}\n",
            1,
            Some("metadata"),
        );
    }

    #[test]
    fn merge_keys_are_applied() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n  labels:\n    <<: {team: a}\n    env: prod\n";
        let snap = load(text).unwrap();
        assert_eq!(snap.namespaces["x"].labels.len(), 2);
    }

    #[test]
    fn errors_in_several_documents_all_reported() {
        let text = "apiVersion: v1\nkind: Bogus\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [], x: 1}\n";
        let errs = errors(text);
        assert_eq!(errs.iter().map(|e| e.document).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn load_dir_reads_yaml_files_sorted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.yml"), pod_yaml("p", "198.18.1.2", "")).unwrap();
        std::fs::write(dir.path().join("a.yaml"), NODE_A).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "not yaml: [").unwrap();
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let docs = load_dir(dir.path()).unwrap();
        let names: Vec<_> = docs
            .iter()
            .map(|d| d.file.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.yaml", "b.yml"]);
        let snap = crate::load_snapshot(dir.path()).unwrap();
        assert_eq!(snap.pods.len(), 1);
        assert_eq!(snap.nodes.len(), 1);
    }

    #[test]
    fn load_dir_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), NODE_A).unwrap();
        std::fs::write(dir.path().join("b.yaml"), "apiVersion: v1\nkind: Nope\n").unwrap();
        let errs = load_dir(dir.path()).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs.0[0].file, dir.path().join("b.yaml"));
        assert!(
            errs.to_string()
                .contains("b.yaml: document 1: kind: unknown kind")
        );
    }

    #[test]
    fn load_snapshot_combines_parse_and_build_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            format!("{NODE_A}---\n{}", pod_yaml("p", "198.18.9.5", "")),
        )
        .unwrap();
        std::fs::write(dir.path().join("b.yaml"), "apiVersion: v1\nkind: Nope\n").unwrap();
        let errs = crate::load_snapshot(dir.path()).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs}");
    }

    #[test]
    fn missing_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let errs = load_dir(&missing).unwrap_err();
        assert_eq!(errs.0[0].file, missing);
        assert_eq!(errs.0[0].document, 0);
        assert!(errs.to_string().contains("cannot read directory"));
    }
}
