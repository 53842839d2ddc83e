//! Workload identity material shared by the CA, the agent's certificate reconciler and the
//! proxy's HBONE tunnels: the certificates a node holds ([`CertSet`], swapped whole in a
//! [`CertStore`]), the facts read from X.509 ([`x509`]), workload keys and CSRs ([`csr`])
//! and PEM helpers ([`pem_util`]).
#![forbid(unsafe_code)]

pub mod csr;
pub mod pem_util;
pub mod store;
pub mod x509;

pub use comb_model::mesh::SpiffeId;
pub use csr::{KeyAndCsr, key_and_csr};
pub use store::{CertSet, CertStore, WorkloadCert};
pub use x509::{CertInfo, X509Error};
