//! Lab cgroups (v2). All of them live under `<cgroup2>/comb-lab-<lab>`; nothing here writes
//! to the root cgroup's files. No controllers are enabled, so processes may sit in inner
//! nodes too (the "no internal processes" rule only applies with controllers).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::naming::CGROUP_PREFIX;

/// Refuse to operate on anything that is not a lab cgroup: a bug must not reach the root.
fn check_lab_path(root: &Path, cg: &Path) -> Result<()> {
    let rel = cg.strip_prefix(root).unwrap_or(Path::new(""));
    let first = rel
        .components()
        .next()
        .and_then(|c| c.as_os_str().to_str())
        .unwrap_or("");
    if !first.starts_with(CGROUP_PREFIX) {
        bail!("refusing to touch non-lab cgroup {}", cg.display());
    }
    Ok(())
}

pub fn create(root: &Path, cg: &Path) -> Result<()> {
    check_lab_path(root, cg)?;
    fs::create_dir_all(cg).with_context(|| format!("creating cgroup {}", cg.display()))
}

pub fn procs(cg: &Path) -> Vec<i32> {
    fs::read_to_string(cg.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether any process is in `cg` or below (cgroup.events `populated`).
pub fn populated(cg: &Path) -> bool {
    match fs::read_to_string(cg.join("cgroup.events")) {
        Ok(s) => s.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => false,
    }
}

/// Every pid in `cg` and its descendants.
pub fn procs_recursive(cg: &Path) -> Vec<i32> {
    let mut out = procs(cg);
    for child in subdirs(cg) {
        out.extend(procs_recursive(&child));
    }
    out
}

fn subdirs(cg: &Path) -> Vec<PathBuf> {
    fs::read_dir(cg)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL everything in `cg` and below (cgroup.kill, kernel ≥ 5.14), then wait until empty.
/// Exited children count as gone here (the kernel unlinks them from the cgroup at exit); the
/// lab reaps its own children separately, by pid, so it never steals another thread's child.
/// Falls back to killing the listed pids one by one when cgroup.kill is missing.
pub fn kill_all(root: &Path, cg: &Path, timeout: Duration) -> Result<()> {
    check_lab_path(root, cg)?;
    if !cg.exists() {
        return Ok(());
    }
    if fs::write(cg.join("cgroup.kill"), "1").is_err() {
        for pid in procs_recursive(cg) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let deadline = Instant::now() + timeout;
    while populated(cg) {
        if Instant::now() > deadline {
            bail!(
                "cgroup {} still has processes {:?}",
                cg.display(),
                procs_recursive(cg)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// rmdir bottom-up (cgroup directories can only be removed empty, and their files can't be).
pub fn remove_tree(root: &Path, cg: &Path) -> Result<()> {
    check_lab_path(root, cg)?;
    if !cg.exists() {
        return Ok(());
    }
    for child in subdirs(cg) {
        remove_tree(root, &child)?;
    }
    fs::remove_dir(cg).with_context(|| format!("removing cgroup {}", cg.display()))
}

/// Lab cgroups directly under the mount (`comb-lab-*`), as lab names.
pub fn list_labs(root: &Path) -> Vec<String> {
    subdirs(root)
        .iter()
        .filter_map(|p| {
            p.file_name()?
                .to_str()?
                .strip_prefix(CGROUP_PREFIX)
                .map(str::to_string)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_lab_paths() {
        let root = Path::new("/sys/fs/cgroup");
        assert!(check_lab_path(root, root).is_err());
        assert!(check_lab_path(root, &root.join("system.slice")).is_err());
        assert!(check_lab_path(root, &root.join("comb-lab-t1/n1")).is_ok());
    }
}
