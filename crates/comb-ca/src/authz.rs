//! Which identities a node may hold: those of service accounts with pods scheduled on it,
//! read from the same manifests directory the agents read (comb_config's one conversion).
//! The directory is read again (only changed files are parsed) before every decision, so a
//! pod the agent has just seen is never refused because the CA looked earlier; a directory
//! with errors keeps the last good snapshot in force.

use std::path::PathBuf;
use std::sync::Mutex;

use comb_config::DirCache;
use comb_identity::SpiffeId;
use comb_model::Snapshot;

pub struct NodeIdentities {
    dir: PathBuf,
    trust_domain: String,
    state: Mutex<(DirCache, Option<Snapshot>)>,
}

impl NodeIdentities {
    pub fn new(dir: PathBuf, trust_domain: String) -> Self {
        Self {
            dir,
            trust_domain,
            state: Mutex::new((DirCache::new(), None)),
        }
    }

    /// Whether `node` runs a pod whose identity is `id`. Blocking (reads files).
    pub fn allowed(&self, node: &str, id: &SpiffeId) -> bool {
        let mut st = self.state.lock().expect("authz lock");
        let (cache, last) = &mut *st;
        match cache.load(&self.dir) {
            Ok(snap) => *last = Some(snap),
            Err(errors) => tracing::warn!(
                dir = %self.dir.display(),
                errors = errors.len(),
                first = %errors.iter().next().map(|e| e.to_string()).unwrap_or_default(),
                "manifests have errors; the last good ones decide"
            ),
        }
        let Some(snap) = last else { return false };
        snap.pods.values().any(|p| {
            p.node_name.as_deref() == Some(node) && SpiffeId::of_pod(&self.trust_domain, p) == *id
        })
    }
}
