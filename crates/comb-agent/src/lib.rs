//! combd: the per-node agent.
//!
//! Data flows one way: a [`source`] produces State snapshots; the one [`writer`] swaps them
//! into State, runs the pure pipeline (comb_model::pipeline) and hands its result to the
//! reconcilers (datapath maps and attachments, the proxy's table); it publishes an immutable
//! status that the admin API and `/metrics` ([`view`]) read without waiting for it.
#![forbid(unsafe_code)]

mod admin;
mod args;
mod certs;
mod cgroup_path;
mod config;
mod ct_gc;
mod flows;
mod handover;
mod identity_store;
mod metrics;
mod node_proxy;
mod policy_rows;
mod reconcile;
mod run;
mod service_rows;
pub mod source;
mod status;
mod uplinks;
mod view;
mod writer;

pub use args::Args;
/// The admin API's wire types live in comb-api so the CLI need not link the agent.
pub use comb_api as api;
pub use config::{AgentConfig, CertsConfig, ProxyConfig};
pub use run::{main, run, run_with};
