//! Named network namespaces (`/run/netns/<name>`, the iproute2 convention so `ip netns exec`
//! works for humans too) and running `ip` inside them. Nothing here ever touches the root
//! namespace: every `ip` call carries `-n <lab netns>`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

pub const NETNS_DIR: &str = "/run/netns";

fn ip_binary() -> &'static str {
    for p in ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    "ip"
}

fn run(cmd: &mut Command, input: Option<&str>) -> Result<()> {
    let shown = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {shown}"))?;
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

pub fn add(name: &str) -> Result<()> {
    run(Command::new(ip_binary()).args(["netns", "add", name]), None)
}

/// Deleting a namespace also destroys the veths in it (and so their peers).
pub fn delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    run(
        Command::new(ip_binary()).args(["netns", "delete", name]),
        None,
    )
}

/// Names in /run/netns starting with `prefix`.
pub fn list(prefix: &str) -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    Ok(names)
}

/// Kill processes whose network namespace is one of `names` (e.g. started by hand with
/// `ip netns exec`, outside any lab cgroup): deleting the name alone would leave the namespace
/// alive as long as they run. Lab namespaces only, so this never matches the root namespace.
pub fn kill_processes_in(names: &[String]) {
    use std::os::unix::fs::MetadataExt;
    let inodes: Vec<(u64, u64)> = names
        .iter()
        .filter_map(|n| std::fs::metadata(path(n)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if inodes.is_empty() {
        return;
    }
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in proc_dir.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // nsfs inodes: stat of /proc/<pid>/ns/net and of the bind mount compare equal.
        let Ok(m) = std::fs::metadata(e.path().join("ns/net")) else {
            continue;
        };
        if inodes.contains(&(m.dev(), m.ino())) && pid != std::process::id() as i32 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Run `ip -n <ns> -batch -` with one command per line: one fork for a whole interface setup.
pub fn ip_batch(ns: &str, lines: &[String]) -> Result<()> {
    let input = lines.join("\n") + "\n";
    run(
        Command::new(ip_binary()).args(["-n", ns, "-batch", "-"]),
        Some(&input),
    )
    .with_context(|| format!("in netns {ns}:\n{input}"))
}

pub fn open(name: &str) -> Result<File> {
    File::open(path(name)).with_context(|| format!("opening netns {name}"))
}

/// Write sysctls (`("net/ipv4/ip_forward", "1")`) inside a namespace. A short-lived thread
/// does setns so the calling thread keeps its namespace; /proc/sys/net resolves against the
/// namespace of the thread that opens the file.
pub fn sysctls(name: &str, settings: &[(&str, &str)]) -> Result<()> {
    let fd = open(name)?;
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ns = name.to_string();
    std::thread::spawn(move || -> Result<()> {
        setns(&fd, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {ns}"))?;
        for (k, v) in settings {
            let p = Path::new("/proc/sys").join(&k);
            // A kernel booted with ipv6.disable=1 has no IPv6 sysctls; nothing to turn off.
            if k.starts_with("net/ipv6/") && !Path::new("/proc/sys/net/ipv6").exists() {
                continue;
            }
            std::fs::write(&p, &v)
                .with_context(|| format!("netns {ns}: writing {v} to {}", p.display()))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))?
}
