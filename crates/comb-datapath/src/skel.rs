//! The libbpf-rs skeletons build.rs generates, one per BPF object; each feature loads its own.

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    missing_docs
)]
pub(crate) mod splice {
    include!(concat!(env!("OUT_DIR"), "/splice.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    missing_docs
)]
pub(crate) mod lb {
    include!(concat!(env!("OUT_DIR"), "/lb_sock.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    missing_docs
)]
pub(crate) mod policy {
    include!(concat!(env!("OUT_DIR"), "/policy.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    missing_docs
)]
pub(crate) mod proxy_splice {
    include!(concat!(env!("OUT_DIR"), "/proxy_splice.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    missing_docs
)]
pub(crate) mod uplink {
    include!(concat!(env!("OUT_DIR"), "/uplink.skel.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    rust_2018_idioms,
    missing_docs
)]
pub(crate) mod proxy_lookup {
    include!(concat!(env!("OUT_DIR"), "/proxy_lookup.skel.rs"));
}
