//! Comb's certificate authority (`comb ca`): Istio's CA API
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`) over TLS 1.3, so Comb agents
//! and Istio's ztunnel obtain workload certificates the same way. Keys: [`authority`]
//! (self-signed root or a plug-in CA); callers: [`tokens`] (bearer token → node) and
//! [`authz`] (a node gets only identities of pods scheduled on it), or on a cluster
//! [`kube_auth`] (TokenReview, pods from the API) and [`kube_keys`] (keys in a Secret, the
//! root published in a ConfigMap); [`server`] ties them
//! together; [`client`] is what the node agent calls. docs/mtls.md.
#![forbid(unsafe_code)]

pub mod authority;
pub mod authz;
pub mod client;
pub mod duration;
pub mod kube_auth;
pub mod kube_keys;
pub mod server;
pub mod tokens;

/// Generated from proto/ca.proto.
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("istio.v1.auth");
}

pub use client::{CaClient, CaClientError};
pub use duration::parse_duration;
pub use server::{CaConfig, CaServer, Callers, DEFAULT_MAX_TTL, KubeKeys};
