//! Finding the combd binary a lab starts on its nodes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The combd binary shipped beside the running one: `comb` and `combd` both land in
/// `target/<profile>/` (or one install directory). A test binary runs from
/// `target/<profile>/deps/`, so its parent directory is tried too.
pub fn combd_path() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running binary")?;
    let dir = exe
        .parent()
        .context("the running binary has no directory")?;
    let candidates = candidates(dir);
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    bail!(
        "combd not found next to {} (looked at {}); build it with `cargo build --workspace --bins`",
        exe.display(),
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn candidates(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.join("combd")];
    if dir.file_name().is_some_and(|n| n == "deps")
        && let Some(up) = dir.parent()
    {
        out.push(up.join("combd"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_binaries_look_one_level_up() {
        assert_eq!(
            candidates(Path::new("/t/debug/deps")),
            [
                PathBuf::from("/t/debug/deps/combd"),
                PathBuf::from("/t/debug/combd")
            ]
        );
        assert_eq!(
            candidates(Path::new("/usr/bin")),
            [PathBuf::from("/usr/bin/combd")]
        );
    }
}
