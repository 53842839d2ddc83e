//! Istio's `PeerAuthentication` CRD (`security.istio.io/v1`, same schema as `v1beta1`) as
//! plain serde types, and its validation into [`comb_model::mesh::PeerAuthentication`].
//!
//! Validated as istiod does: `mtls.mode` and `portLevelMtls[].mode` are UNSET, DISABLE,
//! PERMISSIVE or STRICT; `portLevelMtls` needs a non-empty selector (istiod refuses it
//! otherwise) and port keys 1..=65535.

use std::collections::BTreeMap;

use comb_model::ObjKey;
use comb_model::mesh::{self as model, MtlsMode};
use comb_model::policy::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::convert::checked;
use crate::convert_policy::match_labels;
use crate::error::Sink;
use crate::istio::WorkloadSelector;

pub const KIND: &str = "PeerAuthentication";
pub const API_VERSIONS: &[&str] = crate::istio::API_VERSIONS;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    /// Kept as written (`v1` or `v1beta1`).
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PeerAuthenticationSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Keys are port numbers written as strings (YAML `8080:` becomes `"8080"` in JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_level_mtls: Option<BTreeMap<String, Mtls>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mtls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl From<Mode> for MtlsMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Unset => MtlsMode::Unset,
            Mode::Disable => MtlsMode::Disable,
            Mode::Permissive => MtlsMode::Permissive,
            Mode::Strict => MtlsMode::Strict,
        }
    }
}

pub(crate) fn peer_authentication(
    o: &PeerAuthentication,
    key: ObjKey,
    s: &mut Sink<'_>,
) -> Option<model::PeerAuthentication> {
    checked(s, |s| {
        let spec = o.spec.clone().unwrap_or_default();
        let selector = spec.selector.as_ref().and_then(|sel| {
            let labels = match_labels(sel.match_labels.as_ref(), "spec.selector.matchLabels", s);
            // Empty matchLabels = no selector (namespace- or mesh-wide), as in istiod.
            (!labels.is_empty()).then(|| LabelSelector {
                match_labels: labels,
                match_expressions: vec![],
            })
        });
        let mode = spec
            .mtls
            .as_ref()
            .and_then(|m| m.mode)
            .map_or(MtlsMode::Unset, MtlsMode::from);
        let mut port_level = BTreeMap::new();
        if let Some(ports) = &spec.port_level_mtls {
            if selector.is_none() && !ports.is_empty() {
                s.field(
                    "spec.portLevelMtls",
                    "requires a non-empty spec.selector (port-level mTLS applies to selected workloads only)",
                );
            }
            for (port, m) in ports {
                let at = format!("spec.portLevelMtls[{port:?}]");
                match port.parse::<u16>() {
                    Ok(p) if p > 0 => {
                        port_level.insert(p, m.mode.map_or(MtlsMode::Unset, MtlsMode::from));
                    }
                    _ => s.field(at, format!("{port:?} is not a port number (1-65535)")),
                }
            }
        }
        model::PeerAuthentication {
            key,
            selector,
            mode,
            port_level,
        }
    })
}

#[cfg(test)]
mod tests {
    use crate::test_util::{errors, load};
    use comb_model::ObjKey;
    use comb_model::mesh::MtlsMode;

    fn pa(meta: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {meta}\nspec:\n{spec}"
        )
    }

    #[test]
    fn mesh_namespace_and_workload_scopes_with_port_level() {
        let text = [
            pa("{name: default, namespace: istio-system}", "  mtls: {mode: STRICT}\n"),
            pa("{name: ns, namespace: shop}", "  mtls: {}\n"),
            pa(
                "{name: web, namespace: shop}",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    9090: {}\n",
            ),
        ]
        .join("---\n");
        let snap = load(&text).unwrap();
        let pas = &snap.peer_authentications;
        assert_eq!(pas.len(), 3);
        assert_eq!(
            pas[&ObjKey::new("istio-system", "default")].mode,
            MtlsMode::Strict
        );
        assert_eq!(pas[&ObjKey::new("shop", "ns")].mode, MtlsMode::Unset);
        let web = &pas[&ObjKey::new("shop", "web")];
        assert_eq!(web.mode, MtlsMode::Permissive);
        assert_eq!(web.port_level[&8080], MtlsMode::Disable);
        assert_eq!(web.port_level[&9090], MtlsMode::Unset);
        assert!(
            web.selector
                .as_ref()
                .unwrap()
                .match_labels
                .contains_key("app")
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                "  mtls: {mode: MUTUAL}\n",
                "spec.mtls.mode",
                "unknown variant",
            ),
            (
                "  portLevelMtls:\n    8080: {mode: STRICT}\n",
                "spec.portLevelMtls",
                "requires a non-empty spec.selector",
            ),
            (
                "  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    http: {mode: STRICT}\n",
                "spec.portLevelMtls[\"http\"]",
                "not a port number",
            ),
            (
                "  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    0: {mode: STRICT}\n",
                "spec.portLevelMtls[\"0\"]",
                "not a port number",
            ),
            (
                "  mtls: {mode: STRICT, extra: 1}\n",
                "spec.mtls.extra",
                "unknown field",
            ),
            (
                "  selector: {matchLabels: {\"bad key!\": web}}\n",
                "spec.selector.matchLabels[\"bad key!\"]",
                "not a valid label key",
            ),
        ];
        for (spec, field, msg) in cases {
            let errs = errors(&pa("{name: p, namespace: shop}", spec));
            assert_eq!(errs.len(), 1, "{spec}: {errs:?}");
            let e = errs[0].to_string();
            assert!(
                e.contains(&format!("document 1: {field}: ")) && e.contains(msg),
                "{spec}: {e}"
            );
        }
    }

    #[test]
    fn unsupported_version_is_refused() {
        let text =
            "apiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata: {name: p}\n";
        let e = errors(text)[0].to_string();
        assert!(e.contains("unsupported apiVersion"), "{e}");
    }
}
