//! Mesh membership and workload identity: which pods are in the mesh (enrolment), their
//! SPIFFE identities, and the mutual-TLS mode PeerAuthentication asks for (docs/mtls.md).
//!
//! "Security identity" (a number, [`crate::identity`]) is what the kernel judges; a
//! "workload identity" ([`SpiffeId`]) is what a certificate proves. Both derive from the
//! pod's namespace and service account.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::objects::{ObjKey, Pod};
use crate::policy::LabelSelector;

/// The trust domain when none is configured (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Istio's mesh-wide root namespace: a PeerAuthentication without selector there applies to
/// every pod.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// The port an HBONE peer listens on (Istio ambient's ztunnel).
pub const HBONE_PORT: u16 = 15008;

/// Label (namespace or pod) by which Istio ambient enrols or excludes workloads; `none`
/// opts out of the mesh.
pub const LABEL_DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Annotation Istio's sidecar injector sets on a pod that runs a sidecar.
pub const ANNOTATION_SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Annotation Istio ambient's CNI sets on a pod its ztunnel captures.
pub const ANNOTATION_AMBIENT_REDIRECTION: &str = "ambient.istio.io/redirection";
/// Node annotation: `"false"` declares a node without a Comb agent (its pods are reached as
/// they are: through HBONE when ambient-captured, plain otherwise).
pub const ANNOTATION_NODE_AGENT: &str = "comb.dev/agent";

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// The identity of `pod` in `trust_domain`.
    pub fn of_pod(trust_domain: &str, pod: &Pod) -> Self {
        Self::new(trust_domain, &pod.key.namespace, &pod.service_account)
    }

    /// Istio's principal form (`<td>/ns/<ns>/sa/<sa>`), what AuthorizationPolicy
    /// `principals` and the `source_principal` metric label carry (without `spiffe://`).
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

/// Why a string is not a workload SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeIdError(pub String);

impl fmt::Display for SpiffeIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpiffeIdError {}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    /// Only the workload form Istio issues: exactly `spiffe://td/ns/NS/sa/SA`, no query,
    /// fragment, port or empty segment.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| SpiffeIdError(format!("{s:?} is not a workload SPIFFE ID: {why}"));
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("must start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "ns", ns, "sa", sa] = parts.as_slice() else {
            return Err(err(
                "expected spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT",
            ));
        };
        let ok = |x: &str| {
            !x.is_empty()
                && x.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if !ok(td) || !ok(ns) || !ok(sa) {
            return Err(err("empty segment or a character outside [A-Za-z0-9._-]"));
        }
        Ok(Self::new(td, ns, sa))
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

/// How a pod takes part in the mesh (enrolment, for phased migration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataplaneMode {
    /// In the mesh: identity, HBONE between nodes, PeerAuthentication.
    Mesh,
    /// `istio.io/dataplane-mode: none` on the pod or its namespace: plain traffic.
    None,
    /// Runs an Istio sidecar (`sidecar.istio.io/status`): left to its sidecar.
    Sidecar,
}

impl DataplaneMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DataplaneMode::Mesh => "mesh",
            DataplaneMode::None => "none",
            DataplaneMode::Sidecar => "sidecar",
        }
    }
}

/// The mutual-TLS mode of PeerAuthentication (`spec.mtls.mode`, `portLevelMtls`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope.
    Unset,
    /// Plaintext only (HBONE still accepted from Comb/ztunnel peers: it is how they talk).
    Disable,
    /// Both plaintext and mutual TLS (Istio's default).
    Permissive,
    /// Mutual TLS only: plaintext from another node is dropped in the kernel.
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

/// A validated `security.istio.io` PeerAuthentication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    pub key: ObjKey,
    /// `spec.selector.matchLabels`; `None` = the whole namespace (or the mesh, in the root
    /// namespace).
    pub selector: Option<LabelSelector>,
    pub mode: MtlsMode,
    /// `portLevelMtls`: container (target) port → mode. Only with a selector (Istio ignores
    /// it otherwise; comb-config rejects it).
    pub port_level: BTreeMap<u16, MtlsMode>,
}

/// The effective mode of one pod: a default and per-port exceptions, never `Unset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMtls {
    pub default: MtlsMode,
    pub ports: BTreeMap<u16, MtlsMode>,
    /// The PeerAuthentications that decided it, narrowest first.
    pub from: Vec<ObjKey>,
}

impl PodMtls {
    pub fn mode(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).copied().unwrap_or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Snapshot;
    use crate::objects::Namespace;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            key: ObjKey::new(ns, name),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: BTreeMap::new(),
            node_name: Some("n1".into()),
            service_account: "default".into(),
            ips: vec![],
            cgroup: None,
            splice: true,
            interface: None,
            ports: vec![],
            owner: None,
        }
    }

    fn pa(
        ns: &str,
        name: &str,
        sel: Option<&[(&str, &str)]>,
        mode: MtlsMode,
    ) -> PeerAuthentication {
        PeerAuthentication {
            key: ObjKey::new(ns, name),
            selector: sel.map(|l| LabelSelector {
                match_labels: l
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                match_expressions: vec![],
            }),
            mode,
            port_level: BTreeMap::new(),
        }
    }

    fn snap(pas: Vec<PeerAuthentication>) -> Snapshot {
        let mut s = Snapshot::default();
        for p in pas {
            s.peer_authentications.insert(p.key.clone(), p);
        }
        s
    }

    #[test]
    fn spiffe_id_round_trips_and_rejects_other_forms() {
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/client".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "a", "client"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/a/sa/client");
        assert_eq!(id.principal(), "cluster.local/ns/a/sa/client");
        for bad in [
            "cluster.local/ns/a/sa/client",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns/a/x/b",
            "spiffe://cluster.local:80/ns/a/sa/b",
            "spiffe://td/ns/a/sa/b?x=1",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn enrolment_sidecar_then_pod_label_then_namespace_label() {
        let mut s = Snapshot::default();
        let mut ns = Namespace {
            name: "legacy".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        };
        ns.labels.insert(LABEL_DATAPLANE_MODE.into(), "none".into());
        s.namespaces.insert("legacy".into(), ns);
        assert_eq!(
            s.dataplane_mode(&pod("shop", "a", &[])),
            DataplaneMode::Mesh
        );
        assert_eq!(
            s.dataplane_mode(&pod("legacy", "a", &[])),
            DataplaneMode::None
        );
        // A pod label overrides its namespace's.
        let p = pod("legacy", "b", &[(LABEL_DATAPLANE_MODE, "ambient")]);
        assert_eq!(s.dataplane_mode(&p), DataplaneMode::Mesh);
        let p = pod("shop", "c", &[(LABEL_DATAPLANE_MODE, "none")]);
        assert_eq!(s.dataplane_mode(&p), DataplaneMode::None);
        let mut p = pod("shop", "d", &[]);
        p.annotations
            .insert(ANNOTATION_SIDECAR_STATUS.into(), "{}".into());
        assert_eq!(s.dataplane_mode(&p), DataplaneMode::Sidecar);
    }

    #[test]
    fn peer_authentication_inheritance() {
        let web = pod("shop", "web", &[("app", "web")]);
        let root = "istio-system";
        // Nothing: PERMISSIVE.
        assert_eq!(
            snap(vec![]).pod_mtls(&web, root).default,
            MtlsMode::Permissive
        );
        // Mesh STRICT applies; namespace UNSET inherits it; namespace DISABLE overrides it.
        let mesh = pa(root, "default", None, MtlsMode::Strict);
        let s = snap(vec![mesh.clone()]);
        assert_eq!(s.pod_mtls(&web, root).default, MtlsMode::Strict);
        let s = snap(vec![mesh.clone(), pa("shop", "ns", None, MtlsMode::Unset)]);
        let m = s.pod_mtls(&web, root);
        assert_eq!(m.default, MtlsMode::Strict);
        assert_eq!(
            m.from,
            vec![ObjKey::new("shop", "ns"), ObjKey::new(root, "default")]
        );
        let s = snap(vec![
            mesh.clone(),
            pa("shop", "ns", None, MtlsMode::Disable),
        ]);
        assert_eq!(s.pod_mtls(&web, root).default, MtlsMode::Disable);
        // A mesh-wide policy elsewhere than the root namespace is a namespace policy there.
        let s = snap(vec![pa("other", "default", None, MtlsMode::Strict)]);
        assert_eq!(s.pod_mtls(&web, root).default, MtlsMode::Permissive);
        // Workload selector wins; a non-matching selector does nothing.
        let s = snap(vec![
            mesh.clone(),
            pa("shop", "w", Some(&[("app", "web")]), MtlsMode::Permissive),
            pa("shop", "x", Some(&[("app", "db")]), MtlsMode::Disable),
        ]);
        assert_eq!(s.pod_mtls(&web, root).default, MtlsMode::Permissive);
        // Port level: UNSET ports take the workload's effective mode; equal ones vanish.
        let mut w = pa("shop", "w", Some(&[("app", "web")]), MtlsMode::Unset);
        w.port_level.insert(8080, MtlsMode::Disable);
        w.port_level.insert(9090, MtlsMode::Unset);
        w.port_level.insert(7070, MtlsMode::Strict);
        let s = snap(vec![mesh, w]);
        let m = s.pod_mtls(&web, root);
        assert_eq!(m.default, MtlsMode::Strict);
        assert_eq!(m.mode(8080), MtlsMode::Disable);
        assert_eq!(m.mode(9090), MtlsMode::Strict);
        assert_eq!(m.mode(1), MtlsMode::Strict);
        assert_eq!(m.ports.len(), 1);
    }
}
