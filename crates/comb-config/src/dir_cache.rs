//! A manifests directory read incrementally: each file is parsed again only when it changed
//! (inode, size, mtime), so an edit to one policy in a directory of thousands of objects costs
//! the parse of that file plus the cross-object checks, not a parse of everything.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use comb_model::Snapshot;

use crate::error::{ConfigError, ConfigErrors};
use crate::object::Document;
use crate::parse::{manifest_files, parse_partial};
use crate::snapshot::build_partial;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

struct Parsed {
    stamp: Stamp,
    docs: Vec<Document>,
    errors: Vec<ConfigError>,
}

/// The same result as [`crate::load_snapshot`], computed from cached per-file parses.
#[derive(Default)]
pub struct DirCache {
    files: HashMap<PathBuf, Parsed>,
}

impl DirCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parse `file` again at the next load even if its stamp is unchanged (a rewrite that
    /// kept inode, size and mtime).
    pub fn forget(&mut self, file: &Path) {
        self.files.remove(file);
    }

    /// Files whose stamp is unchanged are not read again.
    pub fn load(&mut self, dir: &Path) -> Result<Snapshot, ConfigErrors> {
        let mut errors = Vec::new();
        let files = match manifest_files(dir) {
            Ok(f) => f,
            Err(e) => {
                return Err(ConfigErrors(vec![ConfigError::new(
                    dir,
                    0,
                    None,
                    format!("cannot read directory: {e}"),
                )]));
            }
        };
        self.files.retain(|p, _| files.contains(p));
        for file in &files {
            let stamp = match std::fs::metadata(file) {
                Ok(m) => Stamp {
                    ino: m.ino(),
                    len: m.len(),
                    mtime: m.modified().ok(),
                },
                Err(e) => {
                    self.files.remove(file);
                    errors.push(ConfigError::new(file, 0, None, format!("cannot read: {e}")));
                    continue;
                }
            };
            if self.files.get(file).is_some_and(|p| p.stamp == stamp) {
                continue;
            }
            let mut file_errors = Vec::new();
            let docs = match std::fs::read_to_string(file) {
                Ok(text) => parse_partial(file, &text, &mut file_errors),
                Err(e) => {
                    file_errors.push(ConfigError::new(file, 0, None, format!("cannot read: {e}")));
                    Vec::new()
                }
            };
            self.files.insert(
                file.clone(),
                Parsed {
                    stamp,
                    docs,
                    errors: file_errors,
                },
            );
        }
        // In name order, as load_dir reads them, so errors and duplicates come out the same.
        let parsed: Vec<&Parsed> = files.iter().filter_map(|f| self.files.get(f)).collect();
        for p in &parsed {
            errors.extend(p.errors.iter().cloned());
        }
        let snapshot = build_partial(parsed.iter().flat_map(|p| p.docs.iter()), &mut errors);
        if errors.is_empty() {
            Ok(snapshot)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn same_result_as_a_full_load_and_only_changed_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), NODE_A).unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        )
        .unwrap();
        let mut cache = DirCache::new();
        let first = cache.load(dir.path()).unwrap();
        assert_eq!(first, crate::load_snapshot(dir.path()).unwrap());

        // A broken file: the same errors as a full load; the good file's parse is reused.
        std::fs::write(dir.path().join("b.yaml"), "kind: Namespace\nmetadata: [\n").unwrap();
        let cached = cache.load(dir.path()).unwrap_err().to_string();
        let full = crate::load_snapshot(dir.path()).unwrap_err().to_string();
        assert_eq!(cached, full);

        // Removed files are forgotten.
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        let again = cache.load(dir.path()).unwrap();
        assert_eq!(again, crate::load_snapshot(dir.path()).unwrap());
        assert_eq!(cache.files.len(), 1);
        cache.forget(&dir.path().join("a.yaml"));
        assert!(cache.files.is_empty());
        assert_eq!(cache.load(dir.path()).unwrap(), again);
    }
}
