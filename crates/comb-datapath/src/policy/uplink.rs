//! The node uplink program (`bpf/uplink.c`): HBONE inbound. One tcx ingress link per uplink
//! interface of the node (in the node's network namespace, never the machine's root one),
//! pinned as `<pin_dir>/links/uplink-<ifindex>` and adopted by the next agent like the policy
//! links. The program shares `comb_proxy_listeners` and the mesh maps with `bpf/policy.c`
//! through their pins.

use std::collections::BTreeMap;
use std::fs;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::MutexGuard;

use anyhow::{Context, Result, ensure};
use libbpf_rs::{ProgramHandle, libbpf_sys};
use tracing::{debug, info, warn};

use super::Policy;
use crate::pin::{load_pinned, remove_pin};
use crate::skel::uplink::UplinkSkelBuilder;
use crate::sys;

pub(crate) const PROG_UPLINK: &str = "comb_uplink_ingress";
const LINK_PREFIX: &str = "uplink-";

/// True for a pin name under `links/` that belongs to the uplink program.
pub(crate) fn is_link_name(name: &str) -> bool {
    name.starts_with(LINK_PREFIX)
}

fn link_name(ifindex: u32) -> String {
    format!("{LINK_PREFIX}{ifindex}")
}

fn parse_link_name(name: &str) -> Option<u32> {
    let idx = name.strip_prefix(LINK_PREFIX)?;
    let ifindex: u32 = idx.parse().ok().filter(|&i| i != 0)?;
    (ifindex.to_string() == idx).then_some(ifindex)
}

/// Load `bpf/uplink.c` against the maps pinned under `<pin_dir>/maps/` (the policy object
/// pinned them first) and pin its program under `<pin_dir>/progs/`.
pub(super) fn load(pin_dir: &Path) -> Result<ProgramHandle> {
    let mut storage = MaybeUninit::uninit();
    let skel = load_pinned(
        UplinkSkelBuilder::default(),
        &mut storage,
        &pin_dir.join("maps"),
        "uplink",
    )?;
    let prog = ProgramHandle::try_from(&skel.progs.comb_uplink_ingress)
        .context("program comb_uplink_ingress")?;
    let path = pin_dir.join("progs").join(PROG_UPLINK);
    remove_pin(&path)?;
    prog.pin(&path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(prog)
}

fn detach_link(fd: &OwnedFd, name: &str) {
    if let Err(e) = sys::link_detach(fd.as_fd()) {
        debug!(name, error = %e, "detaching uplink link");
    }
}

impl Policy {
    fn uplink_links(&self) -> MutexGuard<'_, BTreeMap<u32, OwnedFd>> {
        self.uplinks.lock().expect("uplink links lock poisoned")
    }

    /// Attach the uplink program to tcx ingress of `ifindex` (an interface of the calling
    /// thread's network namespace: the node's, never the machine's root namespace).
    /// Idempotent: an attached link is switched to the current program.
    pub fn attach_uplink(&self, ifindex: u32) -> Result<()> {
        ensure!(ifindex != 0, "ifindex 0 names no interface");
        let mut links = self.uplink_links();
        let name = link_name(ifindex);
        if let Some(fd) = links.get(&ifindex) {
            if sys::link_update(fd.as_fd(), self.uplink.as_fd()).is_ok() {
                return Ok(());
            }
            if let Some(fd) = links.remove(&ifindex) {
                detach_link(&fd, &name);
            }
        }
        let fd = sys::link_create_tcx(self.uplink.as_fd(), ifindex, libbpf_sys::BPF_TCX_INGRESS)
            .with_context(|| format!("attaching the uplink program to ifindex {ifindex}"))?;
        let pin = self.pin_dir.join("links").join(&name);
        remove_pin(&pin)?;
        if let Err(e) = sys::obj_pin(fd.as_fd(), &pin) {
            detach_link(&fd, &name);
            return Err(e).with_context(|| format!("pinning {}", pin.display()));
        }
        links.insert(ifindex, fd);
        info!(ifindex, "uplink program attached");
        Ok(())
    }

    /// Detach the uplink program from `ifindex` and remove its pin; an interface that is
    /// gone is fine.
    pub fn detach_uplink(&self, ifindex: u32) -> Result<()> {
        let name = link_name(ifindex);
        let pin = self.pin_dir.join("links").join(&name);
        match self.uplink_links().remove(&ifindex) {
            Some(fd) => detach_link(&fd, &name),
            None => {
                if let Ok(fd) = sys::obj_get(&pin) {
                    detach_link(&fd, &name);
                }
            }
        }
        remove_pin(&pin)?;
        info!(ifindex, "uplink program detached");
        Ok(())
    }

    /// The ifindexes with the uplink program attached.
    pub fn uplinks(&self) -> Vec<u32> {
        self.uplink_links().keys().copied().collect()
    }

    /// Take over uplink links pinned by a previous agent; drop defunct ones.
    pub(crate) fn adopt_uplinks(&mut self) -> Result<()> {
        let dir = self.pin_dir.join("links");
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(ifindex) = parse_link_name(&name) else {
                continue;
            };
            let path = entry.path();
            let fd = sys::obj_get(&path)
                .with_context(|| format!("opening pinned link {}", path.display()))?;
            let alive = matches!(sys::link_tcx(fd.as_fd()),
                Ok((i, t)) if i == ifindex && t == libbpf_sys::BPF_TCX_INGRESS);
            if !alive || sys::link_update(fd.as_fd(), self.uplink.as_fd()).is_err() {
                warn!(
                    name,
                    "pinned uplink link is defunct (interface gone?), removing it"
                );
                detach_link(&fd, &name);
                remove_pin(&path)?;
                continue;
            }
            debug!(name, "adopted pinned uplink link");
            self.uplinks
                .get_mut()
                .expect("uplink links lock poisoned")
                .insert(ifindex, fd);
        }
        Ok(())
    }

    /// Detach every uplink link (shutdown without pins); returns the errors.
    pub(crate) fn detach_all_uplinks(&self) -> Vec<String> {
        self.uplinks()
            .into_iter()
            .filter_map(|i| self.detach_uplink(i).err().map(|e| format!("{e:#}")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip() {
        assert_eq!(link_name(7), "uplink-7");
        assert!(is_link_name("uplink-7"));
        assert_eq!(parse_link_name("uplink-7"), Some(7));
        for bad in ["uplink-0", "uplink-07", "uplink-x", "policy-7-from", "a_b"] {
            assert_eq!(parse_link_name(bad), None, "{bad}");
        }
        assert!(!super::super::links::is_link_name("uplink-7"));
    }

    #[test]
    fn program_name_matches_the_object() {
        let mut storage = MaybeUninit::uninit();
        let (progs, mut maps) =
            crate::pin::object_names(UplinkSkelBuilder::default(), &mut storage);
        assert_eq!(progs, [PROG_UPLINK]);
        use super::super::abi::*;
        let mut want = [MAP_PROXY_LISTENERS, MAP_MESH_ADDRS, MAP_MESH_PORTS];
        want.sort();
        maps.retain(|m| !m.starts_with('.'));
        assert_eq!(maps, want);
    }
}
