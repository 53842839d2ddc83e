//! The node-local L7 proxy (design.md, path 4). Flows whose policy needs L7 are steered to it
//! by the datapath (`bpf_sk_assign` to a transparent listener, docs/l7.md); it learns the
//! original destination from the accepted socket's local address and the source from the
//! peer address, detects the protocol on the first bytes, enforces AuthorizationPolicy on
//! HTTP/1.1, HTTP/2 and gRPC requests, forwards over pooled upstream connections, records
//! Istio-standard telemetry, and relays anything else as opaque TCP (spliced in the kernel
//! once allowed).
//!
//! Entry points: [`Proxy::start`] (threads + listeners, for the agent) and
//! [`serve_connection`] with a [`ProxyContext`] (one accepted connection; tests, fuzzing).
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod body;
mod busy_poll;
mod conn;
mod conn_clock;
mod context;
pub mod detect;
pub mod hbone;
pub mod http;
pub mod listener;
mod options;
mod reaper;
pub mod relay;
mod server;
mod shards;
mod stream_copy;
mod tcp;
pub mod telemetry;
mod tunnel;
pub mod upstream;

pub use conn::{serve_connection, serve_tunneled};
pub use context::ProxyContext;
pub use hbone::{HboneOptions, ListenerKind, serve_inbound, serve_outbound};
pub use listener::Family;
pub use options::{DEFAULT_PORT, Limits, ProxyOptions};
pub use server::{Proxy, ProxyHandle};
