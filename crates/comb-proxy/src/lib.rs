//! The node-local L7 proxy (design.md, path 4). Flows whose policy needs L7 are steered to it
//! by the datapath (`bpf_sk_assign` to a transparent listener, docs/l7.md); it learns the
//! original destination from the accepted socket's local address and the source from the
//! peer address, detects the protocol on the first bytes, enforces AuthorizationPolicy on
//! HTTP/1.1, HTTP/2 and gRPC requests, forwards over pooled upstream connections, records
//! Istio-standard telemetry, and relays anything else as opaque TCP (spliced in the kernel
//! once allowed).
#![deny(rust_2018_idioms)]

pub mod relay;
pub mod telemetry;
