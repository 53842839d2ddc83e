//! Facts read from an X.509 certificate: its SPIFFE identities (URI SANs), serial and
//! validity. Parsing only (x509-parser); chain verification is rustls/webpki's job.

use std::time::{Duration, SystemTime};

use x509_parser::prelude::*;

use crate::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum X509Error {
    #[error("not a DER X.509 certificate: {0}")]
    Parse(String),
    #[error("certificate has no workload SPIFFE ID in its URI SANs")]
    NoSpiffeId,
}

/// What `comb cert list` and renewal need to know about a leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Lower-case hex, no separators.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Every workload SPIFFE ID among the URI SANs (Istio issues exactly one).
    pub spiffe_ids: Vec<SpiffeId>,
}

impl CertInfo {
    /// Parse a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, X509Error> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| X509Error::Parse(e.to_string()))?;
        let time = |t: ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(Self {
            serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
            spiffe_ids: uri_sans(&cert).filter_map(|u| u.parse().ok()).collect(),
        })
    }

    /// The one workload identity the certificate proves.
    pub fn spiffe_id(&self) -> Result<&SpiffeId, X509Error> {
        self.spiffe_ids.first().ok_or(X509Error::NoSpiffeId)
    }

    /// Halfway between not-before and not-after: when renewal is due (before jitter).
    pub fn half_life(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> impl Iterator<Item = &'a str> + 'a {
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
}

/// The SPIFFE identity of a peer's leaf certificate (DER).
pub fn peer_spiffe_id(leaf_der: &[u8]) -> Result<SpiffeId, X509Error> {
    CertInfo::from_der(leaf_der)?.spiffe_id().cloned()
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    #[test]
    fn facts_of_a_generated_certificate() {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![
            SanType::DnsName("ignored.example".try_into().unwrap()),
            SanType::URI("spiffe://cluster.local/ns/a/sa/client".try_into().unwrap()),
        ];
        p.serial_number = Some(vec![0x01, 0xab, 0xcd].into());
        p.not_before = rcgen::date_time_ymd(2026, 1, 1);
        p.not_after = rcgen::date_time_ymd(2026, 1, 3);
        let cert = p.self_signed(&key).unwrap();
        let info = CertInfo::from_der(cert.der()).unwrap();
        assert_eq!(info.serial, "01abcd");
        assert_eq!(
            info.spiffe_id().unwrap().to_string(),
            "spiffe://cluster.local/ns/a/sa/client"
        );
        let day = 86_400;
        let jan1 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        assert_eq!(info.not_before, jan1);
        assert_eq!(info.not_after, jan1 + Duration::from_secs(2 * day));
        assert_eq!(info.half_life(), jan1 + Duration::from_secs(day));
        assert_eq!(
            peer_spiffe_id(cert.der()).unwrap(),
            *info.spiffe_id().unwrap()
        );
        assert!(matches!(
            CertInfo::from_der(b"junk"),
            Err(X509Error::Parse(_))
        ));
    }
}
