//! The admin API's wire types, shared with the `comb` CLI.
//!
//! One JSON request per line on the unix socket, one JSON response line back.

use std::net::{IpAddr, SocketAddr};

use comb_model::Protocol;
use comb_model::lb::{BackendState, LbAlgorithm};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Endpoints,
    SpliceStats,
    SetSplice {
        enabled: bool,
    },
    Metrics,
    /// Service frontends of this node: `Vec<ServiceRow>`.
    Services,
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
    /// Socket LB as attached now: "on", "host-only" or "off".
    pub socket_lb: String,
    /// The cgroup the socket LB is attached to, relative to the cgroup root ("/" = the root).
    pub lb_cgroup: Option<String>,
    /// Why the socket LB is off when the flags did not switch it on (or it failed to attach).
    pub socket_lb_note: Option<String>,
    /// Service frontends in the datapath's socket-LB maps.
    pub lb_services: usize,
    /// Service frontends that cannot be programmed, with why (e.g. SCTP).
    pub lb_skipped: Vec<String>,
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

/// One Service frontend (VIP:port/protocol) for `comb service list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRow {
    /// `namespace/name`.
    pub service: String,
    pub port_name: Option<String>,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub algorithm: LbAlgorithm,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity_timeout_secs: Option<u32>,
    /// Every endpoint of the Service for this port, sorted by address.
    pub backends: Vec<BackendRow>,
    /// Whether the datapath holds this frontend with exactly its active backends.
    pub programmed: bool,
}

impl ServiceRow {
    /// `10.96.0.10:80/TCP`, `[fd00::10]:80/TCP`.
    pub fn frontend(&self) -> String {
        let proto = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        };
        format!("{}/{proto}", SocketAddr::new(self.vip, self.port))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRow {
    pub ip: IpAddr,
    pub port: u16,
    pub state: BackendState,
    pub node: Option<String>,
    /// 1 when new connections may pick it, 0 otherwise (not ready, or only a fallback).
    pub weight: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_brackets_ipv6() {
        let mut r = ServiceRow {
            service: "apps/web".into(),
            port_name: None,
            vip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            algorithm: LbAlgorithm::Random,
            affinity_timeout_secs: None,
            backends: vec![],
            programmed: true,
        };
        assert_eq!(r.frontend(), "10.96.0.10:80/TCP");
        r.vip = "fd00::10".parse().unwrap();
        r.protocol = Protocol::Udp;
        assert_eq!(r.frontend(), "[fd00::10]:80/UDP");
    }

    #[test]
    fn services_request_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&Request::Services).unwrap(),
            r#"{"cmd":"services"}"#
        );
    }
}
