//! Service frontends as socket-LB entries: one `LbService` per (VIP, port, protocol) with
//! its active backends; what the socket LB cannot do (SCTP, a VIP:port claimed twice) is
//! skipped and said.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::Protocol;
use crate::lb::{LbAlgorithm, LbFrontend, LbService};
use crate::terms::{IPPROTO_TCP, IPPROTO_UDP};

/// A socket-LB map key: VIP, port, IP protocol number.
pub type ServiceKey = (IpAddr, u16, u8);

pub fn key(s: &LbService) -> ServiceKey {
    (s.vip, s.port, s.protocol)
}

/// IP protocol number the datapath keys on; None for what the socket LB does not handle.
pub fn ip_protocol(p: Protocol) -> Option<u8> {
    match p {
        Protocol::Tcp => Some(IPPROTO_TCP),
        Protocol::Udp => Some(IPPROTO_UDP),
        // The socket LB translates TCP and UDP only; an SCTP frontend is skipped and
        // reported (`comb status`, comb_lb_frontends_skipped) rather than half-working.
        Protocol::Sctp => None,
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct DesiredServices {
    pub services: BTreeMap<ServiceKey, LbService>,
    /// Frontends left out, with why (SCTP, a VIP:port claimed by two Services).
    pub skipped: Vec<String>,
}

fn describe(f: &LbFrontend) -> String {
    let proto = match f.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    };
    format!(
        "{} {}/{proto}",
        f.service,
        std::net::SocketAddr::new(f.vip, f.port)
    )
}

pub fn desired(frontends: &[LbFrontend]) -> DesiredServices {
    let mut d = DesiredServices::default();
    let mut owner: BTreeMap<ServiceKey, String> = BTreeMap::new();
    for f in frontends {
        let Some(protocol) = ip_protocol(f.protocol) else {
            d.skipped.push(format!(
                "{}: SCTP is not load-balanced at the socket",
                describe(f)
            ));
            continue;
        };
        let k = (f.vip, f.port, protocol);
        // Nothing upstream stops two Services from claiming one VIP:port; the map holds one
        // entry, so the first Service (by namespace/name) keeps it, deterministically.
        if let Some(first) = owner.get(&k) {
            d.skipped
                .push(format!("{}: VIP:port already used by {first}", describe(f)));
            continue;
        }
        owner.insert(k, f.service.to_string());
        d.services.insert(k, lb_service(f, protocol));
    }
    d
}

/// The datapath entry for one frontend: its active backends, in the compiler's order.
pub fn lb_service(f: &LbFrontend, protocol: u8) -> LbService {
    LbService {
        vip: f.vip,
        port: f.port,
        protocol,
        backends: f.active_backends().map(|b| (b.ip, b.port)).collect(),
        maglev: f.algorithm == LbAlgorithm::Maglev,
        affinity_timeout_secs: f.affinity_timeout_secs.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ObjKey;
    use crate::lb::{BackendState, LbBackend};
    fn backend(ip: &str, state: BackendState, active: bool) -> LbBackend {
        LbBackend {
            ip: ip.parse().unwrap(),
            port: 8080,
            state,
            node: Some("n1".into()),
            active,
        }
    }

    fn frontend(svc: &str, vip: &str, protocol: Protocol) -> LbFrontend {
        LbFrontend {
            service: ObjKey::new("apps", svc),
            port_name: None,
            vip: vip.parse().unwrap(),
            port: 80,
            protocol,
            algorithm: LbAlgorithm::Random,
            affinity_timeout_secs: None,
            backends: vec![
                backend("198.18.1.2", BackendState::Ready, true),
                backend("198.18.1.3", BackendState::Terminating, false),
                backend("198.18.1.4", BackendState::Ready, true),
            ],
        }
    }

    #[test]
    fn frontend_becomes_an_lb_service_of_its_active_backends() {
        let mut f = frontend("web", "10.96.0.10", Protocol::Udp);
        f.algorithm = LbAlgorithm::Maglev;
        f.affinity_timeout_secs = Some(300);
        let d = desired(&[f]);
        assert!(d.skipped.is_empty());
        let s = d.services.values().next().unwrap();
        assert_eq!(s.protocol, 17);
        assert!(s.maglev);
        assert_eq!(s.affinity_timeout_secs, 300);
        assert_eq!(
            s.backends,
            [
                ("198.18.1.2".parse().unwrap(), 8080),
                ("198.18.1.4".parse().unwrap(), 8080)
            ]
        );
    }

    #[test]
    fn no_affinity_is_zero_and_tcp_is_six() {
        let d = desired(&[frontend("web", "10.96.0.10", Protocol::Tcp)]);
        let s = d.services.values().next().unwrap();
        assert_eq!(
            (s.protocol, s.affinity_timeout_secs, s.maglev),
            (6, 0, false)
        );
    }

    #[test]
    fn sctp_is_skipped_and_reported() {
        let d = desired(&[frontend("sig", "10.96.0.10", Protocol::Sctp)]);
        assert!(d.services.is_empty());
        assert_eq!(d.skipped.len(), 1);
        assert!(
            d.skipped[0].contains("apps/sig 10.96.0.10:80/SCTP"),
            "{:?}",
            d.skipped
        );
    }

    #[test]
    fn a_vip_port_claimed_twice_goes_to_the_first_service() {
        let mut b = frontend("b", "10.96.0.10", Protocol::Tcp);
        b.backends.truncate(1);
        let d = desired(&[frontend("a", "10.96.0.10", Protocol::Tcp), b]);
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.services.values().next().unwrap().backends.len(), 2);
        assert!(
            d.skipped[0].contains("already used by apps/a"),
            "{:?}",
            d.skipped
        );
    }
}
