//! The manifests-directory source: notices changes and parses the directory into snapshots.
//!
//! Polling a fingerprint (names, sizes, mtimes) is cheap for a directory of manifests and
//! catches every way an editor or `comb apply` may replace a file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use comb_config::ConfigErrors;
use comb_model::Snapshot;
use tokio::sync::mpsc;

pub type SourceUpdate = Result<Snapshot, ConfigErrors>;

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

/// Watch `dir` forever, sending a parsed snapshot (or the errors) whenever it changes.
pub async fn watch(dir: PathBuf, every: Duration, tx: mpsc::Sender<SourceUpdate>) {
    let mut last: Option<Option<Fingerprint>> = None;
    loop {
        let fp = fingerprint(&dir);
        if last.as_ref() != Some(&fp) {
            let d = dir.clone();
            let update = tokio::task::spawn_blocking(move || comb_config::load_snapshot(&d))
                .await
                .expect("manifest loader panicked");
            // A file may change again while it is read; the next poll sees that.
            last = Some(fp);
            if tx.send(update).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(every).await;
    }
}
