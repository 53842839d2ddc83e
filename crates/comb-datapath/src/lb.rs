//! Socket load balancing (`bpf/sock.c`): Service VIP:port → one backend at connect() /
//! sendmsg() time, in the cgroup sock_addr hooks.
//!
//! Update protocol (see the header of `bpf/sock.c`): a Service's backends (and Maglev table)
//! are written under a new version, then the service entry is flipped to that version with one
//! map update, then the old version's entries are deleted. A BPF reader that finds its version
//! retired reads the service entry again. Service ids are allocated here (smallest free id) and
//! stored in the service entries, so an agent that adopts the pinned maps finds them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use libbpf_rs::{MapCore, MapFlags, MapHandle, ProgramHandle, libbpf_sys};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::Datapath;
use crate::lb_maps::{
    BackendKey, BackendValue, COMB_LB_CFG_F_HOST_ONLY, COMB_LB_F_AFFINITY, COMB_LB_F_MAGLEV,
    COMB_LB_MAX_SERVICES, LbConfigValue, LbStatsValue, MAGLEV_M, MaglevKey, SvcKey, SvcValue,
    maglev_value_bytes,
};
use crate::maps::Pod;
use crate::sys;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Most backends one Service may have.
pub const MAX_BACKENDS_PER_SERVICE: usize = 65535;

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
pub(crate) fn is_lb_link_name(name: &str) -> bool {
    HOOKS.iter().any(|(_, n, _)| *n == name)
}

/// The maps an update touches, abstracted so the protocol is unit-tested against a fake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum LbMap {
    Services,
    Backends,
    Maglev,
}

pub(crate) trait LbStore {
    fn get(&self, map: LbMap, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn put(&self, map: LbMap, key: &[u8], value: &[u8]) -> Result<()>;
    /// Deleting a missing key is not an error.
    fn del(&self, map: LbMap, key: &[u8]) -> Result<()>;
    fn keys(&self, map: LbMap) -> Result<Vec<Vec<u8>>>;
}

/// Service ids in use; new ones are the smallest free id ≥ 1.
#[derive(Debug, Default, Clone)]
pub(crate) struct IdAlloc {
    used: BTreeSet<u32>,
}

impl IdAlloc {
    pub(crate) fn alloc(&mut self) -> Result<u32> {
        let mut want = 1u32;
        for &u in self.used.range(1..) {
            if u != want {
                break;
            }
            want += 1;
        }
        ensure!(
            want <= COMB_LB_MAX_SERVICES,
            "no free service id ({} services)",
            self.used.len()
        );
        self.used.insert(want);
        Ok(want)
    }

    pub(crate) fn mark(&mut self, id: u32) {
        self.used.insert(id);
    }

    pub(crate) fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// The next version of a backend set; never 0 (0 is never live).
pub(crate) fn next_version(v: u32) -> u32 {
    match v.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

fn validate(svc: &LbService) -> Result<()> {
    ensure!(
        svc.protocol == IPPROTO_TCP || svc.protocol == IPPROTO_UDP,
        "service {}:{}: protocol {} is not TCP (6) or UDP (17)",
        svc.vip,
        svc.port,
        svc.protocol
    );
    ensure!(
        svc.backends.len() <= MAX_BACKENDS_PER_SERVICE,
        "service {}:{}: {} backends (at most {MAX_BACKENDS_PER_SERVICE})",
        svc.vip,
        svc.port,
        svc.backends.len()
    );
    let v4 = |ip: &IpAddr| crate::maps::CombAddr::from(*ip).ip().is_ipv4();
    for (ip, port) in &svc.backends {
        ensure!(
            v4(ip) == v4(&svc.vip),
            "service {}:{}: backend {ip}:{port} is of another address family",
            svc.vip,
            svc.port
        );
    }
    Ok(())
}

fn decode<T: Pod>(b: &[u8], what: &str) -> Result<T> {
    T::from_bytes(b).with_context(|| format!("{what} has an unexpected size"))
}

/// Write `svc` under a new version, flip, retire the old version (see the module docs).
pub(crate) fn upsert(store: &dyn LbStore, ids: &mut IdAlloc, svc: &LbService) -> Result<()> {
    validate(svc)?;
    let key = SvcKey::new(svc.vip, svc.port, svc.protocol);
    let old: Option<SvcValue> = store
        .get(LbMap::Services, key.as_bytes())?
        .map(|v| decode(&v, "service entry"))
        .transpose()?;
    let (id, version, fresh) = match old {
        Some(o) => (o.id, next_version(o.version), false),
        None => (ids.alloc()?, 1, true),
    };
    let maglev = svc.maglev && !svc.backends.is_empty();
    let value = SvcValue {
        id,
        version,
        count: svc.backends.len() as u32,
        flags: if svc.maglev { COMB_LB_F_MAGLEV } else { 0 }
            | if svc.affinity_timeout_secs > 0 {
                COMB_LB_F_AFFINITY
            } else {
                0
            },
        affinity_timeout_secs: svc.affinity_timeout_secs,
        reserved: [0; 3],
    };

    // 1. The new version, invisible to readers until the flip.
    let written = write_version(store, id, version, svc, maglev);
    // 2. The flip.
    let flipped =
        written.and_then(|()| store.put(LbMap::Services, key.as_bytes(), value.as_bytes()));
    if let Err(e) = flipped {
        // Readers still use the old version (or see no service): undo what we wrote.
        delete_version(store, id, version, svc.backends.len() as u32, maglev);
        if fresh {
            ids.free(id);
        }
        return Err(e).with_context(|| format!("writing service {}:{}", svc.vip, svc.port));
    }
    // 3. Retire the old version.
    if let Some(o) = old {
        retire(store, &o)?;
    }
    Ok(())
}

fn write_version(
    store: &dyn LbStore,
    id: u32,
    version: u32,
    svc: &LbService,
    maglev: bool,
) -> Result<()> {
    for (i, (ip, port)) in svc.backends.iter().enumerate() {
        let k = BackendKey {
            svc_id: id,
            version,
            index: i as u32,
        };
        store.put(
            LbMap::Backends,
            k.as_bytes(),
            BackendValue::new(*ip, *port).as_bytes(),
        )?;
    }
    if maglev {
        let table = comb_model::maglev::table(&svc.backends, MAGLEV_M);
        let k = MaglevKey {
            svc_id: id,
            version,
        };
        store.put(LbMap::Maglev, k.as_bytes(), &maglev_value_bytes(&table))?;
    }
    Ok(())
}

/// Best effort: errors are logged (a leftover is collected at the next load).
fn delete_version(store: &dyn LbStore, id: u32, version: u32, count: u32, maglev: bool) {
    for index in 0..count {
        let k = BackendKey {
            svc_id: id,
            version,
            index,
        };
        if let Err(e) = store.del(LbMap::Backends, k.as_bytes()) {
            warn!(id, version, index, "deleting backend entry: {e:#}");
        }
    }
    if maglev {
        let k = MaglevKey {
            svc_id: id,
            version,
        };
        if let Err(e) = store.del(LbMap::Maglev, k.as_bytes()) {
            warn!(id, version, "deleting Maglev table: {e:#}");
        }
    }
}

fn retire(store: &dyn LbStore, old: &SvcValue) -> Result<()> {
    delete_version(
        store,
        old.id,
        old.version,
        old.count,
        old.flags & COMB_LB_F_MAGLEV != 0,
    );
    Ok(())
}

pub(crate) fn remove(store: &dyn LbStore, ids: &mut IdAlloc, key: SvcKey) -> Result<()> {
    let Some(old) = store.get(LbMap::Services, key.as_bytes())? else {
        return Ok(());
    };
    let old: SvcValue = decode(&old, "service entry")?;
    // The entry first: from now on no reader looks at the backends.
    store.del(LbMap::Services, key.as_bytes())?;
    retire(store, &old)?;
    ids.free(old.id);
    Ok(())
}

pub(crate) fn read_all(store: &dyn LbStore) -> Result<Vec<LbService>> {
    let mut out = Vec::new();
    for k in store.keys(LbMap::Services)? {
        let Some(v) = store.get(LbMap::Services, &k)? else {
            continue;
        };
        let (k, v): (SvcKey, SvcValue) = (decode(&k, "service key")?, decode(&v, "service entry")?);
        let mut backends = Vec::with_capacity(v.count as usize);
        for index in 0..v.count {
            let bk = BackendKey {
                svc_id: v.id,
                version: v.version,
                index,
            };
            let b: BackendValue = match store.get(LbMap::Backends, bk.as_bytes())? {
                Some(b) => decode(&b, "backend entry")?,
                None => bail!(
                    "service {}:{} (id {}, version {}) lacks backend {index}",
                    k.vip.ip(),
                    k.port,
                    v.id,
                    v.version
                ),
            };
            backends.push((b.ip.ip(), b.port));
        }
        out.push(LbService {
            vip: k.vip.ip(),
            port: k.port,
            protocol: k.proto,
            backends,
            maglev: v.flags & COMB_LB_F_MAGLEV != 0,
            affinity_timeout_secs: v.affinity_timeout_secs,
        });
    }
    out.sort_by_key(|s| (s.vip, s.port, s.protocol));
    Ok(out)
}

/// At load: the ids in use, and delete backend and Maglev entries that no live
/// (id, version) names (left by an agent that died mid-update).
pub(crate) fn adopt(store: &dyn LbStore) -> Result<IdAlloc> {
    let mut ids = IdAlloc::default();
    let mut live: BTreeMap<u32, u32> = BTreeMap::new();
    for k in store.keys(LbMap::Services)? {
        if let Some(v) = store.get(LbMap::Services, &k)? {
            let v: SvcValue = decode(&v, "service entry")?;
            ids.mark(v.id);
            live.insert(v.id, v.version);
        }
    }
    let mut stale = 0;
    for k in store.keys(LbMap::Backends)? {
        let bk: BackendKey = decode(&k, "backend key")?;
        if live.get(&bk.svc_id) != Some(&bk.version) {
            store.del(LbMap::Backends, &k)?;
            stale += 1;
        }
    }
    for k in store.keys(LbMap::Maglev)? {
        let mk: MaglevKey = decode(&k, "Maglev key")?;
        if live.get(&mk.svc_id) != Some(&mk.version) {
            store.del(LbMap::Maglev, &k)?;
            stale += 1;
        }
    }
    if stale > 0 {
        info!(stale, "removed socket-LB entries of unfinished updates");
    }
    Ok(ids)
}

/// The socket LB's half of [`Datapath`].
pub(crate) struct SocketLb {
    pub(crate) services: MapHandle,
    pub(crate) backends: MapHandle,
    pub(crate) maglev: MapHandle,
    pub(crate) config: MapHandle,
    pub(crate) stats: MapHandle,
    /// In HOOKS order.
    pub(crate) progs: Vec<ProgramHandle>,
    pub(crate) ids: std::sync::Mutex<IdAlloc>,
    pub(crate) attached: Option<LbAttachment>,
}

pub(crate) struct LbAttachment {
    /// As given to `attach_socket_lb` ("/" = the cgroup root); empty when an adopted link's
    /// cgroup could not be found.
    pub(crate) cgroup: PathBuf,
    pub(crate) mode: SocketLbMode,
    /// In HOOKS order.
    pub(crate) links: Vec<OwnedFd>,
}

impl LbStore for SocketLb {
    fn get(&self, map: LbMap, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.map(map).lookup(key, MapFlags::ANY)?)
    }
    fn put(&self, map: LbMap, key: &[u8], value: &[u8]) -> Result<()> {
        Ok(self.map(map).update(key, value, MapFlags::ANY)?)
    }
    fn del(&self, map: LbMap, key: &[u8]) -> Result<()> {
        Ok(crate::maps::delete_if_present(self.map(map), key)?)
    }
    fn keys(&self, map: LbMap) -> Result<Vec<Vec<u8>>> {
        Ok(self.map(map).keys().collect())
    }
}

impl SocketLb {
    fn map(&self, map: LbMap) -> &MapHandle {
        match map {
            LbMap::Services => &self.services,
            LbMap::Backends => &self.backends,
            LbMap::Maglev => &self.maglev,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdAlloc> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn read_config(&self) -> Result<LbConfigValue> {
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
    pub(crate) fn adopt_links(&mut self, pin_dir: &Path, cgroup_root: &Path) -> Result<()> {
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
                crate::splice::remove_pin(&path)?;
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
                let _ = crate::splice::remove_pin(&dir.join(name));
            }
            for l in &links {
                let _ = sys::link_detach(l.as_fd());
            }
            return Ok(());
        }
        let cgroup = cg_id
            .and_then(|id| {
                let root_ino =
                    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(cgroup_root).ok()?);
                if root_ino == id {
                    Some(PathBuf::from("/"))
                } else {
                    crate::splice::find_cgroup(cgroup_root, id)
                }
            })
            .unwrap_or_default();
        let mode = if self.read_config()?.flags & COMB_LB_CFG_F_HOST_ONLY != 0 {
            SocketLbMode::HostOnly
        } else {
            SocketLbMode::All
        };
        debug!(cgroup = %cgroup.display(), ?mode, "adopted socket-LB links");
        self.attached = Some(LbAttachment {
            cgroup,
            mode,
            links,
        });
        Ok(())
    }

    pub(crate) fn detach(&mut self, pin_dir: &Path) -> Result<()> {
        let mut errors = Vec::new();
        for (_, name, _) in HOOKS {
            if let Err(e) = crate::splice::remove_pin(&pin_dir.join("links").join(name)) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Some(a) = self.attached.take() {
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
    crate::splice::validate_cgroup_rel(rel)?;
    Ok(root.join(rel))
}

impl Datapath {
    /// Create or update a Service, glitch-free: connects never see a partial backend set. An
    /// empty backend list is a valid Service whose connects are refused (ECONNREFUSED).
    pub fn upsert_service(&self, svc: &LbService) -> Result<()> {
        let mut ids = self.lb.lock();
        upsert(&self.lb, &mut ids, svc)
    }

    /// Remove a Service; missing is fine.
    pub fn remove_service(&self, vip: IpAddr, port: u16, protocol: u8) -> Result<()> {
        let mut ids = self.lb.lock();
        remove(&self.lb, &mut ids, SvcKey::new(vip, port, protocol))
            .with_context(|| format!("removing service {vip}:{port}/{protocol}"))
    }

    /// The Services in the maps, sorted by (vip, port, protocol).
    pub fn services(&self) -> Result<Vec<LbService>> {
        let _ids = self.lb.lock();
        read_all(&self.lb)
    }

    /// Attach the 8 socket-LB programs to `cgroup_rel` (relative to the cgroup root; "/" is the
    /// root itself), links pinned under `<pin_dir>/links/lb-*`. Idempotent; moving to another
    /// cgroup attaches there before detaching the old one.
    pub fn attach_socket_lb(&mut self, cgroup_rel: &Path, mode: SocketLbMode) -> Result<()> {
        let cg_path = resolve_cgroup(&self.opts.cgroup_root, cgroup_rel)?;
        self.lb.write_config(mode)?;
        if let Some(a) = &mut self.lb.attached
            && a.cgroup == cgroup_rel
        {
            for (l, p) in a.links.iter().zip(&self.lb.progs) {
                sys::link_update(l.as_fd(), p.as_fd()).context("updating socket-LB link")?;
            }
            a.mode = mode;
            return Ok(());
        }
        let cg = std::fs::File::open(&cg_path)
            .with_context(|| format!("opening cgroup {}", cg_path.display()))?;
        ensure!(
            cg.metadata()?.is_dir(),
            "{} is not a cgroup directory",
            cg_path.display()
        );
        // All links first; unpinned links go away when dropped on error.
        let mut links = Vec::with_capacity(HOOKS.len());
        for ((prog_name, _, attach), prog) in HOOKS.iter().zip(&self.lb.progs) {
            links.push(
                sys::link_create(prog.as_fd(), cg.as_fd(), *attach)
                    .with_context(|| format!("attaching {prog_name} to {}", cg_path.display()))?,
            );
        }
        let dir = self.opts.pin_dir.join("links");
        for ((_, name, _), l) in HOOKS.iter().zip(&links) {
            let pin = dir.join(name);
            crate::splice::remove_pin(&pin)?;
            sys::obj_pin(l.as_fd(), &pin).with_context(|| format!("pinning {}", pin.display()))?;
        }
        if let Some(old) = self.lb.attached.replace(LbAttachment {
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

    pub fn detach_socket_lb(&mut self) -> Result<()> {
        self.lb.detach(&self.opts.pin_dir)
    }

    pub fn socket_lb(&self) -> Option<(PathBuf, SocketLbMode)> {
        self.lb
            .attached
            .as_ref()
            .map(|a| (a.cgroup.clone(), a.mode))
    }

    pub fn lb_stats(&self) -> Result<LbStats> {
        let mut sum = LbStatsValue::default();
        let per_cpu = self
            .lb
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
    use std::cell::RefCell;
    use std::collections::HashMap;

    type Snapshot = HashMap<(LbMap, Vec<u8>), Vec<u8>>;

    /// An in-memory store that records the state after every mutation.
    #[derive(Default)]
    struct Fake {
        now: RefCell<Snapshot>,
        history: RefCell<Vec<Snapshot>>,
        fail_puts_after: RefCell<Option<usize>>,
    }

    impl LbStore for Fake {
        fn get(&self, map: LbMap, key: &[u8]) -> Result<Option<Vec<u8>>> {
            Ok(self.now.borrow().get(&(map, key.to_vec())).cloned())
        }
        fn put(&self, map: LbMap, key: &[u8], value: &[u8]) -> Result<()> {
            if let Some(n) = self.fail_puts_after.borrow_mut().as_mut() {
                if *n == 0 {
                    bail!("injected failure");
                }
                *n -= 1;
            }
            self.now
                .borrow_mut()
                .insert((map, key.to_vec()), value.to_vec());
            self.history.borrow_mut().push(self.now.borrow().clone());
            Ok(())
        }
        fn del(&self, map: LbMap, key: &[u8]) -> Result<()> {
            self.now.borrow_mut().remove(&(map, key.to_vec()));
            self.history.borrow_mut().push(self.now.borrow().clone());
            Ok(())
        }
        fn keys(&self, map: LbMap) -> Result<Vec<Vec<u8>>> {
            Ok(self
                .now
                .borrow()
                .keys()
                .filter(|(m, _)| *m == map)
                .map(|(_, k)| k.clone())
                .collect())
        }
    }

    fn be(n: u8) -> (IpAddr, u16) {
        (IpAddr::from([10, 0, 0, n]), 8080)
    }

    fn service(backends: Vec<(IpAddr, u16)>) -> LbService {
        LbService {
            vip: "10.96.0.1".parse().unwrap(),
            port: 80,
            protocol: IPPROTO_TCP,
            backends,
            maglev: true,
            affinity_timeout_secs: 0,
        }
    }

    fn svc_of(s: &Snapshot, key: &SvcKey) -> Option<SvcValue> {
        s.get(&(LbMap::Services, key.as_bytes().to_vec()))
            .map(|v| SvcValue::from_bytes(v).unwrap())
    }

    fn backend_of(s: &Snapshot, id: u32, version: u32, index: u32) -> Option<(IpAddr, u16)> {
        let k = BackendKey {
            svc_id: id,
            version,
            index,
        };
        s.get(&(LbMap::Backends, k.as_bytes().to_vec())).map(|v| {
            let b = BackendValue::from_bytes(v).unwrap();
            (b.ip.ip(), b.port)
        })
    }

    #[test]
    fn ids_are_smallest_free() {
        let mut ids = IdAlloc::default();
        assert_eq!(ids.alloc().unwrap(), 1);
        assert_eq!(ids.alloc().unwrap(), 2);
        assert_eq!(ids.alloc().unwrap(), 3);
        ids.free(2);
        assert_eq!(ids.alloc().unwrap(), 2);
        ids.mark(5);
        assert_eq!(ids.alloc().unwrap(), 4);
        assert_eq!(ids.alloc().unwrap(), 6);
        let mut full = IdAlloc::default();
        for i in 1..=COMB_LB_MAX_SERVICES {
            full.mark(i);
        }
        assert!(full.alloc().is_err());
    }

    #[test]
    fn versions_skip_zero() {
        assert_eq!(next_version(1), 2);
        assert_eq!(next_version(u32::MAX), 1);
    }

    #[test]
    fn lb_link_names_never_collide_with_pod_ids() {
        for (_, name, _) in HOOKS {
            assert!(is_lb_link_name(name));
            assert!(!name.contains('_'), "pod link ids are <ns>_<pod>");
        }
        assert!(!is_lb_link_name("lb-x_pod"));
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
    fn bad_services_are_refused() {
        let mut s = service(vec![be(1)]);
        s.protocol = 132;
        assert!(validate(&s).is_err());
        let mut s = service(vec![("fd00::1".parse().unwrap(), 80)]);
        assert!(validate(&s).is_err(), "v6 backend for a v4 VIP");
        s.vip = "fd00::ffff".parse().unwrap();
        assert!(validate(&s).is_ok());
    }

    /// Every interleaving a BPF reader can see: it copies the service entry in snapshot i and
    /// reads a backend in a later snapshot j. The backend is either from the set that entry
    /// describes, or missing - and then snapshot j's entry names another version (the reader's
    /// retry makes progress). Never a backend of a half-written set.
    #[test]
    fn readers_never_see_a_half_written_set() {
        let store = Fake::default();
        let mut ids = IdAlloc::default();
        let sets = [
            vec![be(1), be(2), be(3)],
            vec![be(2), be(3), be(4), be(5)],
            vec![be(5)],
            vec![],
            vec![be(6), be(7)],
        ];
        for set in &sets {
            upsert(&store, &mut ids, &service(set.clone())).unwrap();
        }
        let key = SvcKey::new("10.96.0.1".parse().unwrap(), 80, IPPROTO_TCP);
        let history = store.history.borrow();
        let mut seen_sets = BTreeSet::new();
        for (i, si) in history.iter().enumerate() {
            let Some(v) = svc_of(si, &key) else { continue };
            // The entry's set is complete in the snapshot that published it.
            let set: Vec<_> = (0..v.count)
                .map(|x| backend_of(si, v.id, v.version, x).expect("complete set"))
                .collect();
            assert!(
                sets.contains(&set),
                "snapshot {i}: {set:?} was never written"
            );
            seen_sets.insert(set.clone());
            if v.flags & COMB_LB_F_MAGLEV != 0 && v.count > 0 {
                let mk = MaglevKey {
                    svc_id: v.id,
                    version: v.version,
                };
                assert!(si.contains_key(&(LbMap::Maglev, mk.as_bytes().to_vec())));
            }
            for sj in &history[i..] {
                for x in 0..v.count {
                    match backend_of(sj, v.id, v.version, x) {
                        Some(b) => {
                            assert_eq!(b, set[x as usize], "entries of a live version changed")
                        }
                        None => assert_ne!(svc_of(sj, &key).map(|n| n.version), Some(v.version)),
                    }
                }
            }
        }
        assert_eq!(seen_sets.len(), sets.len());
        // Only the last version is left.
        drop(history);
        let now = store.now.borrow().clone();
        let v = svc_of(&now, &key).unwrap();
        assert_eq!(v.count, 2);
        assert_eq!(now.len(), 1 + 2 + 1, "service, 2 backends, 1 Maglev table");
        assert_eq!(read_all(&store).unwrap(), vec![service(sets[4].clone())]);
        remove(&store, &mut ids, key).unwrap();
        assert!(store.now.borrow().is_empty());
        assert_eq!(ids.alloc().unwrap(), 1, "id freed");
    }

    #[test]
    fn failed_update_leaves_the_old_version_serving() {
        let store = Fake::default();
        let mut ids = IdAlloc::default();
        let old = service(vec![be(1), be(2)]);
        upsert(&store, &mut ids, &old).unwrap();
        *store.fail_puts_after.borrow_mut() = Some(2); // two backends, then fail
        assert!(upsert(&store, &mut ids, &service(vec![be(3), be(4), be(5)])).is_err());
        *store.fail_puts_after.borrow_mut() = None;
        assert_eq!(read_all(&store).unwrap(), vec![old]);
        assert_eq!(
            store.now.borrow().len(),
            1 + 2 + 1,
            "partial version cleaned up"
        );
        // A new Service whose write fails gives its id back.
        let mut other = service(vec![be(9)]);
        other.port = 81;
        *store.fail_puts_after.borrow_mut() = Some(0);
        assert!(upsert(&store, &mut ids, &other).is_err());
        *store.fail_puts_after.borrow_mut() = None;
        assert_eq!(ids.alloc().unwrap(), 2);
    }

    #[test]
    fn adopt_finds_ids_and_drops_unfinished_versions() {
        let store = Fake::default();
        let mut ids = IdAlloc::default();
        upsert(&store, &mut ids, &service(vec![be(1)])).unwrap();
        let mut b = service(vec![be(2)]);
        b.port = 81;
        upsert(&store, &mut ids, &b).unwrap();
        // An agent died after step 1 of an update of service 1 (version 2 written, no flip).
        let orphan = BackendKey {
            svc_id: 1,
            version: 2,
            index: 0,
        };
        store
            .put(
                LbMap::Backends,
                orphan.as_bytes(),
                BackendValue::new(be(7).0, 1).as_bytes(),
            )
            .unwrap();
        let mut adopted = adopt(&store).unwrap();
        assert_eq!(adopted.alloc().unwrap(), 3);
        assert!(
            store
                .get(LbMap::Backends, orphan.as_bytes())
                .unwrap()
                .is_none()
        );
        assert_eq!(read_all(&store).unwrap().len(), 2);
    }

    #[test]
    fn hooks_match_the_object() {
        use crate::sock_skel::SockSkelBuilder;
        let mut storage = std::mem::MaybeUninit::uninit();
        let (progs, maps) = crate::splice::object_names(SockSkelBuilder::default(), &mut storage);
        let mut want: Vec<String> = HOOKS.iter().map(|h| h.0.to_string()).collect();
        want.sort();
        assert_eq!(progs, want);
        use crate::lb_maps::*;
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
