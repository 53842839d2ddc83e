//! Pod sandboxes as `comb-cni` reports them: one JSON record per sandbox in the spool
//! directory (`--cni-spool`). The directory is the durable queue between the plugin and the
//! agent: it is read whole at start (sandboxes added while the agent was down are there) and
//! followed with inotify, with a periodic rescan as the backstop (it also notices a netns that
//! disappeared without a CNI DEL). A record whose netns is gone is forgotten and its file
//! removed. The pod's cgroup is found by its UID under the kubelet's cgroup layout; a record
//! whose cgroup does not exist yet (the kubelet creates it around the sandbox) is looked up
//! again at the next scan.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use comb_cni::SandboxRecord;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::{Notify, mpsc};

use super::kube_watch::KindEvent;

/// The backstop rescan (inotify wakes it at once otherwise).
const RESCAN: Duration = Duration::from_secs(2);

/// Where to look.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Absolute: the root pod cgroup paths are relative to (`--cgroup-root`, default the
    /// cgroup2 mount).
    pub cgroup_root: PathBuf,
    /// The kubelet's pod cgroups, relative to `cgroup_root` (`--kubelet-cgroup-root`);
    /// `None`: `kubepods` (cgroupfs driver) or `kubepods.slice` (systemd driver), whichever
    /// exists.
    pub kubelet_root: Option<PathBuf>,
}

/// What the Kubernetes source learns of a pod from its sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Node-side interface.
    pub interface: Option<String>,
    /// Relative to the cgroup root, as a pod's `comb.dev/cgroup` annotation.
    pub cgroup: Option<String>,
}

/// The pod-level cgroup directories a kubelet may have made for `uid`, relative to its root:
/// cgroupfs (`pod<uid>` at the QoS level) and systemd (`kubepods-<qos>-pod<uid_>.slice`).
pub fn pod_cgroup_candidates(uid: &str) -> Vec<PathBuf> {
    let u = uid.replace('-', "_");
    vec![
        PathBuf::from(format!("pod{uid}")),
        PathBuf::from(format!("burstable/pod{uid}")),
        PathBuf::from(format!("besteffort/pod{uid}")),
        PathBuf::from(format!("kubepods-pod{u}.slice")),
        PathBuf::from(format!(
            "kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"
        )),
        PathBuf::from(format!(
            "kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
        )),
    ]
}

fn kubelet_roots(cfg: &SpoolConfig) -> Vec<PathBuf> {
    match &cfg.kubelet_root {
        Some(r) => vec![cfg.cgroup_root.join(r.strip_prefix("/").unwrap_or(r))],
        None => ["kubepods", "kubepods.slice"]
            .iter()
            .map(|r| cfg.cgroup_root.join(r))
            .collect(),
    }
}

/// The pod's cgroup relative to the cgroup root, if the kubelet made it.
pub fn find_pod_cgroup(cfg: &SpoolConfig, uid: &str) -> Option<String> {
    // A UID is a UUID: never let it form a path of its own.
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return None;
    }
    for root in kubelet_roots(cfg) {
        for c in pod_cgroup_candidates(uid) {
            let abs = root.join(c);
            if abs.is_dir() {
                let rel = abs.strip_prefix(&cfg.cgroup_root).ok()?;
                return Some(rel.display().to_string());
            }
        }
    }
    None
}

/// Read the spool: each live sandbox (the newest record per pod), and the problems to
/// report. Records whose netns is gone are removed.
pub fn scan(cfg: &SpoolConfig) -> (Vec<Sandbox>, Vec<String>) {
    let mut problems = Vec::new();
    let entries = match std::fs::read_dir(&cfg.dir) {
        Ok(e) => e,
        // Nothing reported yet: the plugin creates the directory on its first ADD.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Vec::new(), problems),
        Err(e) => {
            problems.push(format!("reading {}: {e}", cfg.dir.display()));
            return (Vec::new(), problems);
        }
    };
    // (namespace, name) → (modified, record)
    let mut newest: BTreeMap<(String, String), (std::time::SystemTime, SandboxRecord)> =
        BTreeMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let is_record = path.extension().is_some_and(|e| e == "json")
            && !entry.file_name().to_string_lossy().starts_with('.');
        if !is_record {
            continue;
        }
        let rec = match comb_cni::read_record(&path) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("skipping a sandbox record: {e}"));
                continue;
            }
        };
        if !Path::new(&rec.netns).exists() {
            tracing::info!(pod = %format!("{}/{}", rec.namespace, rec.name), netns = %rec.netns, "sandbox gone; forgetting it");
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        let key = (rec.namespace.clone(), rec.name.clone());
        if newest.get(&key).is_none_or(|(t, _)| *t <= modified) {
            newest.insert(key, (modified, rec));
        }
    }
    let sandboxes = newest
        .into_values()
        .map(|(_, r)| Sandbox {
            cgroup: find_pod_cgroup(cfg, &r.uid),
            namespace: r.namespace,
            name: r.name,
            uid: r.uid,
            interface: r.host_interface,
        })
        .collect();
    (sandboxes, problems)
}

/// Wakes `notify` when a record is renamed in or removed.
fn spawn_inotify(dir: &Path, notify: Arc<Notify>) {
    let ino = match Inotify::init(InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; rescanning the CNI spool only");
            return;
        }
    };
    let mask = AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_ONLYDIR;
    if let Err(e) = ino.add_watch(dir, mask) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the CNI spool; rescanning only");
        return;
    }
    let _ = std::thread::Builder::new()
        .name("cni-spool".into())
        .spawn(move || {
            loop {
                match ino.read_events() {
                    Ok(_) => notify.notify_one(),
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "inotify read failed; rescanning only");
                        return;
                    }
                }
            }
        });
}

/// Follow the spool until `tx` closes, sending the sandboxes whenever they change.
pub async fn watch(cfg: SpoolConfig, tx: mpsc::Sender<KindEvent>) {
    // The plugin makes it on its first ADD; making it here lets inotify watch from the start.
    if let Err(e) = std::fs::create_dir_all(&cfg.dir) {
        tracing::warn!(error = %e, dir = %cfg.dir.display(), "cannot create the CNI spool directory");
    }
    let notify = Arc::new(Notify::new());
    spawn_inotify(&cfg.dir, notify.clone());
    let mut last: Option<(Vec<Sandbox>, Vec<String>)> = None;
    loop {
        let c = cfg.clone();
        let now = tokio::task::spawn_blocking(move || scan(&c))
            .await
            .unwrap_or_default();
        if last.as_ref() != Some(&now) {
            for p in now
                .1
                .iter()
                .filter(|p| last.as_ref().is_none_or(|l| !l.1.contains(p)))
            {
                tracing::warn!(problem = %p, "CNI spool");
            }
            let event = KindEvent::Sandboxes(now.0.clone(), now.1.clone());
            if tx.send(event).await.is_err() {
                return;
            }
            last = Some(now);
        }
        tokio::select! {
            _ = tokio::time::sleep(RESCAN) => {}
            _ = notify.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path, id: &str, name: &str, uid: &str, netns: &Path) {
        comb_cni::write_record(
            dir,
            &SandboxRecord {
                container_id: id.into(),
                netns: netns.display().to_string(),
                if_name: "eth0".into(),
                namespace: "apps".into(),
                name: name.into(),
                uid: uid.into(),
                host_interface: Some(format!("veth{id}")),
                ips: vec!["10.22.0.5".into()],
            },
        )
        .unwrap();
    }

    #[test]
    fn cgroups_are_found_for_both_drivers() {
        let root = tempfile::tempdir().unwrap();
        let cfg = |kubelet: Option<&str>| SpoolConfig {
            dir: root.path().join("spool"),
            cgroup_root: root.path().to_path_buf(),
            kubelet_root: kubelet.map(PathBuf::from),
        };
        let uid = "0a1b-22";
        assert_eq!(find_pod_cgroup(&cfg(None), uid), None);
        std::fs::create_dir_all(root.path().join("kubepods/burstable/pod0a1b-22/ctr")).unwrap();
        assert_eq!(
            find_pod_cgroup(&cfg(None), uid).as_deref(),
            Some("kubepods/burstable/pod0a1b-22")
        );
        let sd = "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9f_e1.slice";
        std::fs::create_dir_all(root.path().join(sd)).unwrap();
        assert_eq!(find_pod_cgroup(&cfg(None), "9f-e1").as_deref(), Some(sd));
        // A kubelet root given explicitly (a lab node's cgroup) replaces the defaults.
        std::fs::create_dir_all(root.path().join("lab/n1/kubepods/pod77")).unwrap();
        assert_eq!(
            find_pod_cgroup(&cfg(Some("/lab/n1/kubepods")), "77").as_deref(),
            Some("lab/n1/kubepods/pod77")
        );
        assert_eq!(find_pod_cgroup(&cfg(Some("lab/n1/kubepods")), uid), None);
        assert_eq!(find_pod_cgroup(&cfg(None), "../x"), None);
    }

    #[test]
    fn scan_keeps_live_sandboxes_and_forgets_dead_ones() {
        let root = tempfile::tempdir().unwrap();
        let spool = root.path().join("spool");
        let netns = root.path().join("netns-live");
        std::fs::write(&netns, "").unwrap();
        let cfg = SpoolConfig {
            dir: spool.clone(),
            cgroup_root: root.path().to_path_buf(),
            kubelet_root: None,
        };
        assert_eq!(
            scan(&cfg),
            (vec![], vec![]),
            "no spool yet is not a problem"
        );
        record(&spool, "c1", "web-0", "u1", &netns);
        record(&spool, "c2", "web-1", "u2", &root.path().join("netns-gone"));
        std::fs::write(spool.join("junk.json"), "{").unwrap();
        std::fs::write(spool.join(".half.tmp"), "{").unwrap();
        std::fs::create_dir_all(root.path().join("kubepods/podu1")).unwrap();
        let (sandboxes, problems) = scan(&cfg);
        assert_eq!(
            sandboxes,
            vec![Sandbox {
                namespace: "apps".into(),
                name: "web-0".into(),
                uid: "u1".into(),
                interface: Some("vethc1".into()),
                cgroup: Some("kubepods/podu1".into()),
            }]
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("junk.json"), "{problems:?}");
        assert!(
            !spool.join("c2.json").exists(),
            "a dead sandbox's record is removed"
        );
        assert!(spool.join("c1.json").exists());
    }
}
