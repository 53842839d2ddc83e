//! Service frontends in the socket-LB maps: the pipeline's `LbService`s diffed against what
//! the datapath holds, so that only changed Services are rewritten (a full rebuild would
//! briefly leave VIPs without backends and reshuffle Maglev tables).

use std::collections::{BTreeMap, BTreeSet};

use comb_datapath::Datapath;
use comb_model::lb::LbService;
use comb_model::pipeline::ServiceKey;
use comb_model::pipeline::services::key;

/// The datapath's entry with backends in our (sorted) order, so a datapath that stores
/// them differently does not look changed on every pass.
pub fn normalized(s: &LbService) -> LbService {
    let mut s = s.clone();
    s.backends.sort();
    s
}

/// What to write and what to remove to turn `have` into `want`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub upserts: Vec<LbService>,
    pub removals: Vec<ServiceKey>,
}

pub fn plan(have: &[LbService], want: &BTreeMap<ServiceKey, LbService>) -> Plan {
    let have: BTreeMap<ServiceKey, LbService> =
        have.iter().map(|s| (key(s), normalized(s))).collect();
    Plan {
        upserts: want
            .iter()
            .filter(|(k, s)| have.get(k) != Some(s))
            .map(|(_, s)| s.clone())
            .collect(),
        removals: have
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect(),
    }
}

/// Upserts first, then removals: a Service changing its VIP keeps one working meanwhile.
/// Returns how many frontends the maps hold afterwards.
pub fn apply(
    dp: &Datapath,
    want: &BTreeMap<ServiceKey, LbService>,
    errors: &mut Vec<String>,
) -> usize {
    let have = match dp.lb().services() {
        Ok(v) => v,
        Err(e) => {
            errors.push(format!("reading services map: {e:#}"));
            // Without knowing what is there, writing everything is still correct; removals
            // wait for the retry.
            let p = plan(&[], want);
            return upsert(dp, &p.upserts, errors).len();
        }
    };
    let p = plan(&have, want);
    let mut held: BTreeSet<ServiceKey> = have.iter().map(key).collect();
    held.extend(upsert(dp, &p.upserts, errors));
    for k @ (vip, port, protocol) in p.removals {
        match dp.lb().remove_service(vip, port, protocol) {
            Ok(()) => {
                held.remove(&k);
            }
            Err(e) => {
                let addr = std::net::SocketAddr::new(vip, port);
                errors.push(format!("removing service {addr}/{protocol}: {e:#}"));
            }
        }
    }
    held.len()
}

/// Writes `services`; returns the keys written.
fn upsert(dp: &Datapath, services: &[LbService], errors: &mut Vec<String>) -> Vec<ServiceKey> {
    let mut done = Vec::with_capacity(services.len());
    for s in services {
        match dp.lb().upsert_service(s) {
            Ok(()) => done.push(key(s)),
            Err(e) => {
                let addr = std::net::SocketAddr::new(s.vip, s.port);
                errors.push(format!("service {addr}/{}: {e:#}", s.protocol));
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_model::lb::{BackendState, LbAlgorithm, LbBackend, LbFrontend};
    use comb_model::pipeline::services::desired;
    use comb_model::{ObjKey, Protocol};

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

    fn svc(vip: &str, backends: &[&str]) -> LbService {
        LbService {
            vip: vip.parse().unwrap(),
            port: 80,
            protocol: 6,
            backends: backends
                .iter()
                .map(|b| (b.parse().unwrap(), 8080))
                .collect(),
            maglev: false,
            affinity_timeout_secs: 0,
        }
    }

    #[test]
    fn plan_touches_only_what_changed() {
        let want: BTreeMap<_, _> = [
            svc("10.96.0.1", &["198.18.1.2"]),
            svc("10.96.0.2", &["198.18.1.2", "198.18.1.3"]),
            svc("10.96.0.3", &["198.18.1.2"]),
        ]
        .into_iter()
        .map(|s| (key(&s), s))
        .collect();
        let have = [
            svc("10.96.0.1", &["198.18.1.2"]),               // same
            svc("10.96.0.2", &["198.18.1.3", "198.18.1.2"]), // same set, other order
            svc("10.96.0.9", &["198.18.1.2"]),               // stale
        ];
        let p = plan(&have, &want);
        assert_eq!(p.upserts, [svc("10.96.0.3", &["198.18.1.2"])]);
        assert_eq!(p.removals, [(("10.96.0.9".parse().unwrap()), 80, 6)]);
    }

    #[test]
    fn plan_rewrites_a_service_whose_backends_or_options_changed() {
        let mut changed = svc("10.96.0.1", &["198.18.1.2"]);
        changed.maglev = true;
        let want: BTreeMap<_, _> = [(key(&changed), changed.clone())].into();
        let p = plan(&[svc("10.96.0.1", &["198.18.1.2"])], &want);
        assert_eq!(p.upserts, [changed]);
        assert!(p.removals.is_empty());
        let p = plan(&[svc("10.96.0.1", &[])], &want);
        assert_eq!(p.upserts.len(), 1);
    }

    #[test]
    fn plan_of_a_converged_datapath_is_empty() {
        let want = desired(&[frontend("web", "10.96.0.10", Protocol::Tcp)]).services;
        let have: Vec<_> = want.values().cloned().collect();
        assert_eq!(plan(&have, &want), Plan::default());
    }
}
