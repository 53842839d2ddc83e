//! The node's uplink interfaces, where the uplink program (HBONE inbound, `bpf/uplink.c`)
//! attaches: named by `--uplink IFACE` (repeatable; `none` = no uplink program), or by
//! default the interfaces that carry the default routes of the agent's network namespace
//! (in the lab: `uplink`). In the machine's root network namespace (the kernel's initial one,
//! or PID 1's) nothing is picked by default: on a shared machine those are the machine's own
//! interfaces, never touched implicitly (a real node names them).
//!
//! Resolved on every reconcile, in the writer thread's (the agent's) network namespace, so an
//! interface that appears later is picked up by the next pass.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

/// What `--uplink` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UplinkPlan {
    /// The interfaces of the default routes (not in the root network namespace).
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

/// The inode number of the kernel's initial network namespace (`PROC_NET_INIT_INO`,
/// 0xEFFFFFF9; fixed on the kernels that have it, like the other init namespaces').
const INIT_NET_INO: u64 = 0xEFFF_FFF9;

/// Whether the calling thread is in the machine's root network namespace: the kernel's initial
/// one, or PID 1's (when we may look at it: not in every sandbox). Its own namespace not
/// readable = yes (fail safe).
fn in_root_netns() -> bool {
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino()).ok();
    let Some(own) = ino("/proc/thread-self/ns/net") else {
        return true;
    };
    own == INIT_NET_INO || ino("/proc/1/ns/net") == Some(own)
}

/// The interface names the plan means here, or why there are none.
fn names(plan: &UplinkPlan) -> Result<Vec<String>, String> {
    match plan {
        UplinkPlan::Off => Ok(vec![]),
        UplinkPlan::Named(v) => Ok(v.clone()),
        UplinkPlan::Auto => {
            if in_root_netns() {
                return Err(
                    "no --uplink given and the agent runs in the machine's root network \
                     namespace: name the node's uplinks with --uplink (or --uplink none)"
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

    /// The test runs in the machine's namespace (or a sandbox's): auto must not pick there
    /// unless it is a namespace of its own. Here: only checks that the answer is stable and
    /// that auto in the root namespace resolves to nothing without an error.
    #[test]
    fn auto_in_the_root_namespace_picks_nothing() {
        if in_root_netns() {
            let mut errors = vec![];
            assert!(resolve(&UplinkPlan::Auto, &mut errors).is_empty());
            assert!(errors.is_empty(), "{errors:?}");
        }
    }

    /// In a namespace of its own (a lab node), auto picks the interface of the default route
    /// and not the others. Privileged: creates and deletes a throwaway network namespace.
    #[test]
    fn auto_in_a_node_namespace_picks_the_default_route() {
        if !comb_host::privileged_test("uplink auto-detection (netns)") {
            return;
        }
        let name = format!("comb-upl-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        ip(&["netns", "add", &name]);
        struct Del(String);
        impl Drop for Del {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.0])
                    .status();
            }
        }
        let _del = Del(name.clone());
        for args in [
            &[
                "link", "add", "uplink", "type", "veth", "peer", "name", "lxc1",
            ][..],
            &["addr", "add", "198.18.254.1/32", "dev", "uplink"],
            &["link", "set", "uplink", "up"],
            &["link", "set", "lxc1", "up"],
            &[
                "route",
                "add",
                "198.18.254.254",
                "dev",
                "uplink",
                "scope",
                "link",
            ],
            &[
                "route",
                "add",
                "default",
                "via",
                "198.18.254.254",
                "dev",
                "uplink",
            ],
            &["route", "add", "198.18.1.2/32", "dev", "lxc1"],
        ] {
            let mut a = vec!["-n", name.as_str()];
            a.extend_from_slice(args);
            ip(&a);
        }
        let path = format!("/run/netns/{name}");
        let (got, errors, want) = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            assert!(!in_root_netns());
            let mut errors = vec![];
            let got = resolve(&UplinkPlan::Auto, &mut errors);
            let want = nix::net::if_::if_nametoindex("uplink").unwrap();
            (got, errors, want)
        })
        .join()
        .unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(got, BTreeSet::from([want]));
    }

    #[test]
    fn off_resolves_to_nothing() {
        let mut errors = vec![];
        assert!(resolve(&UplinkPlan::Off, &mut errors).is_empty());
        assert!(errors.is_empty());
    }
}
