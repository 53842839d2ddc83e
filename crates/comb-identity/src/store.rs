//! The certificates a node holds, as one immutable set: the certificate reconciler (one
//! writer) builds a new [`CertSet`] and swaps it in; the proxy reads whichever is current
//! at handshake time.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

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

/// Shared between the certificate reconciler (writes) and the proxy (reads).
pub type CertStore = Arc<ArcSwap<CertSet>>;

pub fn new_store() -> CertStore {
    Arc::new(ArcSwap::from_pointee(CertSet::default()))
}
