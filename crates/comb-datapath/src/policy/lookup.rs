//! The proxy lookup program (`bpf/proxy_lookup.c`): the sk_lookup program of the node's
//! network namespace that hands the SYNs the policy and uplink programs marked for the node
//! proxy to the proxy's listeners, after the kernel's established and TIME_WAIT lookup. One
//! link per namespace, pinned as `<pin_dir>/links/proxy-lookup` and adopted (switched to the
//! new program) by the next agent, so redirection keeps working across a restart. It shares
//! `comb_ct`, `comb_proxy_listeners` and `comb_mesh_addrs` with `bpf/policy.c` through their
//! pins.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::MutexGuard;

use anyhow::{Context, Result};
use libbpf_rs::{ProgramHandle, libbpf_sys};
use tracing::{debug, info, warn};

use super::Policy;
use crate::pin::{load_pinned, remove_pin};
use crate::skel::proxy_lookup::ProxyLookupSkelBuilder;
use crate::sys;

pub(crate) const PROG_LOOKUP: &str = "comb_proxy_lookup";
pub(crate) const LINK_NAME: &str = "proxy-lookup";

/// The calling thread's network namespace (the node's: the agent runs in it).
fn own_netns() -> Result<(File, u64)> {
    let path = "/proc/thread-self/ns/net";
    let f = File::open(path).with_context(|| format!("opening {path}"))?;
    let ino = f.metadata().with_context(|| format!("stat {path}"))?.ino();
    Ok((f, ino))
}

/// Load `bpf/proxy_lookup.c` against the maps pinned under `<pin_dir>/maps/` (the policy
/// object pinned them first) and pin its program under `<pin_dir>/progs/`.
pub(super) fn load(pin_dir: &Path) -> Result<ProgramHandle> {
    let mut storage = MaybeUninit::uninit();
    let skel = load_pinned(
        ProxyLookupSkelBuilder::default(),
        &mut storage,
        &pin_dir.join("maps"),
        "proxy_lookup",
    )?;
    let prog = ProgramHandle::try_from(&skel.progs.comb_proxy_lookup)
        .context("program comb_proxy_lookup")?;
    let path = pin_dir.join("progs").join(PROG_LOOKUP);
    remove_pin(&path)?;
    prog.pin(&path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(prog)
}

fn detach_link(fd: &OwnedFd) {
    if let Err(e) = sys::link_detach(fd.as_fd()) {
        debug!(error = %e, "detaching the proxy lookup link");
    }
}

impl Policy {
    fn lookup_link(&self) -> MutexGuard<'_, Option<OwnedFd>> {
        self.lookup_link
            .lock()
            .expect("proxy lookup link lock poisoned")
    }

    /// Attach the proxy lookup program to the calling thread's network namespace (the
    /// node's, never the machine's root one: the caller decides). Idempotent: an attached
    /// link is switched to the current program.
    pub fn attach_proxy_lookup(&self) -> Result<()> {
        let mut link = self.lookup_link();
        if let Some(fd) = link.as_ref() {
            if sys::link_update(fd.as_fd(), self.lookup.as_fd()).is_ok() {
                return Ok(());
            }
            if let Some(fd) = link.take() {
                detach_link(&fd);
            }
        }
        let (ns, _) = own_netns()?;
        let fd = sys::link_create(self.lookup.as_fd(), ns.as_fd(), libbpf_sys::BPF_SK_LOOKUP)
            .context("attaching the proxy lookup program (sk_lookup) to the node's namespace")?;
        let pin = self.pin_dir.join("links").join(LINK_NAME);
        remove_pin(&pin)?;
        if let Err(e) = sys::obj_pin(fd.as_fd(), &pin) {
            detach_link(&fd);
            return Err(e).with_context(|| format!("pinning {}", pin.display()));
        }
        *link = Some(fd);
        info!("proxy lookup program attached (sk_lookup)");
        Ok(())
    }

    /// Whether the proxy lookup program is attached.
    pub fn proxy_lookup_attached(&self) -> bool {
        self.lookup_link().is_some()
    }

    /// Detach the proxy lookup program and remove its pin.
    pub fn detach_proxy_lookup(&self) -> Result<()> {
        let pin = self.pin_dir.join("links").join(LINK_NAME);
        match self.lookup_link().take() {
            Some(fd) => detach_link(&fd),
            None => {
                if let Ok(fd) = sys::obj_get(&pin) {
                    detach_link(&fd);
                }
            }
        }
        remove_pin(&pin)
    }

    /// Take over the link a previous agent pinned, switched to this program; a link whose
    /// namespace is not the calling thread's (or gone) is dropped.
    pub(crate) fn adopt_proxy_lookup(&mut self) -> Result<()> {
        let pin = self.pin_dir.join("links").join(LINK_NAME);
        if !pin.exists() {
            return Ok(());
        }
        let fd =
            sys::obj_get(&pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
        let (_, own) = own_netns()?;
        let alive = matches!(sys::link_netns(fd.as_fd()),
            Ok((ino, t)) if u64::from(ino) == own && t == libbpf_sys::BPF_SK_LOOKUP);
        if !alive || sys::link_update(fd.as_fd(), self.lookup.as_fd()).is_err() {
            warn!("pinned proxy lookup link is defunct (another namespace?), removing it");
            detach_link(&fd);
            return remove_pin(&pin);
        }
        debug!("adopted the pinned proxy lookup link");
        *self
            .lookup_link
            .get_mut()
            .expect("proxy lookup link lock poisoned") = Some(fd);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_and_maps_match_the_object() {
        let mut storage = MaybeUninit::uninit();
        let (progs, mut maps) =
            crate::pin::object_names(ProxyLookupSkelBuilder::default(), &mut storage);
        assert_eq!(progs, [PROG_LOOKUP]);
        use super::super::abi::*;
        let mut want = [MAP_CT, MAP_PROXY_LISTENERS, MAP_MESH_ADDRS, MAP_MESH_PORTS];
        want.sort();
        maps.retain(|m| !m.starts_with('.'));
        assert_eq!(maps, want);
    }

    #[test]
    fn link_name_is_reserved() {
        assert!(super::super::is_link_name(LINK_NAME));
        assert!(!super::super::links::is_link_name(LINK_NAME));
        assert!(!super::super::uplink::is_link_name(LINK_NAME));
    }
}
