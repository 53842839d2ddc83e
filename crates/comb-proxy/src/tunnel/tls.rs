//! Mutual TLS of HBONE tunnels: TLS 1.3 only, AES-GCM suites only, ALPN `h2`, no SNI,
//! SPIFFE identities checked against the trust roots of the current [`CertSet`].
//!
//! Configs are built from the certificate set in force at handshake time and cached per
//! `CertSet::generation`: a new set (renewal, a new identity, new roots) drops the cache and
//! the next handshake builds from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use comb_identity::{CertSet, CertStore, SpiffeId, WorkloadCert};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore,
    ServerConfig, SignatureScheme,
};

/// ALPN of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Client sessions kept per local identity for resumption.
const SESSIONS_PER_IDENTITY: usize = 256;

/// ring with the TLS 1.3 AES-GCM suites only (ztunnel's set; no ChaCha20).
// ring is the provider by decision (no aws-lc/cmake); rustls deprecates its default only for
// lacking the post-quantum hybrid key exchange.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        )
    });
    Arc::new(p)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no certificate for {0} on this node")]
    NoCertificate(SpiffeId),
    #[error("no trust roots")]
    NoRoots,
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
}

/// The TLS configs of one certificate generation.
#[derive(Default)]
struct Generation {
    generation: u64,
    roots: Option<Arc<RootCertStore>>,
    clients: HashMap<(SpiffeId, SpiffeId), Arc<ClientConfig>>,
    servers: HashMap<SpiffeId, Arc<ServerConfig>>,
}

/// Builds and caches client and server configs from the node's [`CertStore`].
pub struct TlsConfigs {
    store: CertStore,
    provider: Arc<CryptoProvider>,
    cache: Mutex<Generation>,
    /// Resumption state, one memory cache per local (client) identity: a session resumed
    /// carries the client identity it was authenticated with, so sessions of one identity
    /// must never be offered for another. Kept across certificate generations (a renewed
    /// certificate names the same identity).
    sessions: Mutex<HashMap<SpiffeId, Arc<ClientSessionMemoryCache>>>,
}

impl TlsConfigs {
    pub fn new(store: CertStore) -> Self {
        Self {
            store,
            provider: provider(),
            cache: Mutex::default(),
            sessions: Mutex::default(),
        }
    }

    pub fn store(&self) -> &CertStore {
        &self.store
    }

    fn with_generation<T>(
        &self,
        f: impl FnOnce(&CertSet, &mut Generation) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        let set = self.store.load();
        let mut g = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if g.generation != set.generation || g.roots.is_none() {
            *g = Generation {
                generation: set.generation,
                roots: Some(Arc::new(roots(&set)?)),
                ..Default::default()
            };
        }
        f(&set, &mut g)
    }

    /// The config for a tunnel from `local` (its certificate is presented) to a server that
    /// must prove `peer`.
    pub fn client(
        &self,
        local: &SpiffeId,
        peer: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, ConfigError> {
        self.with_generation(|set, g| {
            let key = (local.clone(), peer.clone());
            if let Some(c) = g.clients.get(&key) {
                return Ok(c.clone());
            }
            let cert = set
                .get(local)
                .ok_or_else(|| ConfigError::NoCertificate(local.clone()))?;
            let roots = g.roots.clone().ok_or(ConfigError::NoRoots)?;
            let verifier = Arc::new(SpiffeServerVerifier {
                roots,
                expected: peer.clone(),
                algs: self.provider.signature_verification_algorithms,
            });
            let (chain, key_der) = chain_and_key(cert);
            let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_auth_cert(chain, key_der)?;
            cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
            cfg.enable_sni = false;
            cfg.resumption = Resumption::store(self.sessions_of(local));
            let cfg = Arc::new(cfg);
            g.clients.insert(key, cfg.clone());
            Ok(cfg)
        })
    }

    fn sessions_of(&self, local: &SpiffeId) -> Arc<ClientSessionMemoryCache> {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.entry(local.clone())
            .or_insert_with(|| Arc::new(ClientSessionMemoryCache::new(SESSIONS_PER_IDENTITY)))
            .clone()
    }

    /// The config of the server side of tunnels to `local`: its certificate, client
    /// certificates required and verified to the roots.
    pub fn server(&self, local: &SpiffeId) -> Result<Arc<ServerConfig>, ConfigError> {
        self.with_generation(|set, g| {
            if let Some(c) = g.servers.get(local) {
                return Ok(c.clone());
            }
            let cert = set
                .get(local)
                .ok_or_else(|| ConfigError::NoCertificate(local.clone()))?;
            let roots = g.roots.clone().ok_or(ConfigError::NoRoots)?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots, self.provider.clone())
                    .build()
                    .map_err(|e| TlsError::General(e.to_string()))?;
            let (chain, key_der) = chain_and_key(cert);
            let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key_der)?;
            cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
            // Stateless resumption (tickets): any worker resumes any session.
            cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
            let cfg = Arc::new(cfg);
            g.servers.insert(local.clone(), cfg.clone());
            Ok(cfg)
        })
    }
}

fn roots(set: &CertSet) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for der in &set.roots {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    if roots.is_empty() {
        return Err(ConfigError::NoRoots);
    }
    Ok(roots)
}

/// The chain to present (leaf and intermediates; the root is the peer's own trust anchor,
/// sending it is waste) and the key.
fn chain_and_key(cert: &WorkloadCert) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let n = if cert.chain.len() > 1 {
        cert.chain.len() - 1
    } else {
        cert.chain.len()
    };
    let chain = cert.chain[..n]
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pkcs8.clone()));
    (chain, key)
}

/// The server name given to rustls: never sent (SNI off), but it keys the resumption cache,
/// so it is the destination address.
pub fn server_name(addr: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}

/// Verifies a server's chain to the trust roots (webpki, no hostname check: HBONE has no
/// names) and that its leaf proves the SPIFFE identity the destination must have.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let id = comb_identity::x509::peer_spiffe_id(end_entity.as_ref())
            .map_err(|_| TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
        if id != self.expected {
            tracing::debug!(presented = %id, expected = %self.expected, "hbone: wrong server identity");
            return Err(TlsError::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        // TLS 1.2 is not offered.
        Err(TlsError::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The SPIFFE identity of a finished handshake's peer (its leaf certificate).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    comb_identity::x509::peer_spiffe_id(leaf.as_ref()).ok()
}
