//! HBONE: TCP flows between nodes carried as HTTP/2 CONNECT streams inside mutual TLS 1.3 on
//! port 15008, wire-compatible with Istio ambient's ztunnel (docs/mtls.md, "HBONE").
//!
//! - Outbound ([`serve_outbound`]): a local mesh pod's flow to a remote HBONE peer, steered
//!   by the datapath to the outbound listener (15001), becomes one CONNECT stream on a pooled
//!   connection ([`pool`]) keyed by (source identity, destination identity, source IP,
//!   destination address).
//! - Inbound ([`serve_inbound`]): TLS with the certificate of the pod the connection is
//!   addressed to, the client's certificate verified to the roots, CONNECT answered as
//!   ztunnel does, the stream authorized with the certificate's identity and handed to the
//!   proxy's connection pipeline (HTTP with L7 policy, or opaque TCP) towards the pod.
//!
//! The shared state (TLS configs, pool, options) lives in `crate::tunnel`, below the
//! connection pipeline; this module serves connections with it.

mod inbound;
mod outbound;

pub use crate::tunnel::*;
pub use inbound::serve_inbound;
pub use outbound::serve_outbound;
