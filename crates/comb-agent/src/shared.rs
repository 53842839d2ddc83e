//! What the agent's tasks share: State, the datapath and the status the readers report.

use std::sync::Mutex;
use std::time::Instant;

use comb_datapath::Datapath;
use comb_model::State;

use crate::args::Args;

pub struct Shared {
    pub args: Args,
    pub started: Instant,
    pub inner: Mutex<Inner>,
}

pub struct Inner {
    pub state: State,
    /// None once shut down.
    pub datapath: Option<Datapath>,
    pub applied_generation: u64,
    pub splice_enabled: bool,
    pub config_errors: Vec<String>,
    pub datapath_errors: Vec<String>,
    pub config_reloads: u64,
    pub config_rejects: u64,
}
