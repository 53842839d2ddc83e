//! The agent's admin API: its wire types and a blocking client, shared by `combd` and the
//! `comb` CLI (and the testkit), so neither side links the other.
//!
//! One JSON request per line on the unix socket, one JSON response line back.

#![forbid(unsafe_code)]

pub mod client;
pub mod proxy;
pub mod table;
pub mod tunnel;

use std::net::{IpAddr, SocketAddr};

use comb_model::Protocol;
use comb_model::lb::{BackendState, LbAlgorithm};
use serde::{Deserialize, Serialize};

/// A request: a read-only query, answered from what the agent last published (and the
/// kernel's maps) without waiting for the writer, or a control request, which the agent's
/// single writer carries out in order with configuration changes. One JSON object per line,
/// `{"cmd": "<name>", ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Request {
    Query(Query),
    Control(Control),
}

impl From<Query> for Request {
    fn from(q: Query) -> Self {
        Request::Query(q)
    }
}

impl From<Control> for Request {
    fn from(c: Control) -> Self {
        Request::Control(c)
    }
}

/// Changes the agent's behaviour; carried out by the writer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Control {
    /// Switch local pod-to-pod splice on or off (new connections): `bool`.
    SetSplice { enabled: bool },
    /// Sent by a new combd starting while this one runs (docs/upgrades.md): stop the
    /// control plane, release the admin socket and the metrics address, and drain the node
    /// proxy while the successor takes its listeners over. Answered once released:
    /// `{"pid": <this agent's pid>}`.
    Handover,
}

/// Reads only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Query {
    /// `Status`; never waits for a reconcile.
    Status,
    /// Every pod with an address: `Vec<EndpointRow>`.
    Endpoints,
    /// The splice's counters.
    SpliceStats,
    /// Prometheus text (the same as `/metrics`).
    Metrics,
    /// Service frontends of this node: `Vec<ServiceRow>`.
    Services,
    /// Security identities known to this node: `Vec<IdentityRow>`.
    Identities,
    /// A local pod's policy as the datapath holds it: `EndpointPolicy`.
    EndpointPolicy {
        /// `namespace/name`, or `name` in namespace `default`.
        pod: String,
    },
    /// Streams `MonitorLine`s (one response line each, `{"result":"ok","data":...}`) until
    /// the client goes away. Filters: a pod (either end), and forwarded or dropped only.
    Monitor {
        pod: Option<String>,
        verdict: Option<VerdictFilter>,
    },
    /// The node proxy's summary: `ProxyStatsReply`.
    ProxyStats,
    /// Workload certificates the agent holds or wants: `Vec<CertRow>`.
    CertList,
    /// The node proxy's HBONE tunnels: `tunnel::TunnelsReply`.
    Tunnels,
}

/// One workload certificate (`comb cert list`): one per identity the node needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertRow {
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub identity: String,
    /// Lower-case hex; None while pending.
    pub serial: Option<String>,
    /// Unix seconds.
    pub not_before: Option<f64>,
    pub not_after: Option<f64>,
    /// `valid`, `renewing` (renewal due or retrying, the certificate still valid),
    /// `expired` (no longer offered), `pending` (none issued yet).
    pub state: String,
    /// The last failure to obtain or renew it, cleared by success.
    pub last_error: Option<String>,
}

/// The certificate reconciler in `comb status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CertsSummary {
    /// False without `--ca-address`: no certificates, mesh mTLS off.
    pub enabled: bool,
    /// The CA's address.
    pub ca: Option<String>,
    /// Identities the node needs.
    pub wanted: usize,
    /// Of those, certificates valid now.
    pub valid: usize,
    /// Since when (unix seconds) requests to the CA fail; None when the last one succeeded.
    pub failing_since: Option<f64>,
    /// Whether the CA could not be reached (vs. answered with an error).
    pub unreachable: bool,
    pub last_error: Option<String>,
    /// The earliest `not_after` among the certificates held (unix seconds).
    pub valid_until: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProxyStatsReply {
    /// Transparent listener port.
    pub port: u16,
    /// The datapath's listener slot holds the proxy's IPv4 listener.
    pub listener_registered: bool,
    /// The node's policy routing for redirected flows is in place.
    pub routing_installed: bool,
    pub active_connections: usize,
    /// Sockets handed to the kernel now and the bytes it moved; None without the splice.
    pub spliced_sockets: Option<u64>,
    pub spliced_bytes: Option<u64>,
    pub stats: proxy::ProxyStats,
}

/// The socket splice's counters (`Request::SpliceStats`), summed over CPUs. The agent sends
/// the datapath's own counters; this is their shape on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpliceStats {
    /// Current sockhash entries.
    pub sockets: u64,
    pub redirected_msgs: u64,
    pub redirected_bytes: u64,
    pub passed_msgs: u64,
    pub passed_bytes: u64,
    pub sockets_added: u64,
    pub add_failures: u64,
    /// Sockets that could not be marked TCP-first (no memory); 0 unless something is wrong.
    pub sticky_failures: u64,
    pub sockets_closed: u64,
    /// Sockets moved to TCP because their peer held the queue limit unread (backpressure).
    /// Absent from an older agent's answer.
    #[serde(default)]
    pub queue_fallbacks: u64,
    /// Sockets moved to TCP because their peer stayed over the stall limit too long.
    #[serde(default)]
    pub stall_fallbacks: u64,
    /// The most unread redirected bytes a peer held when its sender was judged.
    #[serde(default)]
    pub max_unread: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictFilter {
    Forwarded,
    Dropped,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRow {
    pub id: u32,
    /// Cilium-style labels: `reserved:host`, `k8s:app=web`, `cidr:10.0.0.0/8`.
    pub labels: Vec<String>,
    /// The ipcache prefixes that resolve to it.
    pub prefixes: Vec<String>,
    /// `namespace/name` of the pods that have it.
    pub pods: Vec<String>,
}

/// `comb endpoint policy get`: what the kernel holds for one local pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPolicy {
    pub pod: String,
    pub interface: String,
    pub ifindex: u32,
    pub identity: u32,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// `Kind namespace/name` of every policy selecting the pod.
    pub policies: Vec<String>,
    /// Read back from the kernel's policy map, most specific first within an identity.
    pub entries: Vec<PolicyEntryRow>,
    /// Whether the map holds exactly what the compiler wants for this pod.
    pub in_sync: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEntryRow {
    pub direction: String,
    /// 0 = every identity without entries of its own.
    pub identity: u32,
    pub identity_labels: Vec<String>,
    /// `any`, `TCP`, `UDP`, `SCTP` or a number.
    pub protocol: String,
    /// `any`, `80`, `8000-8063`.
    pub ports: String,
    pub verdict: String,
    pub reason: String,
    /// `Kind namespace/name` of the deciding policy.
    pub policy: Option<String>,
}

/// One line of `comb monitor`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
#[allow(clippy::large_enum_variant)] // one line at a time; boxing buys nothing
pub enum MonitorLine {
    Flow(FlowRow),
    /// Events that never reached this client: `kernel` (ring buffer full) and `agent` (this
    /// client read too slowly), counted since the previous notice.
    Lost {
        kernel: u64,
        agent: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRow {
    /// Unix time, seconds.
    pub time: f64,
    pub node: String,
    /// Of the local pod: `ingress` (to it) or `egress` (from it).
    pub direction: String,
    /// `forwarded` or `dropped`.
    pub verdict: String,
    pub reason: String,
    pub protocol: String,
    pub src: String,
    pub dst: String,
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub policy: Option<String>,
    pub bytes: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok { data: serde_json::Value },
    Error { message: String },
}

/// When a generation replaced State and when the datapath held it completely (unix seconds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationTimes {
    pub generation: u64,
    pub replaced_at: f64,
    pub applied_at: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// When `applied_generation` was applied (unix seconds).
    #[serde(default)]
    pub applied_at: Option<f64>,
    /// The most recent generations (oldest first, at most 64) with their times.
    #[serde(default)]
    pub generations: Vec<GenerationTimes>,
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
    /// Identity policy programs on the pods' interfaces.
    pub policy: bool,
    pub identities: usize,
    /// Local pods with policy programs attached.
    pub policy_endpoints: usize,
    /// Local pods whose traffic policy cannot judge, with why.
    pub policy_unenforced: Vec<String>,
    /// The node proxy's listener (`127.0.0.1:PORT`), None when it is off.
    #[serde(default)]
    pub proxy: Option<String>,
    /// Workload certificates (the certificate reconciler's own published state).
    #[serde(default)]
    pub certificates: CertsSummary,
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
    /// Enrolment: `mesh`, `none` (`istio.io/dataplane-mode: none`) or `sidecar`.
    #[serde(default)]
    pub mode: String,
    /// Local mesh pods: the effective PeerAuthentication mode, with port exceptions
    /// (`STRICT 8080=PERMISSIVE`).
    #[serde(default)]
    pub mtls: Option<String>,
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
    fn requests_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&Request::Query(Query::Services)).unwrap(),
            r#"{"cmd":"services"}"#
        );
        let set = Request::Control(Control::SetSplice { enabled: true });
        let text = r#"{"cmd":"set_splice","enabled":true}"#;
        assert_eq!(serde_json::to_string(&set).unwrap(), text);
        assert_eq!(serde_json::from_str::<Request>(text).unwrap(), set);
        let q: Request =
            serde_json::from_str(r#"{"cmd":"endpoint_policy","pod":"shop/web"}"#).unwrap();
        assert_eq!(
            q,
            Request::Query(Query::EndpointPolicy {
                pod: "shop/web".into()
            })
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Query(Query::Status)
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }
}
