//! The policy part of the datapath reconciler: the pipeline's identities, policy endpoints
//! and compiled entries diffed against what the datapath's maps hold, written in an order
//! that never widens: new identities and entries before the interfaces that use them,
//! removals last.

use std::collections::{BTreeMap, BTreeSet};

use comb_datapath::Datapath;
use comb_datapath::policy as dp;
use comb_model::pipeline::DesiredPolicy;
use comb_model::policy_compile::{EntryKey, EntryValue};

/// The kernel's form of a compiled entry.
pub fn datapath_entry(
    endpoint: u32,
    k: &EntryKey,
    v: &EntryValue,
) -> (dp::PolicyKey, dp::PolicyValue) {
    let key = dp::PolicyKey {
        endpoint,
        identity: k.identity,
        direction: k.direction,
        protocol: k.protocol,
        port: k.port,
        port_prefix: k.port_prefix,
    };
    let value = dp::PolicyValue {
        verdict: v.verdict,
        reason: v.reason.into(),
        proxy_port: 0,
        policy: v.policy,
    };
    (key, value)
}

/// Make the policy maps and attachments match `want`. Order: ipcache and endpoint entries
/// first, then policy entries (new before stale are removed, so an entry is always either the
/// old or the new answer), then attachments (a new interface is judged from its first
/// packet), and removals of what nothing uses any more last.
pub fn apply(d: &Datapath, want: &DesiredPolicy, errors: &mut Vec<String>) {
    let mut fail = |what: String, e: anyhow::Error| errors.push(format!("{what}: {e:#}"));

    let have_ipcache = d.policy().ipcache_entries().unwrap_or_else(|e| {
        fail("reading the ipcache".into(), e);
        BTreeMap::new()
    });
    for (net, id) in &want.ipcache {
        let entry = dp::IpcacheEntry {
            identity: *id,
            endpoint: want.redirect_endpoints.get(net).copied().unwrap_or(0),
        };
        if have_ipcache.get(net) != Some(&entry)
            && let Err(e) = d.policy().upsert_ipcache_entry(*net, entry)
        {
            fail(format!("ipcache {net} -> {entry:?}"), e);
        }
    }

    let have_eps = d.policy().endpoints().unwrap_or_else(|e| {
        fail("reading the policy endpoints".into(), e);
        BTreeMap::new()
    });
    for (ifindex, ep) in &want.endpoints {
        let same = have_eps
            .get(ifindex)
            .is_some_and(|h| h.identity == ep.identity && h.addrs == ep.addrs);
        if !same && let Err(e) = d.policy().set_endpoint(*ifindex, ep.identity, &ep.addrs) {
            fail(format!("policy endpoint {} (ifindex {ifindex})", ep.pod), e);
        }
    }

    let want_entries: BTreeMap<dp::PolicyKey, dp::PolicyValue> = want
        .entries
        .iter()
        .map(|((ep, k), v)| datapath_entry(*ep, k, v))
        .collect();
    match d.policy().entries() {
        Ok(have) => {
            for (k, v) in &want_entries {
                if have.get(k) != Some(v)
                    && let Err(e) = d.policy().upsert_entry(k, v)
                {
                    fail(format!("policy entry {k:?}"), e);
                }
            }
            for k in have.keys().filter(|k| !want_entries.contains_key(k)) {
                if let Err(e) = d.policy().remove_entry(k) {
                    fail(format!("removing policy entry {k:?}"), e);
                }
            }
        }
        Err(e) => fail("reading the policy entries".into(), e),
    }

    let attached: BTreeSet<u32> = d.policy().attachments().into_iter().collect();
    for (ifindex, ep) in &want.endpoints {
        if !attached.contains(ifindex)
            && let Err(e) = d.policy().attach(*ifindex)
        {
            fail(
                format!("attaching policy to pod {} (ifindex {ifindex})", ep.pod),
                e,
            );
        }
    }
    for ifindex in attached.iter().filter(|i| !want.endpoints.contains_key(i)) {
        if let Err(e) = d.policy().detach(*ifindex) {
            fail(format!("detaching policy from ifindex {ifindex}"), e);
        }
    }
    for ifindex in have_eps.keys().filter(|i| !want.endpoints.contains_key(i)) {
        if let Err(e) = d.policy().remove_endpoint(*ifindex) {
            fail(format!("removing policy endpoint {ifindex}"), e);
        }
    }
    for net in have_ipcache
        .keys()
        .filter(|n| !want.ipcache.contains_key(n))
    {
        if let Err(e) = d.policy().remove_ipcache(*net) {
            fail(format!("removing ipcache {net}"), e);
        }
    }
}
