//! The Kubernetes kinds Comb reads, as k8s-openapi types.

use std::path::PathBuf;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::{istio, istio_peer_auth};

/// A parsed, not yet cross-validated object.
// Unboxed on purpose: callers match and construct these directly, and a few kilobytes per
// manifest document do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Object {
    Namespace(core::Namespace),
    Node(core::Node),
    Pod(core::Pod),
    Service(core::Service),
    EndpointSlice(discovery::EndpointSlice),
    NetworkPolicy(networking::NetworkPolicy),
    AuthorizationPolicy(istio::AuthorizationPolicy),
    PeerAuthentication(istio_peer_auth::PeerAuthentication),
}

/// One object and where it came from, kept so later errors can still name the document.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub file: PathBuf,
    /// 1-based document number within `file`.
    pub index: usize,
    pub object: Object,
}

/// The kinds we accept, with the apiVersions each may carry (several when a CRD serves the
/// same schema under more than one version).
pub(crate) const KINDS: &[(&str, &[&str])] = &[
    ("Namespace", &["v1"]),
    ("Node", &["v1"]),
    ("Pod", &["v1"]),
    ("Service", &["v1"]),
    ("EndpointSlice", &["discovery.k8s.io/v1"]),
    ("NetworkPolicy", &["networking.k8s.io/v1"]),
    (istio::KIND, istio::API_VERSIONS),
    (istio_peer_auth::KIND, istio_peer_auth::API_VERSIONS),
];

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Node(_) => "Node",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::NetworkPolicy(_) => "NetworkPolicy",
            Object::AuthorizationPolicy(_) => istio::KIND,
            Object::PeerAuthentication(_) => istio_peer_auth::KIND,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
        }
    }

    /// Whether objects of this kind live in a namespace (and so default to `default`).
    pub fn is_namespaced(&self) -> bool {
        !matches!(self, Object::Namespace(_) | Object::Node(_))
    }
}

macro_rules! from_k8s {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for Object {
            fn from(o: $ty) -> Self {
                Object::$variant(o)
            }
        }
    )*};
}

from_k8s!(
    Namespace(core::Namespace),
    Node(core::Node),
    Pod(core::Pod),
    Service(core::Service),
    EndpointSlice(discovery::EndpointSlice),
    NetworkPolicy(networking::NetworkPolicy),
    AuthorizationPolicy(istio::AuthorizationPolicy),
    PeerAuthentication(istio_peer_auth::PeerAuthentication)
);
