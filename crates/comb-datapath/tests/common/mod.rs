//! Helpers shared by the privileged datapath tests: the root check, throwaway cgroups and pin
//! directories, and python helper processes joined to a cgroup.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// True when privileged; false = skip (with a notice); panics under CI=true. `what` names the
/// test in the message.
pub fn privileged(what: &str) -> bool {
    comb_host::privileged_test(&format!("{what} (BPF, cgroup2, bpffs)"))
}

pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// A child cgroup, removed on drop (after its processes are gone).
pub struct CgroupGuard(pub PathBuf);

impl CgroupGuard {
    pub fn new(mount: &Path) -> Self {
        let p = mount.join(unique("comb-test"));
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", p.display()));
        Self(p)
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        // rmdir fails with EBUSY while a killed process is still exiting.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not remove cgroup {}", self.0.display());
    }
}

/// A bpffs directory, removed on drop whatever the test left in it.
pub struct PinGuard(pub PathBuf);

impl PinGuard {
    /// A fresh, not yet created directory under the bpffs mount.
    pub fn fresh() -> Self {
        Self(Path::new(comb_host::BPFFS).join(unique("comb-test")))
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A python process running `script` with `args`, joined to `cgroup` (and optionally run in
/// network namespace `netns`); its stdout lines arrive on `lines`. Killed on drop.
pub struct CgroupChild {
    pub child: Child,
    pub stdin: ChildStdin,
    pub lines: mpsc::Receiver<String>,
}

impl CgroupChild {
    pub fn spawn(cgroup: &Path, netns: Option<&str>, script: &str, args: &[&str]) -> Self {
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let mut cmd = Command::new("sh");
        // The shell joins the cgroup first, so python and every socket it opens live there
        // (and before `ip netns exec`, which remounts /sys, hiding the cgroup fs).
        cmd.arg("-c")
            .arg("echo $$ > \"$1\" && shift && exec \"$@\"")
            .arg("sh")
            .arg(cgroup.join("cgroup.procs"));
        if let Some(ns) = netns {
            cmd.args(["ip", "netns", "exec", ns]);
        }
        let mut child = cmd
            .arg(python)
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning python in the test cgroup");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take().unwrap();
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// The next stdout line; panics (naming the exit status) after `timeout`.
    pub fn line(&mut self, timeout: Duration, what: &str) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("{what} (exit status: {:?})", self.child.try_wait()))
    }
}

impl Drop for CgroupChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn bpftool_cgroup_show(cg: &Path) -> String {
    let out = Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(cg)
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool cgroup show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
