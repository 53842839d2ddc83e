//! The CA's keys and root on a cluster. The signing keys live in a Secret, so a CA pod that
//! is restarted or rescheduled (its disk is an emptyDir) serves the same root: read at start
//! when it exists, else a self-signed root is generated and stored there (when another
//! replica stored one first, that one is used). The Secret may hold Istio's `cacerts` layout
//! instead (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`): a plug-in CA,
//! checked link by link as `--cacerts` is. The root the agents must trust is published in a
//! ConfigMap (`root-cert.pem`, as istiod's `istio-ca-root-cert`), kept so while the CA runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use crate::authority::{Authority, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};

/// The ConfigMap key agents read.
pub const ROOT_KEY: &str = ROOT_CERT;
/// How often the published root is checked (and restored if someone changed it).
const REPUBLISH: Duration = Duration::from_secs(30);

/// `NAMESPACE/NAME`.
pub fn parse_ref(s: &str) -> Result<(String, String)> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => bail!("{s:?}: expected NAMESPACE/NAME"),
    }
}

/// The metadata of an object the CA creates: its name, and who manages it.
fn managed(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(ns.to_owned()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/managed-by".to_owned(),
            "comb-ca".to_owned(),
        )])),
        ..Default::default()
    }
}

/// Which layout a Secret's keys are in.
#[derive(Debug, PartialEq, Eq)]
pub enum Layout {
    /// `cert-chain.pem` present: a plug-in CA (all four files).
    Plugin,
    /// `ca-cert.pem` + `ca-key.pem`: a self-signed root.
    SelfSigned,
}

/// The layout of a Secret with these keys, or what is missing.
pub fn layout(keys: &[&str]) -> Result<Layout, String> {
    let has = |k: &str| keys.contains(&k);
    if has(CERT_CHAIN) {
        let missing: Vec<&str> = [CA_CERT, CA_KEY, ROOT_CERT]
            .into_iter()
            .filter(|k| !has(k))
            .collect();
        return if missing.is_empty() {
            Ok(Layout::Plugin)
        } else {
            Err(format!(
                "has {CERT_CHAIN} (a plug-in CA) but lacks {}",
                missing.join(", ")
            ))
        };
    }
    if has(CA_CERT) && has(CA_KEY) {
        Ok(Layout::SelfSigned)
    } else {
        Err(format!(
            "holds neither a self-signed root ({CA_CERT}, {CA_KEY}) nor a plug-in CA ({CA_CERT}, {CA_KEY}, {CERT_CHAIN}, {ROOT_CERT})"
        ))
    }
}

/// The CA's authority from Secret `ns/name`, generating a self-signed root and storing it
/// there when the Secret does not exist. `dir` is the CA's state directory.
pub async fn authority(
    client: &kube::Client,
    (ns, name): &(String, String),
    dir: &Path,
    trust_domain: &str,
) -> Result<Authority> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    // Twice at most: a create that lost a race reads the winner's Secret.
    for _ in 0..2 {
        let found = api
            .get_opt(name)
            .await
            .with_context(|| format!("reading Secret {ns}/{name}"))?;
        if let Some(secret) = found {
            return from_secret(&secret, &dir.join("secret"), trust_domain)
                .with_context(|| format!("Secret {ns}/{name}"));
        }
        let generated = dir.join("generated");
        // A fresh root, unless this CA made one before and could not store it.
        let auth = Authority::self_signed(&generated, trust_domain)?;
        let read = |f: &str| {
            std::fs::read(generated.join(f))
                .with_context(|| format!("reading {}", generated.join(f).display()))
        };
        let cert = read(CA_CERT)?;
        let data = BTreeMap::from([
            (CA_CERT.to_owned(), ByteString(cert.clone())),
            (CA_KEY.to_owned(), ByteString(read(CA_KEY)?)),
            (ROOT_CERT.to_owned(), ByteString(cert)),
        ]);
        let secret = Secret {
            metadata: managed(ns, name),
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = %format!("{ns}/{name}"), "stored the generated root CA");
                return Ok(auth);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::info!(secret = %format!("{ns}/{name}"), "another CA stored a root first; using it");
                let _ = std::fs::remove_dir_all(&generated);
            }
            Err(e) => return Err(e).with_context(|| format!("creating Secret {ns}/{name}")),
        }
    }
    bail!("Secret {ns}/{name}: created by another CA and then gone")
}

/// Write the Secret's files into `dir` (keys mode 0600) and load them.
fn from_secret(secret: &Secret, dir: &Path, trust_domain: &str) -> Result<Authority> {
    let data = secret.data.clone().unwrap_or_default();
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    let layout = layout(&keys).map_err(|e| anyhow::anyhow!(e))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (k, v) in &data {
        if ![CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT].contains(&k.as_str()) {
            continue;
        }
        let path = dir.join(k);
        crate::authority::write_file(&path, &v.0, k == CA_KEY)?;
    }
    match layout {
        Layout::Plugin => Authority::plugin(dir),
        Layout::SelfSigned => Authority::self_signed(dir, trust_domain),
    }
}

/// Make ConfigMap `ns/name` hold `root_pem` under `root-cert.pem` (created or updated).
pub async fn publish_root(
    client: &kube::Client,
    (ns, name): &(String, String),
    root_pem: &str,
) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let found = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading ConfigMap {ns}/{name}"))?;
    match found {
        Some(cm)
            if cm
                .data
                .as_ref()
                .and_then(|d| d.get(ROOT_KEY))
                .map(String::as_str)
                == Some(root_pem) =>
        {
            Ok(())
        }
        Some(_) => {
            let patch = ConfigMap {
                data: Some(BTreeMap::from([(ROOT_KEY.to_owned(), root_pem.to_owned())])),
                ..Default::default()
            };
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("updating ConfigMap {ns}/{name}"))?;
            tracing::info!(configmap = %format!("{ns}/{name}"), "root published");
            Ok(())
        }
        None => {
            let cm = ConfigMap {
                metadata: managed(ns, name),
                data: Some(BTreeMap::from([(ROOT_KEY.to_owned(), root_pem.to_owned())])),
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm)
                .await
                .with_context(|| format!("creating ConfigMap {ns}/{name}"))?;
            tracing::info!(configmap = %format!("{ns}/{name}"), "root published");
            Ok(())
        }
    }
}

/// Keep the root published while the CA runs (a failure is logged and retried).
pub async fn keep_published(client: kube::Client, target: (String, String), root_pem: String) {
    loop {
        if let Err(e) = publish_root(&client, &target, &root_pem).await {
            tracing::error!(error = %format!("{e:#}"), "publishing the root; retrying");
        }
        tokio::time::sleep(REPUBLISH).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_a_plugin_ca_or_a_self_signed_root() {
        assert_eq!(
            layout(&[CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT]),
            Ok(Layout::Plugin)
        );
        assert_eq!(
            layout(&[CA_CERT, CA_KEY, ROOT_CERT]),
            Ok(Layout::SelfSigned)
        );
        assert_eq!(layout(&[CA_CERT, CA_KEY]), Ok(Layout::SelfSigned));
        let e = layout(&[CA_CERT, CA_KEY, CERT_CHAIN]).unwrap_err();
        assert!(e.contains(ROOT_CERT), "{e}");
        let e = layout(&["tls.crt", "tls.key"]).unwrap_err();
        assert!(e.contains("neither"), "{e}");
    }

    #[test]
    fn references_are_namespace_slash_name() {
        assert_eq!(
            parse_ref("comb-system/comb-ca-root").unwrap(),
            ("comb-system".to_owned(), "comb-ca-root".to_owned())
        );
        for bad in ["x", "/x", "x/", "a/b/c"] {
            assert!(parse_ref(bad).is_err(), "{bad}");
        }
    }
}
