//! The datapath reconciler: makes the kernel's maps and attachments match what the pipeline
//! (comb_model::pipeline) computed for this node. It diffs against what the datapath reports
//! (not a cached copy), so an agent that adopted pinned state converges the same way, and
//! writes new entries before removing stale ones.

mod endpoints;
pub mod mesh;
pub mod policy;
pub mod services;

use std::collections::BTreeSet;
use std::path::PathBuf;

use comb_datapath::{Datapath, SocketLbMode};
use comb_model::pipeline::Desired;

use crate::cgroup_path::{display_cgroup, normalize_cgroup};

/// What one pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Errors met; each step is independent, so one bad pod or Service does not hold back the
    /// others. Empty = the datapath holds `want` completely.
    pub errors: Vec<String>,
    /// Service frontends in the socket-LB maps afterwards.
    pub lb_services: usize,
}

fn same_attachment(
    have: Option<(PathBuf, SocketLbMode)>,
    want: Option<&(PathBuf, SocketLbMode)>,
) -> bool {
    match (have, want) {
        (None, None) => true,
        // An adopted attachment whose cgroup could not be found reads as an empty path:
        // re-attach to be sure.
        (Some((hc, _)), Some(_)) if hc.as_os_str().is_empty() => false,
        (Some((hc, hm)), Some((wc, wm))) => normalize_cgroup(&hc) == *wc && hm == *wm,
        _ => false,
    }
}

/// Apply `want` to the datapath. `socket_lb`: where and how the socket LB attaches (None =
/// off). `uplinks`: the ifindexes of the node's uplinks (the uplink program's attachments).
pub fn apply(
    dp: &Datapath,
    want: &Desired,
    socket_lb: Option<&(PathBuf, SocketLbMode)>,
    uplinks: &BTreeSet<u32>,
) -> Outcome {
    let mut errors = Vec::new();
    endpoints::apply(dp, &want.pods, &mut errors);
    // The mesh before the policy programs attach to a new pod's veth (its entries are keyed
    // by the veth's ifindex, known before the attach), so a STRICT pod is STRICT from its
    // first packet; the uplinks after the mesh (HBONE inbound needs the local addresses).
    mesh::apply(dp, &want.mesh, &mut errors);
    policy::apply(dp, &want.policy, &mut errors);
    mesh::apply_uplinks(dp, uplinks, &mut errors);

    let attached_ok = same_attachment(dp.lb().attachment(), socket_lb);
    // Turning off: stop translating before the maps are emptied, so no socket meets a VIP
    // whose backends are being removed.
    if !attached_ok
        && socket_lb.is_none()
        && let Err(e) = dp.lb().detach()
    {
        errors.push(format!("detaching the socket LB: {e:#}"));
    }
    let lb_services = services::apply(dp, &want.services, &mut errors);
    // Turning on: the maps are filled first, so the first translated connect finds them.
    // Attaching is idempotent and moves (cgroup or mode) without a gap, so no detach first.
    if !attached_ok
        && let Some((cg, mode)) = socket_lb
        && let Err(e) = dp.lb().attach(cg, *mode)
    {
        errors.push(format!(
            "attaching the socket LB to cgroup {}: {e:#}",
            display_cgroup(cg)
        ));
    }
    Outcome {
        errors,
        lb_services,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_compares_normalized_cgroup_and_mode() {
        let want = (PathBuf::from("lab/n1"), SocketLbMode::All);
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
        let root = (PathBuf::from("/"), SocketLbMode::HostOnly);
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
