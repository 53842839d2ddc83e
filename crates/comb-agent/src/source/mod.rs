//! Configuration sources: each turns outside configuration into whole State snapshots (or
//! the located errors that kept one from being built) on a channel the writer drains. The
//! manifests directory is the first; the Kubernetes API plugs in here without touching the
//! writer or the reconcilers.

use std::future::Future;
use std::pin::Pin;

use comb_config::ConfigErrors;
use comb_model::Snapshot;
use tokio::sync::mpsc;

pub mod manifests;

/// A validated snapshot of everything the source knows, or why the newest configuration
/// was rejected (the writer then keeps the last good State).
pub type SourceUpdate = Result<Snapshot, ConfigErrors>;

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
