//! The kinds the Kubernetes source watches, and which version of each the server offers.
//!
//! Every kind is read as a dynamic object and handed to comb-config as JSON, the same
//! input the manifests parser gets; so one watcher serves the built-in kinds, EndpointSlices
//! of either version and the Istio CRDs alike.

use kube::Client;
use kube::core::{ApiResource, GroupVersionKind};

/// One watched kind and the versions Comb reads, preferred first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchedKind {
    pub kind: &'static str,
    /// API group ("" for the core group).
    pub group: &'static str,
    pub versions: &'static [&'static str],
    pub plural: &'static str,
    /// Cluster-scoped kinds have no namespace in their key.
    pub namespaced: bool,
    /// Defined by a CRD that may be missing: State is built without it (reported) until it
    /// appears. Built-in kinds are waited for before the first snapshot.
    pub optional: bool,
}

pub const KINDS: &[WatchedKind] = &[
    WatchedKind {
        kind: "Namespace",
        group: "",
        versions: &["v1"],
        plural: "namespaces",
        namespaced: false,
        optional: false,
    },
    // The nodes' addresses: traffic from a node (its kubelet's probes, host processes) is
    // judged as the node's, not as the world's.
    WatchedKind {
        kind: "Node",
        group: "",
        versions: &["v1"],
        plural: "nodes",
        namespaced: false,
        optional: false,
    },
    WatchedKind {
        kind: "Pod",
        group: "",
        versions: &["v1"],
        plural: "pods",
        namespaced: true,
        optional: false,
    },
    WatchedKind {
        kind: "Service",
        group: "",
        versions: &["v1"],
        plural: "services",
        namespaced: true,
        optional: false,
    },
    // v1 since Kubernetes 1.21; 1.20 serves only v1beta1 (comb_config::api converts it).
    WatchedKind {
        kind: "EndpointSlice",
        group: "discovery.k8s.io",
        versions: &["v1", "v1beta1"],
        plural: "endpointslices",
        namespaced: true,
        optional: false,
    },
    WatchedKind {
        kind: "NetworkPolicy",
        group: "networking.k8s.io",
        versions: &["v1"],
        plural: "networkpolicies",
        namespaced: true,
        optional: false,
    },
    WatchedKind {
        kind: comb_config::istio::KIND,
        group: comb_config::istio::API_GROUP,
        versions: &["v1", "v1beta1"],
        plural: "authorizationpolicies",
        namespaced: true,
        optional: true,
    },
    WatchedKind {
        kind: comb_config::istio_peer_auth::KIND,
        group: comb_config::istio::API_GROUP,
        versions: &["v1", "v1beta1"],
        plural: "peerauthentications",
        namespaced: true,
        optional: true,
    },
];

impl WatchedKind {
    /// `pods`, `authorizationpolicies.security.istio.io`: how kubectl and RBAC name it.
    pub fn resource_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn api_resource(&self, version: &str) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, version, self.kind),
            self.plural,
        )
    }

    fn group_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }
}

/// Why a kind cannot be watched yet.
#[derive(Debug)]
pub enum Unserved {
    /// The server answered and serves none of the versions (a CRD not installed).
    NotServed,
    /// Discovery failed (server down, forbidden, ...).
    Failed(kube::Error),
}

/// The first of `kind`'s versions the server serves, by API discovery.
pub async fn discover(client: &Client, kind: &WatchedKind) -> Result<ApiResource, Unserved> {
    for version in kind.versions {
        // The core group lives under /api, the others under /apis.
        let listed = if kind.group.is_empty() {
            client.list_core_api_resources(version).await
        } else {
            client
                .list_api_group_resources(&kind.group_version(version))
                .await
        };
        match listed {
            Ok(list) if list.resources.iter().any(|r| r.name == kind.plural) => {
                return Ok(kind.api_resource(version));
            }
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Unserved::Failed(e)),
        }
    }
    Err(Unserved::NotServed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_resources() {
        let slice = KINDS.iter().find(|k| k.kind == "EndpointSlice").unwrap();
        assert_eq!(slice.resource_name(), "endpointslices.discovery.k8s.io");
        let r = slice.api_resource("v1beta1");
        assert_eq!(r.api_version, "discovery.k8s.io/v1beta1");
        assert_eq!(slice.group_version("v1"), "discovery.k8s.io/v1");
        let pod = KINDS.iter().find(|k| k.kind == "Pod").unwrap();
        assert_eq!(pod.resource_name(), "pods");
        assert_eq!(pod.api_resource("v1").api_version, "v1");
        assert!(
            KINDS
                .iter()
                .filter(|k| k.optional)
                .all(|k| k.group == "security.istio.io")
        );
    }
}
