//! The CA in-process on loopback: real TLS, real gRPC, the agent's client.

use std::path::Path;
use std::time::{Duration, SystemTime};

use comb_ca::authority::{Authority, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
use comb_ca::{CaClient, CaConfig, CaServer};
use comb_identity::pem_util::{cert_to_pem, certs_from_pem};
use comb_identity::{CertInfo, SpiffeId, WorkloadCert, key_and_csr};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use tonic::Code;
use x509_parser::prelude::{FromDer, X509Certificate};

const T1: &str = "token-node-one-0123456789";
const T2: &str = "token-node-two-0123456789";

const PODS: &str = "apiVersion: v1
kind: Pod
metadata: {name: c1, namespace: a}
spec:
  nodeName: n1
  serviceAccountName: client
  containers: [{name: c, image: x}]
---
apiVersion: v1
kind: Pod
metadata: {name: s1, namespace: b}
spec:
  nodeName: n2
  serviceAccountName: server
  containers: [{name: c, image: x}]
";

struct Fixture {
    _tmp: tempfile::TempDir,
    server: CaServer,
    root: String,
}

async fn start(tmp: tempfile::TempDir, cacerts: Option<&Path>, max_ttl: Duration) -> Fixture {
    let d = tmp.path();
    std::fs::create_dir_all(d.join("manifests")).unwrap();
    std::fs::write(d.join("manifests/pods.yaml"), PODS).unwrap();
    std::fs::write(d.join("tokens"), format!("{T1} n1\n{T2} n2\n")).unwrap();
    let server = CaServer::start(CaConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: d.join("ca"),
        cacerts: cacerts.map(Path::to_path_buf),
        callers: comb_ca::Callers::Files {
            tokens: d.join("tokens"),
            manifests: d.join("manifests"),
        },
        trust_domain: "cluster.local".into(),
        max_ttl,
        serving_dns: Vec::new(),
        kube_keys: None,
    })
    .await
    .unwrap();
    let root = std::fs::read_to_string(d.join("ca/root-cert.pem")).unwrap();
    assert_eq!(root, server.root_pem);
    Fixture {
        _tmp: tmp,
        server,
        root,
    }
}

fn client(f: &Fixture, token: &str) -> CaClient {
    CaClient::new(&f.server.local_addr.to_string(), &f.root, token).unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn verify_chain(chain: &[Vec<u8>]) {
    for pair in chain.windows(2) {
        let (_, child) = X509Certificate::from_der(&pair[0]).unwrap();
        let (_, parent) = X509Certificate::from_der(&pair[1]).unwrap();
        child
            .verify_signature(Some(parent.public_key()))
            .expect("each certificate is signed by the next");
    }
    let (_, root) = X509Certificate::from_der(chain.last().unwrap()).unwrap();
    root.verify_signature(None).expect("self-signed root");
}

#[tokio::test]
async fn signs_the_nodes_identities_and_refuses_the_rest() {
    let f = start(
        tempfile::tempdir().unwrap(),
        None,
        Duration::from_secs(3600),
    )
    .await;
    let c1 = client(&f, T1);
    let me = id("spiffe://cluster.local/ns/a/sa/client");
    let kc = key_and_csr(&me).unwrap();
    // Asks for 48 h, capped at the 1 h maximum.
    let chain = c1
        .create_certificate(&kc.csr_pem, Duration::from_secs(48 * 3600))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2, "leaf and the self-signed root");
    assert_eq!(chain[1], f.root);
    let wc = WorkloadCert::from_pem_chain(&me, &chain, kc.key_pkcs8).unwrap();
    verify_chain(&wc.chain);
    let now = SystemTime::now();
    assert!(wc.info.not_after <= now + Duration::from_secs(3600 + 5));
    assert!(wc.info.not_after >= now + Duration::from_secs(3600 - 60));
    assert_eq!(wc.info.spiffe_ids, vec![me.clone()]);
    let (_, leaf) = X509Certificate::from_der(&wc.chain[0]).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(sans.value.general_names.len(), 1, "only the SPIFFE URI");
    assert!(!leaf.is_ca());

    // A short validity is honoured.
    let kc = key_and_csr(&me).unwrap();
    let chain = c1
        .create_certificate(&kc.csr_pem, Duration::from_secs(20))
        .await
        .unwrap();
    let info = CertInfo::from_der(&certs_from_pem(&chain[0]).unwrap()[0]).unwrap();
    assert!(info.not_after <= SystemTime::now() + Duration::from_secs(21));

    // n1 has no pod of b/server: refused.
    let other = id("spiffe://cluster.local/ns/b/sa/server");
    let kc = key_and_csr(&other).unwrap();
    let e = c1
        .create_certificate(&kc.csr_pem, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("node n1"), "{e}");
    // n2 does.
    client(&f, T2)
        .create_certificate(&kc.csr_pem, Duration::from_secs(60))
        .await
        .unwrap();

    // A pod appears on n1: the CA reads the manifests again.
    let d = f._tmp.path();
    std::fs::write(
        d.join("manifests/more.yaml"),
        PODS.split("---\n")
            .nth(1)
            .unwrap()
            .replace("name: s1", "name: s2")
            .replace("nodeName: n2", "nodeName: n1"),
    )
    .unwrap();
    c1.create_certificate(&kc.csr_pem, Duration::from_secs(60))
        .await
        .unwrap();
    f.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_tokens_and_bad_csrs() {
    let f = start(
        tempfile::tempdir().unwrap(),
        None,
        Duration::from_secs(3600),
    )
    .await;
    let me = id("spiffe://cluster.local/ns/a/sa/client");
    let kc = key_and_csr(&me).unwrap();
    let e = client(&f, "not-a-known-token-at-all")
        .create_certificate(&kc.csr_pem, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");

    let c1 = client(&f, T1);
    let bad = |csr: String, want: &'static str| {
        let c1 = c1.clone();
        async move {
            let e = c1
                .create_certificate(&csr, Duration::from_secs(60))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
            assert!(e.to_string().contains(want), "{e} should say {want:?}");
        }
    };
    bad("garbage".into(), "not PEM").await;
    bad(
        cert_to_pem(b"x").replace("CERTIFICATE", "CERTIFICATE REQUEST"),
        "not a PKCS#10",
    )
    .await;
    let csr_with = |sans: Vec<SanType>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.serialize_request(&key).unwrap().pem().unwrap()
    };
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    bad(
        csr_with(vec![
            uri("spiffe://cluster.local/ns/a/sa/client"),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ]),
        "2 subject alternative names",
    )
    .await;
    bad(
        csr_with(vec![SanType::DnsName("evil.example".try_into().unwrap())]),
        "not a URI",
    )
    .await;
    bad(
        csr_with(vec![uri("https://example.com/x")]),
        "not a workload SPIFFE ID",
    )
    .await;
    bad(csr_with(vec![]), "no subject alternative names").await;
    bad(
        key_and_csr(&id("spiffe://other.domain/ns/a/sa/client"))
            .unwrap()
            .csr_pem,
        "trust domain \"other.domain\"",
    )
    .await;
    f.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_generated_root_persists_with_a_private_key_file() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let a = Authority::self_signed(&ca, "cluster.local").unwrap();
    let mode = std::fs::metadata(ca.join(CA_KEY))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let b = Authority::self_signed(&ca, "cluster.local").unwrap();
    assert_eq!(a.root_der(), b.root_der());
    // A key that is not the certificate's is refused, naming both files.
    let other = KeyPair::generate().unwrap();
    std::fs::write(ca.join(CA_KEY), other.serialize_pem()).unwrap();
    let e = Authority::self_signed(&ca, "cluster.local").err().unwrap();
    assert!(format!("{e:#}").contains("is not the key of"), "{e:#}");
}

/// A root and an intermediate in Istio's cacerts layout; returns the root's and the
/// intermediate's DER.
fn write_cacerts(dir: &Path, chain_has_root: bool) -> (Vec<u8>, Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let root_key = KeyPair::generate().unwrap();
    let mut rp = CertificateParams::default();
    rp.distinguished_name.push(DnType::CommonName, "Test root");
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate().unwrap();
    let mut ip = CertificateParams::default();
    ip.distinguished_name
        .push(DnType::CommonName, "Test intermediate");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = rcgen::Issuer::new(rp, root_key);
    let int = ip.signed_by(&int_key, &issuer).unwrap();
    std::fs::write(dir.join(CA_CERT), int.pem()).unwrap();
    std::fs::write(dir.join(CA_KEY), int_key.serialize_pem()).unwrap();
    std::fs::write(dir.join(ROOT_CERT), root.pem()).unwrap();
    let chain = if chain_has_root {
        format!("{}{}", int.pem(), root.pem())
    } else {
        int.pem()
    };
    std::fs::write(dir.join(CERT_CHAIN), chain).unwrap();
    (root.der().to_vec(), int.der().to_vec())
}

#[tokio::test]
async fn plug_in_ca_chain_order() {
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    let (root, int) = write_cacerts(&cacerts, true);
    let f = start(tmp, Some(&cacerts), Duration::from_secs(3600)).await;
    assert_eq!(certs_from_pem(&f.root).unwrap(), vec![root.clone()]);
    let me = id("spiffe://cluster.local/ns/a/sa/client");
    let kc = key_and_csr(&me).unwrap();
    let chain = client(&f, T1)
        .create_certificate(&kc.csr_pem, Duration::from_secs(600))
        .await
        .unwrap();
    let wc = WorkloadCert::from_pem_chain(&me, &chain, kc.key_pkcs8).unwrap();
    assert_eq!(
        wc.chain.len(),
        3,
        "leaf, intermediate, root (root not repeated)"
    );
    assert_eq!(wc.chain[1], int);
    assert_eq!(wc.chain[2], root);
    verify_chain(&wc.chain);
    f.server.shutdown().await.unwrap();

    // cert-chain.pem without the root: the same chain.
    let tmp = tempfile::tempdir().unwrap();
    write_cacerts(tmp.path(), false);
    assert!(Authority::plugin(tmp.path()).is_ok());
}

#[test]
fn plug_in_ca_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let e = Authority::plugin(d).err().unwrap();
    assert!(format!("{e:#}").contains(CA_CERT), "{e:#}");

    // Another root than the one that signed the intermediate.
    write_cacerts(d, false);
    let other = tmp.path().join("other");
    write_cacerts(&other, false);
    std::fs::copy(other.join(ROOT_CERT), d.join(ROOT_CERT)).unwrap();
    let e = format!("{:#}", Authority::plugin(d).err().unwrap());
    assert!(e.contains(CERT_CHAIN) && e.contains("root-cert.pem"), "{e}");

    // cert-chain.pem that does not start with ca-cert.pem.
    write_cacerts(d, false);
    std::fs::copy(other.join(CERT_CHAIN), d.join(CERT_CHAIN)).unwrap();
    let e = format!("{:#}", Authority::plugin(d).err().unwrap());
    assert!(e.contains("must start with"), "{e}");

    // A key of another certificate.
    write_cacerts(d, false);
    std::fs::copy(other.join(CA_KEY), d.join(CA_KEY)).unwrap();
    let e = format!("{:#}", Authority::plugin(d).err().unwrap());
    assert!(e.contains("is not the key of"), "{e}");

    // Not a key at all.
    std::fs::write(
        d.join(CA_KEY),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = format!("{:#}", Authority::plugin(d).err().unwrap());
    assert!(e.contains("ca-key.pem") && e.contains("PKCS#8"), "{e}");
}

/// A root rotation with overlap (Istio's combined root): `root-cert.pem` holds a new root and
/// the current one. Issued chains end at the root the intermediate leads to; both roots are
/// what clients are given to trust.
#[tokio::test]
async fn plug_in_ca_with_two_roots_publishes_both() {
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    let (root, int) = write_cacerts(&cacerts, false);
    let (new_root, _) = write_cacerts(&tmp.path().join("new"), false);
    std::fs::write(
        cacerts.join(ROOT_CERT),
        format!("{}{}", cert_to_pem(&new_root), cert_to_pem(&root)),
    )
    .unwrap();
    let a = Authority::plugin(&cacerts).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(a.root_der(), root.as_slice(), "the chain's root");
    assert_eq!(
        certs_from_pem(&a.root_pem()).unwrap(),
        vec![root.clone(), new_root.clone()],
        "both roots, the chain's first"
    );

    let f = start(tmp, Some(&cacerts), Duration::from_secs(3600)).await;
    assert_eq!(
        certs_from_pem(&f.root).unwrap(),
        vec![root.clone(), new_root]
    );
    let me = id("spiffe://cluster.local/ns/a/sa/client");
    let kc = key_and_csr(&me).unwrap();
    // The client trusts the bundle (f.root) and reaches the CA.
    let chain = client(&f, T1)
        .create_certificate(&kc.csr_pem, Duration::from_secs(600))
        .await
        .unwrap();
    let wc = WorkloadCert::from_pem_chain(&me, &chain, kc.key_pkcs8).unwrap();
    assert_eq!(wc.chain.len(), 3);
    assert_eq!(wc.chain[1], int);
    assert_eq!(wc.chain[2], root);
    verify_chain(&wc.chain);
    f.server.shutdown().await.unwrap();

    // A bundle member that is not a CA is refused, naming which.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (root, _) = write_cacerts(d, false);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["x.example".to_owned()])
        .unwrap()
        .self_signed(&leaf_key)
        .unwrap();
    std::fs::write(
        d.join(ROOT_CERT),
        format!("{}{}", cert_to_pem(&root), leaf.pem()),
    )
    .unwrap();
    let e = format!("{:#}", Authority::plugin(d).err().unwrap());
    assert!(
        e.contains(ROOT_CERT) && e.contains("certificate 2") && e.contains("not a CA"),
        "{e}"
    );
    // No root at all.
    std::fs::write(d.join(ROOT_CERT), "").unwrap();
    assert!(Authority::plugin(d).is_err());
}

/// A TLS 1.3 handshake with the CA trusting `root_pem`, verifying `name`.
async fn handshake(
    addr: std::net::SocketAddr,
    root_pem: &str,
    name: &str,
) -> Result<(), std::io::Error> {
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in certs_from_pem(root_pem).unwrap() {
        roots.add(CertificateDer::from(c)).unwrap();
    }
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map(|_| ())
}

/// `--serving-dns`: the serving certificate carries the names clients dial (a Service's),
/// besides the one Comb's agents verify; any other name fails verification.
#[tokio::test]
async fn serving_certificate_carries_the_given_dns_names() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("manifests")).unwrap();
    std::fs::write(d.join("tokens"), format!("{T1} n1\n")).unwrap();
    let server = CaServer::start(CaConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: d.join("ca"),
        cacerts: None,
        callers: comb_ca::Callers::Files {
            tokens: d.join("tokens"),
            manifests: d.join("manifests"),
        },
        trust_domain: "cluster.local".into(),
        max_ttl: Duration::from_secs(3600),
        serving_dns: vec![
            "comb-ca.comb-system.svc".into(),
            "comb-ca.comb-system.svc.cluster.local".into(),
        ],
        kube_keys: None,
    })
    .await
    .unwrap();
    let (addr, root) = (server.local_addr, server.root_pem.clone());
    for name in [
        "comb-ca.comb-system.svc",
        "comb-ca.comb-system.svc.cluster.local",
        comb_ca::authority::SERVING_DNS_NAME,
    ] {
        handshake(addr, &root, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let e = handshake(addr, &root, "comb-ca.other.svc")
        .await
        .expect_err("a name the certificate does not carry");
    assert!(e.to_string().to_lowercase().contains("name"), "{e}");
    server.shutdown().await.unwrap();

    // What the certificate holds: each name once, and the listen address.
    let a = Authority::self_signed(&d.join("ca"), "cluster.local").unwrap();
    let (chain, _) = a
        .serving_cert(
            &["127.0.0.1".parse().unwrap()],
            &[
                "comb-ca.comb-system.svc".into(),
                comb_ca::authority::SERVING_DNS_NAME.into(),
            ],
        )
        .unwrap();
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        sans,
        [
            "DNSName(istiod.istio-system.svc)",
            "DNSName(comb-ca.comb-system.svc)",
            "IPAddress(7f:00:00:01)"
        ],
        "{sans:?}"
    );
    assert!(a.serving_cert(&[], &["bad name".into()]).is_err());
}

/// The first step of rotating away from a root that signs directly (the generated one): the
/// same root as a plug-in CA (`ca-cert.pem` = the root) with the next root added to
/// `root-cert.pem`, so clients come to trust both before anything is signed by the next.
#[test]
fn a_root_signing_directly_with_the_next_root_in_the_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let old = tmp.path().join("old");
    let a = Authority::self_signed(&old, "cluster.local").unwrap();
    let (next, _) = write_cacerts(&tmp.path().join("next"), false);
    let d = tmp.path().join("cacerts");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(old.join(CA_CERT), d.join(CA_CERT)).unwrap();
    std::fs::copy(old.join(CA_KEY), d.join(CA_KEY)).unwrap();
    std::fs::copy(old.join(CA_CERT), d.join(CERT_CHAIN)).unwrap();
    std::fs::write(
        d.join(ROOT_CERT),
        format!("{}{}", cert_to_pem(&next), a.root_pem()),
    )
    .unwrap();
    let b = Authority::plugin(&d).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        b.root_der(),
        a.root_der(),
        "still signing with the old root"
    );
    assert_eq!(
        certs_from_pem(&b.root_pem()).unwrap(),
        vec![a.root_der().to_vec(), next],
        "both trusted"
    );
}
