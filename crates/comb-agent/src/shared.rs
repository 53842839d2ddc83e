//! What the agent's tasks share: State, the datapath and the status the readers report.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use comb_datapath::Datapath;
use comb_model::State;

use crate::args::{Args, SocketLb};
use crate::flows::{FlowMsg, SharedIndex};
use crate::identity_store::IdentityStore;
use crate::node_proxy::NodeProxy;
use crate::reconcile::policy::DesiredPolicy;
use comb_model::identity::{IdentityAllocator, IdentityTable};

pub struct Shared {
    pub args: Args,
    pub started: Instant,
    /// The socket LB's cgroup (relative to the cgroup root) and mode, or why it is off;
    /// fixed by the flags for the agent's life.
    pub socket_lb: Result<(PathBuf, SocketLb), String>,
    pub inner: Mutex<Inner>,
    /// Flow events for `comb monitor` subscribers.
    pub flows: tokio::sync::broadcast::Sender<FlowMsg>,
    /// Names for flow events, rebuilt at each reconcile (read without the agent lock).
    pub flow_index: SharedIndex,
    /// The node L7 proxy (None with `--proxy off`, or once shut down). A lock of its own:
    /// metrics and stats read it without the agent lock.
    pub proxy: Mutex<Option<NodeProxy>>,
}

pub struct Inner {
    pub state: State,
    /// None once shut down.
    pub datapath: Option<Datapath>,
    pub applied_generation: u64,
    pub splice_enabled: bool,
    pub config_errors: Vec<String>,
    pub datapath_errors: Vec<String>,
    /// Service frontends the last reconcile could not program, with why.
    pub lb_skipped: Vec<String>,
    /// False until the first good snapshot was reconciled: that one must run even when it
    /// equals the empty initial State (an empty manifests directory still has to attach the
    /// socket LB and clear adopted leftovers).
    pub reconciled_once: bool,
    pub config_reloads: u64,
    pub config_rejects: u64,
    /// Identity numbers (persisted through `identity_store`).
    pub identities: IdentityAllocator,
    pub identity_store: IdentityStore,
    /// The identities of the State in force.
    pub identity_table: IdentityTable,
    /// What the last reconcile wanted of the policy datapath.
    pub policy: DesiredPolicy,
}
