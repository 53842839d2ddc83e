//! HBONE test material: a test CA (rcgen) issuing SPIFFE workload certificates, certificate
//! stores, and tables with the mesh view filled in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use comb_identity::{CertInfo, CertSet, CertStore, SpiffeId, WorkloadCert};
use comb_model::l7::{HboneTarget, MeshIdentity, ProxyTable};
use comb_model::mesh::DataplaneMode;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub root_der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Self {
            root_der: cert.der().to_vec(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A workload certificate as Istio issues it: only the SPIFFE URI SAN, both EKUs.
    pub fn issue(&self, id: &SpiffeId) -> Arc<WorkloadCert> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = p.signed_by(&key, &self.issuer).unwrap();
        Arc::new(WorkloadCert {
            id: id.clone(),
            chain: vec![leaf.der().to_vec(), self.root_der.clone()],
            key_pkcs8: key.serialize_der(),
            info: CertInfo::from_der(leaf.der()).unwrap(),
        })
    }
}

pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa)
}

/// A store holding `certs`, trusting `roots`.
pub fn store(roots: &[&TestCa], certs: &[Arc<WorkloadCert>]) -> CertStore {
    let s = comb_identity::store::new_store();
    s.store(Arc::new(CertSet {
        generation: 1,
        roots: roots.iter().map(|c| c.root_der.clone()).collect(),
        certs: certs
            .iter()
            .map(|c| (c.id.clone(), c.clone()))
            .collect::<HashMap<_, _>>(),
    }));
    s
}

/// Marks `ip` as a local mesh pod with identity `id`.
pub fn local(table: &mut ProxyTable, ip: &str, id: &SpiffeId) {
    table.mesh_endpoints.insert(
        ip.parse::<IpAddr>().unwrap(),
        MeshIdentity {
            identity: id.clone(),
            mode: DataplaneMode::Mesh,
        },
    );
}

/// Marks `ip` as a remote HBONE peer that must prove `id`.
pub fn peer(table: &mut ProxyTable, ip: &str, id: &SpiffeId) {
    table.hbone_peers.insert(
        ip.parse::<IpAddr>().unwrap(),
        HboneTarget {
            identity: id.clone(),
            comb: true,
        },
    );
}
