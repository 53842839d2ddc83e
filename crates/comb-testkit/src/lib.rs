//! Comb's testkit: the benchmarks (`comb bench`) and the traffic probes that tests and
//! benchmarks run inside lab pods (`comb probe`). The `comb` binary only parses its command
//! line and dispatches here: [`bench::run`] and [`probe::run`] take the clap subcommands
//! defined in this crate.
//!
//! It talks to agents only through their admin API (comb-api) and processes, and reuses
//! comb-model/comb-config for pure computations, so `comb` never links the agent or proxy.

// One poll(2) call needs libc; it lives in `sys`, the only module allowed unsafe code.
#![deny(unsafe_code)]

pub mod bench;
pub mod probe;
mod probe_http;
mod probe_load;
#[allow(unsafe_code)]
mod sys;
