//! The Kubernetes API source (`combd --kubeconfig PATH`, or in-cluster config): one watcher
//! per kind (kube_watch) feeds a store (kube_store) that builds State through the same
//! validation and conversion as the manifests directory, object by object.
//!
//! Every Pod of the cluster is read, as every Pod of the manifests directory is: the
//! pipeline programs the datapath for this node's pods (spec.nodeName) and uses the others
//! as policy peers and endpoints. A pod's interface and cgroup come from its sandbox as
//! comb-cni reported it (cni_spool), unless its `comb.dev/interface` / `comb.dev/cgroup`
//! annotations say otherwise. A rejected object gets a Kubernetes Event (kube_events).

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, Result};
use comb_config::{ConfigError, ConfigErrors};
use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};
use tokio::sync::mpsc;

use super::cni_spool::{self, SpoolConfig};
use super::kube_events::EventReporter;
use super::kube_kinds::KINDS;
use super::kube_store::Store;
use super::kube_watch::{KindEvent, watch_kind};
use super::{Source, SourceUpdate};

/// Changes are applied together until none arrived for BATCH_QUIET, or for at most
/// BATCH_WINDOW after the first: a relist or a burst of updates becomes one State generation,
/// not hundreds, and a lone change waits only BATCH_QUIET.
const BATCH_QUIET: Duration = Duration::from_millis(3);
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// How often a kubeconfig that cannot be used is tried again.
const CONFIG_RETRY: Duration = Duration::from_secs(2);

pub struct KubernetesSource {
    /// `None`: in-cluster configuration (service account token, KUBERNETES_SERVICE_HOST).
    pub kubeconfig: Option<PathBuf>,
    /// Where comb-cni reports pod sandboxes, and where the kubelet's pod cgroups are.
    pub spool: SpoolConfig,
    /// This node: the reporting instance of the Events on rejected objects.
    pub node: String,
}

impl Source for KubernetesSource {
    fn describe(&self) -> String {
        match &self.kubeconfig {
            Some(p) => format!("kubernetes (kubeconfig {})", p.display()),
            None => "kubernetes (in-cluster)".into(),
        }
    }

    fn run(
        self: Box<Self>,
        updates: mpsc::Sender<SourceUpdate>,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(run(self.kubeconfig, self.spool, self.node, updates))
    }
}

async fn client(kubeconfig: &Option<PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => Config::incluster().context("in-cluster Kubernetes configuration")?,
    };
    Client::try_from(config).context("Kubernetes client")
}

async fn run(
    kubeconfig: Option<PathBuf>,
    spool: SpoolConfig,
    node: String,
    updates: mpsc::Sender<SourceUpdate>,
) {
    let client = loop {
        match client(&kubeconfig).await {
            Ok(c) => break c,
            Err(e) => {
                // Reported like a rejected configuration: the agent keeps its last State.
                let origin = kubeconfig.clone().unwrap_or_else(|| "in-cluster".into());
                let err = ConfigError::new(&origin, 0, None, format!("{e:#}"));
                let update = SourceUpdate {
                    snapshot: None,
                    errors: ConfigErrors(vec![err]),
                };
                if updates.send(update).await.is_err() {
                    return;
                }
                tokio::time::sleep(CONFIG_RETRY).await;
            }
        }
    };
    let (tx, mut rx) = mpsc::channel(1024);
    let mut watchers = tokio::task::JoinSet::new();
    for kind in KINDS {
        watchers.spawn(watch_kind(client.clone(), *kind, tx.clone()));
    }
    watchers.spawn(cni_spool::watch(spool, tx.clone()));
    drop(tx);
    let mut store = Store::new(KINDS);
    let mut events = EventReporter::new(client.clone(), &node);
    while let Some(first) = rx.recv().await {
        apply(&mut store, first);
        let end = tokio::time::Instant::now() + BATCH_WINDOW;
        loop {
            let quiet = (tokio::time::Instant::now() + BATCH_QUIET).min(end);
            tokio::select! {
                Some(ev) = rx.recv() => apply(&mut store, ev),
                _ = tokio::time::sleep_until(quiet) => break,
            }
        }
        if !store.ready() {
            // No State yet (a partial one would look like deletions); say what holds it up.
            let errors = store.problems();
            if !errors.is_empty() {
                let update = SourceUpdate {
                    snapshot: None,
                    errors,
                };
                if updates.send(update).await.is_err() {
                    return;
                }
            }
            continue;
        }
        let (snapshot, errors) = store.build();
        events.report(store.rejections());
        let update = SourceUpdate {
            snapshot: Some(snapshot),
            errors,
        };
        if updates.send(update).await.is_err() {
            return;
        }
    }
}

fn apply(store: &mut Store, ev: KindEvent) {
    match ev {
        KindEvent::RelistStart(k) => store.relist_start(k),
        KindEvent::RelistDone(k) => {
            tracing::debug!(kind = k, "listed");
            store.relist_done(k)
        }
        KindEvent::Apply(k, o) => store.apply(k, o),
        KindEvent::Delete(k, o) => store.delete(k, &o),
        KindEvent::Problem(k, p) => store.set_problem(k, p),
        KindEvent::Sandboxes(s, problems) => store.set_sandboxes(s, problems),
    }
}
