//! The datapath reconciler: computes what the kernel maps and attachments should hold for
//! this node from State (pure), diffs it against what the datapath reports, and applies the
//! difference. Reading back the datapath (not a cached copy) makes a restarted agent that
//! adopted pinned state converge the same way.

mod endpoints;
pub mod policy;
pub mod services;

use std::collections::BTreeMap;
use std::path::PathBuf;

use comb_datapath::{Datapath, LbService, SocketLbMode};
use comb_model::State;
use comb_model::lb::compile_frontends;

use crate::args::{SocketLb, display_cgroup, normalize_cgroup};
pub use endpoints::{DesiredPods, attach_id};
use services::ServiceKey;

/// What this node's datapath should hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub pods: DesiredPods,
    /// Socket-LB entries; empty when the socket LB is off (nothing would read them).
    pub services: BTreeMap<ServiceKey, LbService>,
    /// Frontends that cannot be programmed, with why.
    pub lb_skipped: Vec<String>,
    /// Where the socket-LB programs attach (cgroup relative to the cgroup root) and how.
    pub socket_lb: Option<(PathBuf, SocketLb)>,
    /// Identity policy; filled by the caller, which owns the identity allocator.
    pub policy: policy::DesiredPolicy,
}

/// `socket_lb`: the agent's resolved `--socket-lb`/`--lb-cgroup` (None = off).
pub fn desired(state: &State, node: &str, socket_lb: Option<&(PathBuf, SocketLb)>) -> Desired {
    let lb = services::desired(&compile_frontends(state.snapshot(), node));
    Desired {
        pods: endpoints::desired(state, node),
        services: if socket_lb.is_some() {
            lb.services
        } else {
            BTreeMap::new()
        },
        lb_skipped: lb.skipped,
        socket_lb: socket_lb.cloned(),
        policy: Default::default(),
    }
}

fn datapath_mode(m: SocketLb) -> SocketLbMode {
    match m {
        SocketLb::HostOnly => SocketLbMode::HostOnly,
        SocketLb::On | SocketLb::Off => SocketLbMode::All,
    }
}

fn same_attachment(
    have: Option<(PathBuf, SocketLbMode)>,
    want: Option<&(PathBuf, SocketLb)>,
) -> bool {
    match (have, want) {
        (None, None) => true,
        // An adopted attachment whose cgroup could not be found reads as an empty path:
        // re-attach to be sure.
        (Some((hc, _)), Some(_)) if hc.as_os_str().is_empty() => false,
        (Some((hc, hm)), Some((wc, wm))) => {
            normalize_cgroup(&hc) == *wc && hm == datapath_mode(*wm)
        }
        _ => false,
    }
}

/// Apply `want` to the datapath; returns the errors met (each step is independent, so one
/// bad pod or Service does not hold back the others).
pub fn apply(dp: &mut Datapath, want: &Desired) -> Vec<String> {
    let mut errors = Vec::new();
    endpoints::apply(dp, &want.pods, &mut errors);
    policy::apply(dp, &want.policy, &mut errors);

    let attached_ok = same_attachment(dp.lb().attachment(), want.socket_lb.as_ref());
    // Turning off: stop translating before the maps are emptied, so no socket meets a VIP
    // whose backends are being removed.
    if !attached_ok
        && want.socket_lb.is_none()
        && let Err(e) = dp.lb_mut().detach()
    {
        errors.push(format!("detaching the socket LB: {e:#}"));
    }
    services::apply(dp, &want.services, &mut errors);
    // Turning on: the maps are filled first, so the first translated connect finds them.
    // Attaching is idempotent and moves (cgroup or mode) without a gap, so no detach first.
    if !attached_ok
        && let Some((cg, mode)) = &want.socket_lb
        && let Err(e) = dp.lb_mut().attach(cg, datapath_mode(*mode))
    {
        errors.push(format!(
            "attaching the socket LB to cgroup {}: {e:#}",
            display_cgroup(cg)
        ));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_model::{
        Endpoint, EndpointPort, EndpointSlice, ObjKey, Protocol, Service, ServicePort, Snapshot,
        TargetPort,
    };

    fn state() -> State {
        let mut snap = Snapshot::default();
        let svc = Service {
            key: ObjKey::new("apps", "web"),
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![
                ServicePort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: TargetPort::Number(8080),
                },
                ServicePort {
                    name: Some("sig".into()),
                    protocol: Protocol::Sctp,
                    port: 9,
                    target_port: TargetPort::Number(9),
                },
            ],
            annotations: BTreeMap::new(),
            affinity_timeout_secs: None,
            internal_local: false,
        };
        let slice = EndpointSlice {
            key: ObjKey::new("apps", "web-1"),
            service_name: "web".into(),
            ports: vec![EndpointPort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: vec![Endpoint {
                addresses: vec!["198.18.2.2".parse().unwrap()],
                ready: true,
                serving: true,
                terminating: false,
                node_name: Some("n2".into()),
            }],
        };
        snap.services.insert(svc.key.clone(), svc);
        snap.endpoint_slices.insert(slice.key.clone(), slice);
        let mut s = State::new();
        s.replace(snap);
        s
    }

    #[test]
    fn services_are_desired_when_the_socket_lb_is_on() {
        let on = (PathBuf::from("lab/n1"), SocketLb::On);
        let d = desired(&state(), "n1", Some(&on));
        assert_eq!(d.services.len(), 1, "the TCP port; SCTP is skipped");
        let s = d.services.values().next().unwrap();
        assert_eq!(s.backends, [("198.18.2.2".parse().unwrap(), 8080)]);
        assert_eq!(d.lb_skipped.len(), 1);
        assert_eq!(d.socket_lb, Some(on));
    }

    #[test]
    fn no_services_in_the_maps_when_the_socket_lb_is_off() {
        let d = desired(&state(), "n1", None);
        assert!(d.services.is_empty());
        assert_eq!(d.socket_lb, None);
        // Still reported: the skip is a property of the configuration.
        assert_eq!(d.lb_skipped.len(), 1);
    }

    #[test]
    fn attachment_compares_normalized_cgroup_and_mode() {
        let want = (PathBuf::from("lab/n1"), SocketLb::On);
        let have = |p: &str, m| Some((PathBuf::from(p), m));
        assert!(same_attachment(
            have("/lab/n1/", SocketLbMode::All),
            Some(&want)
        ));
        assert!(!same_attachment(
            have("lab/n1", SocketLbMode::HostOnly),
            Some(&want)
        ));
        assert!(!same_attachment(
            have("lab", SocketLbMode::All),
            Some(&want)
        ));
        assert!(!same_attachment(None, Some(&want)));
        assert!(!same_attachment(have("lab/n1", SocketLbMode::All), None));
        assert!(same_attachment(None, None));
        let root = (PathBuf::from("/"), SocketLb::HostOnly);
        assert!(same_attachment(
            have("/", SocketLbMode::HostOnly),
            Some(&root)
        ));
        assert!(
            !same_attachment(have("", SocketLbMode::HostOnly), Some(&root)),
            "adopted, cgroup unknown"
        );
    }
}
