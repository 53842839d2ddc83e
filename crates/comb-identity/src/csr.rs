//! Workload keys and certificate signing requests, made where the key stays: an ECDSA P-256
//! key (PKCS#8) generated in memory and a CSR that carries only the SPIFFE URI SAN, as
//! Istio's CA expects (`istio.v1.auth.IstioCertificateService/CreateCertificate`).

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use crate::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("generating an ECDSA P-256 key: {0}")]
    Key(String),
    #[error("building the CSR for {id}: {why}")]
    Csr { id: String, why: String },
}

/// A fresh key and the CSR proving it, for one workload identity.
pub struct KeyAndCsr {
    /// PEM `CERTIFICATE REQUEST`, what the CA API takes.
    pub csr_pem: String,
    /// PKCS#8 DER of the private key; never leaves the process that made it.
    pub key_pkcs8: Vec<u8>,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("csr_pem", &self.csr_pem)
            .finish_non_exhaustive()
    }
}

/// A new ECDSA P-256 key (PKCS#8 DER).
pub fn generate_key() -> Result<Vec<u8>, CsrError> {
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CsrError::Key(e.to_string()))?;
    Ok(key.serialize_der())
}

/// A new key and a CSR for `id`: empty subject, one URI SAN (`spiffe://…`), nothing else.
pub fn key_and_csr(id: &SpiffeId) -> Result<KeyAndCsr, CsrError> {
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CsrError::Key(e.to_string()))?;
    let csr_err = |why: String| CsrError::Csr {
        id: id.to_string(),
        why,
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        id.to_string()
            .try_into()
            .map_err(|e: rcgen::Error| csr_err(e.to_string()))?,
    )];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| csr_err(e.to_string()))?;
    Ok(KeyAndCsr {
        csr_pem: csr.pem().map_err(|e| csr_err(e.to_string()))?,
        key_pkcs8: key.serialize_der(),
    })
}

#[cfg(test)]
mod tests {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;

    use super::*;

    #[test]
    fn csr_carries_only_the_spiffe_uri_san_and_a_p256_key() {
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/client".parse().unwrap();
        let kc = key_and_csr(&id).unwrap();
        assert!(
            kc.csr_pem
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
        );
        let der = pem::parse(&kc.csr_pem).unwrap().into_contents();
        let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
        csr.verify_signature().unwrap();
        let info = &csr.certification_request_info;
        assert_eq!(info.subject.iter().count(), 0, "empty subject");
        // id-ecPublicKey with the P-256 curve.
        let alg = &info.subject_pki.algorithm;
        assert_eq!(alg.algorithm.to_id_string(), "1.2.840.10045.2.1");
        let curve = alg.parameters.as_ref().unwrap().as_oid().unwrap();
        assert_eq!(curve.to_id_string(), "1.2.840.10045.3.1.7");
        let exts: Vec<_> = csr.requested_extensions().unwrap().collect();
        assert_eq!(exts.len(), 1, "{exts:?}");
        let ParsedExtension::SubjectAlternativeName(san) = exts[0] else {
            panic!("{:?}", exts[0])
        };
        assert_eq!(
            san.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/a/sa/client")]
        );
        // The key is PKCS#8 and loads back.
        KeyPair::try_from(kc.key_pkcs8.as_slice()).unwrap();
        assert!(!format!("{kc:?}").contains("key_pkcs8"));
    }
}
