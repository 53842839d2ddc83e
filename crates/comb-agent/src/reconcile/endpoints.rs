//! Endpoints map and per-pod cgroup attachments (the splice's state).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use comb_datapath::{Datapath, EndpointInfo};
use comb_model::pipeline::DesiredPods;

/// Apply `want` to the datapath, collecting the errors met (each step is independent, so one
/// bad pod does not hold back the others).
pub fn apply(dp: &Datapath, want: &DesiredPods, errors: &mut Vec<String>) {
    let have: BTreeMap<IpAddr, bool> = match dp.splice().endpoints() {
        Ok(v) => v.into_iter().map(|(ip, info)| (ip, info.splice)).collect(),
        Err(e) => {
            errors.push(format!("reading endpoints map: {e:#}"));
            BTreeMap::new()
        }
    };
    // Add and update before removing, so a pod that moves address is never absent.
    for (ip, splice) in &want.endpoints {
        if have.get(ip) != Some(splice)
            && let Err(e) = dp
                .splice()
                .upsert_endpoint(*ip, EndpointInfo { splice: *splice })
        {
            errors.push(format!("endpoint {ip}: {e:#}"));
        }
    }
    for ip in have.keys().filter(|ip| !want.endpoints.contains_key(ip)) {
        if let Err(e) = dp.splice().remove_endpoint(*ip) {
            errors.push(format!("removing endpoint {ip}: {e:#}"));
        }
    }
    let attached: BTreeMap<String, PathBuf> = dp.splice().attached().into_iter().collect();
    for (id, cg) in &want.cgroups {
        if attached.get(id) != Some(cg)
            && let Err(e) = dp.splice().attach_cgroup(id, cg)
        {
            errors.push(format!("attaching {id} to cgroup {}: {e:#}", cg.display()));
        }
    }
    for id in attached.keys().filter(|id| !want.cgroups.contains_key(*id)) {
        if let Err(e) = dp.splice().detach_cgroup(id) {
            errors.push(format!("detaching {id}: {e:#}"));
        }
    }
}
