//! The certificates a node holds, as one immutable set: the certificate reconciler (one
//! writer) builds a new [`CertSet`] and swaps it in; the proxy reads whichever is current
//! at handshake time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::SpiffeId;
use crate::x509::CertInfo;

/// One workload certificate with its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkloadCert {
    pub id: SpiffeId,
    /// DER, leaf first, then intermediates, then the root (the CA's reply, in order).
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER of the ECDSA P-256 key (generated in the agent, never leaves it).
    pub key_pkcs8: Vec<u8>,
    /// Facts of the leaf.
    pub info: CertInfo,
}

impl std::fmt::Debug for WorkloadCert {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Why a CA's reply does not make a usable [`WorkloadCert`].
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("the CA returned an empty chain")]
    Empty,
    #[error("chain: {0}")]
    Pem(#[from] crate::pem_util::PemError),
    #[error("leaf: {0}")]
    Leaf(#[from] crate::x509::X509Error),
    #[error("the CA issued a certificate for {got:?}, not {wanted}")]
    WrongIdentity { wanted: String, got: Vec<String> },
}

impl WorkloadCert {
    /// The CA's reply (PEM strings, leaf first, each holding one or more certificates) with
    /// the key that made the CSR; the leaf must prove exactly `id`.
    pub fn from_pem_chain(
        id: &SpiffeId,
        chain_pem: &[String],
        key_pkcs8: Vec<u8>,
    ) -> Result<Self, ChainError> {
        let mut chain = Vec::new();
        for p in chain_pem {
            chain.extend(crate::pem_util::certs_from_pem(p)?);
        }
        let leaf = chain.first().ok_or(ChainError::Empty)?;
        let info = CertInfo::from_der(leaf)?;
        if info.spiffe_ids.as_slice() != std::slice::from_ref(id) {
            return Err(ChainError::WrongIdentity {
                wanted: id.to_string(),
                got: info.spiffe_ids.iter().map(|i| i.to_string()).collect(),
            });
        }
        Ok(Self {
            id: id.clone(),
            chain,
            key_pkcs8,
            info,
        })
    }
}

/// Everything the proxy needs for mutual TLS at one moment.
#[derive(Clone, Debug, Default)]
pub struct CertSet {
    /// Bumped by the writer on every change (lets readers cache derived TLS configs).
    pub generation: u64,
    /// DER trust anchors: peers' chains must end in one of these.
    pub roots: Vec<Vec<u8>>,
    pub certs: HashMap<SpiffeId, Arc<WorkloadCert>>,
}

impl CertSet {
    pub fn get(&self, id: &SpiffeId) -> Option<&Arc<WorkloadCert>> {
        self.certs.get(id)
    }
}

/// Shared between the certificate reconciler (writes) and the proxy (reads). Readers that
/// need a certificate the node is still obtaining (a pod's first flow right after it
/// started) wait for the next set with [`CertStore::wait_for`] instead of failing the flow.
#[derive(Clone)]
pub struct CertStore(Arc<Shared>);

struct Shared {
    set: ArcSwap<CertSet>,
    /// Carries nothing: a send says "a new set is in".
    swapped: watch::Sender<()>,
}

impl Default for CertStore {
    fn default() -> Self {
        Self(Arc::new(Shared {
            set: ArcSwap::from_pointee(CertSet::default()),
            swapped: watch::Sender::new(()),
        }))
    }
}

impl CertStore {
    /// The set in force now.
    pub fn load(&self) -> Arc<CertSet> {
        self.0.set.load_full()
    }

    /// Puts `set` in force and wakes whoever waits for a certificate.
    pub fn store(&self, set: Arc<CertSet>) {
        self.0.set.store(set);
        self.0.swapped.send_replace(());
    }

    /// Whether a certificate for `id` is held, waiting up to `limit` for one to arrive.
    pub async fn wait_for(&self, id: &SpiffeId, limit: Duration) -> bool {
        // Subscribed before looking, so a set stored in between still wakes us.
        let mut swapped = self.0.swapped.subscribe();
        let look = |s: &Self| s.0.set.load().get(id).is_some();
        if look(self) {
            return true;
        }
        let wait = async {
            loop {
                if swapped.changed().await.is_err() {
                    return false;
                }
                if look(self) {
                    return true;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.unwrap_or(false)
    }
}

pub fn new_store() -> CertStore {
    CertStore::default()
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn cert(id: &SpiffeId) -> Arc<WorkloadCert> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let c = p.self_signed(&key).unwrap();
        Arc::new(WorkloadCert {
            id: id.clone(),
            chain: vec![c.der().to_vec()],
            key_pkcs8: key.serialize_der(),
            info: CertInfo::from_der(c.der()).unwrap(),
        })
    }

    fn with(id: &SpiffeId, generation: u64) -> Arc<CertSet> {
        Arc::new(CertSet {
            generation,
            roots: vec![],
            certs: HashMap::from([(id.clone(), cert(id))]),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_wakes_when_its_certificate_arrives_and_gives_up_at_the_limit() {
        let store = new_store();
        let web = SpiffeId::new("cluster.local", "default", "web");
        let db = SpiffeId::new("cluster.local", "default", "db");
        let late = store.clone();
        let w = web.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            late.store(with(&w, 1)); // a set without `db` wakes its waiter, which waits on
        });
        let t0 = tokio::time::Instant::now();
        assert!(store.wait_for(&web, Duration::from_secs(2)).await);
        assert_eq!(t0.elapsed(), Duration::from_millis(300));
        assert!(!store.wait_for(&db, Duration::from_secs(2)).await);
        assert_eq!(t0.elapsed(), Duration::from_millis(2300));
        // Held: no wait at all.
        assert!(store.wait_for(&web, Duration::ZERO).await);
    }
}
