//! Cgroup paths, shared by the features that attach to cgroups (splice, socket LB): which
//! relative paths are acceptable, opening one, and finding a cgroup by its id.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, ensure};

/// Pod cgroups are strictly below the cgroup root: never the root itself, never outside it.
pub(crate) fn validate_rel(rel: &Path) -> Result<()> {
    let normal = rel.components().all(|c| matches!(c, Component::Normal(_)));
    ensure!(
        normal && rel.components().next().is_some(),
        "cgroup path {} must be relative, non-empty and without `..` (the cgroup root itself is refused)",
        rel.display()
    );
    Ok(())
}

/// Open the cgroup directory at `path` (for attaching to it).
pub(crate) fn open_dir(path: &Path) -> Result<fs::File> {
    let cg = fs::File::open(path).with_context(|| format!("opening cgroup {}", path.display()))?;
    ensure!(
        cg.metadata()?.is_dir(),
        "{} is not a cgroup directory",
        path.display()
    );
    Ok(cg)
}

/// The inode number of `path`, which is its cgroup id on cgroup2.
pub(crate) fn id_of(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Find the cgroup with this id (its inode number on cgroup2) below `root`, as a relative path.
pub(crate) fn find(root: &Path, id: u64) -> Option<PathBuf> {
    fn walk(root: &Path, dir: &Path, id: u64, depth: usize) -> Option<PathBuf> {
        for e in fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            let Ok(md) = e.metadata() else { continue };
            if !md.is_dir() {
                continue;
            }
            if md.ino() == id {
                return p.strip_prefix(root).ok().map(Path::to_path_buf);
            }
            if depth > 0
                && let Some(found) = walk(root, &p, id, depth - 1)
            {
                return Some(found);
            }
        }
        None
    }
    walk(root, root, id, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_stay_below_the_root() {
        assert!(validate_rel(Path::new("comb-lab-x/node/ns_pod")).is_ok());
        for bad in ["", "/", "/sys/fs/cgroup", "a/../..", "..", "./"] {
            assert!(validate_rel(Path::new(bad)).is_err(), "{bad:?} accepted");
        }
    }
}
