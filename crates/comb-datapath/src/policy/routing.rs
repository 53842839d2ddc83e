//! Policy routing for the node L7 proxy, in the calling thread's network namespace: packets
//! the policy datapath marked for the proxy ([`PROXY_MARK`] under [`PROXY_MARK_MASK`]) are
//! delivered locally (to the socket `bpf_sk_assign` chose, or the proxy's accepted socket)
//! instead of being forwarded to their destination.
//!
//! `ip rule add fwmark 0xb00/0xf00 lookup 2005 pref 100` and
//! `ip route replace local 0.0.0.0/0 dev lo table 2005`, and the same for IPv6 (skipped where
//! IPv6 is disabled). Uses the `ip` tool (iproute2), run as a child of the calling thread so
//! it acts in that thread's namespace.
//!
//! It must only ever run in the node's network namespace (the agent's job). Tests must never
//! run it in the machine's root namespace: enter a namespace the test created first.

use std::process::Command;

use anyhow::{Context, Result, bail};

use super::abi::{PROXY_MARK, PROXY_MARK_MASK};

/// The routing table with the local default routes.
pub const TABLE: u32 = 2005;
/// Priority of the fwmark rule: before the main table (32766).
pub const RULE_PREF: u32 = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_net(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

fn fwmark() -> String {
    format!("{PROXY_MARK:#x}/{PROXY_MARK_MASK:#x}")
}

/// `ip <args>`: stdout, or an error with its stderr.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// IPv6 is off in this namespace (no IPv6 at all, or disabled on lo).
fn ipv6_disabled() -> bool {
    // /proc/sys/net follows the opening thread's network namespace.
    match std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6") {
        Ok(v) => v.trim() == "1",
        Err(_) => true,
    }
}

/// Whether `rules` (`ip rule show` output) holds our rule. Output looks like
/// `100:<TAB>from all fwmark 0xb00/0xf00 lookup 2005`.
fn has_rule(rules: &str) -> bool {
    let (mark, table, pref) = (fwmark(), TABLE.to_string(), format!("{RULE_PREF}:"));
    rules.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let after = |key: &str| w.windows(2).find(|p| p[0] == key).map(|p| p[1]);
        w.first() == Some(&pref.as_str())
            && after("fwmark") == Some(mark.as_str())
            && after("lookup") == Some(table.as_str())
    })
}

fn rule_installed(f: Family) -> Result<bool> {
    let rules = ip(&[f.flag(), "rule", "show", "pref", &RULE_PREF.to_string()])?;
    Ok(has_rule(&rules))
}

fn route_installed(f: Family) -> Result<bool> {
    let routes = ip(&[f.flag(), "route", "show", "table", &TABLE.to_string()])?;
    Ok(routes.lines().any(|l| {
        let l = l.trim();
        l.starts_with("local default dev lo")
            || l.starts_with(&format!("local {} dev lo", f.default_net()))
    }))
}

/// `ip [-6] route VERB local default dev lo table TABLE`.
fn local_route(f: Family, verb: &str) -> Result<String> {
    let table = TABLE.to_string();
    ip(&[
        f.flag(),
        "route",
        verb,
        "local",
        f.default_net(),
        "dev",
        "lo",
        "table",
        &table,
    ])
}

/// `ip [-6] rule VERB fwmark MARK/MASK lookup TABLE pref PREF`.
fn mark_rule(f: Family, verb: &str) -> Result<String> {
    ip(&[
        f.flag(),
        "rule",
        verb,
        "fwmark",
        &fwmark(),
        "lookup",
        &TABLE.to_string(),
        "pref",
        &RULE_PREF.to_string(),
    ])
}

fn install_family(f: Family) -> Result<()> {
    local_route(f, "replace")?;
    if !rule_installed(f)? {
        mark_rule(f, "add")?;
    }
    Ok(())
}

fn remove_family(f: Family) -> Result<()> {
    // `ip rule del` removes one matching rule per call; loop in case one was added twice.
    while rule_installed(f)? {
        mark_rule(f, "del")?;
    }
    if route_installed(f)? {
        local_route(f, "del")?;
    }
    Ok(())
}

/// Install the proxy's policy routing in the current network namespace. Idempotent. IPv6 is
/// skipped when it is disabled in the namespace.
pub fn install() -> Result<()> {
    install_family(Family::V4).context("IPv4 proxy routing")?;
    if !ipv6_disabled() {
        install_family(Family::V6).context("IPv6 proxy routing")?;
    }
    Ok(())
}

/// Remove what [`install`] added; what is missing is fine.
pub fn remove() -> Result<()> {
    remove_family(Family::V4).context("IPv4 proxy routing")?;
    if !ipv6_disabled() {
        remove_family(Family::V6).context("IPv6 proxy routing")?;
    }
    Ok(())
}

/// Whether the IPv4 rule and route are in place (and the IPv6 ones, where IPv6 is enabled).
pub fn installed() -> Result<bool> {
    let v4 = rule_installed(Family::V4)? && route_installed(Family::V4)?;
    if !v4 || ipv6_disabled() {
        return Ok(v4);
    }
    Ok(rule_installed(Family::V6)? && route_installed(Family::V6)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_lines_are_recognised() {
        assert_eq!(fwmark(), "0xb00/0xf00");
        assert!(has_rule("100:\tfrom all fwmark 0xb00/0xf00 lookup 2005\n"));
        assert!(has_rule(
            "0:\tfrom all lookup local\n100:\tfrom all fwmark 0xb00/0xf00 lookup 2005 proto boot\n"
        ));
        assert!(!has_rule("100:\tfrom all fwmark 0xa00/0xf00 lookup 2005\n"));
        assert!(!has_rule("101:\tfrom all fwmark 0xb00/0xf00 lookup 2005\n"));
        assert!(!has_rule(
            "100:\tfrom all fwmark 0xb00/0xf00 lookup 20050\n"
        ));
        assert!(!has_rule(""));
    }
}
