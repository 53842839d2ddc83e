//! Rows for `comb identity list` and `comb endpoint policy get`, read back from the
//! datapath's maps (what the kernel enforces, not what the agent meant to write).

use std::collections::BTreeMap;

use comb_datapath::Datapath;
use comb_datapath::policy::{PolicyKey, PolicyValue};
use comb_model::ObjKey;
use comb_model::identity::IdentityTable;
use comb_model::terms::protocol_name;

use crate::api::{EndpointPolicy, IdentityRow, PolicyEntryRow};
use crate::reconcile::policy::datapath_entry;
use comb_model::pipeline::{DesiredPolicy, FlowIndex};

pub fn identities(table: &IdentityTable) -> Vec<IdentityRow> {
    table
        .identities
        .values()
        .map(|i| IdentityRow {
            id: i.id,
            labels: i.label_strings(),
            prefixes: i.prefixes.iter().map(|p| p.to_string()).collect(),
            pods: table
                .pods_of
                .get(&i.id)
                .map(|v| v.iter().map(|k| k.to_string()).collect())
                .unwrap_or_default(),
        })
        .collect()
}

/// `ns/name`, or `name` in `default`.
pub fn pod_key(s: &str) -> ObjKey {
    match s.split_once('/') {
        Some((ns, name)) => ObjKey::new(ns, name),
        None => ObjKey::new("default", s),
    }
}

/// 0 is "any protocol" in policy entries.
fn protocol(p: u8) -> String {
    match p {
        0 => "any".into(),
        n => protocol_name(n),
    }
}

fn ports(k: &PolicyKey) -> String {
    if k.protocol == 0 || k.port_prefix == 0 {
        return "any".into();
    }
    let size = 1u32 << (16 - u32::from(k.port_prefix));
    let last = u32::from(k.port) + size - 1;
    if size == 1 {
        k.port.to_string()
    } else {
        format!("{}-{last}", k.port)
    }
}

pub fn endpoint_policy(
    dp: &Datapath,
    pod: &str,
    want: &DesiredPolicy,
    table: &IdentityTable,
    index: &FlowIndex,
    interface: Option<&str>,
) -> Result<EndpointPolicy, String> {
    let key = pod_key(pod);
    let Some((&ifindex, ep)) = want.endpoints.iter().find(|(_, e)| e.pod == key) else {
        let why = want
            .unenforced
            .iter()
            .find(|u| u.starts_with(&format!("pod {key}:")))
            .cloned()
            .unwrap_or_else(|| {
                format!("pod {key} is not a local pod with an address on this node")
            });
        return Err(why);
    };
    let have: BTreeMap<PolicyKey, PolicyValue> = dp
        .policy()
        .entries()
        .map_err(|e| format!("reading the policy map: {e:#}"))?
        .into_iter()
        .filter(|(k, _)| k.endpoint == ifindex)
        .collect();
    let wanted: BTreeMap<PolicyKey, PolicyValue> = want
        .entries
        .iter()
        .filter(|((i, _), _)| *i == ifindex)
        .map(|((i, k), v)| datapath_entry(*i, k, v))
        .collect();
    let mut entries: Vec<(&PolicyKey, &PolicyValue)> = have.iter().collect();
    // By direction, identity (ANY last), then most specific first, as the lookup prefers.
    entries.sort_by_key(|(k, _)| {
        (
            k.direction,
            k.identity == 0,
            k.identity,
            k.protocol == 0,
            std::cmp::Reverse(k.port_prefix),
            k.protocol,
            k.port,
        )
    });
    let rows = entries
        .into_iter()
        .map(|(k, v)| PolicyEntryRow {
            direction: k.direction.name().into(),
            identity: k.identity,
            identity_labels: if k.identity == 0 {
                vec!["any other".into()]
            } else {
                table
                    .identities
                    .get(&k.identity)
                    .map(|i| i.label_strings())
                    .unwrap_or_else(|| vec!["unknown".into()])
            },
            protocol: protocol(k.protocol),
            ports: ports(k),
            verdict: format!("{:?}", v.verdict).to_lowercase(),
            reason: v.reason.to_string(),
            policy: (v.policy != 0).then(|| {
                index
                    .policy_names
                    .get(&v.policy)
                    .cloned()
                    .unwrap_or_else(|| format!("policy #{}", v.policy))
            }),
        })
        .collect();
    Ok(EndpointPolicy {
        pod: key.to_string(),
        interface: interface.unwrap_or_default().to_owned(),
        ifindex,
        identity: ep.identity,
        ingress_enforced: ep.ingress_enforced,
        egress_enforced: ep.egress_enforced,
        policies: ep
            .policies
            .iter()
            .map(|p| format!("{} {}", p.kind, p.key))
            .collect(),
        entries: rows,
        in_sync: have == wanted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_model::terms::Direction;

    #[test]
    fn port_blocks_print_as_ranges() {
        let k = |protocol, port, port_prefix| PolicyKey {
            endpoint: 1,
            identity: 0,
            direction: Direction::Ingress,
            protocol,
            port,
            port_prefix,
        };
        assert_eq!(ports(&k(0, 0, 0)), "any");
        assert_eq!(ports(&k(6, 0, 0)), "any");
        assert_eq!(ports(&k(6, 80, 16)), "80");
        assert_eq!(ports(&k(6, 8000, 10)), "8000-8063");
        assert_eq!(pod_key("shop/web"), ObjKey::new("shop", "web"));
        assert_eq!(pod_key("web"), ObjKey::new("default", "web"));
    }
}
