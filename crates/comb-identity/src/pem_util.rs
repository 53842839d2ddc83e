//! PEM in and out: the CA API carries certificates as PEM strings, rustls wants DER.

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("not PEM: {0}")]
    Parse(String),
    #[error("no {0} block in the PEM text")]
    Missing(&'static str),
    #[error("a {found} block where {wanted} was expected")]
    Unexpected { found: String, wanted: &'static str },
}

/// Every `CERTIFICATE` block, in order (DER). Other blocks are an error.
pub fn certs_from_pem(text: &str) -> Result<Vec<Vec<u8>>, PemError> {
    let blocks = pem::parse_many(text).map_err(|e| PemError::Parse(e.to_string()))?;
    if blocks.is_empty() {
        return Err(PemError::Missing("CERTIFICATE"));
    }
    blocks
        .into_iter()
        .map(|b| {
            if b.tag() == "CERTIFICATE" {
                Ok(b.into_contents())
            } else {
                Err(PemError::Unexpected {
                    found: b.tag().to_string(),
                    wanted: "CERTIFICATE",
                })
            }
        })
        .collect()
}

/// The one private key block (`PRIVATE KEY`, `EC PRIVATE KEY` or `RSA PRIVATE KEY`): its tag
/// and DER.
pub fn key_from_pem(text: &str) -> Result<(String, Vec<u8>), PemError> {
    let blocks = pem::parse_many(text).map_err(|e| PemError::Parse(e.to_string()))?;
    let b = blocks
        .into_iter()
        .find(|b| b.tag().ends_with("PRIVATE KEY"))
        .ok_or(PemError::Missing("PRIVATE KEY"))?;
    Ok((b.tag().to_string(), b.into_contents()))
}

/// DER certificate → PEM text.
pub fn cert_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// PKCS#8 DER key → PEM `PRIVATE KEY`.
pub fn pkcs8_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("PRIVATE KEY", der.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let a = cert_to_pem(b"one");
        let b = cert_to_pem(b"two");
        let both = format!("{a}{b}");
        assert_eq!(
            certs_from_pem(&both).unwrap(),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
        assert!(matches!(certs_from_pem(""), Err(PemError::Missing(_))));
        let k = pkcs8_to_pem(b"k");
        assert!(matches!(
            certs_from_pem(&k),
            Err(PemError::Unexpected { .. })
        ));
        assert_eq!(
            key_from_pem(&k).unwrap(),
            ("PRIVATE KEY".into(), b"k".to_vec())
        );
    }
}
