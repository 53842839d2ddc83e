//! The admin API's wire types, shared with the `comb` CLI.
//!
//! One JSON request per line on the unix socket, one JSON response line back.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Endpoints,
    SpliceStats,
    SetSplice { enabled: bool },
    Metrics,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok { data: serde_json::Value },
    Error { message: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub manifests: String,
    pub pin_dir: String,
    /// Generation of the State in force (the last good configuration).
    pub generation: u64,
    /// Generation the datapath reconciler last applied completely.
    pub applied_generation: u64,
    pub splice_enabled: bool,
    pub local_endpoints: usize,
    /// Errors of the newest manifests that could not be applied; empty when they are good.
    pub config_errors: Vec<String>,
    /// Errors the reconciler met making the datapath match State (retried on next change).
    pub datapath_errors: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRow {
    pub pod: String,
    pub namespace: String,
    pub ip: String,
    pub node: String,
    /// The pod's cgroup when it is local and its programs are attached.
    pub cgroup: Option<String>,
    pub local: bool,
    /// Whether the pod's connections to other local pods are spliced.
    pub splice: bool,
}
