//! The CA service: `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS 1.3.
//!
//! A request is authenticated by its bearer token (→ a node), its CSR checked (one SPIFFE URI
//! SAN in the CA's trust domain), authorized (the node runs a pod of that service account),
//! and signed with the requested validity capped at the maximum.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use prost_types::value::Kind;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status};

use crate::authority::{Authority, check_csr};
use crate::authz::NodeIdentities;
use crate::kube_auth::{KubeAuth, Refusal};
use crate::pb::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::pb::{IstioCertificateRequest, IstioCertificateResponse};
use crate::tokens::Tokens;
use comb_identity::SpiffeId;

/// The metadata key ztunnel sets to the identity it asks for on a workload's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug)]
pub struct CaConfig {
    pub listen: SocketAddr,
    /// Where the self-signed root lives (generated on first start) and where
    /// `root-cert.pem` is written for clients.
    pub dir: PathBuf,
    /// A plug-in CA in Istio's `cacerts` layout instead of the self-signed root.
    pub cacerts: Option<PathBuf>,
    pub callers: Callers,
    pub trust_domain: String,
    pub max_ttl: Duration,
    /// DNS names the serving certificate carries besides `istiod.istio-system.svc` (e.g. the
    /// CA's Service names on a cluster), for clients that verify the name they dial.
    pub serving_dns: Vec<String>,
    /// Kubernetes mode: keys kept in a Secret, the root published in a ConfigMap.
    pub kube_keys: Option<KubeKeys>,
}

/// Where a CA on a cluster keeps its keys and publishes its root (crate::kube_keys).
#[derive(Clone, Debug, Default)]
pub struct KubeKeys {
    /// `(namespace, name)` of the Secret with the signing keys.
    pub root_secret: Option<(String, String)>,
    /// `(namespace, name)` of the ConfigMap agents read the root from.
    pub publish_root: Option<(String, String)>,
}

/// How callers are authenticated and which identities their node may hold.
#[derive(Clone, Debug)]
pub enum Callers {
    /// Standalone (the lab): bearer tokens from a file (`TOKEN NODE` per line); pods from
    /// the manifests directory the agents read.
    Files { tokens: PathBuf, manifests: PathBuf },
    /// A cluster: the agent's ServiceAccount token checked with a TokenReview, its node from
    /// its pod; pods from the API (crate::kube_auth).
    Kubernetes {
        /// `None`: in-cluster configuration.
        kubeconfig: Option<PathBuf>,
        /// The agents' ServiceAccount, `(namespace, name)`.
        agent: (String, String),
    },
}

enum Auth {
    Files {
        tokens: Tokens,
        authz: Arc<NodeIdentities>,
    },
    Kubernetes(KubeAuth),
}

struct Service {
    authority: Arc<Authority>,
    auth: Auth,
    trust_domain: String,
    max_ttl: Duration,
}

impl Service {
    async fn node_of(&self, token: &str) -> Result<String, Status> {
        match &self.auth {
            Auth::Files { tokens, .. } => tokens
                .node_of(token)
                .map(str::to_string)
                .ok_or_else(|| Status::unauthenticated("unknown bearer token")),
            Auth::Kubernetes(k) => k.node_of(token).await.map_err(|e| match e {
                Refusal::Api(_) => Status::unavailable(e.to_string()),
                Refusal::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
                Refusal::NotAnAgent(_) => Status::permission_denied(e.to_string()),
            }),
        }
    }

    async fn allowed(&self, node: &str, id: &SpiffeId) -> Result<bool, Status> {
        match &self.auth {
            Auth::Files { authz, .. } => {
                let authz = authz.clone();
                let (n, id) = (node.to_owned(), id.clone());
                tokio::task::spawn_blocking(move || authz.allowed(&n, &id))
                    .await
                    .map_err(|e| Status::internal(format!("authorization: {e}")))
            }
            Auth::Kubernetes(k) => k
                .allowed(node, id)
                .await
                .map_err(|e| Status::unavailable(format!("{e:#}"))),
        }
    }
}

fn bearer(req: &Request<IstioCertificateRequest>) -> Option<&str> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = req.remote_addr();
        let Some(token) = bearer(&req) else {
            tracing::warn!(?peer, "refused: no bearer token");
            return Err(Status::unauthenticated(
                "no `authorization: Bearer <token>` header",
            ));
        };
        let node = match self.node_of(token).await {
            Ok(n) => n,
            Err(status) => {
                tracing::warn!(?peer, reason = %status.message(), "refused: caller not authenticated");
                return Err(status);
            }
        };
        let r = req.into_inner();
        let csr = check_csr(&r.csr, &self.trust_domain).map_err(|e| {
            tracing::warn!(%node, error = %e, "refused: bad CSR");
            Status::invalid_argument(e.to_string())
        })?;
        let impersonated = r
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        if let Some(imp) = impersonated
            && imp != csr.id.to_string()
        {
            tracing::warn!(%node, identity = %csr.id, impersonated = %imp, "refused: metadata and CSR disagree");
            return Err(Status::invalid_argument(format!(
                "metadata {IMPERSONATED_IDENTITY} {imp:?} differs from the CSR's identity {}",
                csr.id
            )));
        }
        let allowed = self.allowed(&node, &csr.id).await?;
        if !allowed {
            tracing::warn!(%node, identity = %csr.id, "refused: no pod of this service account is scheduled on the node");
            return Err(Status::permission_denied(format!(
                "node {node} may not obtain {}: no pod of service account {}/{} is scheduled on it",
                csr.id, csr.id.namespace, csr.id.service_account
            )));
        }
        let validity = if r.validity_duration > 0 {
            Duration::from_secs(r.validity_duration as u64).min(self.max_ttl)
        } else {
            self.max_ttl
        };
        let chain = self.authority.issue(&csr, validity).map_err(|e| {
            tracing::error!(%node, identity = %csr.id, error = %e, "signing failed");
            Status::internal(format!("signing failed: {e}"))
        })?;
        tracing::info!(%node, identity = %csr.id, validity_s = validity.as_secs(), "issued");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// A running CA: its address, its root, and a way to stop it.
pub struct CaServer {
    pub local_addr: SocketAddr,
    pub root_pem: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
    publisher: Option<tokio::task::JoinHandle<()>>,
}

impl CaServer {
    /// Load or create the keys, bind, and serve in the background.
    pub async fn start(cfg: CaConfig) -> Result<Self> {
        let client = match &cfg.callers {
            Callers::Kubernetes { kubeconfig, .. } => {
                Some(crate::kube_auth::client(kubeconfig.as_deref()).await?)
            }
            Callers::Files { .. } => None,
        };
        let keys = cfg.kube_keys.clone().unwrap_or_default();
        if client.is_none() && (keys.root_secret.is_some() || keys.publish_root.is_some()) {
            anyhow::bail!("a root Secret or a root ConfigMap needs the CA's Kubernetes mode");
        }
        let authority = match (&cfg.cacerts, &keys.root_secret, &client) {
            (Some(dir), _, _) => Authority::plugin(dir)?,
            (None, Some(secret), Some(c)) => {
                crate::kube_keys::authority(c, secret, &cfg.dir, &cfg.trust_domain).await?
            }
            _ => Authority::self_signed(&cfg.dir, &cfg.trust_domain)?,
        };
        let auth = match (&cfg.callers, &client) {
            (Callers::Kubernetes { agent, .. }, Some(c)) => Auth::Kubernetes(KubeAuth::new(
                c.clone(),
                agent.clone(),
                cfg.trust_domain.clone(),
            )),
            (Callers::Files { tokens, manifests }, _) => Auth::Files {
                tokens: Tokens::load(tokens)?,
                authz: Arc::new(NodeIdentities::new(
                    manifests.clone(),
                    cfg.trust_domain.clone(),
                )),
            },
            (Callers::Kubernetes { .. }, None) => {
                unreachable!("a client is made in Kubernetes mode")
            }
        };
        std::fs::create_dir_all(&cfg.dir)
            .with_context(|| format!("creating {}", cfg.dir.display()))?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        // Written once listening: its appearance tells a launcher (the lab) the CA serves.
        let root_pem = authority.root_pem();
        let root_path = crate::authority::root_cert_path(&cfg.dir);
        write_atomic(&root_path, root_pem.as_bytes())?;
        let local_addr = listener.local_addr()?;
        let mut ips = vec![local_addr.ip()];
        if local_addr.ip().is_unspecified() {
            ips.push(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let (chain, key) = authority.serving_cert(&ips, &cfg.serving_dns)?;
        let publisher = match (&keys.publish_root, client) {
            (Some(target), Some(c)) => {
                // Published before serving, so an agent that sees the root can reach us; a
                // failure is retried in the background.
                if let Err(e) = crate::kube_keys::publish_root(&c, target, &root_pem).await {
                    tracing::error!(error = %format!("{e:#}"), "publishing the root; retrying");
                }
                Some(tokio::spawn(crate::kube_keys::keep_published(
                    c,
                    target.clone(),
                    root_pem.clone(),
                )))
            }
            _ => None,
        };
        let tls = tls_config(chain, key)?;
        tracing::info!(
            listen = %local_addr,
            keys = %authority.source,
            trust_domain = %cfg.trust_domain,
            max_ttl_s = cfg.max_ttl.as_secs(),
            serving_dns = ?cfg.serving_dns,
            callers = ?cfg.callers,
            root = %root_path.display(),
            "CA serving"
        );
        let service = Service {
            authority: Arc::new(authority),
            auth,
            trust_domain: cfg.trust_domain.clone(),
            max_ttl: cfg.max_ttl,
        };
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, TlsAcceptor::from(tls), service, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            local_addr,
            root_pem,
            stop: Some(stop),
            task,
            publisher,
        })
    }

    /// Stop accepting, finish what is in flight.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(p) = self.publisher.take() {
            p.abort();
        }
        self.task.await.context("the CA task")?
    }
}

fn tls_config(chain: Vec<Vec<u8>>, key: Vec<u8>) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    // ring, not aws-lc (no cmake/C toolchain beyond cc); deprecated only for lacking PQ kx.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: Service,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    // Handshakes run on tasks of their own so a slow client never holds up the accept loop.
    let (tx, rx) = mpsc::channel(64);
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    let result = tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(
            IstioCertificateServiceServer::new(service),
            tokio_stream::wrappers::ReceiverStream::new(rx),
            shutdown,
        )
        .await;
    accept.abort();
    result.context("serving the CA API")
}

fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
