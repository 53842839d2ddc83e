//! `comb service list` rows: the compiled frontends of State, each marked with whether the
//! datapath holds it as compiled.

use std::collections::BTreeMap;

use comb_model::lb::{LbFrontend, LbService};
use comb_model::pipeline::services::{self as pipeline_services, ServiceKey};

use crate::api::{BackendRow, ServiceRow};
use crate::reconcile::services;

/// `frontends` and `want` as the pipeline computed them (`want` is empty when the socket LB is
/// off), `have` from the datapath.
pub fn rows(
    frontends: &[LbFrontend],
    want: &BTreeMap<ServiceKey, LbService>,
    have: &[LbService],
) -> Vec<ServiceRow> {
    let have: BTreeMap<ServiceKey, LbService> = have
        .iter()
        .map(|s| (pipeline_services::key(s), services::normalized(s)))
        .collect();
    frontends
        .iter()
        .map(|f| {
            // Programmed: the entry the reconciler wants for this key is this frontend's (it
            // was not skipped or beaten to the VIP) and the datapath holds exactly that.
            let programmed = pipeline_services::ip_protocol(f.protocol).is_some_and(|p| {
                let mine = pipeline_services::lb_service(f, p);
                let k = pipeline_services::key(&mine);
                want.get(&k) == Some(&mine) && have.get(&k) == Some(&mine)
            });
            ServiceRow {
                service: f.service.to_string(),
                port_name: f.port_name.clone(),
                vip: f.vip,
                port: f.port,
                protocol: f.protocol,
                algorithm: f.algorithm,
                affinity_timeout_secs: f.affinity_timeout_secs,
                backends: f
                    .backends
                    .iter()
                    .map(|b| BackendRow {
                        ip: b.ip,
                        port: b.port,
                        state: b.state,
                        node: b.node.clone(),
                        weight: u32::from(b.active),
                    })
                    .collect(),
                programmed,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_model::lb::{BackendState, LbAlgorithm, LbBackend};
    use comb_model::{ObjKey, Protocol};

    fn frontend(protocol: Protocol) -> LbFrontend {
        let b = |ip: &str, state, active| LbBackend {
            ip: ip.parse().unwrap(),
            port: 8080,
            state,
            node: Some("n1".into()),
            active,
        };
        LbFrontend {
            service: ObjKey::new("apps", "web"),
            port_name: Some("http".into()),
            vip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol,
            algorithm: LbAlgorithm::Maglev,
            affinity_timeout_secs: Some(60),
            backends: vec![
                b("198.18.1.2", BackendState::Ready, true),
                b("198.18.1.3", BackendState::Terminating, false),
            ],
        }
    }

    /// Rows with the socket LB on: what the pipeline wants for these frontends.
    fn rows_of(frontends: &[LbFrontend], have: &[LbService]) -> Vec<ServiceRow> {
        rows(
            frontends,
            &pipeline_services::desired(frontends).services,
            have,
        )
    }

    #[test]
    fn weights_are_one_for_active_backends() {
        let r = &rows_of(&[frontend(Protocol::Tcp)], &[])[0];
        assert_eq!(r.service, "apps/web");
        assert_eq!(r.frontend(), "10.96.0.10:80/TCP");
        let w: Vec<_> = r.backends.iter().map(|b| (b.state, b.weight)).collect();
        assert_eq!(
            w,
            [(BackendState::Ready, 1), (BackendState::Terminating, 0)]
        );
        assert!(!r.programmed, "nothing in the datapath");
    }

    #[test]
    fn programmed_when_the_datapath_holds_exactly_the_frontend() {
        let f = frontend(Protocol::Tcp);
        let mut have = pipeline_services::lb_service(&f, 6);
        assert!(rows_of(std::slice::from_ref(&f), std::slice::from_ref(&have))[0].programmed);
        have.backends.clear();
        assert!(!rows_of(std::slice::from_ref(&f), &[have])[0].programmed);
    }

    #[test]
    fn sctp_is_listed_but_never_programmed() {
        let r = &rows_of(&[frontend(Protocol::Sctp)], &[])[0];
        assert_eq!(r.frontend(), "10.96.0.10:80/SCTP");
        assert!(!r.programmed);
    }
}
