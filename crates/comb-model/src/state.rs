//! The State container and its single mutator.

use crate::objects::{Pod, Snapshot};

/// Monotonic stamp of a State change; reconcilers report the generation they applied.
pub type Generation = u64;

#[derive(Clone, Debug, Default)]
pub struct State {
    generation: Generation,
    snapshot: Snapshot,
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The only mutator: swap in a validated snapshot and stamp a new generation.
    /// Returns false (and keeps the generation) when nothing changed.
    pub fn replace(&mut self, snapshot: Snapshot) -> bool {
        if snapshot == self.snapshot {
            return false;
        }
        self.snapshot = snapshot;
        self.generation += 1;
        true
    }

    /// Pods scheduled on `node` that have at least one address.
    pub fn local_pods<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.snapshot
            .pods
            .values()
            .filter(move |p| p.node_name.as_deref() == Some(node) && !p.ips.is_empty())
    }
}
