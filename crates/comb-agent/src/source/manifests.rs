//! The manifests-directory source: notices changes and parses the directory into snapshots.
//!
//! inotify wakes the watcher as soon as a file is written (closed) or renamed in or out, so
//! a change takes effect within milliseconds; polling a fingerprint (names, sizes, mtimes)
//! stays as the fallback for what inotify misses (e.g. a ConfigMap volume's symlink swap,
//! or a filesystem without inotify).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::{Notify, mpsc};

use super::{Source, SourceUpdate};

/// The manifests directory (standalone mode): every `*.yaml`/`*.yml` file in it, re-read
/// when inotify or the fallback poll sees a change.
pub struct ManifestsSource {
    pub dir: PathBuf,
    pub poll: Duration,
}

impl Source for ManifestsSource {
    fn describe(&self) -> String {
        format!("manifests {}", self.dir.display())
    }

    fn run(
        self: Box<Self>,
        updates: mpsc::Sender<SourceUpdate>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(watch(self.dir, self.poll, updates))
    }
}

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// The same files the loader reads (comb_config::manifest_files), so temporary files of
/// `comb apply` or an editor do not trigger a reload.
fn fingerprint(dir: &Path) -> Option<Fingerprint> {
    let files = comb_config::manifest_files(dir).ok()?;
    Some(
        files
            .into_iter()
            .map(|f| {
                let meta = std::fs::metadata(&f).ok();
                let len = meta.as_ref().map_or(0, |m| m.len());
                let modified = meta.and_then(|m| m.modified().ok());
                (f, len, modified)
            })
            .collect(),
    )
}

/// Wakes `notify` on every finished change in `dir`, on a thread of its own. Creation and
/// plain writes are not events here: a file being written is read once it is closed, never
/// half-written. Returns false when inotify is unavailable (polling still works).
/// Names of files inotify reported, for the watcher to parse again whatever their stamps say.
type Dirty = Arc<std::sync::Mutex<Vec<PathBuf>>>;

fn spawn_inotify(dir: &Path, notify: Arc<Notify>, dirty: Dirty) -> bool {
    let ino = match Inotify::init(InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; polling only");
            return false;
        }
    };
    let mask = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ONLYDIR;
    if let Err(e) = ino.add_watch(dir, mask) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the manifests directory; polling only");
        return false;
    }
    let dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name("manifests-inotify".into())
        .spawn(move || {
            loop {
                match ino.read_events() {
                    Ok(events) => {
                        // Only names the loader reads: `comb apply` and editors write
                        // dotfiles first, and waking for those would parse before the rename
                        // lands.
                        let names: Vec<PathBuf> = events
                            .iter()
                            .filter_map(|e| e.name.as_deref())
                            .filter(|n| is_manifest_name(n))
                            .map(|n| dir.join(n))
                            .collect();
                        if !names.is_empty() {
                            dirty.lock().expect("dirty lock").extend(names);
                            notify.notify_one();
                        }
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "inotify read failed; polling only");
                        return;
                    }
                }
            }
        })
        .is_ok()
}

/// The rule of comb_config::manifest_files, for inotify event names.
fn is_manifest_name(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| !n.starts_with('.') && (n.ends_with(".yaml") || n.ends_with(".yml")))
}

/// Watch `dir` forever, sending a parsed snapshot (or the errors) whenever it changes. Files
/// are parsed again only when they changed (comb_config::DirCache).
async fn watch(dir: PathBuf, every: Duration, tx: mpsc::Sender<SourceUpdate>) {
    let notify = Arc::new(Notify::new());
    let dirty = Dirty::default();
    spawn_inotify(&dir, notify.clone(), dirty.clone());
    let mut last: Option<Option<Fingerprint>> = None;
    let mut cache = Some(comb_config::DirCache::new());
    loop {
        let fp = fingerprint(&dir);
        if last.as_ref() != Some(&fp) {
            let d = dir.clone();
            let mut c = cache.take().expect("cache is returned after each load");
            // A file rewritten within one mtime tick at the same size keeps its stamp: what
            // inotify named is parsed again regardless.
            for f in std::mem::take(&mut *dirty.lock().expect("dirty lock")) {
                c.forget(&f);
            }
            let started = std::time::Instant::now();
            let (c, update) = tokio::task::spawn_blocking(move || {
                let r = c.load(&d);
                (c, r)
            })
            .await
            .expect("manifest loader panicked");
            tracing::debug!(
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                ok = update.is_ok(),
                "manifests read"
            );
            cache = Some(c);
            // A file may change again while it is read; the next wake-up or poll sees that.
            last = Some(fp);
            if tx.send(update.into()).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            // Reload even when the fingerprint looks the same (see `forget` above).
            _ = notify.notified() => last = None,
        }
    }
}
