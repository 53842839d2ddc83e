//! Comb's eBPF datapath: the programs under `bpf/`, compiled at build time and embedded,
//! loaded, attached and pinned under bpffs; typed access to their maps.

mod lb;
pub mod lb_maps;
pub mod maps;
pub mod policy;
mod policy_dp;
pub mod policy_events;
pub mod policy_maps;
pub mod proxy_routing;
pub mod proxy_splice;
mod splice;
mod sys;

pub use lb::{
    IPPROTO_TCP, IPPROTO_UDP, LbService, LbStats, MAX_BACKENDS_PER_SERVICE, SocketLbMode,
    current_netns_cookie,
};
pub use policy::{
    CtEntry, Direction, IpcacheEntry, PolicyConfig, PolicyEndpoint, PolicyKey, PolicyMetric,
    PolicyValue, ProxyFamily, Reason, Verdict,
};
pub use policy_events::{FlowEvent, FlowEventReader};
pub use proxy_splice::{PairHandle, ProxySplice, ProxySpliceStats};
pub use splice::{Datapath, DatapathOptions, EndpointInfo, SpliceStats};

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    missing_docs
)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/splice.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    missing_docs
)]
mod sock_skel {
    include!(concat!(env!("OUT_DIR"), "/sock.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    missing_docs
)]
mod policy_skel {
    include!(concat!(env!("OUT_DIR"), "/policy.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    missing_docs
)]
mod proxy_splice_skel {
    include!(concat!(env!("OUT_DIR"), "/proxy_splice.skel.rs"));
}
