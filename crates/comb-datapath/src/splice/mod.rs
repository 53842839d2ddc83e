//! The local splice (`bpf/splice.c`): sockops puts established TCP sockets between local pods
//! into a sockhash, and sk_msg sends each `send` straight into the peer socket.
//!
//! Pin layout under `pin_dir`: `maps/<map name>` (adopted by the next load, so live
//! connections and endpoint entries survive an agent restart), `progs/<prog name>` (the
//! current programs, for inspection), `links/<id>` (one sockops cgroup link per pod; adopted and
//! switched to the new program on load).

#[allow(unsafe_code)] // unsafe impl Pod
pub mod abi;

use std::collections::BTreeMap;
use std::fs;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, bail, ensure};
use libbpf_rs::{MapCore, MapFlags, MapHandle, ProgramHandle, libbpf_sys};
use serde::Serialize;
use tracing::{debug, warn};

use crate::abi::{CombAddr, Pod};
use crate::cgroup;
use crate::map_io::{delete_if_present, entries};
use crate::pin::{load_pinned, map_handle, remove_pin};
use crate::skel::splice::SpliceSkelBuilder;
use crate::sys;
use abi::{
    COMB_CFG_F_SPLICE, COMB_EP_F_SPLICE, ConfigValue, DEFAULT_QUEUE_LIMIT, DEFAULT_STALL_LIMIT,
    DEFAULT_STALL_MS, EndpointValue, QueueStatsValue, SockKey, SpliceStatsValue,
};

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
    /// Sockets moved to TCP because their peer held the queue limit unread (backpressure).
    pub queue_fallbacks: u64,
    /// Sockets moved to TCP because their peer stayed over the stall limit too long.
    pub stall_fallbacks: u64,
    /// The most unread redirected bytes a peer held when its sender was judged.
    pub max_unread: u64,
}

/// When a spliced sender moves to TCP (`bpf/lib/splice_queue.h`): its peer holds
/// `queue_limit` unread bytes, or has held `stall_limit` or more for `stall_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backpressure {
    pub queue_limit: u32,
    pub stall_limit: u32,
    pub stall_ms: u32,
}

impl Default for Backpressure {
    fn default() -> Self {
        Self {
            queue_limit: DEFAULT_QUEUE_LIMIT,
            stall_limit: DEFAULT_STALL_LIMIT,
            stall_ms: DEFAULT_STALL_MS,
        }
    }
}

struct CgroupLink {
    fd: OwnedFd,
    /// Relative to `cgroup_root`; empty when an adopted link's cgroup could not be found.
    cgroup: PathBuf,
}

/// The splice feature of [`crate::Datapath`]: its maps, programs and per-pod sockops links.
pub struct Splice {
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
    config: MapHandle,
    endpoints: MapHandle,
    sock_hash: MapHandle,
    stats: MapHandle,
    queue_stats: MapHandle,
    sockops: ProgramHandle,
    sk_msg: ProgramHandle,
    /// Behind a lock of its own so every method takes `&self`: the agent's writer attaches
    /// while readers list what is attached.
    links: Mutex<BTreeMap<String, CgroupLink>>,
    /// Link names under `links/` that belong to other features (never pod ids): adoption skips
    /// them and attach refuses them. Given by the facade, which knows every feature.
    reserved: fn(&str) -> bool,
}

const PROG_SOCKOPS: &str = "comb_sockops";
const PROG_SK_MSG: &str = "comb_sk_msg";

impl Splice {
    /// Load `bpf/splice.c` with its maps pinned (or adopted) under `<pin_dir>/maps/`, pin its
    /// programs and attach sk_msg to the sockhash. Pinned links are adopted by
    /// [`Self::adopt_links`].
    pub(crate) fn load(
        pin_dir: &Path,
        cgroup_root: &Path,
        reserved: fn(&str) -> bool,
    ) -> Result<Self> {
        let maps_dir = pin_dir.join("maps");
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
        let queue_stats = map_handle(&skel.maps.comb_splice_queue)?;
        let sockops =
            ProgramHandle::try_from(&skel.progs.comb_sockops).context("sockops program")?;
        let sk_msg = ProgramHandle::try_from(&skel.progs.comb_sk_msg).context("sk_msg program")?;

        for (name, p) in [(PROG_SOCKOPS, &sockops), (PROG_SK_MSG, &sk_msg)] {
            let path = pin_dir.join("progs").join(name);
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
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            cgroup_root: cgroup_root.to_owned(),
            config,
            endpoints,
            sock_hash,
            stats,
            queue_stats,
            sockops,
            sk_msg,
            links: Mutex::new(BTreeMap::new()),
            reserved,
        })
    }

    /// Take over links pinned by a previous agent and switch them to our sockops program.
    pub(crate) fn adopt_links(&mut self) -> Result<()> {
        let dir = self.pin_dir.join("links");
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if (self.reserved)(&id) {
                continue; // another feature's, adopted by its owner
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
                .and_then(|cg| cgroup::find(&self.cgroup_root, cg))
                .unwrap_or_default();
            debug!(id, cgroup = %cgroup.display(), "adopted pinned link");
            self.links
                .get_mut()
                .expect("splice links lock poisoned")
                .insert(id, CgroupLink { fd, cgroup });
        }
        Ok(())
    }

    pub fn set_enabled(&self, on: bool) -> Result<()> {
        self.update_config(|cfg| {
            if on {
                cfg.flags |= COMB_CFG_F_SPLICE;
            } else {
                cfg.flags &= !COMB_CFG_F_SPLICE;
            }
        })
    }

    /// The backpressure bounds; apply to the next message of every spliced socket.
    pub fn set_backpressure(&self, b: Backpressure) -> Result<()> {
        ensure!(
            b.queue_limit > 0 && b.stall_limit > 0 && b.stall_ms > 0,
            "splice backpressure bounds must be above 0: {b:?}"
        );
        self.update_config(|cfg| {
            cfg.queue_limit = b.queue_limit;
            cfg.stall_limit = b.stall_limit;
            cfg.stall_ms = b.stall_ms;
        })
    }

    /// The bounds in force (the program's defaults for fields left 0).
    pub fn backpressure(&self) -> Result<Backpressure> {
        let v = self.config.lookup(&0u32.to_ne_bytes(), MapFlags::ANY)?;
        let c = v
            .and_then(|v| ConfigValue::from_bytes(&v))
            .unwrap_or_default();
        let d = Backpressure::default();
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        Ok(Backpressure {
            queue_limit: or(c.queue_limit, d.queue_limit),
            stall_limit: or(c.stall_limit, d.stall_limit),
            stall_ms: or(c.stall_ms, d.stall_ms),
        })
    }

    fn update_config(&self, change: impl FnOnce(&mut ConfigValue)) -> Result<()> {
        let key = 0u32.to_ne_bytes();
        let mut cfg = self
            .config
            .lookup(&key, MapFlags::ANY)?
            .and_then(|v| ConfigValue::from_bytes(&v))
            .unwrap_or_default();
        change(&mut cfg);
        self.config
            .update(&key, cfg.as_bytes(), MapFlags::ANY)
            .context("updating comb_config")
    }

    pub fn enabled(&self) -> Result<bool> {
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

    pub fn attach_cgroup(&self, id: &str, cgroup_rel: &Path) -> Result<()> {
        self.validate_id(id)?;
        cgroup::validate_rel(cgroup_rel)?;
        let mut links = self.links();
        if let Some(l) = links.get(id)
            && l.cgroup == cgroup_rel
        {
            // Idempotent; also makes sure it runs the current program.
            return sys::link_update(l.fd.as_fd(), self.sockops.as_fd())
                .context("updating link program");
        }
        let cg_path = self.cgroup_root.join(cgroup_rel);
        let cg = cgroup::open_dir(&cg_path)?;
        let fd = sys::link_create(
            self.sockops.as_fd(),
            cg.as_fd(),
            libbpf_sys::BPF_CGROUP_SOCK_OPS,
        )
        .with_context(|| format!("attaching sockops to {}", cg_path.display()))?;
        // Replace whatever was pinned under this id; until the old fd below is dropped both
        // links run, which only means the same sockhash insert twice.
        let pin = self.pin_dir.join("links").join(id);
        remove_pin(&pin)?;
        sys::obj_pin(fd.as_fd(), &pin).with_context(|| format!("pinning {}", pin.display()))?;
        if let Some(old) = links.insert(
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

    pub fn detach_cgroup(&self, id: &str) -> Result<()> {
        self.validate_id(id)?;
        let mut links = self.links();
        remove_pin(&self.pin_dir.join("links").join(id))?;
        if let Some(l) = links.remove(id) {
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
        self.links()
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

    pub fn stats(&self) -> Result<SpliceStats> {
        let mut sum = SpliceStatsValue::default();
        let per_cpu = self
            .stats
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .unwrap_or_default();
        for v in per_cpu {
            sum += SpliceStatsValue::from_bytes(&v)
                .context("comb_splice_stats value has an unexpected size")?;
        }
        let (mut queue_fallbacks, mut stall_fallbacks, mut max_unread) = (0, 0, 0);
        for v in self
            .queue_stats
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .unwrap_or_default()
        {
            let q = QueueStatsValue::from_bytes(&v)
                .context("comb_splice_queue value has an unexpected size")?;
            queue_fallbacks += q.fallbacks_full;
            stall_fallbacks += q.fallbacks_stalled;
            max_unread = max_unread.max(q.max_unread);
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
            queue_fallbacks,
            stall_fallbacks,
            max_unread,
        })
    }

    /// Detach every sockops link and sk_msg (for a shutdown without pins); returns the errors.
    pub(crate) fn detach_all(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let ids: Vec<String> = self.links().keys().cloned().collect();
        for id in ids {
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
        errors
    }

    fn links(&self) -> MutexGuard<'_, BTreeMap<String, CgroupLink>> {
        self.links.lock().expect("splice links lock poisoned")
    }

    fn validate_id(&self, id: &str) -> Result<()> {
        validate_id(id, self.reserved)
    }
}

/// Link ids become file names under `links/`.
fn validate_id(id: &str, reserved: impl Fn(&str) -> bool) -> Result<()> {
    ensure!(
        !id.is_empty() && id != "." && id != ".." && !id.contains('/') && !id.contains('\0'),
        "invalid link id {id:?}"
    );
    ensure!(
        !reserved(id),
        "link id {id:?} is reserved for the socket LB or the policy programs"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pin::object_names;
    use abi::{
        MAP_CONFIG, MAP_ENDPOINTS, MAP_SOCK_HASH, MAP_SPLICE_MEMBERS, MAP_SPLICE_QUEUE,
        MAP_SPLICE_STATS, MAP_SPLICE_TCP_FIRST, MAP_SPLICE_WATCH,
    };

    #[test]
    fn link_ids_are_file_names() {
        let reserved = |n: &str| n.starts_with("lb-");
        assert!(validate_id("default_web-1", reserved).is_ok());
        for bad in ["", ".", "..", "a/b", "lb-connect4"] {
            assert!(validate_id(bad, reserved).is_err(), "{bad:?} accepted");
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
            MAP_SPLICE_MEMBERS,
            MAP_SPLICE_QUEUE,
            MAP_SPLICE_STATS,
            MAP_SPLICE_TCP_FIRST,
            MAP_SPLICE_WATCH,
        ];
        want.sort();
        assert_eq!(names, want);
    }
}
