//! The policy programs' links: two tcx links per host-side veth (`comb_policy_from_pod` on
//! ingress, `comb_policy_to_pod` on egress), pinned as `<pin_dir>/links/policy-<ifindex>-from`
//! / `-to`; their names, adoption after a restart, attach and detach.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::MutexGuard;

use anyhow::{Context, Result, ensure};
use libbpf_rs::{ProgramHandle, libbpf_sys};
use tracing::{debug, info, warn};

use super::Policy;
use crate::pin::remove_pin;
use crate::sys;

const LINK_PREFIX: &str = "policy-";

/// The two attach points on a host-side veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Hook {
    /// tcx ingress: packets from the pod.
    From,
    /// tcx egress: packets to the pod.
    To,
}

impl Hook {
    const BOTH: [Hook; 2] = [Hook::From, Hook::To];

    fn suffix(self) -> &'static str {
        match self {
            Hook::From => "from",
            Hook::To => "to",
        }
    }

    fn attach_type(self) -> libbpf_sys::bpf_attach_type {
        match self {
            Hook::From => libbpf_sys::BPF_TCX_INGRESS,
            Hook::To => libbpf_sys::BPF_TCX_EGRESS,
        }
    }

    fn link_name(self, ifindex: u32) -> String {
        format!("{LINK_PREFIX}{ifindex}-{}", self.suffix())
    }
}

/// True for a pin name under `links/` that belongs to the policy programs. Pod link ids of
/// the splice datapath are `<namespace>_<pod>` and always contain `_`; these never do.
pub(crate) fn is_link_name(name: &str) -> bool {
    name.starts_with(LINK_PREFIX)
}

fn parse_link_name(name: &str) -> Option<(u32, Hook)> {
    let rest = name.strip_prefix(LINK_PREFIX)?;
    let (idx, hook) = rest.split_once('-')?;
    let hook = Hook::BOTH.into_iter().find(|h| h.suffix() == hook)?;
    let ifindex: u32 = idx.parse().ok().filter(|&i| i != 0)?;
    (ifindex.to_string() == idx).then_some((ifindex, hook))
}
/// Detach a link now; a link whose interface is gone may refuse, which is fine.
fn detach_link(fd: &OwnedFd, name: &str) {
    if let Err(e) = sys::link_detach(fd.as_fd()) {
        debug!(name, error = %e, "detaching policy link");
    }
}

impl Policy {
    /// Attach both policy programs to the host-side veth `ifindex` (in the calling thread's
    /// network namespace). Idempotent: attached links are switched to the current programs.
    /// Packets pass untouched until the endpoint has an entry ([`Self::set_endpoint`]).
    pub fn attach(&self, ifindex: u32) -> Result<()> {
        self.attach_links(ifindex)?;
        info!(ifindex, "policy attached");
        Ok(())
    }

    /// Detach both programs and remove their pins. An interface that is already gone (pod
    /// deleted) is not an error.
    pub fn detach(&self, ifindex: u32) -> Result<()> {
        self.detach_links(ifindex)?;
        info!(ifindex, "policy detached");
        Ok(())
    }

    /// The ifindexes with policy links, including links whose interface is gone (detach
    /// those).
    pub fn attachments(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.links().keys().map(|(i, _)| *i).collect();
        v.dedup();
        v
    }

    fn prog(&self, hook: Hook) -> &ProgramHandle {
        match hook {
            Hook::From => &self.from_pod,
            Hook::To => &self.to_pod,
        }
    }

    /// Take over links pinned by a previous agent and switch them to our programs; drop the
    /// pins of links whose interface is gone.
    pub(crate) fn adopt_links(&mut self) -> Result<()> {
        let dir = self.pin_dir.join("links");
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((ifindex, hook)) = parse_link_name(&name) else {
                continue;
            };
            let path = entry.path();
            let fd = sys::obj_get(&path)
                .with_context(|| format!("opening pinned link {}", path.display()))?;
            let alive = matches!(sys::link_tcx(fd.as_fd()),
                Ok((i, t)) if i == ifindex && t == hook.attach_type());
            if !alive || sys::link_update(fd.as_fd(), self.prog(hook).as_fd()).is_err() {
                warn!(
                    name,
                    "pinned policy link is defunct (interface gone?), removing it"
                );
                detach_link(&fd, &name);
                remove_pin(&path)?;
                continue;
            }
            debug!(name, "adopted pinned policy link");
            self.links
                .get_mut()
                .expect("policy links lock poisoned")
                .insert((ifindex, hook), fd);
        }
        Ok(())
    }

    fn links(&self) -> MutexGuard<'_, BTreeMap<(u32, Hook), OwnedFd>> {
        self.links.lock().expect("policy links lock poisoned")
    }

    fn attach_links(&self, ifindex: u32) -> Result<()> {
        let pin_dir = self.pin_dir.as_path();
        ensure!(ifindex != 0, "ifindex 0 names no interface");
        let mut links = self.links();
        let mut created = Vec::new();
        for hook in Hook::BOTH {
            if let Some(fd) = links.get(&(ifindex, hook)) {
                // Idempotent; also makes sure it runs the current program.
                if sys::link_update(fd.as_fd(), self.prog(hook).as_fd()).is_ok() {
                    continue;
                }
                // Its interface is gone (an ifindex seen again is another interface).
                if let Some(fd) = links.remove(&(ifindex, hook)) {
                    detach_link(&fd, &hook.link_name(ifindex));
                }
            }
            match self.create_link(pin_dir, ifindex, hook) {
                Ok(fd) => created.push((hook, fd)),
                Err(e) => {
                    // All or nothing for this call: undo the link made before the failure.
                    for (h, fd) in created {
                        detach_link(&fd, &h.link_name(ifindex));
                        let _ = remove_pin(&pin_dir.join("links").join(h.link_name(ifindex)));
                    }
                    return Err(e);
                }
            }
        }
        for (hook, fd) in created {
            links.insert((ifindex, hook), fd);
        }
        Ok(())
    }

    fn create_link(&self, pin_dir: &Path, ifindex: u32, hook: Hook) -> Result<OwnedFd> {
        let name = hook.link_name(ifindex);
        let fd = sys::link_create_tcx(self.prog(hook).as_fd(), ifindex, hook.attach_type())
            .with_context(|| {
                format!("attaching policy ({}) to ifindex {ifindex}", hook.suffix())
            })?;
        let pin = pin_dir.join("links").join(&name);
        remove_pin(&pin)?;
        if let Err(e) = sys::obj_pin(fd.as_fd(), &pin) {
            detach_link(&fd, &name);
            return Err(e).with_context(|| format!("pinning {}", pin.display()));
        }
        debug!(name, "policy link attached");
        Ok(fd)
    }

    fn detach_links(&self, ifindex: u32) -> Result<()> {
        let pin_dir = self.pin_dir.as_path();
        let mut links = self.links();
        for hook in Hook::BOTH {
            let name = hook.link_name(ifindex);
            let pin = pin_dir.join("links").join(&name);
            match links.remove(&(ifindex, hook)) {
                Some(fd) => detach_link(&fd, &name),
                // Pinned by someone else under our dir (not adopted): detach it too.
                None => {
                    if let Ok(fd) = sys::obj_get(&pin) {
                        detach_link(&fd, &name);
                    }
                }
            }
            remove_pin(&pin)?;
        }
        Ok(())
    }

    /// Detach every policy link (for a shutdown without pins); returns the errors.
    pub(crate) fn detach_all(&self) -> Vec<String> {
        let ifs = self.attachments();
        ifs.into_iter()
            .filter_map(|i| self.detach_links(i).err().map(|e| format!("{e:#}")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip() {
        for hook in Hook::BOTH {
            let n = hook.link_name(42);
            assert!(is_link_name(&n));
            assert_eq!(parse_link_name(&n), Some((42, hook)));
        }
        assert_eq!(Hook::From.link_name(7), "policy-7-from");
        assert_eq!(Hook::To.link_name(7), "policy-7-to");
        for bad in [
            "policy-0-from",
            "policy-x-to",
            "policy-7-sideways",
            "policy-07-to",
            "default_web",
        ] {
            assert_eq!(parse_link_name(bad), None, "{bad}");
        }
        assert!(!is_link_name("default_web-1"));
    }
}
