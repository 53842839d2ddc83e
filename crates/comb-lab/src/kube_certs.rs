//! The credentials of a test API server, made fresh for each one: a CA and a serving
//! certificate for 127.0.0.1, the service-account signing key, an admin token, and the
//! kubeconfig that trusts that CA and presents that token.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub struct KubeCredentials {
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// Signs service-account tokens (the API server requires one since 1.20).
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    /// `token,user,uid,"group"` lines (`--token-auth-file`).
    pub tokens: PathBuf,
    pub kubeconfig: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

/// Writes everything into `dir`; the kubeconfig points at `https://127.0.0.1:{port}`.
pub fn generate(dir: &Path, port: u16) -> Result<KubeCredentials> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "comb-test-kubernetes-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let serving_cert = serving.signed_by(&serving_key, &issuer)?;

    let sa = KeyPair::generate()?;
    let token = format!("comb-test-{:016x}", rand::random::<u64>());
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
        ca = dir.join("ca.crt").display(),
    );
    // The kubeconfig names the CA file rather than embedding it.
    write(dir, "ca.crt", &ca_cert.pem())?;
    Ok(KubeCredentials {
        serving_cert: write(dir, "apiserver.crt", &serving_cert.pem())?,
        serving_key: write(dir, "apiserver.key", &serving_key.serialize_pem())?,
        sa_key: write(dir, "sa.key", &sa.serialize_pem())?,
        sa_pub: write(dir, "sa.pub", &sa.public_key_pem())?,
        tokens: write(
            dir,
            "tokens.csv",
            &format!("{token},admin,admin,\"system:masters\"\n"),
        )?,
        kubeconfig: write(dir, "kubeconfig", &kubeconfig)?,
    })
}
