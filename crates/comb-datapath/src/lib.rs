//! Comb's eBPF datapath: the programs under `bpf/`, compiled at build time and embedded,
//! loaded, attached and pinned under bpffs; typed access to their maps.
//!
//! [`Datapath`] (module `datapath`) is the facade over the features, each in its own module:
//! [`splice`] (local socket splice), [`lb`] (socket load balancer), [`policy`] (identity
//! policy, flow events, proxy routing) and [`proxy_splice`] (the node proxy's kernel splice,
//! opened on its own by the proxy). Features share only the helpers below them: [`abi`]
//! (the `Pod` contract, `struct comb_addr`), `pin` (bpffs pinning), `cgroup`, `map_io`, `skel`
//! and `sys` (the one FFI module). Imports run one way, facade → features → helpers; a unit
//! test (`module_graph`) fails on a cycle.

pub mod abi;
mod cgroup;
mod datapath;
mod map_io;
mod pin;
mod skel;
mod sys;

pub mod lb;
pub mod policy;
pub mod proxy_splice;
pub mod splice;

#[cfg(test)]
mod module_graph;

pub use datapath::{Datapath, DatapathOptions};
pub use lb::{
    LbService, LbStats, MAX_BACKENDS_PER_SERVICE, SocketLb, SocketLbMode, current_netns_cookie,
};
pub use policy::{
    CtEntry, FlowEvent, FlowEventReader, IpcacheEntry, Policy, PolicyConfig, PolicyEndpoint,
    PolicyKey, PolicyMetric, PolicyValue, ProxyFamily,
};
pub use proxy_splice::{PairHandle, ProxySplice, ProxySpliceStats};
pub use splice::{EndpointInfo, Splice, SpliceStats};
