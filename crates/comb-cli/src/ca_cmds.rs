//! `comb ca`: the certificate authority in this process (comb-ca), until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use comb_ca::{CaConfig, CaServer, Callers, parse_duration};

#[derive(clap::Args)]
pub struct CaArgs {
    /// Address of the gRPC/TLS listener (Istio's port is 15012).
    #[arg(long, default_value = "127.0.0.1:15012")]
    pub listen: SocketAddr,
    /// State directory: the self-signed root (ca-cert.pem, ca-key.pem mode 0600) generated
    /// on first start, and root-cert.pem, the root clients trust.
    #[arg(long)]
    pub dir: PathBuf,
    /// A plug-in CA in Istio's cacerts layout (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem) instead of the self-signed root.
    #[arg(long)]
    pub cacerts: Option<PathBuf>,
    /// Bearer tokens: one `TOKEN NODE` pair per line (standalone mode).
    #[arg(long, requires = "manifests", conflicts_with_all = ["kubeconfig", "in_cluster"])]
    pub tokens: Option<PathBuf>,
    /// The manifests directory the agents read: a node may obtain only identities of
    /// service accounts with pods scheduled on it (standalone mode).
    #[arg(long, requires = "tokens")]
    pub manifests: Option<PathBuf>,
    /// Kubernetes mode: callers present their ServiceAccount token (checked with a
    /// TokenReview); pods are read from this API server.
    #[arg(long, conflicts_with = "in_cluster")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode with the pod's own ServiceAccount (a Deployment).
    #[arg(long)]
    pub in_cluster: bool,
    /// Kubernetes mode: the agents' ServiceAccount, NAMESPACE/NAME; tokens of any other are
    /// refused.
    #[arg(long, default_value = "comb-system/comb-agent")]
    pub agent_service_account: String,
    #[arg(long, default_value = comb_model::mesh::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Longest validity issued (requests asking for more get this), e.g. 24h, 90m, 30s.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub max_ttl: Duration,
    /// Kubernetes mode: keep the signing keys in this Secret, NAMESPACE/NAME (read at start;
    /// a generated self-signed root is stored there when it does not exist; Istio's cacerts
    /// layout in it makes a plug-in CA).
    #[arg(long, conflicts_with = "cacerts", value_parser = comb_ca::kube_keys::parse_ref)]
    pub root_secret: Option<(String, String)>,
    /// Kubernetes mode: publish the root agents trust in this ConfigMap, NAMESPACE/NAME,
    /// key root-cert.pem.
    #[arg(long, value_parser = comb_ca::kube_keys::parse_ref)]
    pub publish_root: Option<(String, String)>,
    /// A DNS name for the CA's serving certificate besides istiod.istio-system.svc (which
    /// Comb's agents verify), e.g. its Service's comb-ca.comb-system.svc; repeatable.
    #[arg(long, value_parser = comb_ca::authority::parse_dns_name)]
    pub serving_dns: Vec<String>,
}

impl CaArgs {
    fn callers(&self) -> Result<Callers> {
        Ok(match (&self.tokens, &self.manifests) {
            (Some(tokens), Some(manifests)) => Callers::Files {
                tokens: tokens.clone(),
                manifests: manifests.clone(),
            },
            _ if self.kubeconfig.is_some() || self.in_cluster => Callers::Kubernetes {
                kubeconfig: self.kubeconfig.clone(),
                agent: comb_ca::kube_auth::parse_agent(&self.agent_service_account)?,
            },
            _ => anyhow::bail!(
                "say who may call: --tokens and --manifests (standalone), or --kubeconfig / --in-cluster"
            ),
        })
    }
}

pub fn run(a: CaArgs) -> Result<ExitCode> {
    // The CA's decisions (issued, refused with node and identity) go to stderr.
    crate::stderr_log::init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let callers = a.callers()?;
    rt.block_on(async move {
        let server = CaServer::start(CaConfig {
            listen: a.listen,
            dir: a.dir,
            cacerts: a.cacerts,
            callers,
            trust_domain: a.trust_domain,
            max_ttl: a.max_ttl,
            serving_dns: a.serving_dns,
            kube_keys: Some(comb_ca::KubeKeys {
                root_secret: a.root_secret,
                publish_root: a.publish_root,
            }),
        })
        .await?;
        eprintln!("comb ca: serving on {}", server.local_addr);
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("comb ca: stopping");
        server.shutdown().await
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct RequestArgs {
    /// The CA, `host:port`.
    #[arg(long)]
    pub ca: String,
    /// The CA's root (PEM).
    #[arg(long)]
    pub root: PathBuf,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: PathBuf,
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    #[arg(long)]
    pub identity: String,
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Also write the private key (PKCS#8 PEM, mode 0600) here, to use the certificate with
    /// another TLS stack (e.g. a test HBONE peer).
    #[arg(long)]
    pub key_out: Option<std::path::PathBuf>,
}

pub fn request(a: RequestArgs) -> Result<ExitCode> {
    let id: comb_identity::SpiffeId = a.identity.parse()?;
    let root = std::fs::read_to_string(&a.root)
        .with_context(|| format!("reading {}", a.root.display()))?;
    let token = std::fs::read_to_string(&a.token_file)
        .with_context(|| format!("reading {}", a.token_file.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let chain = rt.block_on(async {
        let kc = comb_identity::key_and_csr(&id)?;
        let client = comb_ca::CaClient::new(&a.ca, &root, &token)?;
        let chain = client.create_certificate(&kc.csr_pem, a.ttl).await?;
        let key_pem = comb_identity::pem_util::pkcs8_to_pem(&kc.key_pkcs8);
        comb_identity::WorkloadCert::from_pem_chain(&id, &chain, kc.key_pkcs8)?;
        anyhow::Ok((chain, key_pem))
    })?;
    let (chain, key_pem) = chain;
    if let Some(path) = &a.key_out {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(key_pem.as_bytes())?;
    }
    for c in chain {
        print!("{c}");
    }
    Ok(ExitCode::SUCCESS)
}
