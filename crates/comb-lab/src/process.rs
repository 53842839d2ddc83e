//! Processes placed inside a lab namespace and cgroup.
//!
//! The child joins both between fork and exec (`pre_exec`), so not a single instruction of the
//! program runs outside the pod: no race where a connection is made before the cgroup (and
//! thus the agent's sockops program) applies.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// Make `cmd` run inside cgroup `cgroup` (absolute) and, when given, netns `netns` (else the
/// caller's); `detach` also puts it in its own session so terminal signals to the caller
/// don't reach it.
pub fn place(cmd: &mut Command, netns: Option<&str>, cgroup: &Path, detach: bool) -> Result<()> {
    // Opened here, in the parent: pre_exec must not allocate or format. Both are O_CLOEXEC.
    let ns = netns.map(crate::netns::open).transpose()?;
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    // SAFETY: the closure only makes raw syscalls (write, setns, setsid) on fds it owns.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process itself.
            (&procs).write_all(b"0")?;
            if let Some(ns) = &ns {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
            }
            if detach {
                nix::unistd::setsid()?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// Start a long-running process (in `netns` when given, else the caller's) with
/// stdout/stderr appended to `log`; returns its pid.
pub fn spawn_detached(
    mut cmd: Command,
    netns: Option<&str>,
    cgroup: &Path,
    log: &Path,
) -> Result<u32> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    place(&mut cmd, netns, cgroup, true)?;
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    // Dropping Child neither kills nor waits; the lab reaps by pid (see `reap`).
    Ok(child.id())
}

/// Whether `pid` exists (a zombie counts until reaped).
pub fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// SIGKILL one process (gone already is fine).
pub fn kill_pid(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    let _ = waitpid(Pid::from_raw(pid as i32), None);
}

/// Collect exited children among `pids`, ignoring pids that aren't (or no longer are) ours.
pub fn reap(pids: &[u32]) {
    for &pid in pids {
        let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
    }
}

/// SIGTERM every process in `cgroup`, wait up to `grace`, then SIGKILL the rest.
/// Returns whether they all left on their own.
pub fn stop_cgroup(root: &Path, cgroup: &Path, grace: Duration) -> Result<bool> {
    let pids = crate::cgroup::procs_recursive(cgroup);
    for &pid in &pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let reap_pids: Vec<u32> = pids.iter().map(|&p| p as u32).collect();
    let deadline = Instant::now() + grace;
    while crate::cgroup::populated(cgroup) && Instant::now() < deadline {
        reap(&reap_pids);
        std::thread::sleep(Duration::from_millis(20));
    }
    let clean = !crate::cgroup::populated(cgroup);
    if !clean {
        crate::cgroup::kill_all(root, cgroup, Duration::from_secs(5))?;
    }
    reap(&reap_pids);
    Ok(clean)
}

/// Last `n` lines of a log file, for error messages.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
