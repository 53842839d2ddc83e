//! `#[repr(C)]` twins of the local splice's map types in `bpf/include/comb_splice_types.h`,
//! and their conversions. A unit test checks every struct against the BTF of the embedded
//! `splice.bpf.o`, so a change on one side only fails the build's tests.

use std::net::SocketAddr;

use crate::abi::{CombAddr, Pod};

/// Map names, which are also their pin names under `<pin_dir>/maps/`.
pub const MAP_CONFIG: &str = "comb_config";
pub const MAP_ENDPOINTS: &str = "comb_endpoints";
pub const MAP_SOCK_HASH: &str = "comb_sock_hash";
pub const MAP_SPLICE_TCP_FIRST: &str = "comb_splice_tcp_first";
/// Keys of sockets added because their remote is a local endpoint (their other end joins).
pub const MAP_SPLICE_MEMBERS: &str = "comb_splice_members";
pub const MAP_SPLICE_STATS: &str = "comb_splice_stats";
/// Backpressure counters (`struct comb_splice_queue_stats`).
pub const MAP_SPLICE_QUEUE: &str = "comb_splice_queue";
/// Socket storage of senders whose peer is over the stall limit.
pub const MAP_SPLICE_WATCH: &str = "comb_splice_watch";

pub const COMB_EP_F_SPLICE: u32 = 1 << 0;
pub const COMB_CFG_F_SPLICE: u32 = 1 << 0;

/// `struct comb_sock_key`: one TCP socket seen from its own side, ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local_ip: CombAddr,
    pub remote_ip: CombAddr,
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u32,
}

// SAFETY: repr(C), 16+16+2+2+4 bytes, no padding (checked by a test).
unsafe impl Pod for SockKey {}

impl SockKey {
    /// The key the BPF side builds for a socket with these endpoints.
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        let remote_ip = CombAddr::from(remote.ip());
        Self {
            local_ip: local.ip().into(),
            family: remote_ip.family(),
            remote_ip,
            local_port: local.port(),
            remote_port: remote.port(),
        }
    }

    /// The key of the other end of the connection.
    pub fn peer(&self) -> Self {
        Self {
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.local_ip.family(),
        }
    }

    pub fn local(&self) -> SocketAddr {
        (self.local_ip.ip(), self.local_port).into()
    }

    pub fn remote(&self) -> SocketAddr {
        (self.remote_ip.ip(), self.remote_port).into()
    }
}

/// `struct comb_endpoint_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    pub flags: u32,
    pub reserved: u32,
}

// SAFETY: repr(C), two u32.
unsafe impl Pod for EndpointValue {}

/// `struct comb_config`, the single entry of `comb_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigValue {
    pub flags: u32,
    /// Backpressure; 0 in any: the program's default (`COMB_SPLICE_DEFAULT_*`).
    pub queue_limit: u32,
    pub stall_limit: u32,
    pub stall_ms: u32,
}

// SAFETY: repr(C), four u32.
unsafe impl Pod for ConfigValue {}

/// `struct comb_splice_stats`, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceStatsValue {
    pub redirected_msgs: u64,
    pub redirected_bytes: u64,
    pub passed_msgs: u64,
    pub passed_bytes: u64,
    pub sockets_added: u64,
    pub add_failures: u64,
    pub sticky_failures: u64,
    pub sockets_closed: u64,
}

// SAFETY: repr(C), eight u64.
unsafe impl Pod for SpliceStatsValue {}

/// `struct comb_splice_queue_stats`, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStatsValue {
    pub fallbacks_full: u64,
    pub fallbacks_stalled: u64,
    pub max_unread: u64,
    pub reserved: u64,
}

// SAFETY: repr(C), four u64.
unsafe impl Pod for QueueStatsValue {}

/// `COMB_SPLICE_DEFAULT_QUEUE_LIMIT`, `_STALL_LIMIT`, `_STALL_MS`.
pub const DEFAULT_QUEUE_LIMIT: u32 = 128 << 20;
pub const DEFAULT_STALL_LIMIT: u32 = 4 << 20;
pub const DEFAULT_STALL_MS: u32 = 1000;

impl std::ops::AddAssign for SpliceStatsValue {
    fn add_assign(&mut self, o: Self) {
        self.redirected_msgs += o.redirected_msgs;
        self.redirected_bytes += o.redirected_bytes;
        self.passed_msgs += o.passed_msgs;
        self.passed_bytes += o.passed_bytes;
        self.sockets_added += o.sockets_added;
        self.add_failures += o.add_failures;
        self.sticky_failures += o.sticky_failures;
        self.sockets_closed += o.sockets_closed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::AF_INET;
    use crate::abi::tests::check;
    use libbpf_rs::btf::Btf;
    use std::mem::offset_of;

    /// The object the skeleton embeds, read again for its BTF.
    static OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/splice.bpf.o"));

    #[test]
    fn rust_twins_match_btf() {
        let btf = Btf::from_raw("splice", OBJ)
            .expect("parse BTF")
            .expect("object has BTF");
        check(
            &btf,
            "comb_sock_key",
            size_of::<SockKey>(),
            &[
                ("local_ip", offset_of!(SockKey, local_ip)),
                ("remote_ip", offset_of!(SockKey, remote_ip)),
                ("local_port", offset_of!(SockKey, local_port)),
                ("remote_port", offset_of!(SockKey, remote_port)),
                ("family", offset_of!(SockKey, family)),
            ],
        );
        check(
            &btf,
            "comb_endpoint_info",
            size_of::<EndpointValue>(),
            &[
                ("flags", offset_of!(EndpointValue, flags)),
                ("reserved", offset_of!(EndpointValue, reserved)),
            ],
        );
        check(
            &btf,
            "comb_config",
            size_of::<ConfigValue>(),
            &[
                ("flags", offset_of!(ConfigValue, flags)),
                ("queue_limit", offset_of!(ConfigValue, queue_limit)),
                ("stall_limit", offset_of!(ConfigValue, stall_limit)),
                ("stall_ms", offset_of!(ConfigValue, stall_ms)),
            ],
        );
        check(
            &btf,
            "comb_splice_queue_stats",
            size_of::<QueueStatsValue>(),
            &[
                (
                    "fallbacks_full",
                    offset_of!(QueueStatsValue, fallbacks_full),
                ),
                (
                    "fallbacks_stalled",
                    offset_of!(QueueStatsValue, fallbacks_stalled),
                ),
                ("max_unread", offset_of!(QueueStatsValue, max_unread)),
                ("reserved", offset_of!(QueueStatsValue, reserved)),
            ],
        );
        check(
            &btf,
            "comb_splice_stats",
            size_of::<SpliceStatsValue>(),
            &[
                (
                    "redirected_msgs",
                    offset_of!(SpliceStatsValue, redirected_msgs),
                ),
                (
                    "redirected_bytes",
                    offset_of!(SpliceStatsValue, redirected_bytes),
                ),
                ("passed_msgs", offset_of!(SpliceStatsValue, passed_msgs)),
                ("passed_bytes", offset_of!(SpliceStatsValue, passed_bytes)),
                ("sockets_added", offset_of!(SpliceStatsValue, sockets_added)),
                ("add_failures", offset_of!(SpliceStatsValue, add_failures)),
                (
                    "sticky_failures",
                    offset_of!(SpliceStatsValue, sticky_failures),
                ),
                (
                    "sockets_closed",
                    offset_of!(SpliceStatsValue, sockets_closed),
                ),
            ],
        );
    }

    #[test]
    fn sock_key_bytes_and_peer() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        let k = SockKey::new(local, remote);
        let b = k.as_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(&b[12..16], &[127, 0, 0, 1]);
        assert_eq!(&b[28..32], &[127, 0, 0, 2]);
        // Ports are host order, as the BPF side converts them.
        assert_eq!(&b[32..34], &40000u16.to_ne_bytes());
        assert_eq!(&b[34..36], &8080u16.to_ne_bytes());
        assert_eq!(&b[36..40], &AF_INET.to_ne_bytes());
        let p = k.peer();
        assert_eq!(p, SockKey::new(remote, local));
        assert_eq!(p.peer(), k);
        assert_eq!(SockKey::from_bytes(b), Some(k));
        assert_eq!((k.local(), k.remote()), (local, remote));
    }

    #[test]
    fn dual_stack_socket_matches_v4_peer() {
        // An AF_INET6 socket talking to ::ffff:127.0.0.1 and its AF_INET peer build matching keys.
        let v6_local: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        let v6_remote: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        let v4_server = SockKey::new(
            "127.0.0.1:80".parse().unwrap(),
            "127.0.0.1:40000".parse().unwrap(),
        );
        assert_eq!(SockKey::new(v6_local, v6_remote).peer(), v4_server);
    }
}
