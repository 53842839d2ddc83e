//! `#[repr(C)]` twins of the proxy splice's map types in
//! `bpf/include/comb_proxy_splice_types.h`. A unit test checks each against the BTF of the
//! embedded `proxy_splice.bpf.o`.

use crate::abi::Pod;

/// Map names, which are also their pin names under `<pin_dir>/maps/`.
pub const MAP_PX_SOCKS: &str = "comb_px_socks";
pub const MAP_PX_REDIR: &str = "comb_px_redir";
pub const MAP_PX_PEERS: &str = "comb_px_peers";
pub const MAP_PX_STATS: &str = "comb_px_stats";

/// `struct comb_px_peer`: one side of a pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PxPeer {
    pub peer: u64,
    pub bytes: u64,
    pub skbs: u64,
    pub failures: u64,
}

// SAFETY: repr(C), four u64.
unsafe impl Pod for PxPeer {}

/// `struct comb_px_stats`, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PxStatsValue {
    pub redirected_skbs: u64,
    pub redirected_bytes: u64,
    pub redirect_failures: u64,
    pub unpaired_skbs: u64,
    pub unpaired_bytes: u64,
    pub reserved: [u64; 3],
}

// SAFETY: repr(C), eight u64.
unsafe impl Pod for PxStatsValue {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::tests::check;
    use libbpf_rs::btf::Btf;
    use std::mem::offset_of;

    static OBJ: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/proxy_splice.bpf.o"));

    #[test]
    fn rust_twins_match_btf() {
        let btf = Btf::from_raw("proxy_splice", OBJ)
            .expect("parse BTF")
            .expect("object has BTF");
        check(
            &btf,
            "comb_px_peer",
            size_of::<PxPeer>(),
            &[
                ("peer", offset_of!(PxPeer, peer)),
                ("bytes", offset_of!(PxPeer, bytes)),
                ("skbs", offset_of!(PxPeer, skbs)),
                ("failures", offset_of!(PxPeer, failures)),
            ],
        );
        check(
            &btf,
            "comb_px_stats",
            size_of::<PxStatsValue>(),
            &[
                ("redirected_skbs", offset_of!(PxStatsValue, redirected_skbs)),
                (
                    "redirected_bytes",
                    offset_of!(PxStatsValue, redirected_bytes),
                ),
                (
                    "redirect_failures",
                    offset_of!(PxStatsValue, redirect_failures),
                ),
                ("unpaired_skbs", offset_of!(PxStatsValue, unpaired_skbs)),
                ("unpaired_bytes", offset_of!(PxStatsValue, unpaired_bytes)),
                ("reserved", offset_of!(PxStatsValue, reserved)),
            ],
        );
    }
}
