//! The CA on a cluster: who calls, and which identities its node may hold, both asked of the
//! Kubernetes API. A caller presents its ServiceAccount token (the agent pod's projected,
//! pod-bound token); a TokenReview says whether it is valid and whose it is. It must be the
//! agent's ServiceAccount, and its pod (named in the token, checked by UID) gives the node.
//! A node may obtain `spiffe://<td>/ns/<ns>/sa/<sa>` only while a pod of that ServiceAccount
//! is scheduled on it — asked at each request, so a pod the agent has just seen is not
//! refused because the CA looked earlier.

use std::path::Path;

use anyhow::{Context, Result, bail};
use comb_identity::SpiffeId;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The TokenReview `extra` keys of a pod-bound ServiceAccount token.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

pub struct KubeAuth {
    client: kube::Client,
    /// The agents' ServiceAccount, `(namespace, name)`.
    agent: (String, String),
    trust_domain: String,
}

/// Why a caller is refused (said to the caller and logged).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the token was not accepted by the API server{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    NotAnAgent(String),
    #[error("asking the API server: {0}")]
    Api(String),
}

/// `system:serviceaccount:NS:NAME` → (NS, NAME).
pub fn service_account_of(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty()).then_some((ns, name))
}

/// A client of the API server `kubeconfig` names, or of the pod's own (in-cluster).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context("in-cluster Kubernetes configuration")?,
    };
    kube::Client::try_from(config).context("Kubernetes client")
}

impl KubeAuth {
    pub fn new(client: kube::Client, agent: (String, String), trust_domain: String) -> Self {
        Self {
            client,
            agent,
            trust_domain,
        }
    }

    /// The node of the agent that presented `token`.
    pub async fn node_of(&self, token: &str) -> Result<String, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let r = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Api(format!("TokenReview: {e}")))?;
        let status = r.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.map(|e| format!(": {e}")).unwrap_or_default();
            return Err(Refusal::Unauthenticated(why));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((ns, sa)) = service_account_of(&username) else {
            return Err(Refusal::NotAnAgent(format!(
                "{username} is not a ServiceAccount"
            )));
        };
        if (ns, sa) != (self.agent.0.as_str(), self.agent.1.as_str()) {
            return Err(Refusal::NotAnAgent(format!(
                "ServiceAccount {ns}/{sa} is not the agents' ({}/{})",
                self.agent.0, self.agent.1
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod_name), pod_uid) = (first(EXTRA_POD_NAME), first(EXTRA_POD_UID)) else {
            return Err(Refusal::NotAnAgent(
                "the token is not bound to a pod (use the pod's projected ServiceAccount token)"
                    .into(),
            ));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod = pods
            .get_opt(&pod_name)
            .await
            .map_err(|e| Refusal::Api(format!("pod {ns}/{pod_name}: {e}")))?
            .ok_or_else(|| {
                Refusal::NotAnAgent(format!("the token's pod {ns}/{pod_name} is gone"))
            })?;
        if pod_uid.is_some() && pod.metadata.uid != pod_uid {
            return Err(Refusal::NotAnAgent(format!(
                "the token's pod {ns}/{pod_name} was replaced (UID differs)"
            )));
        }
        pod.spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| Refusal::NotAnAgent(format!("pod {ns}/{pod_name} is not scheduled")))
    }

    /// Whether a pod of `id`'s ServiceAccount is scheduled on `node`.
    pub async fn allowed(&self, node: &str, id: &SpiffeId) -> Result<bool> {
        if id.trust_domain != self.trust_domain {
            return Ok(false);
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &id.namespace);
        let list = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .with_context(|| format!("listing the pods of namespace {} on {node}", id.namespace))?;
        Ok(list.items.iter().any(|p| {
            let running = !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            let sa = p
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default");
            running && sa == id.service_account
        }))
    }
}

/// `NAMESPACE/NAME` of the agents' ServiceAccount, as given on the command line.
pub fn parse_agent(s: &str) -> Result<(String, String)> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => bail!("--agent-service-account {s:?}: expected NAMESPACE/NAME"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_usernames() {
        assert_eq!(
            service_account_of("system:serviceaccount:comb-system:comb-agent"),
            Some(("comb-system", "comb-agent"))
        );
        assert_eq!(service_account_of("admin"), None);
        assert_eq!(service_account_of("system:serviceaccount::x"), None);
        assert_eq!(
            parse_agent("comb-system/comb-agent").unwrap(),
            ("comb-system".into(), "comb-agent".into())
        );
        assert!(parse_agent("comb-agent").is_err());
        assert!(parse_agent("a/b/c").is_err());
    }
}
