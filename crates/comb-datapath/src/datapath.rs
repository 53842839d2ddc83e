//! The facade: one [`Datapath`] that loads, adopts (what a previous agent pinned) and shuts
//! down every feature together, and hands each out through an accessor
//! (`dp.splice()`, `dp.lb()`, `dp.policy()`). Every method takes `&self` (features keep
//! their link bookkeeping behind locks of their own), so the agent's one writer and its
//! readers share one `Arc<Datapath>`: readers read maps and counters while the writer works. Features know nothing of each other;
//! what concerns several of them (whose link names are whose, the order of load and shutdown)
//! is decided here.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};
use tracing::info;

use crate::lb::{self, SocketLb};
use crate::pin;
use crate::policy::{self, Policy};
use crate::splice::Splice;
use crate::sys;

pub struct DatapathOptions {
    /// bpffs directory owned by this agent, e.g. `/sys/fs/bpf/comb/<node>`.
    pub pin_dir: PathBuf,
    /// Pod cgroup paths are relative to this.
    pub cgroup_root: PathBuf,
}

/// The loaded datapath. Dropping it closes its fds only: what is pinned (maps, programs,
/// links) keeps working; [`Datapath::shutdown`] with `keep_pins = false` removes everything.
pub struct Datapath {
    opts: DatapathOptions,
    splice: Splice,
    lb: SocketLb,
    policy: Policy,
}

/// Link pin names under `links/` that belong to the socket LB or the policy programs; every
/// other name is a pod's sockops link of the splice.
fn reserved_link_name(name: &str) -> bool {
    lb::is_link_name(name) || policy::is_link_name(name)
}

impl Datapath {
    pub fn load(opts: DatapathOptions) -> Result<Self> {
        pin::prepare_dir(&opts.pin_dir, &["maps", "progs", "links"])?;
        let splice = Splice::load(&opts.pin_dir, &opts.cgroup_root, reserved_link_name)?;
        let lb = SocketLb::load(&opts.pin_dir, &opts.cgroup_root)?;
        let policy = Policy::load(&opts.pin_dir)?;
        let mut dp = Self {
            opts,
            splice,
            lb,
            policy,
        };
        dp.lb.adopt()?;
        dp.splice.adopt_links()?;
        dp.policy.adopt_links()?;
        dp.policy.adopt_uplinks()?;
        dp.policy.adopt_proxy_lookup()?;
        info!(
            pin_dir = %dp.opts.pin_dir.display(),
            adopted_links = dp.splice.attached().len(),
            adopted_policy_links = dp.policy.attachments().len(),
            "datapath loaded"
        );
        Ok(dp)
    }

    /// The local splice: endpoints, per-pod sockops links, the sockhash.
    pub fn splice(&self) -> &Splice {
        &self.splice
    }

    /// The socket load balancer: Services and the cgroup it is attached to.
    pub fn lb(&self) -> &SocketLb {
        &self.lb
    }

    /// The identity policy: ipcache, policy entries, endpoints, conntrack, counters, events.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn pin_dir(&self) -> &Path {
        &self.opts.pin_dir
    }

    /// `keep_pins = true`: leave everything attached and pinned for the next agent.
    /// `keep_pins = false`: detach every link and sk_msg and remove `pin_dir` entirely; the maps
    /// (and the sockhash's sockets) go away with their last fd. Readers holding the datapath
    /// afterwards still read the (now unpinned) maps through their fds.
    pub fn shutdown(&self, keep_pins: bool) -> Result<()> {
        if keep_pins {
            info!(pin_dir = %self.opts.pin_dir.display(), "splice datapath left pinned");
            return Ok(());
        }
        let mut errors = Vec::new();
        if let Err(e) = self.lb.detach() {
            errors.push(format!("socket LB: {e:#}"));
        }
        errors.extend(self.policy.detach_all());
        errors.extend(self.policy.detach_all_uplinks());
        if let Err(e) = self.policy.detach_proxy_lookup() {
            errors.push(format!("proxy lookup: {e:#}"));
        }
        errors.extend(self.splice.detach_all());
        // Links pinned by someone else under our dir (not adopted): detach before unpinning.
        if let Ok(rd) = fs::read_dir(self.opts.pin_dir.join("links")) {
            for e in rd.flatten() {
                if let Ok(fd) = sys::obj_get(&e.path()) {
                    let _ = sys::link_detach(fd.as_fd());
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.opts.pin_dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            errors.push(format!("removing {}: {e}", self.opts.pin_dir.display()));
        }
        ensure!(
            errors.is_empty(),
            "splice datapath shutdown: {}",
            errors.join("; ")
        );
        info!(pin_dir = %self.opts.pin_dir.display(), "splice datapath removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent shares the datapath between tasks.
    const _: () = {
        const fn send_sync<T: Send + Sync>() {}
        send_sync::<Datapath>();
    };

    #[test]
    fn feature_link_names_are_disjoint() {
        assert!(reserved_link_name("lb-connect4"));
        assert!(reserved_link_name("policy-7-from"));
        assert!(reserved_link_name("uplink-3"));
        assert!(!lb::is_link_name("policy-7-from"));
        assert!(!policy::is_link_name("lb-connect4"));
        // Pod link ids of the splice are <namespace>_<pod>.
        assert!(!reserved_link_name("default_web-1"));
    }
}
