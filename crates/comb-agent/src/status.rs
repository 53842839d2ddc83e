//! What the writer publishes for readers: an immutable snapshot of the agent's state —
//! generations and when each was applied, errors, counts, and the State and desired state
//! in force. The admin API and `/metrics` load it without waiting for the writer, so
//! `comb status` answers while a reconcile of any size is running.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::api::GenerationTimes;
use arc_swap::ArcSwap;
use comb_datapath::SocketLbMode;
use comb_model::Snapshot;
use comb_model::pipeline::Desired;

/// How many generations' times `comb status` keeps.
pub const GENERATION_HISTORY: usize = 64;

#[derive(Clone, Debug, Default)]
pub struct Published {
    /// Generation of the State in force (the last good configuration).
    pub generation: u64,
    /// Generation the datapath reconciler last applied completely.
    pub applied_generation: u64,
    /// When each recent generation replaced State and when it was applied, oldest first.
    pub generations: Vec<GenerationTimes>,
    pub splice_enabled: bool,
    pub config_errors: Vec<String>,
    pub datapath_errors: Vec<String>,
    pub config_reloads: u64,
    pub config_rejects: u64,
    /// The socket LB as the datapath holds it after the last reconcile.
    pub socket_lb: Option<(PathBuf, SocketLbMode)>,
    /// Pods of this node with an address, in the State in force.
    pub local_endpoints: usize,
    /// Service frontends in the socket-LB maps after the last reconcile.
    pub lb_services: usize,
    /// Local pods with policy programs attached after the last reconcile.
    pub policy_endpoints: usize,
    /// The State in force.
    pub state: Arc<Snapshot>,
    /// What the last reconcile wanted (computed from `state`).
    pub desired: Arc<Desired>,
}

impl Published {
    /// A generation replaced State now.
    pub fn replaced(&mut self, generation: u64) {
        self.generation = generation;
        self.generations.push(GenerationTimes {
            generation,
            replaced_at: now_unix(),
            applied_at: None,
        });
        let excess = self.generations.len().saturating_sub(GENERATION_HISTORY);
        self.generations.drain(..excess);
    }

    /// The datapath holds `generation` completely now.
    pub fn applied(&mut self, generation: u64) {
        self.applied_generation = generation;
        let now = now_unix();
        if let Some(g) = self
            .generations
            .iter_mut()
            .rev()
            .find(|g| g.generation == generation)
            && g.applied_at.is_none()
        {
            g.applied_at = Some(now);
        }
    }

    /// When the generation in force was applied, if it was.
    pub fn applied_at(&self) -> Option<f64> {
        self.generations
            .iter()
            .rev()
            .find(|g| g.generation == self.applied_generation)
            .and_then(|g| g.applied_at)
    }
}

/// The slot readers load from; only the writer stores into it.
pub type Board = Arc<ArcSwap<Published>>;

pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_times_follow_their_generation() {
        let mut p = Published::default();
        p.replaced(1);
        p.replaced(2);
        assert_eq!(p.applied_at(), None);
        p.applied(2);
        let g2 = p.generations.iter().find(|g| g.generation == 2).unwrap();
        assert!(g2.applied_at.unwrap() >= g2.replaced_at);
        assert_eq!(p.applied_at(), g2.applied_at);
        assert_eq!(
            p.generations[0].applied_at, None,
            "1 was never applied alone"
        );
        // A later retry of the same generation keeps the first time it was complete.
        let first = p.applied_at();
        p.applied(2);
        assert_eq!(p.applied_at(), first);
    }

    #[test]
    fn history_is_bounded() {
        let mut p = Published::default();
        for g in 1..=(GENERATION_HISTORY as u64 + 10) {
            p.replaced(g);
        }
        assert_eq!(p.generations.len(), GENERATION_HISTORY);
        assert_eq!(p.generations[0].generation, 11);
    }
}
