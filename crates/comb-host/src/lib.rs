//! Facts about the host that the lab, the agent, the datapath and the CLI all need: where
//! cgroup2 and bpffs are mounted, the boot-time clock the BPF programs stamp events with, and
//! the gate of privileged tests. A crate of its own so that users of these need not link libbpf.
#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The cgroup v2 mount: `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a
/// hybrid one. Read from /proc/self/mountinfo, never assumed.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    find_mount(&mounts, "cgroup2")
        .context("no cgroup2 filesystem is mounted (cgroup v2 is required)")
}

/// True when bpffs is mounted at `path`.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts_of_type(&mounts, "bpf").any(|m| m == path))
}

/// Mount bpffs at /sys/fs/bpf when it is not mounted yet.
pub fn ensure_bpffs() -> Result<()> {
    let path = Path::new(BPFFS);
    if is_bpffs(path)? {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .status()
        .context("running mount -t bpf")?;
    if !status.success() {
        bail!("mounting bpffs at {BPFFS} failed ({status})");
    }
    Ok(())
}

fn mounts_of_type<'a>(mounts: &'a str, fstype: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
    mounts.lines().filter_map(move |line| {
        let mut f = line.split_whitespace();
        let (_src, target, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

fn find_mount(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts_of_type(mounts, fstype).next()
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// CLOCK_BOOTTIME in nanoseconds: the clock of `bpf_ktime_get_boot_ns()`, which stamps flow
/// events and conntrack entries; 0 if the clock cannot be read (it always can on Linux).
pub fn boot_time_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The gate of every privileged test in the workspace: true as root; otherwise a failure
/// under `CI=true` (those tests must run there, never skip) and a skip with a notice
/// elsewhere. `what` names the test and what it needs in the messages.
pub fn privileged_test(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let msg = format!("{what} privileged test needs root");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("NOTICE: skipping: {msg}");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
        cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
        bpf /sys/fs/bpf bpf rw 0 0\n";

    #[test]
    fn finds_hybrid_cgroup2_mount() {
        assert_eq!(
            find_mount(HYBRID, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_unified_cgroup2_mount() {
        let m = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            find_mount(m, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(find_mount("proc /proc proc rw 0 0\n", "cgroup2"), None);
    }

    #[test]
    fn boot_clock_moves_forward() {
        let a = boot_time_ns();
        assert!(a > 0);
        assert!(boot_time_ns() >= a);
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
    }
}
