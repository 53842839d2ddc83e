//! Service load-balancing entries compiled from State: what the socket LB must do for
//! each Service VIP:port on a node.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::objects::{ObjKey, Protocol};

mod compile;
pub use compile::compile_frontends;

/// One Service VIP:port/protocol as the socket LB holds it: the backends new connections may
/// choose. The pipeline's desired entry and what the datapath reads back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbService {
    pub vip: IpAddr,
    pub port: u16,
    /// 6 = TCP, 17 = UDP.
    pub protocol: u8,
    /// The active backends, in the order given (read back in the same order).
    pub backends: Vec<(IpAddr, u16)>,
    pub maglev: bool,
    /// `sessionAffinity: ClientIP` timeout; 0 = off.
    pub affinity_timeout_secs: u32,
}

/// Annotation selecting the backend choice: `maglev` for consistent hashing.
pub const ANNOTATION_LB: &str = "comb.dev/lb";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    Ready,
    /// Serving but terminating: used only when no ready backend remains.
    Terminating,
    /// Neither ready nor serving-terminating: never used; listed for `comb service list`.
    NotReady,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbAlgorithm {
    Random,
    Maglev,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LbBackend {
    pub ip: IpAddr,
    pub port: u16,
    pub state: BackendState,
    pub node: Option<String>,
    /// Whether the datapath picks this backend for new connections.
    pub active: bool,
}

/// One Service VIP:port/protocol and its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbFrontend {
    pub service: ObjKey,
    pub port_name: Option<String>,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub algorithm: LbAlgorithm,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity_timeout_secs: Option<u32>,
    /// Every endpoint of the Service for this port, with its state; `active` marks the ones
    /// new connections may choose.
    pub backends: Vec<LbBackend>,
}

impl LbFrontend {
    pub fn active_backends(&self) -> impl Iterator<Item = &LbBackend> {
        self.backends.iter().filter(|b| b.active)
    }
}
