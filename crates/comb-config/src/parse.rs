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

fn parse_object(
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
    let Some(&(_, want)) = KINDS.iter().find(|(k, _)| *k == kind) else {
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
    if api_version != want {
        errors.push(err(
            Some("apiVersion"),
            format!("unsupported apiVersion {api_version:?} for {kind} (expected {want})"),
        ));
        return None;
    }
    let object = match kind.as_str() {
        "Namespace" => typed(json).map(Object::Namespace),
        "Node" => typed(json).map(Object::Node),
        "Pod" => typed(json).map(Object::Pod),
        "Service" => typed(json).map(Object::Service),
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
