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
