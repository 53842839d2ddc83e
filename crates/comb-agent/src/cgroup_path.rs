//! Cgroup paths relative to the cgroup root: one spelling for comparing with what the
//! datapath reports, one for people.

use std::path::{Path, PathBuf};

/// A cgroup path relative to the cgroup root in the datapath's spelling: no leading or
/// trailing slashes, and exactly `/` for the root itself. One spelling, so the reconciler can
/// compare it with what the datapath reports.
pub fn normalize_cgroup(p: &Path) -> PathBuf {
    let rel: PathBuf = p
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    if rel.as_os_str().is_empty() {
        PathBuf::from("/")
    } else {
        rel
    }
}

/// For people: `/comb-lab-x/n1`, `/`.
pub fn display_cgroup(p: &Path) -> String {
    Path::new("/").join(p).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_and_a_display() {
        assert_eq!(normalize_cgroup(Path::new("/a/b/")), PathBuf::from("a/b"));
        assert_eq!(normalize_cgroup(Path::new("/")), PathBuf::from("/"));
        assert_eq!(normalize_cgroup(Path::new("")), PathBuf::from("/"));
        assert_eq!(display_cgroup(Path::new("/")), "/");
        assert_eq!(display_cgroup(Path::new("a/b")), "/a/b");
    }
}
