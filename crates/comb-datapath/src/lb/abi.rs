//! `#[repr(C)]` twins of the socket LB map types in `bpf/include/comb_lb_types.h`. A unit test
//! checks each against the BTF of the embedded `lb_sock.bpf.o`.

use std::net::IpAddr;

use crate::abi::{CombAddr, Pod};

pub const MAP_LB_SERVICES: &str = "comb_lb_services";
pub const MAP_LB_BACKENDS: &str = "comb_lb_backends";
pub const MAP_LB_MAGLEV: &str = "comb_lb_maglev";
pub const MAP_LB_AFFINITY: &str = "comb_lb_affinity";
pub const MAP_LB_REVNAT: &str = "comb_lb_revnat";
pub const MAP_LB_CONFIG: &str = "comb_lb_config";
pub const MAP_LB_STATS: &str = "comb_lb_stats";

/// `COMB_LB_MAGLEV_M`; equal to `comb_model::maglev::M` (checked by a test).
pub const MAGLEV_M: usize = 16381;
pub const COMB_LB_MAX_SERVICES: u32 = 65536;

pub const COMB_LB_F_MAGLEV: u32 = 1 << 0;
pub const COMB_LB_F_AFFINITY: u32 = 1 << 1;
pub const COMB_LB_CFG_F_HOST_ONLY: u32 = 1 << 0;

/// `struct comb_lb_svc_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub vip: CombAddr,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}
// SAFETY: repr(C), 16 + 2 + 1 + 1 bytes, no padding.
unsafe impl Pod for SvcKey {}

impl SvcKey {
    pub fn new(vip: IpAddr, port: u16, proto: u8) -> Self {
        Self {
            vip: vip.into(),
            port,
            proto,
            pad: 0,
        }
    }
}

/// `struct comb_lb_svc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcValue {
    pub id: u32,
    pub version: u32,
    pub count: u32,
    pub flags: u32,
    pub affinity_timeout_secs: u32,
    pub reserved: [u32; 3],
}
// SAFETY: repr(C), eight u32.
unsafe impl Pod for SvcValue {}

/// `struct comb_lb_backend_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub svc_id: u32,
    pub version: u32,
    pub index: u32,
}
// SAFETY: repr(C), three u32.
unsafe impl Pod for BackendKey {}

/// `struct comb_lb_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    pub ip: CombAddr,
    pub port: u16,
    pub pad: u16,
    pub reserved: u32,
}
// SAFETY: repr(C), 16 + 2 + 2 + 4 bytes.
unsafe impl Pod for BackendValue {}

impl BackendValue {
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self {
            ip: ip.into(),
            port,
            ..Self::default()
        }
    }
}

/// `struct comb_lb_maglev_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub svc_id: u32,
    pub version: u32,
}
// SAFETY: repr(C), two u32.
unsafe impl Pod for MaglevKey {}

/// `struct comb_lb_maglev` is `u32[MAGLEV_M]`; written from a `Vec<u32>`.
pub fn maglev_value_bytes(table: &[u32]) -> Vec<u8> {
    table.iter().flat_map(|i| i.to_ne_bytes()).collect()
}

/// `struct comb_lb_affinity_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub client: CombAddr,
    pub svc_id: u32,
    pub pad: u32,
}
// SAFETY: repr(C), 8 + 16 + 4 + 4 bytes.
unsafe impl Pod for AffinityKey {}

/// `struct comb_lb_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub ip: CombAddr,
    pub port: u16,
    pub pad: u16,
    pub version: u32,
    pub index: u32,
    pub reserved: u32,
    pub last_used_ns: u64,
}
// SAFETY: repr(C), 16 + 2 + 2 + 4 + 4 + 4 + 8 bytes.
unsafe impl Pod for AffinityValue {}

/// `struct comb_lb_revnat_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatKey {
    pub cookie: u64,
    pub ip: CombAddr,
    pub port: u16,
    pub pad: u16,
    pub pad2: u32,
}
// SAFETY: repr(C), 8 + 16 + 2 + 2 + 4 bytes.
unsafe impl Pod for RevNatKey {}

/// `struct comb_lb_revnat`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValue {
    pub vip: CombAddr,
    pub port: u16,
    pub pad: u16,
    pub svc_id: u32,
}
// SAFETY: repr(C), 16 + 2 + 2 + 4 bytes.
unsafe impl Pod for RevNatValue {}

/// `struct comb_lb_config`, the single entry of `comb_lb_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfigValue {
    pub flags: u32,
    pub reserved: u32,
    pub host_netns_cookie: u64,
}
// SAFETY: repr(C), 4 + 4 + 8 bytes.
unsafe impl Pod for LbConfigValue {}

/// `struct comb_lb_stats`, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbStatsValue {
    pub connects_translated: u64,
    pub sendmsgs_translated: u64,
    pub replies_reversed: u64,
    pub refused_no_backend: u64,
    pub affinity_hits: u64,
    pub version_retries: u64,
    pub revnat_failures: u64,
    pub reserved: u64,
}
// SAFETY: repr(C), eight u64.
unsafe impl Pod for LbStatsValue {}

impl std::ops::AddAssign for LbStatsValue {
    fn add_assign(&mut self, o: Self) {
        self.connects_translated += o.connects_translated;
        self.sendmsgs_translated += o.sendmsgs_translated;
        self.replies_reversed += o.replies_reversed;
        self.refused_no_backend += o.refused_no_backend;
        self.affinity_hits += o.affinity_hits;
        self.version_retries += o.version_retries;
        self.revnat_failures += o.revnat_failures;
        self.reserved += o.reserved;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::tests::check;
    use libbpf_rs::btf::Btf;
    use std::mem::offset_of;

    static OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/lb_sock.bpf.o"));

    macro_rules! twin {
        ($btf:expr, $c:literal, $t:ty, [$($f:ident),* $(,)?]) => {
            check($btf, $c, size_of::<$t>(), &[$((stringify!($f), offset_of!($t, $f))),*])
        };
    }

    #[test]
    fn rust_twins_match_btf() {
        let btf = Btf::from_raw("lb_sock", OBJ)
            .expect("parse BTF")
            .expect("object has BTF");
        let b = &btf;
        twin!(b, "comb_addr", CombAddr, [a]);
        twin!(b, "comb_lb_svc_key", SvcKey, [vip, port, proto, pad]);
        twin!(
            b,
            "comb_lb_svc",
            SvcValue,
            [id, version, count, flags, affinity_timeout_secs, reserved]
        );
        twin!(
            b,
            "comb_lb_backend_key",
            BackendKey,
            [svc_id, version, index]
        );
        twin!(
            b,
            "comb_lb_backend",
            BackendValue,
            [ip, port, pad, reserved]
        );
        twin!(b, "comb_lb_maglev_key", MaglevKey, [svc_id, version]);
        check(b, "comb_lb_maglev", 4 * MAGLEV_M, &[("idx", 0)]);
        twin!(
            b,
            "comb_lb_affinity_key",
            AffinityKey,
            [netns_cookie, client, svc_id, pad]
        );
        twin!(
            b,
            "comb_lb_affinity",
            AffinityValue,
            [ip, port, pad, version, index, reserved, last_used_ns]
        );
        twin!(
            b,
            "comb_lb_revnat_key",
            RevNatKey,
            [cookie, ip, port, pad, pad2]
        );
        twin!(b, "comb_lb_revnat", RevNatValue, [vip, port, pad, svc_id]);
        twin!(
            b,
            "comb_lb_config",
            LbConfigValue,
            [flags, reserved, host_netns_cookie]
        );
        twin!(
            b,
            "comb_lb_stats",
            LbStatsValue,
            [
                connects_translated,
                sendmsgs_translated,
                replies_reversed,
                refused_no_backend,
                affinity_hits,
                version_retries,
                revnat_failures,
                reserved
            ]
        );
    }

    #[test]
    fn maglev_size_matches_the_model() {
        assert_eq!(MAGLEV_M, comb_model::maglev::M);
    }

    #[test]
    fn svc_key_bytes() {
        let k = SvcKey::new("10.96.0.10".parse().unwrap(), 53, 17);
        let b = k.as_bytes();
        assert_eq!(b.len(), 20);
        assert_eq!(&b[10..16], &[0xff, 0xff, 10, 96, 0, 10]);
        assert_eq!(&b[16..18], &53u16.to_ne_bytes());
        assert_eq!(b[18], 17);
    }
}
