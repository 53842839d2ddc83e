//! Loading, attaching and pinning the local splice datapath (`bpf/splice.c`).
//!
//! Pin layout under `pin_dir`: `maps/<map name>` (adopted by the next load, so live
//! connections and endpoint entries survive an agent restart), `progs/<prog name>` (the
//! current programs, for inspection), `links/<id>` (one sockops cgroup link per pod; adopted and
//! switched to the new program on load).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use libbpf_rs::{MapCore, MapFlags, MapHandle, ProgramHandle, libbpf_sys};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::lb::{HOOKS, IdAlloc, SocketLb, is_lb_link_name};
use crate::maps::{
    COMB_CFG_F_SPLICE, COMB_EP_F_SPLICE, CombAddr, ConfigValue, EndpointValue, Pod, SockKey,
    SpliceStatsValue, delete_if_present, entries,
};
use crate::policy_dp::{PolicyDp, is_policy_link_name};
use crate::skel::SpliceSkelBuilder;
use crate::sock_skel::SockSkelBuilder;
use crate::sys;

pub struct DatapathOptions {
    /// bpffs directory owned by this agent, e.g. `/sys/fs/bpf/comb/<node>`.
    pub pin_dir: PathBuf,
    /// Pod cgroup paths are relative to this.
    pub cgroup_root: PathBuf,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EndpointInfo {
    pub splice: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SpliceStats {
    /// Current sockhash entries.
    pub sockets: u64,
    pub redirected_msgs: u64,
    pub redirected_bytes: u64,
    pub passed_msgs: u64,
    pub passed_bytes: u64,
    pub sockets_added: u64,
    pub add_failures: u64,
    /// Sockets that could not be marked TCP-first (no memory); 0 unless something is wrong.
    pub sticky_failures: u64,
    pub sockets_closed: u64,
}

struct CgroupLink {
    fd: OwnedFd,
    /// Relative to `cgroup_root`; empty when an adopted link's cgroup could not be found.
    cgroup: PathBuf,
}

/// The loaded splice datapath. Dropping it closes its fds only: what is pinned (maps, programs,
/// links) keeps working; [`Datapath::shutdown`] with `keep_pins = false` removes everything.
pub struct Datapath {
    pub(crate) opts: DatapathOptions,
    config: MapHandle,
    endpoints: MapHandle,
    sock_hash: MapHandle,
    stats: MapHandle,
    sockops: ProgramHandle,
    sk_msg: ProgramHandle,
    links: BTreeMap<String, CgroupLink>,
    pub(crate) lb: SocketLb,
    pub(crate) policy: PolicyDp,
}

const PROG_SOCKOPS: &str = "comb_sockops";
const PROG_SK_MSG: &str = "comb_sk_msg";

impl Datapath {
    pub fn load(opts: DatapathOptions) -> Result<Self> {
        let base = opts.pin_dir.parent().unwrap_or(Path::new("/"));
        ensure!(
            first_existing(&opts.pin_dir).is_some_and(|p| sys::is_on_bpffs(&p).unwrap_or(false)),
            "pin dir {} is not on bpffs (mount it: mount -t bpf bpf {})",
            opts.pin_dir.display(),
            base.display()
        );
        for sub in ["maps", "progs", "links"] {
            let d = opts.pin_dir.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let maps_dir = opts.pin_dir.join("maps");

        let mut storage = MaybeUninit::uninit();
        let skel = load_pinned(
            SpliceSkelBuilder::default(),
            &mut storage,
            &maps_dir,
            "splice",
        )?;

        let config = map_handle(&skel.maps.comb_config)?;
        let endpoints = map_handle(&skel.maps.comb_endpoints)?;
        let sock_hash = map_handle(&skel.maps.comb_sock_hash)?;
        let stats = map_handle(&skel.maps.comb_splice_stats)?;
        let sockops =
            ProgramHandle::try_from(&skel.progs.comb_sockops).context("sockops program")?;
        let sk_msg = ProgramHandle::try_from(&skel.progs.comb_sk_msg).context("sk_msg program")?;

        for (name, p) in [(PROG_SOCKOPS, &sockops), (PROG_SK_MSG, &sk_msg)] {
            let path = opts.pin_dir.join("progs").join(name);
            remove_pin(&path)?;
            p.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
        // Replaces the program of a previous agent on an adopted sockhash; sockets already in it
        // keep the program they were added with.
        skel.progs
            .comb_sk_msg
            .attach_sockmap(sock_hash.as_fd().as_raw_fd())
            .context("attaching sk_msg to the sockhash")?;
        drop(skel);
        let lb = load_socket_lb(&opts.pin_dir)?;
        let policy = crate::policy_dp::load(&opts.pin_dir)?;

        let mut dp = Self {
            opts,
            config,
            endpoints,
            sock_hash,
            stats,
            sockops,
            sk_msg,
            links: BTreeMap::new(),
            lb,
            policy,
        };
        dp.lb.adopt_links(&dp.opts.pin_dir, &dp.opts.cgroup_root)?;
        *dp.lb.ids.lock().unwrap_or_else(|p| p.into_inner()) =
            crate::lb::adopt(&dp.lb).context("adopting socket-LB services")?;
        dp.adopt_links()?;
        dp.policy.adopt_links(&dp.opts.pin_dir)?;
        info!(
            pin_dir = %dp.opts.pin_dir.display(),
            adopted_links = dp.links.len(),
            adopted_policy_links = dp.policy_attachments().len(),
            "datapath loaded"
        );
        Ok(dp)
    }

    /// Take over links pinned by a previous agent and switch them to our sockops program.
    fn adopt_links(&mut self) -> Result<()> {
        let dir = self.opts.pin_dir.join("links");
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if is_lb_link_name(&id) || is_policy_link_name(&id) {
                continue; // the socket LB's and the policy's, adopted by their owners
            }
            let path = entry.path();
            let fd = sys::obj_get(&path)
                .with_context(|| format!("opening pinned link {}", path.display()))?;
            let alive = sys::link_cgroup_id(fd.as_fd()).ok().filter(|&id| id != 0);
            let updated =
                alive.is_some() && sys::link_update(fd.as_fd(), self.sockops.as_fd()).is_ok();
            if !updated {
                // Its cgroup is gone (pod deleted while the agent was down): drop the pin.
                warn!(id, "pinned link is defunct, removing it");
                remove_pin(&path)?;
                continue;
            }
            let cgroup = alive
                .and_then(|cg| find_cgroup(&self.opts.cgroup_root, cg))
                .unwrap_or_default();
            debug!(id, cgroup = %cgroup.display(), "adopted pinned link");
            self.links.insert(id, CgroupLink { fd, cgroup });
        }
        Ok(())
    }

    pub fn set_splice_enabled(&self, on: bool) -> Result<()> {
        let key = 0u32.to_ne_bytes();
        let mut cfg = self
            .config
            .lookup(&key, MapFlags::ANY)?
            .and_then(|v| ConfigValue::from_bytes(&v))
            .unwrap_or_default();
        if on {
            cfg.flags |= COMB_CFG_F_SPLICE;
        } else {
            cfg.flags &= !COMB_CFG_F_SPLICE;
        }
        self.config
            .update(&key, cfg.as_bytes(), MapFlags::ANY)
            .context("updating comb_config")
    }

    pub fn splice_enabled(&self) -> Result<bool> {
        let v = self.config.lookup(&0u32.to_ne_bytes(), MapFlags::ANY)?;
        Ok(v.and_then(|v| ConfigValue::from_bytes(&v))
            .is_some_and(|c| c.flags & COMB_CFG_F_SPLICE != 0))
    }

    pub fn upsert_endpoint(&self, ip: IpAddr, info: EndpointInfo) -> Result<()> {
        let key = CombAddr::from(ip);
        let value = EndpointValue {
            flags: if info.splice { COMB_EP_F_SPLICE } else { 0 },
            reserved: 0,
        };
        self.endpoints
            .update(key.as_bytes(), value.as_bytes(), MapFlags::ANY)
            .with_context(|| format!("writing endpoint {ip}"))
    }

    pub fn remove_endpoint(&self, ip: IpAddr) -> Result<()> {
        delete_if_present(&self.endpoints, CombAddr::from(ip).as_bytes())
            .with_context(|| format!("removing endpoint {ip}"))
    }

    pub fn endpoints(&self) -> Result<Vec<(IpAddr, EndpointInfo)>> {
        let mut out = Vec::new();
        for (k, v) in entries(&self.endpoints)? {
            let (Some(k), Some(v)) = (CombAddr::from_bytes(&k), EndpointValue::from_bytes(&v))
            else {
                bail!("comb_endpoints entry has an unexpected size");
            };
            out.push((
                k.ip(),
                EndpointInfo {
                    splice: v.flags & COMB_EP_F_SPLICE != 0,
                },
            ));
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    pub fn attach_cgroup(&mut self, id: &str, cgroup_rel: &Path) -> Result<()> {
        validate_id(id)?;
        validate_cgroup_rel(cgroup_rel)?;
        if let Some(l) = self.links.get(id)
            && l.cgroup == cgroup_rel
        {
            // Idempotent; also makes sure it runs the current program.
            return sys::link_update(l.fd.as_fd(), self.sockops.as_fd())
                .context("updating link program");
        }
        let cg_path = self.opts.cgroup_root.join(cgroup_rel);
        let cg = fs::File::open(&cg_path)
            .with_context(|| format!("opening cgroup {}", cg_path.display()))?;
        ensure!(
            cg.metadata()?.is_dir(),
            "{} is not a cgroup directory",
            cg_path.display()
        );
        let fd = sys::link_create(
            self.sockops.as_fd(),
            cg.as_fd(),
            libbpf_sys::BPF_CGROUP_SOCK_OPS,
        )
        .with_context(|| format!("attaching sockops to {}", cg_path.display()))?;
        // Replace whatever was pinned under this id; until the old fd below is dropped both
        // links run, which only means the same sockhash insert twice.
        let pin = self.opts.pin_dir.join("links").join(id);
        remove_pin(&pin)?;
        sys::obj_pin(fd.as_fd(), &pin).with_context(|| format!("pinning {}", pin.display()))?;
        if let Some(old) = self.links.insert(
            id.to_owned(),
            CgroupLink {
                fd,
                cgroup: cgroup_rel.to_owned(),
            },
        ) {
            let _ = sys::link_detach(old.fd.as_fd());
        }
        debug!(id, cgroup = %cgroup_rel.display(), "sockops attached");
        Ok(())
    }

    pub fn detach_cgroup(&mut self, id: &str) -> Result<()> {
        validate_id(id)?;
        remove_pin(&self.opts.pin_dir.join("links").join(id))?;
        if let Some(l) = self.links.remove(id) {
            // Detach now rather than when the last fd closes (bpftool may hold one).
            match sys::link_detach(l.fd.as_fd()) {
                Err(e) if e.raw_os_error() != Some(libc::ENOLINK) => {
                    return Err(e).with_context(|| format!("detaching link {id}"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn attached(&self) -> Vec<(String, PathBuf)> {
        self.links
            .iter()
            .map(|(id, l)| (id.clone(), l.cgroup.clone()))
            .collect()
    }

    /// The sockets currently in the sockhash, as the BPF side keyed them.
    pub fn spliced_sockets(&self) -> Result<Vec<SockKey>> {
        self.sock_hash
            .keys()
            .map(|k| SockKey::from_bytes(&k).context("comb_sock_hash key has an unexpected size"))
            .collect()
    }

    /// Put an established TCP socket of this process into the sockhash, as sockops would for a
    /// local pod's socket (e.g. for a proxy to splice its two sides). The peer is spliced to it
    /// once the peer is in the sockhash too; the usual TCP-first rule applies.
    pub fn splice_socket(&self, sock: &std::net::TcpStream) -> Result<SockKey> {
        let key = SockKey::new(sock.local_addr()?, sock.peer_addr()?);
        // With an 8-byte value the kernel reads the fd as a u64.
        let fd = sock.as_raw_fd() as u64;
        self.sock_hash
            .update(key.as_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .with_context(|| {
                format!("adding {} -> {} to the sockhash", key.local(), key.remote())
            })?;
        Ok(key)
    }

    pub fn splice_stats(&self) -> Result<SpliceStats> {
        let mut sum = SpliceStatsValue::default();
        let per_cpu = self
            .stats
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .unwrap_or_default();
        for v in per_cpu {
            sum += SpliceStatsValue::from_bytes(&v)
                .context("comb_splice_stats value has an unexpected size")?;
        }
        Ok(SpliceStats {
            sockets: self.sock_hash.keys().count() as u64,
            redirected_msgs: sum.redirected_msgs,
            redirected_bytes: sum.redirected_bytes,
            passed_msgs: sum.passed_msgs,
            passed_bytes: sum.passed_bytes,
            sockets_added: sum.sockets_added,
            add_failures: sum.add_failures,
            sticky_failures: sum.sticky_failures,
            sockets_closed: sum.sockets_closed,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.opts.pin_dir
    }

    /// `keep_pins = true`: leave everything attached and pinned for the next agent.
    /// `keep_pins = false`: detach every link and sk_msg and remove `pin_dir` entirely; the maps
    /// (and the sockhash's sockets) go away with their last fd.
    pub fn shutdown(mut self, keep_pins: bool) -> Result<()> {
        if keep_pins {
            info!(pin_dir = %self.opts.pin_dir.display(), "splice datapath left pinned");
            return Ok(());
        }
        let mut errors = Vec::new();
        if let Err(e) = self.detach_socket_lb() {
            errors.push(format!("socket LB: {e:#}"));
        }
        errors.extend(self.shutdown_policy());
        for id in self.links.keys().cloned().collect::<Vec<_>>() {
            if let Err(e) = self.detach_cgroup(&id) {
                errors.push(format!("{e:#}"));
            }
        }
        match sys::prog_detach(
            self.sk_msg.as_fd(),
            self.sock_hash.as_fd(),
            libbpf_sys::BPF_SK_MSG_VERDICT,
        ) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                errors.push(format!("detaching sk_msg: {e}"))
            }
            _ => {}
        }
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

pub(crate) fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("unpinning {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Point every map of an opened object at `<maps_dir>/<name>`: libbpf reuses a map already
/// pinned at its pin path, else creates and pins it.
/// Open an embedded skeleton, point its maps at `<maps_dir>/<name>` (so existing pins are
/// adopted and new maps pinned there) and load it. `what` names the object in errors.
pub(crate) fn load_pinned<'obj, B: libbpf_rs::skel::SkelBuilder<'obj>>(
    builder: B,
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    maps_dir: &Path,
    what: &str,
) -> Result<<B::Output as libbpf_rs::skel::OpenSkel<'obj>>::Output> {
    use libbpf_rs::skel::OpenSkel;
    let mut open = builder
        .open(storage)
        .with_context(|| format!("opening the embedded {what} object"))?;
    set_map_pin_paths(open.open_object_mut(), maps_dir)?;
    open.load().with_context(|| {
        format!(
            "loading {what} programs and maps (if a map pinned under {} has an older layout, remove it)",
            maps_dir.display()
        )
    })
}

/// Sorted (program, map) names of an embedded object, for the tests that check the Rust
/// constants against it.
#[cfg(test)]
pub(crate) fn object_names<'obj, B: libbpf_rs::skel::SkelBuilder<'obj>>(
    builder: B,
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
) -> (Vec<String>, Vec<String>) {
    use libbpf_rs::skel::OpenSkel;
    let open = builder.open(storage).expect("open embedded object");
    let obj = open.open_object();
    let mut progs: Vec<String> = obj
        .progs()
        .map(|p| p.name().to_string_lossy().into_owned())
        .collect();
    let mut maps: Vec<String> = obj
        .maps()
        .map(|m| m.name().to_string_lossy().into_owned())
        .collect();
    progs.sort();
    maps.sort();
    (progs, maps)
}

pub(crate) fn set_map_pin_paths(obj: &mut libbpf_rs::OpenObject, maps_dir: &Path) -> Result<()> {
    for mut m in obj.maps_mut() {
        let path = maps_dir.join(m.name());
        m.set_pin_path(&path)
            .with_context(|| format!("setting pin path {}", path.display()))?;
    }
    Ok(())
}

/// A handle on one of a loaded object's maps.
pub(crate) fn map_handle(m: &libbpf_rs::Map<'_>) -> Result<MapHandle> {
    MapHandle::try_from(m).with_context(|| format!("map {:?}", m.name()))
}

/// The closest existing ancestor of `p` (itself included).
fn first_existing(p: &Path) -> Option<PathBuf> {
    p.ancestors().find(|a| a.exists()).map(Path::to_path_buf)
}

/// Load `bpf/sock.c` with its maps pinned (or adopted) under `<pin_dir>/maps/` and its
/// programs pinned under `<pin_dir>/progs/`.
fn load_socket_lb(pin_dir: &Path) -> Result<SocketLb> {
    let maps_dir = pin_dir.join("maps");
    let mut storage = MaybeUninit::uninit();
    let skel = load_pinned(
        SockSkelBuilder::default(),
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
        services: map_handle(&skel.maps.comb_lb_services)?,
        backends: map_handle(&skel.maps.comb_lb_backends)?,
        maglev: map_handle(&skel.maps.comb_lb_maglev)?,
        config: map_handle(&skel.maps.comb_lb_config)?,
        stats: map_handle(&skel.maps.comb_lb_stats)?,
        progs,
        ids: std::sync::Mutex::new(IdAlloc::default()),
        attached: None,
    })
}

/// Link ids become file names under `links/`.
fn validate_id(id: &str) -> Result<()> {
    ensure!(
        !id.is_empty() && id != "." && id != ".." && !id.contains('/') && !id.contains('\0'),
        "invalid link id {id:?}"
    );
    ensure!(
        !is_lb_link_name(id) && !is_policy_link_name(id),
        "link id {id:?} is reserved for the socket LB or the policy programs"
    );
    Ok(())
}

/// Pod cgroups are strictly below the cgroup root: never the root itself, never outside it.
pub(crate) fn validate_cgroup_rel(rel: &Path) -> Result<()> {
    let normal = rel.components().all(|c| matches!(c, Component::Normal(_)));
    ensure!(
        normal && rel.components().next().is_some(),
        "cgroup path {} must be relative, non-empty and without `..` (the cgroup root itself is refused)",
        rel.display()
    );
    Ok(())
}

/// Find the cgroup with this id (its inode number on cgroup2) below `root`, as a relative path.
pub(crate) fn find_cgroup(root: &Path, id: u64) -> Option<PathBuf> {
    fn walk(root: &Path, dir: &Path, id: u64, depth: usize) -> Option<PathBuf> {
        for e in fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            let Ok(md) = e.metadata() else { continue };
            if !md.is_dir() {
                continue;
            }
            if md.ino() == id {
                return p.strip_prefix(root).ok().map(Path::to_path_buf);
            }
            if depth > 0
                && let Some(found) = walk(root, &p, id, depth - 1)
            {
                return Some(found);
            }
        }
        None
    }
    walk(root, root, id, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent shares the datapath between tasks.
    const _: () = {
        const fn send_sync<T: Send + Sync>() {}
        send_sync::<Datapath>();
    };
    use crate::maps::{
        MAP_CONFIG, MAP_ENDPOINTS, MAP_SOCK_HASH, MAP_SPLICE_STATS, MAP_SPLICE_TCP_FIRST,
    };

    #[test]
    fn cgroup_paths_stay_below_the_root() {
        assert!(validate_cgroup_rel(Path::new("comb-lab-x/node/ns_pod")).is_ok());
        for bad in ["", "/", "/sys/fs/cgroup", "a/../..", "..", "./"] {
            assert!(
                validate_cgroup_rel(Path::new(bad)).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn link_ids_are_file_names() {
        assert!(validate_id("default_web-1").is_ok());
        for bad in ["", ".", "..", "a/b"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn map_names_match_the_object() {
        let mut storage = MaybeUninit::uninit();
        let (_, names) = object_names(SpliceSkelBuilder::default(), &mut storage);
        let mut want = [
            MAP_CONFIG,
            MAP_ENDPOINTS,
            MAP_SOCK_HASH,
            MAP_SPLICE_STATS,
            MAP_SPLICE_TCP_FIRST,
        ];
        want.sort();
        assert_eq!(names, want);
    }
}
