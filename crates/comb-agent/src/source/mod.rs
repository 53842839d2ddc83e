//! Configuration sources: each turns outside configuration into whole State snapshots (or
//! the located errors that kept one from being built) on a channel the writer drains: the
//! manifests directory (standalone mode) and the Kubernetes API (`--kubeconfig`).

use std::future::Future;
use std::pin::Pin;

use comb_config::ConfigErrors;
use comb_model::Snapshot;
use tokio::sync::mpsc;

pub mod cni_spool;
pub mod kube_events;
pub mod kube_kinds;
pub mod kube_store;
pub mod kube_watch;
pub mod kubernetes;
pub mod manifests;

/// What a source sends the writer.
#[derive(Debug)]
pub struct SourceUpdate {
    /// The State to put in force; `None` when the newest configuration was rejected as a
    /// whole (the manifests directory), and the writer keeps the last good State.
    pub snapshot: Option<Snapshot>,
    /// What `comb status` shows: why the snapshot was rejected, or (the Kubernetes source,
    /// which rejects object by object) the objects left out or kept at their last good
    /// version, and kinds that cannot be watched.
    pub errors: ConfigErrors,
}

impl From<Result<Snapshot, ConfigErrors>> for SourceUpdate {
    fn from(r: Result<Snapshot, ConfigErrors>) -> Self {
        match r {
            Ok(snapshot) => SourceUpdate {
                snapshot: Some(snapshot),
                errors: ConfigErrors::default(),
            },
            Err(errors) => SourceUpdate {
                snapshot: None,
                errors,
            },
        }
    }
}

pub trait Source: Send + 'static {
    /// For logs and `comb status`, e.g. `manifests /etc/comb`.
    fn describe(&self) -> String;

    /// Runs until `updates` is closed, sending a snapshot whenever the configuration
    /// changes (the first one as soon as it can be read).
    fn run(
        self: Box<Self>,
        updates: mpsc::Sender<SourceUpdate>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}
