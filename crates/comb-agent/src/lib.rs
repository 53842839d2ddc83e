//! combd: the per-node agent.
//!
//! Data flows one way: the manifests source produces snapshots, the agent swaps them into
//! State through its one mutator, and the datapath reconciler makes the kernel match State.
//! The admin API and `/metrics` only read.
#![forbid(unsafe_code)]

mod admin;
mod args;
mod flows;
mod identity_store;
mod metrics;
mod node_proxy;
mod policy_rows;
mod reconcile;
mod run;
mod service_rows;
mod shared;
mod source;

pub use args::Args;
/// The admin API's wire types live in comb-api so the CLI need not link the agent.
pub use comb_api as api;
pub use run::{main, run};
