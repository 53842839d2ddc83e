//! What the node L7 proxy needs, compiled from State for one node: who a source address is,
//! which local pods the proxy serves, the Services in front of them and each pod's
//! AuthorizationPolicy rules in a form the proxy evaluates per request (or per opaque TCP
//! connection). Pure, no I/O: the agent builds a [`ProxyTable`] on every State change and the
//! proxy swaps it in atomically; a request keeps the table it started with.
//!
//! Semantics follow Istio's authorization (docs/l7.md): DENY policies first (any matching
//! rule denies), then ALLOW (if any ALLOW policy selects the workload, a request needs a
//! matching ALLOW rule), AUDIT only marks. For opaque TCP, HTTP-only fields make an ALLOW
//! rule never match and are ignored in a DENY rule (which therefore matches more), as Istio
//! does.

mod authz;
mod compile;
mod matchers;

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::mesh::{DataplaneMode, SpiffeId};
use crate::objects::ObjKey;

pub use authz::{Authz, DecisionRef};
pub use compile::compile_proxy_table;

/// Everything the proxy knows, for one node. Cheap to share (`Arc`), never mutated.
#[derive(Clone, Debug, Default)]
pub struct ProxyTable {
    /// State generation it was compiled from.
    pub generation: u64,
    /// Every pod of the cluster with an address (all nodes): who a peer address is.
    pub workloads: HashMap<IpAddr, Arc<Workload>>,
    /// The Services in front of every pod of the cluster (all nodes) by each of its
    /// addresses; pods no Service lists are absent. A local pod's are its endpoint's too.
    pub pod_services: HashMap<IpAddr, Arc<[ServiceRef]>>,
    /// Local pods (this node) by each of their addresses: the destinations the proxy serves.
    pub endpoints: HashMap<IpAddr, Arc<L7Endpoint>>,
    /// Local pods by each of their addresses with their SPIFFE identity and enrolment (HBONE:
    /// the client certificate of an outbound tunnel, the server certificate of an inbound
    /// one). Filled by the pipeline from its `DesiredMesh`.
    pub mesh_endpoints: HashMap<IpAddr, MeshIdentity>,
    /// Pods on other nodes reached through HBONE, by address, with the identity they must
    /// present (the pipeline's `DesiredMesh::hbone_peers`).
    pub hbone_peers: HashMap<IpAddr, HboneTarget>,
}

/// A local pod's mesh identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshIdentity {
    pub identity: SpiffeId,
    pub mode: DataplaneMode,
}

/// A remote pod reached through HBONE at `<its address>:15008`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HboneTarget {
    /// The identity its end of the tunnel must prove (its service account's).
    pub identity: SpiffeId,
    /// A Comb node (`true`) or a ztunnel one.
    pub comb: bool,
}

impl ProxyTable {
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(&ip)
    }

    pub fn endpoint(&self, ip: IpAddr) -> Option<&Arc<L7Endpoint>> {
        self.endpoints.get(&ip)
    }

    /// Istio's `destination_service` for a connection to `port` of the pod at `ip` on any
    /// node, chosen as [`L7Endpoint::destination_service`] chooses without a `Host` header.
    pub fn pod_destination_service(&self, ip: IpAddr, port: u16) -> Option<&ServiceRef> {
        let services = self.pod_services.get(&ip)?;
        compile::destination_service(services, port, None)
    }

    /// The local pod at `ip` when it is in the mesh (its identity signs its tunnels).
    pub fn mesh_identity(&self, ip: IpAddr) -> Option<&SpiffeId> {
        self.mesh_endpoints
            .get(&ip.to_canonical())
            .filter(|m| m.mode == DataplaneMode::Mesh)
            .map(|m| &m.identity)
    }

    pub fn hbone_peer(&self, ip: IpAddr) -> Option<&HboneTarget> {
        self.hbone_peers.get(&ip.to_canonical())
    }
}

/// A pod as telemetry and policy name it (Istio's workload labels).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub pod: ObjKey,
    /// Istio's workload name: the owning Deployment (ReplicaSet owner with its
    /// pod-template-hash stripped), StatefulSet, DaemonSet or Job (a CronJob's Job with its
    /// `-<timestamp>` stripped), any other controller's name; else the pod's name.
    pub workload: String,
    pub namespace: String,
    pub service_account: String,
    /// `cluster.local/ns/<ns>/sa/<sa>` (what `source.principal` matches).
    pub principal: String,
    /// Canonical service and revision (`service.istio.io/canonical-name`/`-revision`, else
    /// `app.kubernetes.io/name`/`version` or `app`/`version`, else the workload / `latest`).
    pub canonical_service: String,
    pub canonical_revision: String,
    /// Security identity number (comb identity table); 0 when the table has none.
    pub identity: u32,
}

/// A local pod the proxy may serve.
#[derive(Clone, Debug)]
pub struct L7Endpoint {
    pub workload: Arc<Workload>,
    /// Services whose selector picks the pod (non-headless and headless), for
    /// `destination_service`: those whose EndpointSlices list one of the pod's addresses
    /// (the model keeps no Service selectors), by key.
    pub services: Arc<[ServiceRef]>,
    /// The pod's AuthorizationPolicies (selector and root-namespace ones), compiled.
    pub authz: Authz,
    /// `comb.dev/l7: "true"` on the pod or its namespace.
    pub visibility: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRef {
    pub key: ObjKey,
    /// `<name>.<namespace>.svc.cluster.local`.
    pub host: String,
    /// Pod ports the Service's TCP ports resolve to on this pod (target ports, names
    /// resolved through the pod's container ports), sorted.
    pub target_ports: Vec<u16>,
}

impl L7Endpoint {
    /// Istio's `destination_service` for a request to `port` of this pod: the Service whose
    /// target ports include `port`; with several, the one whose name or host the `Host`
    /// header names (`web`, `web.shop`, `web.shop.svc`, `web.shop.svc.cluster.local`, with
    /// or without `:port`); else the first by name. None when no Service fronts the port.
    pub fn destination_service(&self, port: u16, host_header: Option<&str>) -> Option<&ServiceRef> {
        compile::destination_service(&self.services, port, host_header)
    }
}

/// Request headers by lowercase name; several values of one header joined with `,` (as
/// Envoy presents them to RBAC).
pub trait Headers {
    fn header(&self, lowercase_name: &str) -> Option<Cow<'_, str>>;
}

/// The attributes of one request (or one opaque TCP connection: `http: None`).
pub struct Request<'a> {
    pub source_ip: IpAddr,
    /// None: not a known pod (world, a node, another cluster).
    pub source: Option<&'a Workload>,
    /// The source identity a peer certificate proved (mutual TLS, HBONE). When set, it is
    /// what `principals`, `namespaces` and `source.principal`/`source.namespace` match,
    /// whatever `source` (inferred from the address) says.
    pub authenticated: Option<Authenticated<'a>>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub http: Option<HttpRequest<'a>>,
}

/// A certificate-proven source identity, in AuthorizationPolicy's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authenticated<'a> {
    /// `<trust-domain>/ns/<ns>/sa/<sa>` (Istio's principal form, no `spiffe://`).
    pub principal: &'a str,
    pub namespace: &'a str,
}

pub struct HttpRequest<'a> {
    /// `:authority` / `Host`, as sent (port included if present).
    pub host: &'a str,
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub headers: &'a dyn Headers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionReason {
    /// No policy decided: no ALLOW policy selects the workload and no DENY rule matched
    /// (also when no policy selects it at all).
    NoPolicy,
    /// An ALLOW rule matched.
    Allowed,
    /// A DENY rule matched.
    Denied,
    /// ALLOW policies select the workload and none of their rules matched.
    NoAllowMatched,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allow: bool,
    pub reason: DecisionReason,
    /// The deciding policy: the DENY or ALLOW policy whose rule matched, or for
    /// `NoAllowMatched` the first ALLOW policy (by namespace/name).
    pub policy: Option<ObjKey>,
    /// An AUDIT policy whose rule matched (the request is to be logged as audited).
    pub audit: Option<ObjKey>,
}
