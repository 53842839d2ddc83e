//! The identity policy (`bpf/policy.c`): loading, attaching and map access. Its vocabulary
//! is in [`types`], its ABI twins in [`abi`], flow events in [`events`], the node proxy's
//! policy routing in [`routing`].
//!
//! Two tcx programs per local pod on its host-side veth (in the node's network namespace;
//! `links.rs`): `comb_policy_from_pod` on ingress, `comb_policy_to_pod` on egress, pinned as
//! `<pin_dir>/links/policy-<ifindex>-from` / `-to`. The endpoint id everywhere is that ifindex.
//! Maps are pinned under `<pin_dir>/maps/` and adopted by the next load together with the
//! links, which are switched to the new programs, so enforcement and conntrack survive an
//! agent restart.
//!
//! Interfaces are resolved in the network namespace of the calling thread: call
//! [`Policy::attach`] from the node's namespace.

#[allow(unsafe_code)] // unsafe impl Pod
pub mod abi;
pub mod events;
mod links;
mod lookup;
pub mod routing;
pub mod types;
mod uplink;

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use comb_model::terms::{Direction, ReasonCode};
use ipnet::IpNet;
use libbpf_rs::{MapCore, MapFlags, MapHandle, ProgramHandle};

pub use events::{FlowEvent, FlowEventReader};
pub use types::{
    CtEntry, IpcacheEntry, ListenerKind, MeshAddr, MeshPort, MeshPortKey, PolicyConfig,
    PolicyEndpoint, PolicyKey, PolicyMetric, PolicyValue, ProxyFamily, ipcache_key, ipcache_net,
};

/// True for a pin name under `links/` that belongs to the policy, uplink or proxy lookup
/// programs.
pub(crate) fn is_link_name(name: &str) -> bool {
    links::is_link_name(name) || uplink::is_link_name(name) || name == lookup::LINK_NAME
}

use crate::abi::{CombAddr, Pod};
use crate::map_io::{delete_if_present, entries, walk_batched};
use crate::pin::{load_pinned, map_handle, remove_pin};
use crate::skel::policy::PolicySkelBuilder;

use abi::{
    CT_F_CLOSING, CT_F_HBONE, CT_F_PROXY, CT_F_SEEN_REPLY, CtKey, CtValue, ID_ANY, IpcacheKey,
    IpcacheValue, MetricKey, MetricValue, PolicyConfigValue, PolicyEndpointValue, PolicyLpmKey,
    PolicyLpmValue,
};
use links::Hook;

pub(crate) const PROG_FROM_POD: &str = "comb_policy_from_pod";
pub(crate) const PROG_TO_POD: &str = "comb_policy_to_pod";

/// The identity policy feature of [`crate::Datapath`]: its maps, the two tc programs and
/// their links per host-side veth.
pub struct Policy {
    pin_dir: PathBuf,
    ipcache: MapHandle,
    endpoints: MapHandle,
    policy: MapHandle,
    ct: MapHandle,
    config: MapHandle,
    metrics: MapHandle,
    events: MapHandle,
    events_lost: MapHandle,
    proxy_listeners: MapHandle,
    mesh_addrs: MapHandle,
    mesh_ports: MapHandle,
    from_pod: ProgramHandle,
    to_pod: ProgramHandle,
    /// The node uplink program (`bpf/uplink.c`, [`uplink`]).
    uplink: ProgramHandle,
    /// Its tcx links by uplink ifindex.
    uplinks: Mutex<BTreeMap<u32, OwnedFd>>,
    /// The proxy lookup program (`bpf/proxy_lookup.c`, [`lookup`]) and its netns link.
    lookup: ProgramHandle,
    lookup_link: Mutex<Option<OwnedFd>>,
    /// Behind a lock of its own so every method takes `&self`: the agent's writer attaches
    /// while readers list the attachments.
    links: Mutex<BTreeMap<(u32, Hook), OwnedFd>>,
}

/// Load `bpf/policy.c` with its maps pinned (or adopted) under `<pin_dir>/maps/` and its
/// programs pinned under `<pin_dir>/progs/`.
fn load(pin_dir: &Path) -> Result<Policy> {
    let maps_dir = pin_dir.join("maps");
    let mut storage = MaybeUninit::uninit();
    let skel = load_pinned(
        PolicySkelBuilder::default(),
        &mut storage,
        &maps_dir,
        "policy",
    )?;
    let m = &skel.maps;
    let from_pod = ProgramHandle::try_from(&skel.progs.comb_policy_from_pod)
        .context("program comb_policy_from_pod")?;
    let to_pod = ProgramHandle::try_from(&skel.progs.comb_policy_to_pod)
        .context("program comb_policy_to_pod")?;
    for (name, p) in [(PROG_FROM_POD, &from_pod), (PROG_TO_POD, &to_pod)] {
        let path = pin_dir.join("progs").join(name);
        remove_pin(&path)?;
        p.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
    }
    // After the policy object: its maps are pinned, the uplink object adopts them.
    let uplink = uplink::load(pin_dir)?;
    let lookup = lookup::load(pin_dir)?;
    Ok(Policy {
        pin_dir: pin_dir.to_owned(),
        ipcache: map_handle(&m.comb_ipcache)?,
        endpoints: map_handle(&m.comb_policy_endpoints)?,
        policy: map_handle(&m.comb_policy)?,
        ct: map_handle(&m.comb_ct)?,
        config: map_handle(&m.comb_policy_config)?,
        metrics: map_handle(&m.comb_policy_metrics)?,
        events: map_handle(&m.comb_flow_events)?,
        events_lost: map_handle(&m.comb_policy_events_lost)?,
        proxy_listeners: map_handle(&m.comb_proxy_listeners)?,
        mesh_addrs: map_handle(&m.comb_mesh_addrs)?,
        mesh_ports: map_handle(&m.comb_mesh_ports)?,
        from_pod,
        to_pod,
        uplink,
        uplinks: Mutex::new(BTreeMap::new()),
        lookup,
        lookup_link: Mutex::new(None),
        links: Mutex::new(BTreeMap::new()),
    })
}

/// Deleting a missing key is not an error.
fn delete(map: &MapHandle, key: &[u8], what: &str) -> Result<()> {
    delete_if_present(map, key).with_context(|| format!("removing {what}"))
}

fn decode<T: Pod>(b: &[u8], what: &str) -> Result<T> {
    T::from_bytes(b).with_context(|| format!("{what} has an unexpected size"))
}

impl Policy {
    pub(crate) fn load(pin_dir: &Path) -> Result<Self> {
        load(pin_dir)
    }
}

/// Size of `struct __sk_buff` and the offset of its ifindex (checked against BTF by a test).
#[cfg(any(test, feature = "testing"))]
pub(crate) const TEST_SKB_CTX_LEN: usize = 192;
#[cfg(any(test, feature = "testing"))]
pub(crate) const TEST_SKB_IFINDEX: usize = 40;

/// The `struct __sk_buff` passed to BPF_PROG_TEST_RUN: zero but for ifindex.
#[cfg(any(test, feature = "testing"))]
fn test_skb_ctx(ifindex: u32) -> [u8; TEST_SKB_CTX_LEN] {
    let mut ctx = [0u8; TEST_SKB_CTX_LEN];
    ctx[TEST_SKB_IFINDEX..TEST_SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

impl Policy {
    /// Enforce policy on the endpoint behind host veth `ifindex`, with its identity and
    /// addresses (at most one IPv4 and one IPv6).
    pub fn set_endpoint(&self, ifindex: u32, identity: u32, addrs: &[IpAddr]) -> Result<()> {
        ensure!(ifindex != 0, "ifindex 0 names no interface");
        ensure!(
            identity != ID_ANY,
            "identity 0 is reserved (any); endpoint {ifindex}"
        );
        let mut v = PolicyEndpointValue {
            identity,
            ..Default::default()
        };
        let (mut v4, mut v6) = (false, false);
        for ip in addrs {
            let a = CombAddr::from(*ip);
            let (slot, seen) = if a.ip().is_ipv4() {
                (0, &mut v4)
            } else {
                (1, &mut v6)
            };
            ensure!(
                !*seen,
                "endpoint {ifindex}: more than one address of a family ({addrs:?})"
            );
            *seen = true;
            v.addrs[slot] = a;
        }
        self.endpoints
            .update(&ifindex.to_ne_bytes(), v.as_bytes(), MapFlags::ANY)
            .with_context(|| format!("writing policy endpoint {ifindex}"))
    }

    /// Stop enforcing on `ifindex` (its packets pass untouched) and drop its counters.
    pub fn remove_endpoint(&self, ifindex: u32) -> Result<()> {
        delete(
            &self.endpoints,
            &ifindex.to_ne_bytes(),
            &format!("policy endpoint {ifindex}"),
        )?;
        let keys: Vec<Vec<u8>> = self.metrics.keys().collect();
        for k in keys {
            if MetricKey::from_bytes(&k).is_some_and(|m| m.endpoint == ifindex) {
                delete(&self.metrics, &k, "policy metric")?;
            }
        }
        Ok(())
    }

    pub fn endpoints(&self) -> Result<BTreeMap<u32, PolicyEndpoint>> {
        let mut out = BTreeMap::new();
        for (k, v) in entries(&self.endpoints)? {
            let ifindex: u32 = decode::<u32>(&k, "comb_policy_endpoints key")?;
            let v: PolicyEndpointValue = decode(&v, "comb_policy_endpoints value")?;
            let addrs = v
                .addrs
                .iter()
                .filter(|a| **a != CombAddr::default())
                .map(CombAddr::ip)
                .collect();
            out.insert(
                ifindex,
                PolicyEndpoint {
                    identity: v.identity,
                    addrs,
                },
            );
        }
        Ok(out)
    }

    /// The node's policy table, keys canonical ([`PolicyKey::canonical`]).
    pub fn entries(&self) -> Result<BTreeMap<PolicyKey, PolicyValue>> {
        let mut out = BTreeMap::new();
        for (k, v) in entries(&self.policy)? {
            let k: PolicyLpmKey = decode(&k, "comb_policy key")?;
            let v: PolicyLpmValue = decode(&v, "comb_policy value")?;
            out.insert(PolicyKey::from_lpm(&k)?, PolicyValue::from_raw(&v)?);
        }
        Ok(out)
    }

    /// Write one policy entry; the key is stored canonical.
    pub fn upsert_entry(&self, key: &PolicyKey, value: &PolicyValue) -> Result<()> {
        let k = key.to_lpm()?;
        self.policy
            .update(k.as_bytes(), value.to_raw().as_bytes(), MapFlags::ANY)
            .with_context(|| format!("writing policy entry {key:?}"))
    }

    /// Remove one policy entry (the exact prefix); missing is fine.
    pub fn remove_entry(&self, key: &PolicyKey) -> Result<()> {
        let k = key.to_lpm()?;
        delete(&self.policy, k.as_bytes(), &format!("policy entry {key:?}"))
    }

    /// Prefix → identity. IPv4 prefixes are stored v4-mapped, so an IPv6 prefix covering
    /// `::ffff:0:0/96` (e.g. `::/0`) also covers IPv4 addresses.
    pub fn ipcache(&self) -> Result<BTreeMap<IpNet, u32>> {
        Ok(self
            .ipcache_entries()?
            .into_iter()
            .map(|(net, e)| (net, e.identity))
            .collect())
    }

    /// Prefix → identity and redirect endpoint.
    pub fn ipcache_entries(&self) -> Result<BTreeMap<IpNet, IpcacheEntry>> {
        let mut out = BTreeMap::new();
        for (k, v) in entries(&self.ipcache)? {
            let k: IpcacheKey = decode(&k, "comb_ipcache key")?;
            let v: IpcacheValue = decode(&v, "comb_ipcache value")?;
            out.insert(
                ipcache_net(&k)?,
                IpcacheEntry {
                    identity: v.identity,
                    endpoint: v.endpoint,
                },
            );
        }
        Ok(out)
    }

    /// Map a prefix (host bits ignored) to an identity, without a redirect endpoint.
    pub fn upsert_ipcache(&self, net: IpNet, identity: u32) -> Result<()> {
        self.upsert_ipcache_entry(
            net,
            IpcacheEntry {
                identity,
                endpoint: 0,
            },
        )
    }

    /// Map a prefix (host bits ignored) to an identity and the local endpoint whose ingress
    /// REDIRECT entries new TCP flows to it are checked against ([`IpcacheEntry::endpoint`]).
    pub fn upsert_ipcache_entry(&self, net: IpNet, e: IpcacheEntry) -> Result<()> {
        ensure!(e.identity != ID_ANY, "identity 0 is reserved (any); {net}");
        let v = IpcacheValue {
            identity: e.identity,
            endpoint: e.endpoint,
        };
        self.ipcache
            .update(ipcache_key(net).as_bytes(), v.as_bytes(), MapFlags::ANY)
            .with_context(|| format!("writing ipcache entry {net}"))
    }

    /// Make `fd`, a listening TCP socket of `family` in the node's network namespace (with
    /// `IP_TRANSPARENT`, so it may accept connections to any address), the node proxy's
    /// listener of `kind`: the flows the datapath steers to that kind go to it. Replaces the
    /// previous one (a restarted agent's new listener); a listener that is closed leaves the
    /// map by itself, and its flows then take their "cannot redirect" path (L7: fail closed
    /// or unredirected by reason; HBONE outbound: plaintext, `hbone-unavailable`; HBONE
    /// inbound: the node answers RST).
    pub fn set_listener(
        &self,
        kind: ListenerKind,
        family: ProxyFamily,
        fd: BorrowedFd<'_>,
    ) -> Result<()> {
        let raw = u64::try_from(fd.as_raw_fd()).context("negative fd")?;
        self.proxy_listeners
            .update(
                &kind.slot(family).to_ne_bytes(),
                &raw.to_ne_bytes(),
                MapFlags::ANY,
            )
            .with_context(|| {
                format!(
                    "putting the {} {family:?} listener into comb_proxy_listeners (a listening TCP socket?)",
                    kind.as_str()
                )
            })
    }

    /// No listener of `kind` for `family`. Missing is fine.
    pub fn clear_listener(&self, kind: ListenerKind, family: ProxyFamily) -> Result<()> {
        if !self.listener_present(kind, family)? {
            return Ok(());
        }
        match self
            .proxy_listeners
            .delete(&kind.slot(family).to_ne_bytes())
        {
            // A sockmap answers EINVAL for an empty slot: closed since we looked.
            Err(e) if e.kind() == libbpf_rs::ErrorKind::InvalidInput => Ok(()),
            r => r.with_context(|| format!("removing the {} {family:?} listener", kind.as_str())),
        }
    }

    /// Whether `kind` has a listener for `family` (false once it was closed).
    pub fn listener_present(&self, kind: ListenerKind, family: ProxyFamily) -> Result<bool> {
        Ok(self
            .proxy_listeners
            .lookup(&kind.slot(family).to_ne_bytes(), MapFlags::ANY)
            .with_context(|| format!("reading the {} {family:?} listener", kind.as_str()))?
            .is_some())
    }

    /// The socket cookie of the listener in `kind`'s slot for `family` (None: empty). A
    /// proxy compares it with its own listener's ([`crate::socket_cookie`]) to see that a
    /// successor took the slot over.
    pub fn listener_cookie(&self, kind: ListenerKind, family: ProxyFamily) -> Result<Option<u64>> {
        let v = self
            .proxy_listeners
            .lookup(&kind.slot(family).to_ne_bytes(), MapFlags::ANY)
            .with_context(|| format!("reading the {} {family:?} listener", kind.as_str()))?;
        match v {
            None => Ok(None),
            Some(b) => Ok(Some(u64::from_ne_bytes(
                b.as_slice()
                    .try_into()
                    .context("comb_proxy_listeners value is not a cookie")?,
            ))),
        }
    }

    /// [`Self::clear_listener`] only while the slot holds the socket with `cookie`: a
    /// draining proxy must not remove the listener its successor put there.
    pub fn clear_listener_if(
        &self,
        kind: ListenerKind,
        family: ProxyFamily,
        cookie: u64,
    ) -> Result<()> {
        if self.listener_cookie(kind, family)? == Some(cookie) {
            self.clear_listener(kind, family)?;
        }
        Ok(())
    }

    /// [`Self::set_listener`] of the L7 proxy.
    pub fn set_proxy_listener(&self, family: ProxyFamily, fd: BorrowedFd<'_>) -> Result<()> {
        self.set_listener(ListenerKind::L7, family, fd)
    }

    /// [`Self::clear_listener`] of the L7 proxy.
    pub fn clear_proxy_listener(&self, family: ProxyFamily) -> Result<()> {
        self.clear_listener(ListenerKind::L7, family)
    }

    /// [`Self::listener_present`] of the L7 proxy.
    pub fn proxy_listener_present(&self, family: ProxyFamily) -> Result<bool> {
        self.listener_present(ListenerKind::L7, family)
    }

    /// What `comb_mesh_addrs` holds: HBONE peers and local mesh pods by address.
    pub fn mesh_addrs(&self) -> Result<BTreeMap<IpAddr, MeshAddr>> {
        let mut out = BTreeMap::new();
        for (k, v) in entries(&self.mesh_addrs)? {
            let k: CombAddr = decode(&k, "comb_mesh_addrs key")?;
            let v: abi::MeshAddrValue = decode(&v, "comb_mesh_addrs value")?;
            out.insert(k.ip(), MeshAddr::from_raw(&v));
        }
        Ok(out)
    }

    /// Write what the mesh makes of `ip` (one map write: readers see the old or the new value).
    pub fn upsert_mesh_addr(&self, ip: IpAddr, a: MeshAddr) -> Result<()> {
        ensure!(
            a.peer || a.local.is_some(),
            "mesh address {ip}: neither peer nor local"
        );
        self.mesh_addrs
            .update(
                CombAddr::from(ip).as_bytes(),
                a.to_raw().as_bytes(),
                MapFlags::ANY,
            )
            .with_context(|| format!("writing mesh address {ip}"))
    }

    /// `ip` is nothing to the mesh any more; missing is fine.
    pub fn remove_mesh_addr(&self, ip: IpAddr) -> Result<()> {
        delete(
            &self.mesh_addrs,
            CombAddr::from(ip).as_bytes(),
            &format!("mesh address {ip}"),
        )
    }

    /// What `comb_mesh_ports` holds: local endpoints' enrolment and mTLS modes.
    pub fn mesh_ports(&self) -> Result<BTreeMap<MeshPortKey, MeshPort>> {
        let mut out = BTreeMap::new();
        for (k, v) in entries(&self.mesh_ports)? {
            let k: abi::MeshPortKey = decode(&k, "comb_mesh_ports key")?;
            let v: abi::MeshPortValue = decode(&v, "comb_mesh_ports value")?;
            out.insert(MeshPortKey::from_raw(&k), MeshPort::from_raw(&v));
        }
        Ok(out)
    }

    /// Write one endpoint's (`port: None`) or one port's mesh entry.
    pub fn upsert_mesh_port(&self, key: MeshPortKey, v: MeshPort) -> Result<()> {
        self.mesh_ports
            .update(
                key.to_raw()?.as_bytes(),
                v.to_raw().as_bytes(),
                MapFlags::ANY,
            )
            .with_context(|| format!("writing mesh entry {key:?}"))
    }

    /// Remove one mesh entry; missing is fine.
    pub fn remove_mesh_port(&self, key: MeshPortKey) -> Result<()> {
        delete(
            &self.mesh_ports,
            key.to_raw()?.as_bytes(),
            &format!("mesh entry {key:?}"),
        )
    }

    pub fn remove_ipcache(&self, net: IpNet) -> Result<()> {
        delete(
            &self.ipcache,
            ipcache_key(net).as_bytes(),
            &format!("ipcache entry {net}"),
        )
    }

    /// Conntrack lifetimes (zero = the default) and whether flow events are emitted.
    pub fn set_config(&self, cfg: &PolicyConfig) -> Result<()> {
        self.config
            .update(&0u32.to_ne_bytes(), cfg.to_raw().as_bytes(), MapFlags::ANY)
            .context("updating comb_policy_config")
    }

    /// The configuration in effect (defaults while never written).
    pub fn config(&self) -> Result<PolicyConfig> {
        let v = self
            .config
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .and_then(|v| PolicyConfigValue::from_bytes(&v))
            .unwrap_or_default();
        Ok(PolicyConfig::from_raw(&v))
    }

    /// Every conntrack entry, expired ones included (with zero `remaining`).
    pub fn ct_entries(&self) -> Result<Vec<CtEntry>> {
        let now = comb_host::boot_time_ns();
        let mut out = Vec::new();
        walk_batched(&self.ct, |k, v| -> Result<()> {
            let k: CtKey = decode(k, "comb_ct key")?;
            let v: CtValue = decode(v, "comb_ct value")?;
            out.push(CtEntry {
                src: SocketAddr::new(k.saddr.ip(), u16::from_be(k.sport)),
                dst: SocketAddr::new(k.daddr.ip(), u16::from_be(k.dport)),
                protocol: k.protocol,
                direction: Direction::from_raw(k.direction)
                    .with_context(|| format!("invalid direction {}", k.direction))?,
                seen_reply: v.flags & CT_F_SEEN_REPLY != 0,
                closing: v.flags & CT_F_CLOSING != 0,
                proxy: v.flags & CT_F_PROXY != 0,
                hbone: v.flags & CT_F_HBONE != 0,
                flags: v.flags,
                reason: ReasonCode(v.reason),
                endpoint: v.endpoint,
                policy: v.policy,
                remaining: Duration::from_nanos(v.expires_ns.saturating_sub(now)),
                age: Duration::from_nanos(now.saturating_sub(v.created_ns)),
            });
            Ok(())
        })
        .context("reading comb_ct")?;
        out.sort_by(|a, b| {
            (a.endpoint, a.direction, a.src, a.dst, a.protocol).cmp(&(
                b.endpoint,
                b.direction,
                b.src,
                b.dst,
                b.protocol,
            ))
        });
        Ok(out)
    }

    /// Delete expired conntrack entries (the datapath already ignores them; this frees the
    /// slots). Returns how many were deleted.
    pub fn ct_gc(&self) -> Result<usize> {
        let mut n = 0;
        let now = comb_host::boot_time_ns();
        // Collected first (iterating while deleting restarts a hash map's walk), in batches:
        // most entries are alive and cost no syscall of their own.
        let mut expired = Vec::new();
        walk_batched(&self.ct, |k, v| -> Result<()> {
            let v: CtValue = decode(v, "comb_ct value")?;
            if v.expires_ns <= now {
                expired.push(k.to_vec());
            }
            Ok(())
        })
        .context("reading comb_ct")?;
        for k in expired {
            // Read again right before deleting: the datapath may have renewed the entry.
            let Some(v) = self.ct.lookup(&k, MapFlags::ANY)? else {
                continue;
            };
            let v: CtValue = decode(&v, "comb_ct value")?;
            if v.expires_ns <= now {
                delete(&self.ct, &k, "conntrack entry")?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Counters per (endpoint, direction, reason), summed over CPUs, sorted.
    pub fn metrics(&self) -> Result<Vec<PolicyMetric>> {
        let mut out = Vec::new();
        for k in self.metrics.keys() {
            let Some(per_cpu) = self.metrics.lookup_percpu(&k, MapFlags::ANY)? else {
                continue;
            };
            let key: MetricKey = decode(&k, "comb_policy_metrics key")?;
            let mut sum = MetricValue::default();
            for v in per_cpu {
                let v: MetricValue = decode(&v, "comb_policy_metrics value")?;
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            out.push(PolicyMetric {
                endpoint: key.endpoint,
                direction: Direction::from_raw(key.direction)
                    .with_context(|| format!("invalid direction {}", key.direction))?,
                reason: ReasonCode(key.reason),
                packets: sum.packets,
                bytes: sum.bytes,
            });
        }
        out.sort();
        Ok(out)
    }

    /// Flow events that did not fit into the ring buffer.
    pub fn events_lost(&self) -> Result<u64> {
        let per_cpu = self
            .events_lost
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .unwrap_or_default();
        per_cpu
            .iter()
            .map(|v| decode::<u64>(v, "comb_policy_events_lost value"))
            .sum()
    }

    /// A consumer of the flow events (enable them with [`PolicyConfig::events`]). Run one at a
    /// time.
    pub fn flow_events(&self) -> Result<FlowEventReader> {
        let map = MapHandle::try_from(&self.events).context("comb_flow_events")?;
        FlowEventReader::new(map)
    }

    /// Run one policy program on `packet` (Ethernet frame) with BPF_PROG_TEST_RUN, as if it
    /// crossed host veth `ifindex` (which must exist in the calling thread's network
    /// namespace). Returns the tc verdict: 0 = pass, 2 = drop. For tests.
    #[cfg(feature = "testing")]
    pub fn test_run(
        &self,
        direction: Direction,
        ifindex: u32,
        packet: &[u8],
        repeat: u32,
    ) -> Result<u32> {
        use crate::sys;
        use std::os::fd::AsFd;

        let prog = match direction {
            Direction::Egress => &self.from_pod,
            Direction::Ingress => &self.to_pod,
        };
        if packet.len() < 14 {
            anyhow::bail!("a test packet needs at least an Ethernet header");
        }
        Ok(sys::prog_test_run(
            prog.as_fd(),
            packet,
            &test_skb_ctx(ifindex),
            repeat,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names_match_the_object() {
        let mut storage = MaybeUninit::uninit();
        let (progs, maps) = crate::pin::object_names(PolicySkelBuilder::default(), &mut storage);
        assert_eq!(progs, [PROG_FROM_POD, PROG_TO_POD]);
        use abi::*;
        let mut want = [
            MAP_IPCACHE,
            MAP_POLICY_ENDPOINTS,
            MAP_POLICY,
            MAP_CT,
            MAP_FRAG,
            MAP_POLICY_CONFIG,
            MAP_POLICY_METRICS,
            MAP_FLOW_EVENTS,
            MAP_POLICY_EVENTS_LOST,
            MAP_PROXY_LISTENERS,
            MAP_MESH_ADDRS,
            MAP_MESH_PORTS,
        ];
        want.sort();
        assert_eq!(maps, want);
    }

    #[test]
    fn test_ctx_puts_ifindex_where_the_kernel_reads_it() {
        let ctx = test_skb_ctx(0x01020304);
        assert_eq!(&ctx[40..44], &0x01020304u32.to_ne_bytes());
        assert!(ctx[..40].iter().chain(&ctx[44..]).all(|b| *b == 0));
    }
}
