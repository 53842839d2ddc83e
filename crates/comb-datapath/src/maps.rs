//! `#[repr(C)]` twins of the map key and value types in `bpf/include/comb_types.h`, and the
//! conversions between them and std types. A unit test checks every struct against the BTF of
//! the embedded object, so a change on one side only fails the build's tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Map names, which are also their pin names under `<pin_dir>/maps/`.
pub const MAP_CONFIG: &str = "comb_config";
pub const MAP_ENDPOINTS: &str = "comb_endpoints";
pub const MAP_SOCK_HASH: &str = "comb_sock_hash";
pub const MAP_SPLICE_TCP_FIRST: &str = "comb_splice_tcp_first";
pub const MAP_SPLICE_STATS: &str = "comb_splice_stats";

pub const AF_INET: u32 = libc::AF_INET as u32;
pub const AF_INET6: u32 = libc::AF_INET6 as u32;

pub const COMB_EP_F_SPLICE: u32 = 1 << 0;
pub const COMB_CFG_F_SPLICE: u32 = 1 << 0;

/// Plain-old-data map types: no padding, any bit pattern valid.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, without padding, made only of integers.
pub unsafe trait Pod: Copy + Default + 'static {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: Pod types are padding-free integers, so every byte is initialised.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }

    /// Reads a value from the start of `b`; None when `b` is too short.
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() >= size_of::<Self>()).then(|| {
            // SAFETY: length checked; any bit pattern is a valid Pod; read_unaligned because map
            // buffers carry no alignment guarantee.
            unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) }
        })
    }
}

// SAFETY: plain integers (map keys like ifindexes, per-CPU counters).
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}

/// `struct comb_addr`: 16 bytes in network order, IPv4 as `::ffff:a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CombAddr {
    pub a: [u32; 4],
}

// SAFETY: repr(C), four u32.
unsafe impl Pod for CombAddr {}

impl CombAddr {
    pub fn octets(&self) -> [u8; 16] {
        let mut o = [0u8; 16];
        for (i, w) in self.a.iter().enumerate() {
            // The words hold bytes in network order, as laid out in memory.
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        o
    }

    pub fn from_octets(o: [u8; 16]) -> Self {
        let mut a = [0u32; 4];
        for (i, w) in a.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
        }
        Self { a }
    }

    /// The family the BPF side derives from the address (v4-mapped is AF_INET).
    pub fn family(&self) -> u32 {
        if self.ip().is_ipv4() {
            AF_INET
        } else {
            AF_INET6
        }
    }

    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.octets());
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

impl From<IpAddr> for CombAddr {
    fn from(ip: IpAddr) -> Self {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            // A v4-mapped v6 address is the same endpoint as its v4 form; keep it as is.
            IpAddr::V6(v6) => v6,
        };
        Self::from_octets(v6.octets())
    }
}

impl From<Ipv4Addr> for CombAddr {
    fn from(ip: Ipv4Addr) -> Self {
        IpAddr::V4(ip).into()
    }
}

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
    pub fn new(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Self {
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

    pub fn local(&self) -> std::net::SocketAddr {
        (self.local_ip.ip(), self.local_port).into()
    }

    pub fn remote(&self) -> std::net::SocketAddr {
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
    pub reserved: [u32; 3],
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

/// Delete `key`; a key that is already gone is not an error (the goal is its absence).
pub(crate) fn delete_if_present(map: &libbpf_rs::MapHandle, key: &[u8]) -> libbpf_rs::Result<()> {
    use libbpf_rs::MapCore;
    match map.delete(key) {
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Every (key, value) of a map; entries deleted between iteration and lookup are skipped.
pub(crate) fn entries(map: &libbpf_rs::MapHandle) -> libbpf_rs::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use libbpf_rs::MapCore;
    let mut out = Vec::new();
    for k in map.keys() {
        if let Some(v) = map.lookup(&k, libbpf_rs::MapFlags::ANY)? {
            out.push((k, v));
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::mem::offset_of;
    use std::net::SocketAddr;

    use libbpf_rs::btf::types::{Composite, MemberAttr};
    use libbpf_rs::btf::{Btf, HasSize};

    /// The object the skeleton embeds, read again for its BTF.
    static OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/splice.bpf.o"));

    /// (size, [(field, byte offset)]) of a C struct, from BTF. Searched by kind because map
    /// variables share names with their value structs (`comb_config`).
    pub(crate) fn c_layout(btf: &Btf<'_>, name: &str) -> (usize, Vec<(String, usize)>) {
        let ty: Composite<'_> = btf
            .type_by_kind::<Composite<'_>>()
            .find(|c| c.is_struct && c.name().is_some_and(|n| n == name))
            .unwrap_or_else(|| panic!("struct {name} not in BTF"));
        let fields = ty
            .iter()
            .map(|m| {
                let MemberAttr::Normal { offset } = m.attr else {
                    panic!("{name}: bitfield")
                };
                assert_eq!(offset % 8, 0, "{name}: unaligned member");
                let n = m
                    .name
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (n, offset as usize / 8)
            })
            .collect();
        (ty.size(), fields)
    }

    pub(crate) fn check(btf: &Btf<'_>, name: &str, rust_size: usize, rust: &[(&str, usize)]) {
        let (size, fields) = c_layout(btf, name);
        assert_eq!(size, rust_size, "size of struct {name}");
        let want: Vec<(String, usize)> = rust.iter().map(|(n, o)| (n.to_string(), *o)).collect();
        assert_eq!(fields, want, "fields of struct {name}");
    }

    #[test]
    fn rust_twins_match_btf() {
        let btf = Btf::from_raw("splice", OBJ)
            .expect("parse BTF")
            .expect("object has BTF");
        check(
            &btf,
            "comb_addr",
            size_of::<CombAddr>(),
            &[("a", offset_of!(CombAddr, a))],
        );
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
                ("reserved", offset_of!(ConfigValue, reserved)),
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
    fn v4_is_v4_mapped_in_network_order() {
        let a = CombAddr::from(Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(
            a.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 1, 2]
        );
        assert_eq!(a.family(), AF_INET);
        assert_eq!(a.ip(), IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2)));
        // A v4-mapped v6 address is the same key as the v4 one.
        let m: IpAddr = "::ffff:198.18.1.2".parse().unwrap();
        assert_eq!(CombAddr::from(m), a);
    }

    #[test]
    fn v6_round_trips() {
        let ip: IpAddr = "fd00::1:2".parse().unwrap();
        let a = CombAddr::from(ip);
        assert_eq!(a.family(), AF_INET6);
        assert_eq!(a.ip(), ip);
        assert_eq!(
            a.octets(),
            "fd00::1:2".parse::<Ipv6Addr>().unwrap().octets()
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
