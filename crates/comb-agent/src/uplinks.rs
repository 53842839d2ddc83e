//! The node's uplink interfaces, where the uplink program (HBONE inbound, `bpf/uplink.c`)
//! attaches: named by `--uplink IFACE` (repeatable; `none` = no uplink program), or by
//! default the interfaces that carry the default routes of the agent's network namespace
//! (in the lab: `uplink`). In the network namespace of PID 1 nothing is picked by default:
//! on a shared machine that is the machine's own namespace, and its interfaces are never
//! touched implicitly (a real node names them).
//!
//! Resolved on every reconcile, in the writer thread's (the agent's) network namespace, so an
//! interface that appears later is picked up by the next pass.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

/// What `--uplink` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UplinkPlan {
    /// The interfaces of the default routes (not in PID 1's network namespace).
    Auto,
    /// Exactly these interfaces.
    Named(Vec<String>),
    /// No uplink program (`--uplink none`).
    Off,
}

impl UplinkPlan {
    pub fn from_flags(flags: &[String]) -> Self {
        if flags.is_empty() {
            UplinkPlan::Auto
        } else if flags.iter().any(|f| f == "none") {
            UplinkPlan::Off
        } else {
            let mut v = flags.to_vec();
            v.sort();
            v.dedup();
            UplinkPlan::Named(v)
        }
    }
}

/// Interfaces of the IPv4 default routes in `/proc/net/route` text.
fn default_route_ifaces_v4(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            (w.len() >= 8 && w[1] == "00000000" && w[7] == "00000000").then(|| w[0].to_string())
        })
        .collect()
}

/// Interfaces of the IPv6 default routes in `/proc/net/ipv6_route` text.
fn default_route_ifaces_v6(table: &str) -> Vec<String> {
    table
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // dest plen src splen nexthop metric refcnt use flags iface
            (w.len() >= 10 && w[0].chars().all(|c| c == '0') && w[1] == "00")
                .then(|| w[9].to_string())
        })
        .collect()
}

/// Whether the calling thread is in PID 1's network namespace (unknown = yes: fail safe).
fn in_init_netns() -> bool {
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino()).ok();
    match (ino("/proc/thread-self/ns/net"), ino("/proc/1/ns/net")) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// The interface names the plan means here, or why there are none.
fn names(plan: &UplinkPlan) -> Result<Vec<String>, String> {
    match plan {
        UplinkPlan::Off => Ok(vec![]),
        UplinkPlan::Named(v) => Ok(v.clone()),
        UplinkPlan::Auto => {
            if in_init_netns() {
                return Err(
                    "no --uplink given and the agent runs in PID 1's network namespace: \
                            name the node's uplinks with --uplink (or --uplink none)"
                        .into(),
                );
            }
            let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
            let mut v = default_route_ifaces_v4(&read("/proc/thread-self/net/route"));
            v.extend(default_route_ifaces_v6(&read(
                "/proc/thread-self/net/ipv6_route",
            )));
            v.retain(|i| i != "lo");
            v.sort();
            v.dedup();
            Ok(v)
        }
    }
}

/// The ifindexes of the plan's interfaces; errors name what could not be resolved (retried
/// by the next reconcile).
pub fn resolve(plan: &UplinkPlan, errors: &mut Vec<String>) -> BTreeSet<u32> {
    let names = match names(plan) {
        Ok(n) => n,
        Err(e) => {
            // Auto in the root namespace is a decision, not a failure: nothing to attach.
            if plan == &UplinkPlan::Auto {
                tracing::debug!(reason = %e, "no uplink program");
            } else {
                errors.push(e);
            }
            return BTreeSet::new();
        }
    };
    names
        .iter()
        .filter_map(|n| match nix::net::if_::if_nametoindex(n.as_str()) {
            Ok(i) => Some(i),
            Err(e) => {
                errors.push(format!("uplink interface {n}: {e}"));
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_make_a_plan() {
        assert_eq!(UplinkPlan::from_flags(&[]), UplinkPlan::Auto);
        assert_eq!(
            UplinkPlan::from_flags(&["uplink".into(), "eth1".into(), "uplink".into()]),
            UplinkPlan::Named(vec!["eth1".into(), "uplink".into()])
        );
        assert_eq!(UplinkPlan::from_flags(&["none".into()]), UplinkPlan::Off);
    }

    #[test]
    fn default_routes_are_found() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  uplink\t00000000\tFEFE12C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  lxc2\t030112C6\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  eth9\t00000000\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        assert_eq!(default_route_ifaces_v4(v4), vec!["uplink"]);
        let v6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth1\n";
        assert_eq!(default_route_ifaces_v6(v6), vec!["eth1"]);
        assert!(default_route_ifaces_v4("").is_empty());
    }

    #[test]
    fn off_resolves_to_nothing() {
        let mut errors = vec![];
        assert!(resolve(&UplinkPlan::Off, &mut errors).is_empty());
        assert!(errors.is_empty());
    }
}
