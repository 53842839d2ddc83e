//! Comb's eBPF datapath: the programs under `bpf/`, compiled at build time and embedded,
//! loaded, attached and pinned under bpffs; typed access to their maps.

pub mod host;
