//! Persists the identity allocator, so identity numbers (held by pinned maps, conntrack and
//! flow logs) stay the same across agent restarts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use comb_model::identity::IdentityAllocator;

pub struct IdentityStore {
    path: PathBuf,
    saved: IdentityAllocator,
}

impl IdentityStore {
    /// Reads `<dir>/identities.json`; a missing file is a first start. An unreadable one is
    /// an error: silently starting over would renumber every identity under live maps.
    pub fn open(dir: &Path) -> Result<(Self, IdentityAllocator)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("identities.json");
        let alloc = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "parsing {} (identity numbers; remove it only together with the pinned maps)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => IdentityAllocator::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok((
            IdentityStore {
                path,
                saved: alloc.clone(),
            },
            alloc,
        ))
    }

    /// Writes the allocator if it changed since the last save (write + rename, so a crash
    /// leaves the old or the new file, never half of one).
    pub fn save(&mut self, alloc: &IdentityAllocator) -> Result<()> {
        if *alloc == self.saved {
            return Ok(());
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(alloc)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("renaming to {}", self.path.display()))?;
        self.saved = alloc.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_model::Snapshot;

    #[test]
    fn round_trip_and_corrupt_file() {
        let dir = std::env::temp_dir().join(format!("comb-idstore-{}", std::process::id()));
        let (mut store, mut alloc) = IdentityStore::open(&dir).unwrap();
        assert_eq!(alloc, IdentityAllocator::default());
        let cidrs = ["10.0.0.0/8".parse().unwrap()].into_iter().collect();
        alloc.resolve(&Snapshot::default(), "n1", &cidrs);
        store.save(&alloc).unwrap();
        let (_, again) = IdentityStore::open(&dir).unwrap();
        assert_eq!(again, alloc);
        std::fs::write(dir.join("identities.json"), "{not json").unwrap();
        let err = IdentityStore::open(&dir).err().unwrap();
        assert!(format!("{err:#}").contains("identities.json"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
