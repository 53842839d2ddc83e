//! The socket load balancer (`bpf/lb_sock.c`): Service VIP:port → one backend at connect() /
//! sendmsg() time, in the cgroup sock_addr hooks.
//!
//! Update protocol (see the header of `bpf/lb_sock.c`): a Service's backends (and Maglev table)
//! are written under a new version, then the service entry is flipped to that version with one
//! map update, then the old version's entries are deleted. A BPF reader that finds its version
//! retired reads the service entry again. Service ids are allocated here (smallest free id) and
//! stored in the service entries, so an agent that adopts the pinned maps finds them.

#[allow(unsafe_code)] // unsafe impl Pod
pub mod abi;
mod update;

use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, ensure};
use libbpf_rs::{MapCore, MapFlags, MapHandle, ProgramHandle, libbpf_sys};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::abi::Pod;
use crate::cgroup;
use crate::map_io::delete_if_present;
use crate::pin::{load_pinned, map_handle, remove_pin};
use crate::skel::lb::LbSockSkelBuilder;
use crate::sys;
use abi::{COMB_LB_CFG_F_HOST_ONLY, LbConfigValue, LbStatsValue, SvcKey};
use update::{IdAlloc, LbMap, LbStore};

/// Most backends one Service may have.
pub const MAX_BACKENDS_PER_SERVICE: usize = 65535;

/// One Service as the socket LB holds it: the pipeline's desired entry, defined once in the
/// model.
pub use comb_model::lb::LbService;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SocketLbMode {
    /// Translate every socket in the cgroup.
    All,
    /// Translate only sockets of the node's own network namespace (that of the process calling
    /// `attach_socket_lb`).
    HostOnly,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbStats {
    pub connects_translated: u64,
    pub sendmsgs_translated: u64,
    pub replies_reversed: u64,
    pub refused_no_backend: u64,
    pub affinity_hits: u64,
    /// A BPF reader found the backend set it read retired meanwhile and read the service again.
    #[serde(default)]
    pub version_retries: u64,
    /// Reverse-NAT entries that could not be written.
    #[serde(default)]
    pub revnat_failures: u64,
}

/// One cgroup hook: program name, link pin name (under `links/`), attach type.
pub(crate) const HOOKS: [(&str, &str, libbpf_sys::bpf_attach_type); 8] = [
    (
        "comb_lb_connect4",
        "lb-connect4",
        libbpf_sys::BPF_CGROUP_INET4_CONNECT,
    ),
    (
        "comb_lb_connect6",
        "lb-connect6",
        libbpf_sys::BPF_CGROUP_INET6_CONNECT,
    ),
    (
        "comb_lb_sendmsg4",
        "lb-sendmsg4",
        libbpf_sys::BPF_CGROUP_UDP4_SENDMSG,
    ),
    (
        "comb_lb_sendmsg6",
        "lb-sendmsg6",
        libbpf_sys::BPF_CGROUP_UDP6_SENDMSG,
    ),
    (
        "comb_lb_recvmsg4",
        "lb-recvmsg4",
        libbpf_sys::BPF_CGROUP_UDP4_RECVMSG,
    ),
    (
        "comb_lb_recvmsg6",
        "lb-recvmsg6",
        libbpf_sys::BPF_CGROUP_UDP6_RECVMSG,
    ),
    (
        "comb_lb_getpeername4",
        "lb-getpeername4",
        libbpf_sys::BPF_CGROUP_INET4_GETPEERNAME,
    ),
    (
        "comb_lb_getpeername6",
        "lb-getpeername6",
        libbpf_sys::BPF_CGROUP_INET6_GETPEERNAME,
    ),
];

/// True for a pin name under `links/` that belongs to the socket LB. Pod link ids are
/// `<namespace>_<pod>` and always contain `_`; these never do.
pub(crate) fn is_link_name(name: &str) -> bool {
    HOOKS.iter().any(|(_, n, _)| *n == name)
}

/// The socket LB feature of [`crate::Datapath`]: its maps, the 8 programs and their cgroup
/// links.
pub struct SocketLb {
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
    services: MapHandle,
    backends: MapHandle,
    maglev: MapHandle,
    config: MapHandle,
    stats: MapHandle,
    /// In HOOKS order.
    progs: Vec<ProgramHandle>,
    ids: Mutex<IdAlloc>,
    /// Behind a lock of its own so every method takes `&self`: the agent's writer attaches
    /// while readers ask where it is attached.
    attached: Mutex<Option<LbAttachment>>,
}

struct LbAttachment {
    /// As given to `attach_socket_lb` ("/" = the cgroup root); empty when an adopted link's
    /// cgroup could not be found.
    cgroup: PathBuf,
    mode: SocketLbMode,
    /// In HOOKS order.
    links: Vec<OwnedFd>,
}

impl LbStore for SocketLb {
    fn get(&self, map: LbMap, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.map(map).lookup(key, MapFlags::ANY)?)
    }
    fn put(&self, map: LbMap, key: &[u8], value: &[u8]) -> Result<()> {
        Ok(self.map(map).update(key, value, MapFlags::ANY)?)
    }
    fn del(&self, map: LbMap, key: &[u8]) -> Result<()> {
        Ok(delete_if_present(self.map(map), key)?)
    }
    fn keys(&self, map: LbMap) -> Result<Vec<Vec<u8>>> {
        Ok(self.map(map).keys().collect())
    }
}

impl SocketLb {
    /// Load `bpf/lb_sock.c` with its maps pinned (or adopted) under `<pin_dir>/maps/` and its
    /// programs pinned under `<pin_dir>/progs/`. Pinned links and services are adopted by
    /// [`Self::adopt`].
    pub(crate) fn load(pin_dir: &Path, cgroup_root: &Path) -> Result<Self> {
        let maps_dir = pin_dir.join("maps");
        let mut storage = MaybeUninit::uninit();
        let skel = load_pinned(
            LbSockSkelBuilder::default(),
            &mut storage,
            &maps_dir,
            "socket-LB",
        )?;
        let sp = &skel.progs;
        // In HOOKS order (checked by a unit test).
        let ours = [
            &sp.comb_lb_connect4,
            &sp.comb_lb_connect6,
            &sp.comb_lb_sendmsg4,
            &sp.comb_lb_sendmsg6,
            &sp.comb_lb_recvmsg4,
            &sp.comb_lb_recvmsg6,
            &sp.comb_lb_getpeername4,
            &sp.comb_lb_getpeername6,
        ];
        let mut progs = Vec::with_capacity(HOOKS.len());
        for ((name, _, _), p) in HOOKS.iter().zip(ours) {
            ensure!(
                p.name() == *name,
                "program {:?} where {name} was expected",
                p.name()
            );
            let h = ProgramHandle::try_from(p).with_context(|| format!("program {name}"))?;
            let path = pin_dir.join("progs").join(name);
            remove_pin(&path)?;
            h.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
            progs.push(h);
        }
        Ok(SocketLb {
            pin_dir: pin_dir.to_owned(),
            cgroup_root: cgroup_root.to_owned(),
            services: map_handle(&skel.maps.comb_lb_services)?,
            backends: map_handle(&skel.maps.comb_lb_backends)?,
            maglev: map_handle(&skel.maps.comb_lb_maglev)?,
            config: map_handle(&skel.maps.comb_lb_config)?,
            stats: map_handle(&skel.maps.comb_lb_stats)?,
            progs,
            ids: Mutex::new(IdAlloc::default()),
            attached: Mutex::new(None),
        })
    }

    /// Take over what a previous agent left: its links (switched to our programs) and its
    /// services (their ids; entries of unfinished updates are deleted).
    pub(crate) fn adopt(&mut self) -> Result<()> {
        self.adopt_links()?;
        let ids = update::adopt(self).context("adopting socket-LB services")?;
        *self.lock() = ids;
        Ok(())
    }

    fn map(&self, map: LbMap) -> &MapHandle {
        match map {
            LbMap::Services => &self.services,
            LbMap::Backends => &self.backends,
            LbMap::Maglev => &self.maglev,
        }
    }

    fn lock(&self) -> MutexGuard<'_, IdAlloc> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_config(&self) -> Result<LbConfigValue> {
        Ok(self
            .config
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .and_then(|v| LbConfigValue::from_bytes(&v))
            .unwrap_or_default())
    }

    fn write_config(&self, mode: SocketLbMode) -> Result<()> {
        let cfg = LbConfigValue {
            flags: match mode {
                SocketLbMode::All => 0,
                SocketLbMode::HostOnly => COMB_LB_CFG_F_HOST_ONLY,
            },
            reserved: 0,
            host_netns_cookie: sys::netns_cookie().context("reading our netns cookie")?,
        };
        self.config
            .update(&0u32.to_ne_bytes(), cfg.as_bytes(), MapFlags::ANY)
            .context("updating comb_lb_config")
    }

    /// Take over LB links pinned by a previous agent (all or none) and switch them to our
    /// programs.
    fn adopt_links(&mut self) -> Result<()> {
        let (pin_dir, cgroup_root) = (self.pin_dir.clone(), self.cgroup_root.clone());
        let dir = pin_dir.join("links");
        let mut links = Vec::new();
        let mut cg_id = None;
        for ((_, name, _), prog) in HOOKS.iter().zip(&self.progs) {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let fd = sys::obj_get(&path)
                .with_context(|| format!("opening pinned link {}", path.display()))?;
            let alive = sys::link_cgroup_id(fd.as_fd()).ok().filter(|&id| id != 0);
            if alive.is_none() || sys::link_update(fd.as_fd(), prog.as_fd()).is_err() {
                warn!(name, "pinned socket-LB link is defunct, removing it");
                remove_pin(&path)?;
                continue;
            }
            cg_id = alive;
            links.push(fd);
        }
        if links.is_empty() {
            return Ok(());
        }
        if links.len() != HOOKS.len() {
            // A partial set would translate without reversing: drop it, the agent re-attaches.
            warn!(
                found = links.len(),
                "incomplete set of socket-LB links, detaching them"
            );
            for (_, name, _) in HOOKS {
                let _ = remove_pin(&dir.join(name));
            }
            for l in &links {
                let _ = sys::link_detach(l.as_fd());
            }
            return Ok(());
        }
        let cgroup = cg_id
            .and_then(|id| {
                if cgroup::id_of(&cgroup_root)? == id {
                    Some(PathBuf::from("/"))
                } else {
                    cgroup::find(&cgroup_root, id)
                }
            })
            .unwrap_or_default();
        let mode = if self.read_config()?.flags & COMB_LB_CFG_F_HOST_ONLY != 0 {
            SocketLbMode::HostOnly
        } else {
            SocketLbMode::All
        };
        debug!(cgroup = %cgroup.display(), ?mode, "adopted socket-LB links");
        *self
            .attached
            .get_mut()
            .expect("lb attachment lock poisoned") = Some(LbAttachment {
            cgroup,
            mode,
            links,
        });
        Ok(())
    }

    /// Detach the 8 programs and remove their link pins. Not attached is fine.
    pub fn detach(&self) -> Result<()> {
        let mut errors = Vec::new();
        for (_, name, _) in HOOKS {
            if let Err(e) = remove_pin(&self.pin_dir.join("links").join(name)) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Some(a) = self.attachment_lock().take() {
            for l in &a.links {
                match sys::link_detach(l.as_fd()) {
                    Err(e) if e.raw_os_error() != Some(libc::ENOLINK) => {
                        errors.push(format!("detaching socket-LB link: {e}"))
                    }
                    _ => {}
                }
            }
        }
        ensure!(errors.is_empty(), "{}", errors.join("; "));
        Ok(())
    }
}

/// `cgroup_rel` for the socket LB: a path strictly below the root, or exactly "/" for the root.
fn resolve_cgroup(root: &Path, rel: &Path) -> Result<PathBuf> {
    if rel == Path::new("/") {
        return Ok(root.to_path_buf());
    }
    cgroup::validate_rel(rel)?;
    Ok(root.join(rel))
}

impl SocketLb {
    /// Create or update a Service, glitch-free: connects never see a partial backend set. An
    /// empty backend list is a valid Service whose connects are refused (ECONNREFUSED).
    pub fn upsert_service(&self, svc: &LbService) -> Result<()> {
        let mut ids = self.lock();
        update::upsert(self, &mut ids, svc)
    }

    /// Remove a Service; missing is fine.
    pub fn remove_service(&self, vip: IpAddr, port: u16, protocol: u8) -> Result<()> {
        let mut ids = self.lock();
        update::remove(self, &mut ids, SvcKey::new(vip, port, protocol))
            .with_context(|| format!("removing service {vip}:{port}/{protocol}"))
    }

    /// The Services in the maps, sorted by (vip, port, protocol).
    pub fn services(&self) -> Result<Vec<LbService>> {
        let _ids = self.lock();
        update::read_all(self)
    }

    /// Attach the 8 socket-LB programs to `cgroup_rel` (relative to the cgroup root; "/" is the
    /// root itself), links pinned under `<pin_dir>/links/lb-*`. Idempotent; moving to another
    /// cgroup attaches there before detaching the old one.
    pub fn attach(&self, cgroup_rel: &Path, mode: SocketLbMode) -> Result<()> {
        let cg_path = resolve_cgroup(&self.cgroup_root, cgroup_rel)?;
        let mut attached = self.attachment_lock();
        self.write_config(mode)?;
        if let Some(a) = attached.as_mut()
            && a.cgroup == cgroup_rel
        {
            for (l, p) in a.links.iter().zip(&self.progs) {
                sys::link_update(l.as_fd(), p.as_fd()).context("updating socket-LB link")?;
            }
            a.mode = mode;
            return Ok(());
        }
        let cg = cgroup::open_dir(&cg_path)?;
        // All links first; unpinned links go away when dropped on error.
        let mut links = Vec::with_capacity(HOOKS.len());
        for ((prog_name, _, attach), prog) in HOOKS.iter().zip(&self.progs) {
            links.push(
                sys::link_create(prog.as_fd(), cg.as_fd(), *attach)
                    .with_context(|| format!("attaching {prog_name} to {}", cg_path.display()))?,
            );
        }
        let dir = self.pin_dir.join("links");
        for ((_, name, _), l) in HOOKS.iter().zip(&links) {
            let pin = dir.join(name);
            remove_pin(&pin)?;
            sys::obj_pin(l.as_fd(), &pin).with_context(|| format!("pinning {}", pin.display()))?;
        }
        if let Some(old) = attached.replace(LbAttachment {
            cgroup: cgroup_rel.to_path_buf(),
            mode,
            links,
        }) {
            for l in &old.links {
                let _ = sys::link_detach(l.as_fd());
            }
        }
        info!(cgroup = %cgroup_rel.display(), ?mode, "socket LB attached");
        Ok(())
    }

    /// Where the programs are attached ("/" = the cgroup root; empty when an adopted link's
    /// cgroup could not be found), and how.
    pub fn attachment(&self) -> Option<(PathBuf, SocketLbMode)> {
        self.attachment_lock()
            .as_ref()
            .map(|a| (a.cgroup.clone(), a.mode))
    }

    fn attachment_lock(&self) -> MutexGuard<'_, Option<LbAttachment>> {
        self.attached.lock().expect("lb attachment lock poisoned")
    }

    pub fn stats(&self) -> Result<LbStats> {
        let mut sum = LbStatsValue::default();
        let per_cpu = self
            .stats
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .unwrap_or_default();
        for v in per_cpu {
            sum += LbStatsValue::from_bytes(&v)
                .context("comb_lb_stats value has an unexpected size")?;
        }
        Ok(LbStats {
            connects_translated: sum.connects_translated,
            sendmsgs_translated: sum.sendmsgs_translated,
            replies_reversed: sum.replies_reversed,
            refused_no_backend: sum.refused_no_backend,
            affinity_hits: sum.affinity_hits,
            version_retries: sum.version_retries,
            revnat_failures: sum.revnat_failures,
        })
    }
}

/// The network namespace cookie of the calling thread (SO_NETNS_COOKIE), as BPF's
/// `bpf_get_netns_cookie` reports it for sockets of that namespace.
pub fn current_netns_cookie() -> Result<u64> {
    Ok(sys::netns_cookie()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lb_link_names_never_collide_with_pod_ids() {
        for (_, name, _) in HOOKS {
            assert!(is_link_name(name));
            assert!(!name.contains('_'), "pod link ids are <ns>_<pod>");
        }
        assert!(!is_link_name("lb-x_pod"));
    }

    #[test]
    fn cgroup_root_only_when_explicit() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(resolve_cgroup(root, Path::new("/")).unwrap(), root);
        assert_eq!(
            resolve_cgroup(root, Path::new("kubepods")).unwrap(),
            root.join("kubepods")
        );
        for bad in ["", "/sys/fs/cgroup", "..", "a/../..", "./"] {
            assert!(resolve_cgroup(root, Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hooks_match_the_object() {
        let mut storage = MaybeUninit::uninit();
        let (progs, maps) = crate::pin::object_names(LbSockSkelBuilder::default(), &mut storage);
        let mut want: Vec<String> = HOOKS.iter().map(|h| h.0.to_string()).collect();
        want.sort();
        assert_eq!(progs, want);
        use abi::*;
        let mut want = vec![
            MAP_LB_SERVICES,
            MAP_LB_BACKENDS,
            MAP_LB_MAGLEV,
            MAP_LB_AFFINITY,
            MAP_LB_REVNAT,
            MAP_LB_CONFIG,
            MAP_LB_STATS,
        ];
        want.sort();
        assert_eq!(maps, want);
    }
}
