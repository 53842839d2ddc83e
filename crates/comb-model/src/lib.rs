//! Comb's State: the one in-memory model that sources write and reconcilers read.
//!
//! Pure Rust with no I/O, so it can be unit-tested and fuzzed by itself. Sources
//! (the manifests directory, later the Kubernetes API) build a [`Snapshot`]; the
//! only mutator, [`State::replace`], swaps it in and stamps a new generation.
#![forbid(unsafe_code)]

mod objects;
mod snapshot;
mod state;

pub use objects::*;
pub use snapshot::Snapshot;
pub use state::{Generation, State};

pub mod identity;
pub mod l7;
pub mod lb;
pub mod maglev;
pub mod mesh;
pub mod pipeline;
pub mod policy;
pub mod policy_compile;
pub mod terms;
