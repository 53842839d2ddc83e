//! The ABI shared by every feature's maps: the [`Pod`] contract of `#[repr(C)]` map twins,
//! `struct comb_addr` (`bpf/include/comb_addr.h`), and (for tests) the BTF layout checker that
//! each feature's `abi` module runs against its own object.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const AF_INET: u32 = libc::AF_INET as u32;
pub const AF_INET6: u32 = libc::AF_INET6 as u32;

/// The contract of `#[repr(C)]` map twins; defined with the byte views in [`crate::sys`],
/// the crate's one module with `unsafe` code.
pub use crate::sys::Pod;

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

impl PartialOrd for CombAddr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for CombAddr {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.octets().cmp(&other.octets())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::mem::offset_of;

    use libbpf_rs::btf::types::{Composite, MemberAttr};
    use libbpf_rs::btf::{Btf, HasSize};

    /// An object that holds `struct comb_addr`, read again for its BTF.
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
    fn comb_addr_matches_btf() {
        let btf = Btf::from_raw("splice", OBJ)
            .expect("parse BTF")
            .expect("object has BTF");
        check(
            &btf,
            "comb_addr",
            size_of::<CombAddr>(),
            &[("a", offset_of!(CombAddr, a))],
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
}
