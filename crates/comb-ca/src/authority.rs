//! The CA's keys and what it signs: a self-signed root generated on first start and kept in
//! `--dir`, or a plug-in CA in Istio's `cacerts` layout; workload leaves carrying only the
//! requested SPIFFE URI SAN; the CA's own TLS serving certificate.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use comb_identity::SpiffeId;
use comb_identity::pem_util::{cert_to_pem, certs_from_pem};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Istio's plug-in CA files (`cacerts` secret layout).
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";

/// The DNS name in the CA's serving certificate (what Istio clients verify).
pub const SERVING_DNS_NAME: &str = "istiod.istio-system.svc";

/// Lifetime of a generated root.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Lifetime of the serving certificate (made anew at every start).
const SERVING_TTL: Duration = Duration::from_secs(365 * 86_400);
/// Certificates start this long before "now", for peers whose clocks lag a little (a
/// leaf's: at most a tenth of its validity, so short lifetimes stay short).
const BACKDATE: Duration = Duration::from_secs(30);

pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// DER, what follows an issued leaf: the signing certificate, intermediates, the root.
    upper: Vec<Vec<u8>>,
    /// DER, every root clients must trust: the chain's root first, then any others
    /// `root-cert.pem` holds (a root being rotated in or out).
    roots: Vec<Vec<u8>>,
    /// Where the keys came from, for the log.
    pub source: String,
}

/// Why a CSR is not signed (→ INVALID_ARGUMENT): each names what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrProblem {
    #[error("the CSR is not PEM: {0}")]
    NotPem(String),
    #[error("the CSR is not a PKCS#10 request: {0}")]
    NotCsr(String),
    #[error("the CSR's signature does not verify")]
    BadSignature,
    #[error("the CSR has no subject alternative names: it must carry one SPIFFE URI")]
    NoSan,
    #[error("the CSR asks for {0} subject alternative names: only one SPIFFE URI is allowed")]
    ExtraSans(usize),
    #[error("the CSR's subject alternative name {0} is not a URI: only one SPIFFE URI is allowed")]
    NotUri(String),
    #[error("{0}")]
    NotSpiffe(String),
    #[error("the CSR's identity {id} is in trust domain {got:?}; this CA serves {want:?}")]
    WrongTrustDomain {
        id: String,
        got: String,
        want: String,
    },
    #[error("the CSR asks for a CA certificate")]
    AsksForCa,
    #[error("the CSR's public key is not one this CA signs: {0}")]
    Key(String),
}

/// A CSR that passed the checks: the identity it asks for and its public key.
pub struct CheckedCsr {
    pub id: SpiffeId,
    spki: SubjectPublicKeyInfo,
}

impl Authority {
    /// `dir`'s root (`ca-cert.pem` + `ca-key.pem`), generated and written (key mode 0600)
    /// when absent.
    pub fn self_signed(dir: &Path, trust_domain: &str) -> Result<Self> {
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if !cert_path.exists() && !key_path.exists() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.distinguished_name
                .push(DnType::OrganizationName, trust_domain);
            p.distinguished_name
                .push(DnType::CommonName, "Comb root CA");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            p.serial_number = Some(random_serial());
            let now = SystemTime::now();
            p.not_before = to_offset(now - BACKDATE);
            p.not_after = to_offset(now + ROOT_TTL);
            let cert = p.self_signed(&key)?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            fs::write(&cert_path, cert.pem())
                .with_context(|| format!("writing {}", cert_path.display()))?;
            tracing::info!(dir = %dir.display(), "generated a self-signed root CA");
        }
        let cert = read_one_cert(&cert_path)?;
        let key = read_key(&key_path)?;
        check_key_matches(&cert, &key, &cert_path, &key_path)?;
        let parsed = parse(&cert, &cert_path)?;
        if !parsed.is_ca() || parsed.subject().as_raw() != parsed.issuer().as_raw() {
            bail!("{}: not a self-signed CA certificate", cert_path.display());
        }
        Self::new(
            cert.clone(),
            key,
            vec![cert.clone()],
            vec![cert],
            format!("self-signed root in {}", dir.display()),
        )
    }

    /// A plug-in CA: `ca-cert.pem` (the signing certificate), `ca-key.pem` (its PKCS#8 key),
    /// `cert-chain.pem` (`ca-cert` first, then intermediates, the root optional at the end),
    /// `root-cert.pem` (the self-signed root; or several, as in Istio's combined-root
    /// rotation: the one `cert-chain.pem` leads to ends issued chains, all are published).
    /// Every link is checked.
    pub fn plugin(dir: &Path) -> Result<Self> {
        let p = |f: &str| dir.join(f);
        let ca_cert = read_one_cert(&p(CA_CERT))?;
        let key = read_key(&p(CA_KEY))?;
        check_key_matches(&ca_cert, &key, &p(CA_CERT), &p(CA_KEY))?;
        let roots = read_certs(&p(ROOT_CERT))?;
        if roots.is_empty() {
            bail!("{}: holds no certificate", p(ROOT_CERT).display());
        }
        let chain = read_certs(&p(CERT_CHAIN))?;

        for (i, root) in roots.iter().enumerate() {
            let which = if roots.len() == 1 {
                String::new()
            } else {
                format!(" (certificate {})", i + 1)
            };
            let root_x = parse(root, &p(ROOT_CERT))?;
            if !root_x.is_ca() {
                bail!("{}{which}: not a CA certificate", p(ROOT_CERT).display());
            }
            if root_x.subject().as_raw() != root_x.issuer().as_raw() {
                bail!(
                    "{}{which}: not self-signed (issuer differs from subject)",
                    p(ROOT_CERT).display()
                );
            }
        }
        if parse(&ca_cert, &p(CA_CERT))?
            .is_ca()
            .then_some(())
            .is_none()
        {
            bail!(
                "{}: not a CA certificate (basicConstraints CA:TRUE missing)",
                p(CA_CERT).display()
            );
        }
        if chain.first() != Some(&ca_cert) {
            bail!(
                "{}: must start with the certificate of {}",
                p(CERT_CHAIN).display(),
                CA_CERT
            );
        }
        // cert-chain without a trailing root, then the root it leads to.
        let mut upper: Vec<Vec<u8>> = chain.into_iter().filter(|c| !roots.contains(c)).collect();
        let anchor = match upper.last() {
            Some(top) => anchor_of(top, &roots, &p(CERT_CHAIN))?,
            // ca-cert.pem is itself one of the roots (a root signing directly).
            None => roots
                .iter()
                .position(|r| *r == ca_cert)
                .expect("cert-chain.pem starts with ca-cert.pem"),
        };
        upper.push(roots[anchor].clone());
        for (i, pair) in upper.windows(2).enumerate() {
            let child = parse(&pair[0], &p(CERT_CHAIN))?;
            let parent = parse(&pair[1], &p(CERT_CHAIN))?;
            let what = if i + 2 == upper.len() {
                format!("the root in {ROOT_CERT}")
            } else {
                format!("certificate {} of {CERT_CHAIN}", i + 2)
            };
            if child.issuer().as_raw() != parent.subject().as_raw() {
                bail!(
                    "{}: certificate {} (subject {}) is issued by {}, not by {what} ({})",
                    p(CERT_CHAIN).display(),
                    i + 1,
                    child.subject(),
                    child.issuer(),
                    parent.subject()
                );
            }
            if child.verify_signature(Some(parent.public_key())).is_err() {
                bail!(
                    "{}: the signature of certificate {} does not verify with the key of {what}",
                    p(CERT_CHAIN).display(),
                    i + 1
                );
            }
        }
        let mut bundle = roots;
        let root = bundle.remove(anchor);
        bundle.insert(0, root);
        Self::new(
            ca_cert,
            key,
            upper,
            bundle,
            format!("plug-in CA {}", dir.display()),
        )
    }

    fn new(
        ca_cert: Vec<u8>,
        key: KeyPair,
        upper: Vec<Vec<u8>>,
        roots: Vec<Vec<u8>>,
        source: String,
    ) -> Result<Self> {
        let issuer = Issuer::from_ca_cert_der(&ca_cert.into(), key)
            .context("reading the CA certificate's subject")?;
        Ok(Self {
            issuer,
            upper,
            roots,
            source,
        })
    }

    /// The trust anchor of issued chains (DER).
    pub fn root_der(&self) -> &[u8] {
        self.upper.last().expect("the chain ends in the root")
    }

    /// Every root clients must trust (PEM, the chain's root first): what `--dir/root-cert.pem`
    /// and the published ConfigMap hold. One root, except while a plug-in CA's
    /// `root-cert.pem` carries an old and a new root during a rotation.
    pub fn root_pem(&self) -> String {
        self.roots.iter().map(|c| cert_to_pem(c)).collect()
    }

    /// A workload leaf for `csr`, valid for `validity` from now: `[leaf, …, root]` as PEM.
    pub fn issue(&self, csr: &CheckedCsr, validity: Duration) -> Result<Vec<String>> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(csr.id.to_string().try_into()?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let now = SystemTime::now();
        p.not_before = to_offset(now - BACKDATE.min(validity / 10));
        p.not_after = to_offset(now + validity);
        let leaf = p.signed_by(&csr.spki, &self.issuer)?;
        Ok(std::iter::once(leaf.pem())
            .chain(self.upper.iter().map(|c| cert_to_pem(c)))
            .collect())
    }

    /// The CA's own TLS certificate chain and key (DER): DNS [`SERVING_DNS_NAME`], the DNS
    /// names `dns` (e.g. the Kubernetes Service's, for clients that verify the name they
    /// dial) and `ips`.
    pub fn serving_cert(&self, ips: &[IpAddr], dns: &[String]) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, SERVING_DNS_NAME);
        p.subject_alt_names = vec![SanType::DnsName(SERVING_DNS_NAME.try_into()?)];
        for name in dns.iter().filter(|n| n.as_str() != SERVING_DNS_NAME) {
            let name = parse_dns_name(name).map_err(|e| anyhow::anyhow!(e))?;
            p.subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        p.subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let now = SystemTime::now();
        p.not_before = to_offset(now - BACKDATE);
        p.not_after = to_offset(now + SERVING_TTL);
        let cert = p.signed_by(&key, &self.issuer)?;
        let chain = std::iter::once(cert.der().to_vec())
            .chain(self.upper.iter().cloned())
            .collect();
        Ok((chain, key.serialize_der()))
    }
}

/// Parse and check a PEM CSR: a valid signature, exactly one SAN, a workload SPIFFE URI in
/// `trust_domain`, not a CA request.
pub fn check_csr(csr_pem: &str, trust_domain: &str) -> Result<CheckedCsr, CsrProblem> {
    let block = pem::parse(csr_pem.trim()).map_err(|e| CsrProblem::NotPem(e.to_string()))?;
    if !block.tag().contains("CERTIFICATE REQUEST") {
        return Err(CsrProblem::NotPem(format!(
            "a {} block, not CERTIFICATE REQUEST",
            block.tag()
        )));
    }
    let der = block.contents();
    let (_, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrProblem::NotCsr(e.to_string()))?;
    csr.verify_signature()
        .map_err(|_| CsrProblem::BadSignature)?;
    let mut sans: Vec<String> = Vec::new();
    let mut uris: Vec<String> = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    sans.push(n.to_string());
                    if let GeneralName::URI(u) = n {
                        uris.push(u.to_string());
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrProblem::AsksForCa),
            _ => {}
        }
    }
    match sans.len() {
        0 => return Err(CsrProblem::NoSan),
        1 => {}
        n => return Err(CsrProblem::ExtraSans(n)),
    }
    let Some(uri) = uris.pop() else {
        return Err(CsrProblem::NotUri(sans.remove(0)));
    };
    let id: SpiffeId = uri
        .parse()
        .map_err(|e: comb_model::mesh::SpiffeIdError| CsrProblem::NotSpiffe(e.to_string()))?;
    if id.trust_domain != trust_domain {
        return Err(CsrProblem::WrongTrustDomain {
            id: id.to_string(),
            got: id.trust_domain.clone(),
            want: trust_domain.to_string(),
        });
    }
    let spki = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| CsrProblem::Key(e.to_string()))?;
    Ok(CheckedCsr { id, spki })
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and 16 bytes long
    SerialNumber::from_slice(&b)
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).expect("a time after 1970")
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Write a new file; `private`: mode 0600 (a key).
pub(crate) fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    if private {
        return write_private(path, bytes);
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>> {
    let certs = certs_from_pem(&read_text(path)?).with_context(|| path.display().to_string())?;
    for c in &certs {
        parse(c, path)?;
    }
    Ok(certs)
}

/// Which root of `roots` issued `top` (name and signature), else the first (whose link
/// check then says what is wrong).
fn anchor_of(top: &[u8], roots: &[Vec<u8>], path: &Path) -> Result<usize> {
    let top = parse(top, path)?;
    for (i, r) in roots.iter().enumerate() {
        let r = parse(r, path)?;
        if top.issuer().as_raw() == r.subject().as_raw()
            && top.verify_signature(Some(r.public_key())).is_ok()
        {
            return Ok(i);
        }
    }
    Ok(0)
}

/// A DNS name for the serving certificate (`--serving-dns`): lowercase letters, digits and
/// hyphens in dot-separated labels of 1 to 63 characters, at most 253 in all.
pub fn parse_dns_name(s: &str) -> Result<String, String> {
    let name = s.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("{s:?} is not a DNS name"));
    }
    Ok(name)
}

fn read_one_cert(path: &Path) -> Result<Vec<u8>> {
    let mut certs = read_certs(path)?;
    if certs.len() != 1 {
        bail!(
            "{}: holds {} certificates, expected exactly one",
            path.display(),
            certs.len()
        );
    }
    Ok(certs.remove(0))
}

fn read_key(path: &Path) -> Result<KeyPair> {
    let text = read_text(path)?;
    KeyPair::from_pem(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a usable private key ({e}); expected PKCS#8 PEM (\"PRIVATE KEY\") of an ECDSA P-256/P-384, Ed25519 or RSA key",
            path.display()
        )
    })
}

fn parse<'a>(der: &'a [u8], path: &Path) -> Result<X509Certificate<'a>> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| anyhow::anyhow!("{}: not an X.509 certificate: {e}", path.display()))
}

fn check_key_matches(cert: &[u8], key: &KeyPair, cert_path: &Path, key_path: &Path) -> Result<()> {
    let parsed = parse(cert, cert_path)?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        bail!(
            "{} is not the key of {} (public keys differ)",
            key_path.display(),
            cert_path.display()
        );
    }
    Ok(())
}

/// The path of the root certificate the CA writes into its `--dir` for clients to trust.
pub fn root_cert_path(dir: &Path) -> PathBuf {
    dir.join(ROOT_CERT)
}

#[cfg(test)]
mod tests {
    use super::parse_dns_name;

    #[test]
    fn serving_dns_names_are_checked_and_lowercased() {
        assert_eq!(
            parse_dns_name("comb-ca.comb-system.svc").unwrap(),
            "comb-ca.comb-system.svc"
        );
        assert_eq!(
            parse_dns_name("Comb-CA.comb-system.svc.cluster.local.").unwrap(),
            "comb-ca.comb-system.svc.cluster.local"
        );
        assert_eq!(parse_dns_name("localhost").unwrap(), "localhost");
        let long_label = "a".repeat(64);
        let long_name = vec!["a".repeat(63); 5].join(".");
        for bad in [
            "",
            ".",
            "a..b",
            "-a.svc",
            "a-.svc",
            "a b",
            "a_b.svc",
            "*.svc",
            "10.0.0.1:15012",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(parse_dns_name(bad).is_err(), "{bad:?}");
        }
    }
}
