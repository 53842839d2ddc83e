//! `#[repr(C)]` twins of the identity-policy map types in `bpf/include/comb_policy_types.h`.
//! A unit test checks each against the BTF of the embedded `policy.bpf.o`.

use crate::abi::{CombAddr, Pod};

pub const MAP_IPCACHE: &str = "comb_ipcache";
pub const MAP_POLICY_ENDPOINTS: &str = "comb_policy_endpoints";
pub const MAP_POLICY: &str = "comb_policy";
pub const MAP_CT: &str = "comb_ct";
pub const MAP_FRAG: &str = "comb_frag";
pub const MAP_POLICY_CONFIG: &str = "comb_policy_config";
pub const MAP_POLICY_METRICS: &str = "comb_policy_metrics";
pub const MAP_FLOW_EVENTS: &str = "comb_flow_events";
pub const MAP_POLICY_EVENTS_LOST: &str = "comb_policy_events_lost";
pub const MAP_PROXY_LISTENERS: &str = "comb_proxy_listeners";
pub const MAP_MESH_ADDRS: &str = "comb_mesh_addrs";
pub const MAP_MESH_PORTS: &str = "comb_mesh_ports";

/// Reserved identities (`COMB_ID_*`).
pub const ID_ANY: u32 = 0;
pub const ID_HOST: u32 = 1;
pub const ID_WORLD: u32 = 2;
pub const ID_UNMANAGED: u32 = 3;
pub const ID_REMOTE_NODE: u32 = 6;
pub const ID_FIRST_POD: u32 = 256;
pub const ID_FIRST_CIDR: u32 = 1 << 24;

pub const PREFIX_ANY_PROTO: u32 = 72;
pub const PREFIX_PROTO: u32 = 80;
pub const PREFIX_FULL: u32 = 96;

pub const CT_F_SEEN_REPLY: u32 = 1 << 0;
pub const CT_F_CLOSING: u32 = 1 << 1;
/// Redirected to the node proxy (an EGRESS entry).
pub const CT_F_PROXY: u32 = 1 << 2;
/// The HBONE path: with [`CT_F_PROXY`] (EGRESS) redirected to the HBONE outbound listener;
/// alone (INGRESS) a stream the node proxy delivered from a tunnel, whose replies go back to it.
pub const CT_F_HBONE: u32 = 1 << 3;
pub const POLICY_CFG_F_EVENTS: u32 = 1 << 0;

/// Slots of `comb_proxy_listeners`: the L7 proxy's, HBONE outbound, HBONE inbound; each
/// kind's IPv6 slot follows its IPv4 one.
pub const PROXY_LISTENER_V4: u32 = 0;
pub const PROXY_LISTENER_V6: u32 = 1;
pub const HBONE_OUT_LISTENER_V4: u32 = 2;
pub const HBONE_OUT_LISTENER_V6: u32 = 3;
pub const HBONE_IN_LISTENER_V4: u32 = 4;
pub const HBONE_IN_LISTENER_V6: u32 = 5;
pub const PROXY_LISTENERS: u32 = 8;
/// `skb->mark` of packets for the node proxy, under [`PROXY_MARK_MASK`]; the node's policy
/// routing ([`super::routing`]) delivers them locally.
pub const PROXY_MARK: u32 = 0x0B00;
pub const PROXY_MARK_MASK: u32 = 0x0F00;
/// `SO_MARK` of the node proxy's sockets that deliver HBONE streams to local pods (source =
/// the remote pod's address, `IP_TRANSPARENT`), under [`PROXY_MARK_MASK`]: the pod's hook
/// knows the flow arrived through mutual TLS (PeerAuthentication STRICT admits it) and sends
/// the pod's replies back to the proxy.
pub const HBONE_DELIVERY_MARK: u32 = 0x0C00;
/// HBONE's port on every mesh pod's address.
pub const HBONE_PORT: u16 = 15008;

/// `comb_mesh_addrs` flags: a remote pod reached through HBONE; a local mesh pod.
pub const MESH_ADDR_F_PEER: u32 = 1 << 0;
pub const MESH_ADDR_F_LOCAL: u32 = 1 << 1;
/// `comb_mesh_ports` flags: the pod is enrolled (port 0 only); STRICT.
pub const MESH_F_ENROLLED: u32 = 1 << 0;
pub const MESH_F_STRICT: u32 = 1 << 1;

pub const MAX_IPCACHE: u32 = 65536;
pub const MAX_POLICY: u32 = 262144;
pub const MAX_CT: u32 = 262144;
pub const MAX_FRAGS: u32 = 8192;
pub const MAX_POLICY_METRICS: u32 = 16384;
pub const FLOW_RINGBUF_BYTES: u32 = 1 << 22;
pub const MAX_MESH_ADDRS: u32 = 65536;
pub const MAX_MESH_PORTS: u32 = 65536;

/// `struct comb_ipcache_key`: prefixlen counts bits of the 16-byte address (IPv4: 96 + len).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    pub addr: CombAddr,
}
// SAFETY: repr(C), 4 + 16 bytes, no padding.
unsafe impl Pod for IpcacheKey {}

/// `struct comb_ipcache_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Host-side veth ifindex of a local pod with ingress REDIRECT entries, 0 otherwise.
    pub endpoint: u32,
}
// SAFETY: repr(C), two u32.
unsafe impl Pod for IpcacheValue {}

/// `struct comb_policy_endpoint`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEndpointValue {
    pub identity: u32,
    pub flags: u32,
    /// v4 (mapped), v6; zero = none.
    pub addrs: [CombAddr; 2],
}
// SAFETY: repr(C), 4 + 4 + 32 bytes.
unsafe impl Pod for PolicyEndpointValue {}

/// `struct comb_policy_key`, the LPM key of `comb_policy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyLpmKey {
    pub prefixlen: u32,
    pub endpoint: u32,
    pub identity: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Network order.
    pub port: u16,
}
// SAFETY: repr(C), 4 * 3 + 1 + 1 + 2 bytes.
unsafe impl Pod for PolicyLpmKey {}

/// `struct comb_policy_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyLpmValue {
    pub verdict: u8,
    pub reason: u8,
    pub proxy_port: u16,
    pub policy: u32,
}
// SAFETY: repr(C), 1 + 1 + 2 + 4 bytes.
unsafe impl Pod for PolicyLpmValue {}

/// `struct comb_ct_key`; ports network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtKey {
    pub saddr: CombAddr,
    pub daddr: CombAddr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub direction: u8,
    pub pad: [u8; 2],
}
// SAFETY: repr(C), 16 + 16 + 2 + 2 + 1 + 1 + 2 bytes.
unsafe impl Pod for CtKey {}

/// `struct comb_ct_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub expires_ns: u64,
    pub created_ns: u64,
    pub flags: u32,
    pub endpoint: u32,
    pub policy: u32,
    pub reason: u8,
    pub pad: [u8; 3],
}
// SAFETY: repr(C), 8 + 8 + 4 * 3 + 1 + 3 bytes.
unsafe impl Pod for CtValue {}

/// `struct comb_policy_config`, the single entry of `comb_policy_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfigValue {
    pub flags: u32,
    pub reserved: u32,
    pub ct_tcp_ns: u64,
    pub ct_close_ns: u64,
    pub ct_other_ns: u64,
}
// SAFETY: repr(C), 4 + 4 + 8 * 3 bytes.
unsafe impl Pod for PolicyConfigValue {}

/// `struct comb_policy_metric_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricKey {
    pub endpoint: u32,
    pub direction: u8,
    pub reason: u8,
    pub pad: [u8; 2],
}
// SAFETY: repr(C), 4 + 1 + 1 + 2 bytes.
unsafe impl Pod for MetricKey {}

/// `struct comb_policy_metric_value`, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricValue {
    pub packets: u64,
    pub bytes: u64,
}
// SAFETY: repr(C), two u64.
unsafe impl Pod for MetricValue {}

/// `struct comb_flow_event`, one ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEventRaw {
    pub time_ns: u64,
    pub saddr: CombAddr,
    pub daddr: CombAddr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub endpoint: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub policy: u32,
    pub len: u32,
    pub reserved: u32,
}
// SAFETY: repr(C), 8 + 32 + 8 + 4 * 7 bytes = 72, no padding (checked against BTF).
unsafe impl Pod for FlowEventRaw {}

/// `struct comb_frag_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragKey {
    pub saddr: CombAddr,
    pub daddr: CombAddr,
    pub id: u32,
    pub protocol: u8,
    pub pad: [u8; 3],
}
// SAFETY: repr(C), 16 + 16 + 4 + 1 + 3 bytes.
unsafe impl Pod for FragKey {}

/// `struct comb_frag_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
    pub verdict: u8,
    pub reason: u8,
    pub pad: [u8; 2],
}
// SAFETY: repr(C), 2 + 2 + 1 + 1 + 2 bytes.
unsafe impl Pod for FragValue {}

/// `struct comb_mesh_addr`, the value of `comb_mesh_addrs` (keyed by [`CombAddr`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshAddrValue {
    pub flags: u32,
    pub endpoint: u32,
}
// SAFETY: repr(C), two u32.
unsafe impl Pod for MeshAddrValue {}

/// `struct comb_mesh_port_key`; port network order, 0 = the endpoint's own entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshPortKey {
    pub endpoint: u32,
    pub port: u16,
    pub pad: [u8; 2],
}
// SAFETY: repr(C), 4 + 2 + 2 bytes.
unsafe impl Pod for MeshPortKey {}

/// `struct comb_mesh_port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshPortValue {
    pub flags: u32,
}
// SAFETY: repr(C), one u32.
unsafe impl Pod for MeshPortValue {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::tests::check;
    use libbpf_rs::btf::Btf;
    use std::mem::offset_of;

    static OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/policy.bpf.o"));

    macro_rules! twin {
        ($btf:expr, $c:literal, $t:ty, [$($f:ident),* $(,)?]) => {
            check($btf, $c, size_of::<$t>(), &[$((stringify!($f), offset_of!($t, $f))),*])
        };
    }

    #[test]
    fn rust_twins_match_btf() {
        let btf = Btf::from_raw("policy", OBJ)
            .expect("parse BTF")
            .expect("object has BTF");
        let b = &btf;
        twin!(b, "comb_addr", CombAddr, [a]);
        twin!(b, "comb_ipcache_key", IpcacheKey, [prefixlen, addr]);
        twin!(b, "comb_ipcache_value", IpcacheValue, [identity, endpoint]);
        twin!(
            b,
            "comb_policy_endpoint",
            PolicyEndpointValue,
            [identity, flags, addrs]
        );
        twin!(
            b,
            "comb_policy_key",
            PolicyLpmKey,
            [prefixlen, endpoint, identity, direction, protocol, port]
        );
        twin!(
            b,
            "comb_policy_value",
            PolicyLpmValue,
            [verdict, reason, proxy_port, policy]
        );
        twin!(
            b,
            "comb_ct_key",
            CtKey,
            [saddr, daddr, sport, dport, protocol, direction, pad]
        );
        twin!(
            b,
            "comb_ct_value",
            CtValue,
            [expires_ns, created_ns, flags, endpoint, policy, reason, pad]
        );
        twin!(
            b,
            "comb_policy_config",
            PolicyConfigValue,
            [flags, reserved, ct_tcp_ns, ct_close_ns, ct_other_ns]
        );
        twin!(
            b,
            "comb_policy_metric_key",
            MetricKey,
            [endpoint, direction, reason, pad]
        );
        twin!(b, "comb_policy_metric_value", MetricValue, [packets, bytes]);
        twin!(
            b,
            "comb_flow_event",
            FlowEventRaw,
            [
                time_ns,
                saddr,
                daddr,
                sport,
                dport,
                protocol,
                direction,
                verdict,
                reason,
                endpoint,
                src_identity,
                dst_identity,
                policy,
                len,
                reserved
            ]
        );
        twin!(
            b,
            "comb_frag_key",
            FragKey,
            [saddr, daddr, id, protocol, pad]
        );
        twin!(
            b,
            "comb_frag_value",
            FragValue,
            [sport, dport, verdict, reason, pad]
        );
        twin!(b, "comb_mesh_addr", MeshAddrValue, [flags, endpoint]);
        twin!(b, "comb_mesh_port_key", MeshPortKey, [endpoint, port, pad]);
        twin!(b, "comb_mesh_port", MeshPortValue, [flags]);
    }

    /// The uplink object shares the mesh maps: its types must be the same.
    #[test]
    fn uplink_twins_match_btf() {
        static UPLINK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/uplink.bpf.o"));
        let btf = Btf::from_raw("uplink", UPLINK)
            .expect("parse BTF")
            .expect("object has BTF");
        let b = &btf;
        twin!(b, "comb_addr", CombAddr, [a]);
        twin!(b, "comb_mesh_addr", MeshAddrValue, [flags, endpoint]);
        twin!(b, "comb_mesh_port_key", MeshPortKey, [endpoint, port, pad]);
        twin!(b, "comb_mesh_port", MeshPortValue, [flags]);
    }

    /// The proxy lookup object shares the conntrack and mesh maps: same types.
    #[test]
    fn proxy_lookup_twins_match_btf() {
        static LOOKUP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/proxy_lookup.bpf.o"));
        let btf = Btf::from_raw("proxy_lookup", LOOKUP)
            .expect("parse BTF")
            .expect("object has BTF");
        let b = &btf;
        twin!(b, "comb_addr", CombAddr, [a]);
        twin!(
            b,
            "comb_ct_key",
            CtKey,
            [saddr, daddr, sport, dport, protocol, direction, pad]
        );
        twin!(
            b,
            "comb_ct_value",
            CtValue,
            [expires_ns, created_ns, flags, endpoint, policy, reason, pad]
        );
        twin!(b, "comb_mesh_addr", MeshAddrValue, [flags, endpoint]);
    }

    /// policy_test_run hands the kernel a zeroed `struct __sk_buff` with only ifindex set.
    #[test]
    fn sk_buff_ifindex_offset() {
        let btf = Btf::from_raw("policy", OBJ)
            .expect("parse BTF")
            .expect("object has BTF");
        let (size, fields) = crate::abi::tests::c_layout(&btf, "__sk_buff");
        assert_eq!(size, super::super::TEST_SKB_CTX_LEN);
        assert!(
            fields.contains(&("ifindex".to_string(), super::super::TEST_SKB_IFINDEX)),
            "{fields:?}"
        );
    }
}
