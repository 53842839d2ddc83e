//! Removing labs. Everything is found from the lab name alone (netns prefix, cgroup, pin and
//! state paths), so a lab whose creator crashed before writing state.json is still removable.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::unistd::Pid;

use crate::naming::{self, AGENT_CGROUP, NETNS_PREFIX, PIN_ROOT, RUN_DIR};
use crate::{cgroup, netns};

/// Labs this process created and still owns (not detached, not down): what a signal removes.
static LIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

pub fn register(name: &str) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string());
}

pub fn unregister(name: &str) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
}

/// Building over an existing lab would tear the other one down on failure: refuse instead.
pub fn refuse_existing(name: &str) -> Result<()> {
    let cg = comb_host::cgroup2_mount()?.join(naming::lab_cgroup(name));
    let leftovers = !netns::list(&naming::lab_netns_prefix(name))?.is_empty()
        || naming::state_dir(name).exists()
        || cg.exists();
    if leftovers {
        bail!("lab {name:?} already exists (remove it with `comb lab down {name}`)");
    }
    Ok(())
}

/// Agents first (SIGTERM, so they detach their programs from pod cgroups), then every other
/// process, cgroups, namespaces, pins, state. Keeps going past errors, reports them at the end.
pub fn teardown(name: &str) -> Result<()> {
    let mut errors: Vec<String> = Vec::new();
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            errors.push(format!("{e:#}"));
        }
    };
    match comb_host::cgroup2_mount() {
        Ok(root) => {
            let lab_cg = root.join(naming::lab_cgroup(name));
            stop_agents(&lab_cg);
            note(cgroup::kill_all(&root, &lab_cg, Duration::from_secs(5)));
            note(cgroup::remove_tree(&root, &lab_cg));
        }
        Err(e) => note(Err(e)),
    }
    match netns::list(&naming::lab_netns_prefix(name)) {
        Ok(names) => {
            netns::kill_processes_in(&names);
            names.iter().for_each(|ns| note(netns::delete(ns)));
        }
        Err(e) => note(Err(e)),
    }
    let prefix = format!("{name}-");
    note(remove_pins(|p| p.starts_with(&prefix)).map(|_| ()));
    let dir = naming::state_dir(name);
    if dir.exists() {
        note(
            std::fs::remove_dir_all(&dir)
                .map_err(|e| anyhow::anyhow!("removing {}: {e}", dir.display())),
        );
    }
    tracing::info!(lab = name, errors = errors.len(), "lab down");
    if !errors.is_empty() {
        bail!("tearing down lab {name}: {}", errors.join("; "));
    }
    Ok(())
}

/// SIGTERM every node's agent at once, then give them together up to 5 s.
fn stop_agents(lab_cg: &Path) {
    let agent_cgs: Vec<PathBuf> = std::fs::read_dir(lab_cg)
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.path().join(AGENT_CGROUP)))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    for cg in &agent_cgs {
        for pid in cgroup::procs(cg) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent_cgs.iter().any(|cg| cgroup::populated(cg)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Remove the pin directories under `/sys/fs/bpf/comb/` whose name matches (pins an agent
/// left behind).
fn remove_pins(matches: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(dir) = std::fs::read_dir(PIN_ROOT) else {
        return Ok(removed);
    };
    for e in dir.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if matches(&name) {
            std::fs::remove_dir_all(e.path())
                .map_err(|err| anyhow::anyhow!("removing pins {}: {err}", e.path().display()))?;
            removed.push(e.path().display().to_string());
        }
    }
    // The shared parent goes too once nothing else is pinned there (fails harmlessly if so).
    let _ = std::fs::remove_dir(PIN_ROOT);
    Ok(removed)
}

pub fn state_dirs() -> Result<Vec<String>> {
    let Ok(dir) = std::fs::read_dir(RUN_DIR) else {
        return Ok(vec![]);
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

pub fn down_all() -> Result<Vec<String>> {
    let mut labs: BTreeSet<String> = state_dirs()?.into_iter().collect();
    let root = comb_host::cgroup2_mount()?;
    labs.extend(cgroup::list_labs(&root));
    labs.extend(
        netns::list(NETNS_PREFIX)?
            .iter()
            .filter_map(|n| naming::lab_of_netns(n))
            .map(str::to_string),
    );
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for lab in labs {
        match teardown(&lab) {
            Ok(()) => removed.push(format!("lab {lab}")),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    // Whatever matched the sweep patterns without belonging to a recognizable lab.
    let stray = netns::list(NETNS_PREFIX)?;
    netns::kill_processes_in(&stray);
    for ns in stray {
        match netns::delete(&ns) {
            Ok(()) => removed.push(format!("netns {ns}")),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    // Lab pin dirs are `<lab>-<node>`; an agent outside the lab would use `<node>` alone.
    match remove_pins(|p| p.contains('-')) {
        Ok(pins) => removed.extend(pins.into_iter().map(|p| format!("pins {p}"))),
        Err(e) => errors.push(format!("{e:#}")),
    }
    if !errors.is_empty() {
        bail!(
            "down_all: {} (removed: {})",
            errors.join("; "),
            removed.join(", ")
        );
    }
    Ok(removed)
}

/// Write end of the self-pipe the signal handler pokes; -1 until installed.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    // Only write(2) here: it is async-signal-safe; the real work happens on a thread.
    // SAFETY: writing one byte from a static buffer to a pipe fd we own.
    unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
}

/// On SIGINT/SIGTERM: tear down every lab this process created (and did not detach), then
/// exit with status 130.
pub fn install_signal_cleanup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let (read, write) = match nix::unistd::pipe() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("comb-lab: cannot install signal cleanup: {e}");
                return;
            }
        };
        let write_fd = write.as_raw_fd();
        std::mem::forget(write); // lives as long as the process
        SIGNAL_PIPE.store(write_fd, Ordering::Relaxed);
        std::thread::spawn(move || {
            let mut f = std::fs::File::from(read);
            let mut b = [0u8; 1];
            if f.read_exact(&mut b).is_ok() {
                let names: Vec<String> = LIVE
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned()
                    .collect();
                for name in names {
                    eprintln!("comb-lab: signal received, tearing down lab {name}");
                    if let Err(e) = teardown(&name) {
                        eprintln!("comb-lab: {e:#}");
                    }
                }
                std::process::exit(130);
            }
        });
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only calls write(2).
            if let Err(e) = unsafe { sigaction(sig, &action) } {
                eprintln!("comb-lab: cannot handle {sig}: {e}");
            }
        }
    });
}
