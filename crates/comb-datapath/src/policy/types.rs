//! The identity policy's values as the datapath API speaks them (`bpf/policy.c`): policy keys
//! and values, ipcache entries, conntrack entries, counters, configuration, and their encodings
//! into the map types of [`super::abi`]. Pure: the map access is in [`super`]. Directions,
//! verdicts and reasons are the model's ([`comb_model::terms`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use comb_model::terms::{Direction, Reason, ReasonCode, Verdict};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::abi::{
    IpcacheKey, PREFIX_ANY_PROTO, PREFIX_FULL, PREFIX_PROTO, PolicyConfigValue, PolicyLpmKey,
    PolicyLpmValue,
};
use crate::abi::CombAddr;

/// One entry of the node's policy table (`comb_policy`, an LPM trie).
///
/// `protocol == 0` matches every protocol (port and `port_prefix` are ignored); otherwise the
/// first `port_prefix` bits of `port` must match (16 = exactly this port, 0 = any port of the
/// protocol, k = the aligned block of 2^(16-k) ports containing `port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyKey {
    /// Host-side veth ifindex of the local endpoint.
    pub endpoint: u32,
    /// Peer identity; [`super::abi::ID_ANY`] (0) = every identity without its own
    /// entries.
    pub identity: u32,
    pub direction: Direction,
    /// IP protocol number; 0 = any.
    pub protocol: u8,
    /// Destination port, host order.
    pub port: u16,
    /// Leading significant bits of `port`, 0..=16.
    pub port_prefix: u8,
}

impl PolicyKey {
    /// Every protocol and port.
    pub fn any(endpoint: u32, identity: u32, direction: Direction) -> Self {
        Self {
            endpoint,
            identity,
            direction,
            protocol: 0,
            port: 0,
            port_prefix: 0,
        }
    }

    /// One protocol, one port (or every port of it with `port = None`).
    pub fn port(
        endpoint: u32,
        identity: u32,
        direction: Direction,
        protocol: u8,
        port: Option<u16>,
    ) -> Self {
        Self {
            endpoint,
            identity,
            direction,
            protocol,
            port: port.unwrap_or(0),
            port_prefix: if port.is_some() { 16 } else { 0 },
        }
    }

    /// The form this key reads back as from the map: port bits beyond the prefix zeroed, and
    /// port fields zero for "any protocol".
    pub fn canonical(&self) -> Result<Self> {
        Self::from_lpm(&self.to_lpm()?)
    }

    pub fn to_lpm(&self) -> Result<PolicyLpmKey> {
        ensure!(
            self.port_prefix <= 16,
            "port prefix {} is longer than 16 bits",
            self.port_prefix
        );
        let (prefixlen, port) = if self.protocol == 0 {
            (PREFIX_ANY_PROTO, 0)
        } else {
            (
                PREFIX_PROTO + u32::from(self.port_prefix),
                self.port & port_mask(self.port_prefix),
            )
        };
        Ok(PolicyLpmKey {
            prefixlen,
            endpoint: self.endpoint,
            identity: self.identity,
            direction: self.direction.to_raw(),
            protocol: self.protocol,
            port: port.to_be(),
        })
    }

    pub fn from_lpm(k: &PolicyLpmKey) -> Result<Self> {
        let direction = Direction::from_raw(k.direction)
            .with_context(|| format!("invalid direction {}", k.direction))?;
        let (protocol, port, port_prefix) = match k.prefixlen {
            PREFIX_ANY_PROTO => (0, 0, 0),
            p @ PREFIX_PROTO..=PREFIX_FULL if k.protocol != 0 => {
                let bits = (p - PREFIX_PROTO) as u8;
                (k.protocol, u16::from_be(k.port) & port_mask(bits), bits)
            }
            p => bail!(
                "policy key with prefix length {p} and protocol {}",
                k.protocol
            ),
        };
        Ok(Self {
            endpoint: k.endpoint,
            identity: k.identity,
            direction,
            protocol,
            port,
            port_prefix,
        })
    }
}

/// The leading `bits` bits of a port.
fn port_mask(bits: u8) -> u16 {
    match bits {
        0 => 0,
        b => u16::MAX << (16 - u32::from(b.min(16))),
    }
}

/// What a [`PolicyKey`] decides for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyValue {
    pub verdict: Verdict,
    /// Reported with the verdict. The datapath forwards only with a reason < 128 and drops
    /// only with one >= 128; a value that disagrees is reported as
    /// [`Reason::PolicyAllow`] / [`Reason::PolicyDenied`].
    pub reason: ReasonCode,
    /// [`Verdict::Redirect`]: the node proxy's port; 0 = none.
    pub proxy_port: u16,
    /// Userspace index of the deciding policy, 0 = none; reported in flow events.
    pub policy: u32,
}

impl PolicyValue {
    pub fn allow(policy: u32) -> Self {
        Self {
            verdict: Verdict::Allow,
            reason: Reason::PolicyAllow.into(),
            proxy_port: 0,
            policy,
        }
    }

    pub fn deny(reason: Reason, policy: u32) -> Self {
        Self {
            verdict: Verdict::Deny,
            reason: reason.into(),
            proxy_port: 0,
            policy,
        }
    }

    pub fn to_raw(&self) -> PolicyLpmValue {
        PolicyLpmValue {
            verdict: self.verdict.to_raw(),
            reason: self.reason.0,
            proxy_port: self.proxy_port,
            policy: self.policy,
        }
    }

    pub fn from_raw(v: &PolicyLpmValue) -> Result<Self> {
        Ok(Self {
            verdict: Verdict::from_raw(v.verdict)
                .with_context(|| format!("invalid verdict {}", v.verdict))?,
            reason: ReasonCode(v.reason),
            proxy_port: v.proxy_port,
            policy: v.policy,
        })
    }
}

/// The ipcache LPM key of a prefix: IPv4 as v4-mapped with 96 + its length. Host bits are
/// cleared.
pub fn ipcache_key(net: IpNet) -> IpcacheKey {
    match net.trunc() {
        IpNet::V4(n) => IpcacheKey {
            prefixlen: 96 + u32::from(n.prefix_len()),
            addr: CombAddr::from(IpAddr::V4(n.network())),
        },
        IpNet::V6(n) => IpcacheKey {
            prefixlen: u32::from(n.prefix_len()),
            addr: CombAddr::from(IpAddr::V6(n.network())),
        },
    }
}

/// The prefix an ipcache key names (inverse of [`ipcache_key`]).
pub fn ipcache_net(k: &IpcacheKey) -> Result<IpNet> {
    ensure!(k.prefixlen <= 128, "ipcache prefix length {}", k.prefixlen);
    let len = k.prefixlen as u8;
    let v6 = std::net::Ipv6Addr::from(k.addr.octets());
    Ok(match v6.to_ipv4_mapped() {
        Some(v4) if len >= 96 => IpNet::V4(Ipv4Net::new(v4, len - 96)?),
        _ => IpNet::V6(Ipv6Net::new(v6, len)?),
    })
}

/// What the ipcache holds for one prefix.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct IpcacheEntry {
    pub identity: u32,
    /// Host-side veth ifindex of the local pod with this address when it has ingress REDIRECT
    /// entries (a new TCP flow to it from another local pod is checked against them at the
    /// source, to be redirected to the node proxy); 0 otherwise.
    pub endpoint: u32,
}

/// The address family of a node proxy listener (`comb_proxy_listeners` slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ProxyFamily {
    V4,
    V6,
}

impl ProxyFamily {
    pub const BOTH: [ProxyFamily; 2] = [ProxyFamily::V4, ProxyFamily::V6];

    /// The L7 proxy listener's slot in `comb_proxy_listeners` ([`ListenerKind::slot`] for
    /// the others).
    pub fn slot(self) -> u32 {
        match self {
            ProxyFamily::V4 => super::abi::PROXY_LISTENER_V4,
            ProxyFamily::V6 => super::abi::PROXY_LISTENER_V6,
        }
    }

    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => ProxyFamily::V4,
            IpAddr::V6(_) => ProxyFamily::V6,
        }
    }
}

/// The kinds of node proxy listeners the datapath steers to (`comb_proxy_listeners`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ListenerKind {
    /// The L7 proxy: flows with a REDIRECT verdict (docs/l7.md).
    L7,
    /// HBONE outbound (comb-proxy's port 15001 listener): new TCP flows of mesh pods to HBONE
    /// peers, accepted with the original destination as local address and the pod as peer.
    HboneOut,
    /// HBONE inbound (comb-proxy's port 15008 listener): SYNs to `<local mesh pod>:15008`
    /// arriving on the node's uplinks, accepted with local address `<pod IP>:15008`.
    HboneIn,
}

impl ListenerKind {
    pub const ALL: [ListenerKind; 3] = [
        ListenerKind::L7,
        ListenerKind::HboneOut,
        ListenerKind::HboneIn,
    ];

    /// The slot of this kind's listener of `family` in `comb_proxy_listeners`.
    pub fn slot(self, family: ProxyFamily) -> u32 {
        use super::abi::*;
        let v4 = match self {
            ListenerKind::L7 => PROXY_LISTENER_V4,
            ListenerKind::HboneOut => HBONE_OUT_LISTENER_V4,
            ListenerKind::HboneIn => HBONE_IN_LISTENER_V4,
        };
        match family {
            ProxyFamily::V4 => v4,
            ProxyFamily::V6 => v4 + 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::L7 => "l7",
            ListenerKind::HboneOut => "hbone-out",
            ListenerKind::HboneIn => "hbone-in",
        }
    }
}

/// What the mesh makes of one address (`comb_mesh_addrs`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct MeshAddr {
    /// A remote pod reached through HBONE: mesh pods' new TCP flows to it are steered to the
    /// HBONE outbound listener.
    pub peer: bool,
    /// A local mesh pod's address (its host veth ifindex): HBONE to it on the uplink goes to
    /// the HBONE inbound listener.
    pub local: Option<u32>,
}

impl MeshAddr {
    pub fn peer() -> Self {
        Self {
            peer: true,
            local: None,
        }
    }

    pub fn local(ifindex: u32) -> Self {
        Self {
            peer: false,
            local: Some(ifindex),
        }
    }

    pub(crate) fn to_raw(self) -> super::abi::MeshAddrValue {
        use super::abi::{MESH_ADDR_F_LOCAL, MESH_ADDR_F_PEER};
        super::abi::MeshAddrValue {
            flags: if self.peer { MESH_ADDR_F_PEER } else { 0 }
                | if self.local.is_some() {
                    MESH_ADDR_F_LOCAL
                } else {
                    0
                },
            endpoint: self.local.unwrap_or(0),
        }
    }

    pub(crate) fn from_raw(v: &super::abi::MeshAddrValue) -> Self {
        use super::abi::{MESH_ADDR_F_LOCAL, MESH_ADDR_F_PEER};
        Self {
            peer: v.flags & MESH_ADDR_F_PEER != 0,
            local: (v.flags & MESH_ADDR_F_LOCAL != 0).then_some(v.endpoint),
        }
    }
}

/// A key of `comb_mesh_ports`: a local endpoint (host veth ifindex) and a destination port;
/// `port: None` is the endpoint's own entry (enrolment and default mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MeshPortKey {
    pub endpoint: u32,
    pub port: Option<u16>,
}

impl MeshPortKey {
    pub(crate) fn to_raw(self) -> Result<super::abi::MeshPortKey> {
        ensure!(self.port != Some(0), "port 0 is the endpoint's own entry");
        Ok(super::abi::MeshPortKey {
            endpoint: self.endpoint,
            port: self.port.unwrap_or(0).to_be(),
            pad: [0; 2],
        })
    }

    pub(crate) fn from_raw(k: &super::abi::MeshPortKey) -> Self {
        let port = u16::from_be(k.port);
        Self {
            endpoint: k.endpoint,
            port: (port != 0).then_some(port),
        }
    }
}

/// A value of `comb_mesh_ports`. For the endpoint's own entry: `enrolled` (in the mesh) and
/// `strict` (its default PeerAuthentication mode); for a port: `strict` only (absolute:
/// `false` = plaintext accepted on that port), consulted only while the endpoint is enrolled.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct MeshPort {
    pub enrolled: bool,
    pub strict: bool,
}

impl MeshPort {
    pub(crate) fn to_raw(self) -> super::abi::MeshPortValue {
        use super::abi::{MESH_F_ENROLLED, MESH_F_STRICT};
        super::abi::MeshPortValue {
            flags: if self.enrolled { MESH_F_ENROLLED } else { 0 }
                | if self.strict { MESH_F_STRICT } else { 0 },
        }
    }

    pub(crate) fn from_raw(v: &super::abi::MeshPortValue) -> Self {
        use super::abi::{MESH_F_ENROLLED, MESH_F_STRICT};
        Self {
            enrolled: v.flags & MESH_F_ENROLLED != 0,
            strict: v.flags & MESH_F_STRICT != 0,
        }
    }
}

/// Conntrack lifetimes and flow events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Emit flow events into the ring buffer.
    pub events: bool,
    /// Established TCP.
    pub ct_tcp: Duration,
    /// TCP after FIN/RST, and before a reply is seen.
    pub ct_close: Duration,
    /// UDP, ICMP, everything else.
    pub ct_other: Duration,
}

impl Default for PolicyConfig {
    /// What the datapath uses while the config was never written.
    fn default() -> Self {
        Self {
            events: false,
            ct_tcp: Duration::from_secs(21600),
            ct_close: Duration::from_secs(10),
            ct_other: Duration::from_secs(60),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl PolicyConfig {
    pub fn to_raw(&self) -> PolicyConfigValue {
        PolicyConfigValue {
            flags: if self.events {
                super::abi::POLICY_CFG_F_EVENTS
            } else {
                0
            },
            reserved: 0,
            ct_tcp_ns: nanos(self.ct_tcp),
            ct_close_ns: nanos(self.ct_close),
            ct_other_ns: nanos(self.ct_other),
        }
    }

    /// As the datapath applies it: a zero lifetime takes its default.
    pub fn from_raw(v: &PolicyConfigValue) -> Self {
        let d = Self::default();
        let or = |ns: u64, def: Duration| {
            if ns == 0 {
                def
            } else {
                Duration::from_nanos(ns)
            }
        };
        Self {
            events: v.flags & super::abi::POLICY_CFG_F_EVENTS != 0,
            ct_tcp: or(v.ct_tcp_ns, d.ct_tcp),
            ct_close: or(v.ct_close_ns, d.ct_close),
            ct_other: or(v.ct_other_ns, d.ct_other),
        }
    }
}

/// A local endpoint the policy programs enforce (`comb_policy_endpoints`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyEndpoint {
    pub identity: u32,
    /// At most one IPv4 and one IPv6 address, v4 first.
    pub addrs: Vec<IpAddr>,
}

/// One conntrack entry: a flow judged in one direction at one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtEntry {
    /// The flow's original direction (the packet that created it). Ports are 0 for protocols
    /// without ports, except ICMP/ICMPv6 echoes: the identifier is the request's source port.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub protocol: u8,
    pub direction: Direction,
    pub seen_reply: bool,
    pub closing: bool,
    /// Redirected to the node proxy.
    pub proxy: bool,
    /// The HBONE path: with `proxy`, sent to the HBONE outbound listener; without, a stream
    /// the node proxy delivered from a tunnel (replies go back to it).
    pub hbone: bool,
    /// Raw `COMB_CT_F_*` bits.
    pub flags: u32,
    /// Reason of the verdict that created it.
    pub reason: ReasonCode,
    /// Host-side veth ifindex of the judging endpoint.
    pub endpoint: u32,
    pub policy: u32,
    /// Time left; zero once expired (the datapath ignores it, `ct_gc` removes it).
    pub remaining: Duration,
    pub age: Duration,
}

impl CtEntry {
    pub fn expired(&self) -> bool {
        self.remaining.is_zero()
    }
}

/// Packets and bytes (the L2 frame length) counted for one (endpoint, direction, reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyMetric {
    pub endpoint: u32,
    pub direction: Direction,
    pub reason: ReasonCode,
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::Pod;
    use crate::policy::abi::*;

    const HEADER: &str = include_str!("../../../../bpf/include/comb_policy_types.h");

    /// `#define NAME value` of the contract header; values are integers (decimal or `0x`
    /// hex) or `(1U << n)`.
    fn define(name: &str) -> u64 {
        for line in HEADER.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("#define") || w.next() != Some(name) {
                continue;
            }
            let rest: String = w.take_while(|t| !t.starts_with("/*")).collect();
            let rest = rest.trim_matches(|c| c == '(' || c == ')');
            if let Some((a, b)) = rest.split_once("<<") {
                let a: u64 = a.trim_end_matches('U').parse().unwrap();
                return a << b.parse::<u64>().unwrap();
            }
            let rest = rest.trim_end_matches('U');
            return match rest.strip_prefix("0x").or_else(|| rest.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
                None => rest.parse().unwrap(),
            };
        }
        panic!("{name} not defined in comb_policy_types.h");
    }

    #[test]
    fn constants_match_the_contract() {
        let pairs: &[(&str, u64)] = &[
            ("COMB_ID_ANY", ID_ANY.into()),
            ("COMB_ID_HOST", ID_HOST.into()),
            ("COMB_ID_WORLD", ID_WORLD.into()),
            ("COMB_ID_UNMANAGED", ID_UNMANAGED.into()),
            ("COMB_ID_REMOTE_NODE", ID_REMOTE_NODE.into()),
            ("COMB_ID_FIRST_POD", ID_FIRST_POD.into()),
            ("COMB_ID_FIRST_CIDR", ID_FIRST_CIDR.into()),
            ("COMB_DIR_INGRESS", Direction::Ingress.to_raw().into()),
            ("COMB_DIR_EGRESS", Direction::Egress.to_raw().into()),
            ("COMB_VERDICT_ALLOW", Verdict::Allow.to_raw().into()),
            ("COMB_VERDICT_DENY", Verdict::Deny.to_raw().into()),
            ("COMB_VERDICT_REDIRECT", Verdict::Redirect.to_raw().into()),
            ("COMB_POLICY_PREFIX_ANY_PROTO", PREFIX_ANY_PROTO.into()),
            ("COMB_POLICY_PREFIX_PROTO", PREFIX_PROTO.into()),
            ("COMB_POLICY_PREFIX_FULL", PREFIX_FULL.into()),
            ("COMB_CT_F_SEEN_REPLY", CT_F_SEEN_REPLY.into()),
            ("COMB_CT_F_CLOSING", CT_F_CLOSING.into()),
            ("COMB_CT_F_PROXY", CT_F_PROXY.into()),
            ("COMB_CT_F_HBONE", CT_F_HBONE.into()),
            ("COMB_PROXY_LISTENER_V4", PROXY_LISTENER_V4.into()),
            ("COMB_PROXY_LISTENER_V6", PROXY_LISTENER_V6.into()),
            ("COMB_HBONE_OUT_LISTENER_V4", HBONE_OUT_LISTENER_V4.into()),
            ("COMB_HBONE_OUT_LISTENER_V6", HBONE_OUT_LISTENER_V6.into()),
            ("COMB_HBONE_IN_LISTENER_V4", HBONE_IN_LISTENER_V4.into()),
            ("COMB_HBONE_IN_LISTENER_V6", HBONE_IN_LISTENER_V6.into()),
            ("COMB_HBONE_DELIVERY_MARK", HBONE_DELIVERY_MARK.into()),
            ("COMB_HBONE_PORT", HBONE_PORT.into()),
            ("COMB_MESH_ADDR_F_PEER", MESH_ADDR_F_PEER.into()),
            ("COMB_MESH_ADDR_F_LOCAL", MESH_ADDR_F_LOCAL.into()),
            ("COMB_MESH_F_ENROLLED", MESH_F_ENROLLED.into()),
            ("COMB_MESH_F_STRICT", MESH_F_STRICT.into()),
            ("COMB_MAX_MESH_ADDRS", MAX_MESH_ADDRS.into()),
            ("COMB_MAX_MESH_PORTS", MAX_MESH_PORTS.into()),
            ("COMB_PROXY_LISTENERS", PROXY_LISTENERS.into()),
            ("COMB_PROXY_MARK", PROXY_MARK.into()),
            ("COMB_PROXY_MARK_MASK", PROXY_MARK_MASK.into()),
            ("COMB_POLICY_CFG_F_EVENTS", POLICY_CFG_F_EVENTS.into()),
            ("COMB_MAX_IPCACHE", MAX_IPCACHE.into()),
            ("COMB_MAX_POLICY", MAX_POLICY.into()),
            ("COMB_MAX_CT", MAX_CT.into()),
            ("COMB_MAX_FRAGS", MAX_FRAGS.into()),
            ("COMB_MAX_POLICY_METRICS", MAX_POLICY_METRICS.into()),
            ("COMB_FLOW_RINGBUF_BYTES", FLOW_RINGBUF_BYTES.into()),
        ];
        for (name, v) in pairs {
            assert_eq!(define(name), *v, "{name}");
        }
        for (r, name) in Reason::ALL.iter().zip([
            "POLICY_ALLOW",
            "NO_POLICY",
            "CT_ESTABLISHED",
            "CT_REPLY",
            "HOST",
            "NOT_IP",
            "FRAGMENT",
            "CT_RELATED",
            "L7_VISIBILITY",
            "PROXY_REDIRECT",
            "HBONE_REDIRECT",
            "HBONE_UNAVAILABLE",
            "POLICY_DENIED",
            "AUTHZ_DENY",
            "AUTHZ_NO_ALLOW",
            "PROXY_UNAVAILABLE",
            "FRAG_UNKNOWN",
            "MALFORMED",
            "MTLS_REQUIRED",
        ]) {
            assert_eq!(
                define(&format!("COMB_REASON_{name}")),
                u64::from(r.to_raw()),
                "{name}"
            );
        }
    }

    /// Every reason the kernel header defines is one the model knows, and no other.
    #[test]
    fn reasons_are_exactly_the_headers() {
        let defined = HEADER
            .lines()
            .filter(|l| l.trim_start().starts_with("#define COMB_REASON_"))
            .count();
        assert_eq!(defined, Reason::ALL.len(), "COMB_REASON_* vs Reason::ALL");
    }

    fn key(protocol: u8, port: u16, port_prefix: u8) -> PolicyKey {
        PolicyKey {
            endpoint: 7,
            identity: 300,
            direction: Direction::Egress,
            protocol,
            port,
            port_prefix,
        }
    }

    #[test]
    fn any_protocol_is_prefix_72_without_port() {
        let k = key(0, 8080, 16).to_lpm().unwrap();
        assert_eq!(k.prefixlen, 72);
        assert_eq!((k.protocol, k.port), (0, 0));
        assert_eq!(
            PolicyKey::from_lpm(&k).unwrap(),
            PolicyKey::any(7, 300, Direction::Egress)
        );
    }

    #[test]
    fn exact_port_is_prefix_96_network_order() {
        let k = key(6, 8080, 16).to_lpm().unwrap();
        assert_eq!(k.prefixlen, 96);
        let b = k.as_bytes();
        assert_eq!(b.len(), 16);
        assert_eq!(&b[0..4], &96u32.to_ne_bytes());
        assert_eq!(&b[4..8], &7u32.to_ne_bytes());
        assert_eq!(&b[8..12], &300u32.to_ne_bytes());
        assert_eq!(b[12], Direction::Egress.to_raw());
        assert_eq!(b[13], 6);
        // The port is big-endian, so an LPM prefix covers its high bits.
        assert_eq!(&b[14..16], &[0x1f, 0x90]);
        assert_eq!(PolicyKey::from_lpm(&k).unwrap(), key(6, 8080, 16));
    }

    #[test]
    fn port_ranges_mask_the_host_bits() {
        // 8000-8063: 8000 = 0x1f40, a block of 64 ports = 10 leading bits.
        let k = key(17, 8005, 10).to_lpm().unwrap();
        assert_eq!(k.prefixlen, 90);
        assert_eq!(u16::from_be(k.port), 8000);
        assert_eq!(PolicyKey::from_lpm(&k).unwrap(), key(17, 8000, 10));
        assert_eq!(key(17, 8005, 10).canonical().unwrap(), key(17, 8000, 10));
        // Any port of a protocol: prefix 80, port zeroed.
        let k = key(6, 443, 0).to_lpm().unwrap();
        assert_eq!((k.prefixlen, k.port), (80, 0));
        assert_eq!(
            PolicyKey::from_lpm(&k).unwrap(),
            PolicyKey::port(7, 300, Direction::Egress, 6, None)
        );
        // One bit: the upper half of the port space.
        let k = key(6, 40000, 1).to_lpm().unwrap();
        assert_eq!((k.prefixlen, u16::from_be(k.port)), (81, 32768));
        assert!(key(6, 1, 17).to_lpm().is_err());
    }

    #[test]
    fn bad_lpm_keys_are_refused() {
        let mut k = key(6, 80, 16).to_lpm().unwrap();
        k.direction = 2;
        assert!(PolicyKey::from_lpm(&k).is_err());
        for (prefixlen, protocol) in [(71, 0), (97, 6), (80, 0), (72, 6)] {
            let k = PolicyLpmKey {
                prefixlen,
                protocol,
                ..Default::default()
            };
            if (prefixlen, protocol) == (72, 6) {
                // Protocol bits beyond the prefix are ignored by the trie: reads back as "any".
                assert_eq!(PolicyKey::from_lpm(&k).unwrap().protocol, 0);
            } else {
                assert!(PolicyKey::from_lpm(&k).is_err(), "{prefixlen}/{protocol}");
            }
        }
    }

    #[test]
    fn keys_sort_for_diffing() {
        let mut v = [key(6, 80, 16), key(0, 0, 0), key(6, 79, 16)];
        v.sort();
        assert_eq!(v, [key(0, 0, 0), key(6, 79, 16), key(6, 80, 16)]);
    }

    #[test]
    fn values_round_trip() {
        let v = PolicyValue {
            verdict: Verdict::Redirect,
            reason: Reason::ProxyUnavailable.into(),
            proxy_port: 15001,
            policy: 9,
        };
        assert_eq!(PolicyValue::from_raw(&v.to_raw()).unwrap(), v);
        let raw = PolicyLpmValue {
            verdict: 9,
            ..Default::default()
        };
        assert!(PolicyValue::from_raw(&raw).is_err());
    }

    #[test]
    fn ipcache_keys() {
        let k = ipcache_key("198.18.1.7/24".parse().unwrap());
        assert_eq!(k.prefixlen, 120);
        assert_eq!(
            k.addr.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 1, 0]
        );
        assert_eq!(ipcache_net(&k).unwrap(), "198.18.1.0/24".parse().unwrap());
        let k = ipcache_key("0.0.0.0/0".parse().unwrap());
        assert_eq!(k.prefixlen, 96);
        assert_eq!(ipcache_net(&k).unwrap(), "0.0.0.0/0".parse().unwrap());
        let k = ipcache_key("fd00::1/64".parse().unwrap());
        assert_eq!(k.prefixlen, 64);
        assert_eq!(ipcache_net(&k).unwrap(), "fd00::/64".parse().unwrap());
        let k = ipcache_key("::/0".parse().unwrap());
        assert_eq!(ipcache_net(&k).unwrap(), "::/0".parse().unwrap());
    }

    #[test]
    fn config_defaults_fill_zero_lifetimes() {
        let raw = PolicyConfigValue::default();
        assert_eq!(PolicyConfig::from_raw(&raw), PolicyConfig::default());
        let c = PolicyConfig {
            events: true,
            ct_tcp: Duration::from_millis(5),
            ct_close: Duration::from_millis(6),
            ct_other: Duration::from_millis(7),
        };
        let raw = c.to_raw();
        assert_eq!(raw.flags, POLICY_CFG_F_EVENTS);
        assert_eq!(raw.ct_other_ns, 7_000_000);
        assert_eq!(PolicyConfig::from_raw(&raw), c);
    }
}
