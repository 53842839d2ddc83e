//! The one writer: a thread that owns State, the identity allocator and every change to the
//! datapath and the proxy's table, and applies source updates, control requests and timers
//! in the order they arrive. (Conntrack garbage collection is not its job: it removes only
//! expired entries the BPF programs created, nothing State decides, so it runs on a thread
//! of its own — `crate::ct_gc` — and a sweep of a full table never delays a configuration
//! change.) After each step it publishes an immutable [`Published`] that
//! readers load without waiting for it.

use std::collections::BTreeMap;
use std::sync::Arc;

use comb_datapath::Datapath;
use comb_model::State;
use comb_model::identity::IdentityAllocator;
use comb_model::pipeline::{self, Desired};
use tokio::sync::{mpsc, oneshot};

use crate::api::Control;
use crate::config::AgentConfig;
use crate::identity_store::IdentityStore;
use crate::node_proxy::NodeProxy;
use crate::reconcile;
use crate::source::SourceUpdate;
use crate::status::{Board, Published};

/// What the writer is asked to do.
pub enum WriterMsg {
    // Boxed: a snapshot is large and the other messages are small.
    Source(Box<SourceUpdate>),
    /// Retry a reconcile that met errors (e.g. a pod cgroup that appeared late).
    Resync,
    /// A control request of the admin API; the reply is the response's data or an error.
    Control(Control, oneshot::Sender<Result<serde_json::Value, String>>),
    /// Turn flow events on or off (the monitor pump asks when subscribers come and go).
    FlowEvents(bool),
    /// Finish: the agent is shutting down (readers may still hold senders).
    Stop,
}

pub struct Writer {
    cfg: Arc<AgentConfig>,
    datapath: Arc<Datapath>,
    proxy: Arc<std::sync::Mutex<Option<NodeProxy>>>,
    state: State,
    identities: IdentityAllocator,
    identity_store: IdentityStore,
    /// False until the first good snapshot was reconciled: that one must run even when it
    /// equals the empty initial State (an empty manifests directory still has to attach the
    /// socket LB and clear adopted leftovers).
    reconciled_once: bool,
    /// The writer's own copy of what it publishes.
    status: Published,
    board: Board,
    /// The certificate reconciler's input (None without a CA): the identities wanted after
    /// each step. A watch channel: sending never blocks.
    certs_wanted: Option<crate::certs::Wanted>,
}

impl Writer {
    pub fn new(
        cfg: Arc<AgentConfig>,
        datapath: Arc<Datapath>,
        proxy: Arc<std::sync::Mutex<Option<NodeProxy>>>,
        identities: IdentityAllocator,
        identity_store: IdentityStore,
        board: Board,
        certs_wanted: Option<crate::certs::Wanted>,
    ) -> Self {
        let status = Published {
            splice_enabled: cfg.splice,
            ..Published::clone(&board.load())
        };
        Writer {
            cfg,
            datapath,
            proxy,
            state: State::new(),
            identities,
            identity_store,
            reconciled_once: false,
            status,
            board,
            certs_wanted,
        }
    }

    /// Runs until told to stop (or every sender is gone).
    pub fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        self.publish();
        while let Some(msg) = rx.blocking_recv() {
            let mut trim = false;
            match msg {
                WriterMsg::Source(update) => {
                    self.source_update(*update);
                    trim = true;
                }
                WriterMsg::Resync => {
                    if !self.status.datapath_errors.is_empty() {
                        self.reconcile();
                    }
                }
                WriterMsg::Control(c, reply) => {
                    let _ = reply.send(self.control(c));
                }
                WriterMsg::FlowEvents(on) => self.flow_events(on),
                WriterMsg::Stop => return,
            }
            self.publish();
            if trim {
                // The previous State, its pipeline output and the source's parsing are
                // freed now; glibc would keep the pages resident (tens of MiB at thousands
                // of pods). After publishing, so nothing waits for it.
                comb_datapath::trim_heap();
            }
        }
    }

    fn publish(&self) {
        self.board.store(Arc::new(self.status.clone()));
    }

    fn source_update(&mut self, update: SourceUpdate) {
        tracing::debug!("source update received");
        let SourceUpdate { snapshot, errors } = update;
        let rejected = snapshot.is_none();
        if !errors.is_empty() {
            self.status.config_rejects += 1;
            let previous = std::mem::take(&mut self.status.config_errors);
            self.status.config_errors = errors.0.iter().map(|e| e.to_string()).collect();
            // A partial update repeats the errors still in force: log only new ones.
            for e in &self.status.config_errors {
                if !previous.contains(e) {
                    tracing::error!(error = %e, generation = self.state.generation(), rejected_all = rejected, "configuration rejected; keeping the last good version");
                }
            }
        } else {
            self.status.config_errors.clear();
        }
        let Some(snapshot) = snapshot else {
            return;
        };
        let changed = self.state.replace(snapshot);
        if changed {
            self.status.config_reloads += 1;
            self.status.replaced(self.state.generation());
            self.status.state = self.state.shared_snapshot();
            self.status.local_endpoints = self.state.local_pods(&self.cfg.node).count();
            tracing::info!(
                generation = self.state.generation(),
                "configuration applied"
            );
            // Readers see the new generation (not yet applied) while it is reconciled.
            self.publish();
        }
        if changed || !self.reconciled_once {
            self.reconcile();
        }
    }

    /// State → pipeline → reconcilers (proxy table, datapath).
    fn reconcile(&mut self) {
        let node = self.cfg.node.clone();
        let interfaces = interface_indexes(&self.state, &node);
        let desired = pipeline::compute(
            &self.state,
            &node,
            &mut self.identities,
            &self.cfg.pipeline(),
            &interfaces,
        );
        // Numbers are saved before any map holds them, so a crash cannot orphan them.
        let store_error = self
            .identity_store
            .save(&self.identities)
            .err()
            .map(|e| format!("saving identities: {e:#}"));
        self.log_new_warnings(&desired);
        if let Some(proxy) = self.proxy.lock().expect("proxy lock poisoned").as_ref() {
            proxy.update(desired.proxy.clone());
        }
        let generation = desired.generation;
        let socket_lb = self.cfg.socket_lb.as_ref().ok();
        let mut uplink_errors = Vec::new();
        // Without the policy programs there is no mesh datapath: no uplink program either.
        let uplinks = if self.cfg.policy {
            crate::uplinks::resolve(&self.cfg.uplinks, &mut uplink_errors)
        } else {
            Default::default()
        };
        let outcome = reconcile::apply(&self.datapath, &desired, socket_lb, &uplinks);
        let mut errors = outcome.errors;
        errors.extend(uplink_errors);
        errors.extend(store_error);
        for e in &errors {
            tracing::warn!(error = %e, generation, "datapath reconcile");
        }
        self.reconciled_once = true;
        self.status.lb_services = outcome.lb_services;
        self.status.socket_lb = self.datapath.lb().attachment();
        self.status.policy_endpoints = self.datapath.policy().attachments().len();
        if let Some(tx) = &self.certs_wanted {
            let want = &desired.mesh.identities;
            tx.send_if_modified(|cur| {
                let changed = cur != want;
                if changed {
                    cur.clone_from(want);
                }
                changed
            });
        }
        self.status.desired = Arc::new(desired);
        if errors.is_empty() {
            self.status.applied(generation);
        }
        self.status.datapath_errors = errors;
    }

    /// Warnings are logged when they change, not on every reconcile.
    fn log_new_warnings(&self, desired: &Desired) {
        let before = &self.status.desired;
        if desired.policy.unenforced != before.policy.unenforced {
            for s in &desired.policy.unenforced {
                tracing::warn!(pod = %s, "policy not enforced");
            }
        }
        if desired.lb_skipped != before.lb_skipped {
            for s in &desired.lb_skipped {
                tracing::warn!(frontend = %s, "service frontend not programmed");
            }
        }
    }

    fn control(&mut self, c: Control) -> Result<serde_json::Value, String> {
        match c {
            Control::SetSplice { enabled } => {
                self.datapath
                    .splice()
                    .set_enabled(enabled)
                    .map_err(|e| format!("switching splice: {e:#}"))?;
                self.status.splice_enabled = enabled;
                tracing::info!(enabled, "splice switched");
                Ok(serde_json::Value::Bool(enabled))
            }
            // The admin server hands it to the serve loop, never to the writer.
            Control::Handover => Err("handover is not a writer request".into()),
        }
    }

    fn flow_events(&mut self, on: bool) {
        let result = self.datapath.policy().config().and_then(|mut cfg| {
            cfg.events = on;
            self.datapath.policy().set_config(&cfg)
        });
        if let Err(e) = result {
            tracing::warn!(error = %format!("{e:#}"), on, "switching flow events");
        }
    }
}

/// The indexes of the local pods' host-side interfaces in the agent's network namespace
/// (the pipeline itself does no I/O).
fn interface_indexes(state: &State, node: &str) -> BTreeMap<String, u32> {
    pipeline::interface_names(state, node)
        .filter_map(|name| {
            let index = nix::net::if_::if_nametoindex(name).ok()?;
            Some((name.to_owned(), index))
        })
        .collect()
}
