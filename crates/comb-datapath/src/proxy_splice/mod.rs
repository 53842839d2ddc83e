//! Kernel splice of the node proxy's two sockets of a connection (`bpf/proxy_splice.c`): once
//! paired, every skb received on one socket leaves through the other without crossing userspace.
//!
//! Pin layout under `pin_dir` (shared with [`crate::Datapath`]): `maps/comb_px_*` (adopted by
//! the next [`ProxySplice::open`]; pairs die with their sockets, so stale peer entries are
//! removed then), `progs/comb_px_verdict`.
//!
//! What the caller must know:
//! - FIN is not forwarded. On EOF from one side, wait until the other side has written
//!   everything it was given ([`tcp_bytes_written`]) and then `shutdown(SHUT_WR)` it; a
//!   shutdown earlier makes the kernel drop the rest (EPIPE on its send path).
//! - Bytes the verdict could not redirect (the peer closed) are left to userspace to read.
//! - Before pairing, read each socket until EAGAIN (see [`ProxySplice::pair`]).
//! - Unpairing a live socket discards bytes queued in the kernel for it: unpair when both
//!   directions are finished.

#[allow(unsafe_code)] // unsafe impl Pod
pub mod abi;

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use libbpf_rs::{MapCore, MapFlags, MapHandle, ProgramHandle, libbpf_sys};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::abi::Pod;
use crate::map_io::delete_if_present;
use crate::pin::{load_pinned, map_handle, prepare_dir, remove_pin};
use crate::skel::proxy_splice::ProxySpliceSkelBuilder;
use crate::sys;
use abi::{MAP_PX_PEERS, MAP_PX_REDIR, MAP_PX_SOCKS, MAP_PX_STATS, PxPeer, PxStatsValue};

const PROG_VERDICT: &str = "comb_px_verdict";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProxySpliceStats {
    /// Sockets currently spliced (two per pair).
    pub sockets: u64,
    /// Peer entries (two per live pair).
    pub peer_entries: u64,
    pub redirected_skbs: u64,
    pub redirected_bytes: u64,
    pub redirect_failures: u64,
    pub unpaired_skbs: u64,
    pub unpaired_bytes: u64,
}

struct Inner {
    pin_dir: PathBuf,
    socks: MapHandle,
    redir: MapHandle,
    peers: MapHandle,
    stats: MapHandle,
    prog: ProgramHandle,
}

/// The loaded proxy splice. Dropping it closes its fds only (pins keep the maps and the
/// attachment); [`ProxySplice::shutdown`] with `keep_pins = false` removes them.
pub struct ProxySplice {
    inner: Arc<Inner>,
}

/// The agent's proxy shares it between connection tasks.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<ProxySplice>();
    send_sync::<PairHandle>();
};

impl ProxySplice {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        prepare_dir(pin_dir, &["maps", "progs"])?;
        let maps_dir = pin_dir.join("maps");
        let mut storage = MaybeUninit::uninit();
        let skel = load_pinned(
            ProxySpliceSkelBuilder::default(),
            &mut storage,
            &maps_dir,
            "proxy splice",
        )?;
        let m = &skel.maps;
        let inner = Inner {
            pin_dir: pin_dir.to_owned(),
            socks: map_handle(&m.comb_px_socks)?,
            redir: map_handle(&m.comb_px_redir)?,
            peers: map_handle(&m.comb_px_peers)?,
            stats: map_handle(&m.comb_px_stats)?,
            prog: ProgramHandle::try_from(&skel.progs.comb_px_verdict)
                .context("verdict program")?,
        };
        let path = pin_dir.join("progs").join(PROG_VERDICT);
        remove_pin(&path)?;
        inner
            .prog
            .pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        // Replaces a previous agent's program on an adopted map; sockets already in it keep
        // theirs (they belonged to that agent and close with it).
        skel.progs
            .comb_px_verdict
            .attach_sockmap(inner.socks.as_fd().as_raw_fd())
            .context("attaching the verdict program to comb_px_socks")?;
        drop(skel);
        let stale = inner.remove_stale_peers()?;
        info!(pin_dir = %pin_dir.display(), stale, "proxy splice loaded");
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Splice `a` and `b` (established TCP sockets of this process): from now on what either
    /// receives is sent out of the other by the kernel. Bytes already queued on them are
    /// processed first, in order. On error nothing is spliced.
    ///
    /// Precondition: neither socket has a half-read skb queued, i.e. the caller's last read of
    /// each (if any) returned EAGAIN, or it never read. The verdict gets queued skbs whole
    /// (tcp_read_skb ignores how far userspace read into one), so a half-read one would have
    /// its head sent twice. Whatever the caller wrote must be fully written (not pending).
    pub fn pair(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<PairHandle> {
        let (ca, cb) = (socket_cookie(a)?, socket_cookie(b)?);
        ensure!(ca != cb, "cannot splice a socket to itself");
        let i = &self.inner;
        // Peers first: a socket must never run the verdict without knowing its peer.
        for (k, p) in [(ca, cb), (cb, ca)] {
            let v = PxPeer {
                peer: p,
                ..Default::default()
            };
            if let Err(e) = i
                .peers
                .update(&k.to_ne_bytes(), v.as_bytes(), MapFlags::NO_EXIST)
            {
                i.forget(ca, cb);
                return Err(e).context("adding comb_px_peers entries (socket already paired?)");
            }
        }
        let mut handle = PairHandle {
            inner: self.inner.clone(),
            a: ca,
            b: cb,
            spliced: (false, false),
        };
        // Then both into the redirect map (no programs: nothing changes for the sockets yet),
        // so that neither side's redirect can find its peer missing.
        for fd in [a, b] {
            insert_sock(&i.redir, fd).context("adding the socket to comb_px_redir")?;
        }
        // Now the verdict: a's skbs go to b from here on, in order.
        insert_sock(&i.socks, a).context("adding the socket to comb_px_socks")?;
        handle.spliced.0 = true;
        kick(a).context("kicking the receive path")?;
        // Failing now leaves a -> b spliced: undoing it could reorder (a's redirected bytes are
        // still in flight); b -> a simply stays in userspace.
        match insert_sock(&i.socks, b) {
            Ok(()) => {
                handle.spliced.1 = true;
                kick(b).context("kicking the receive path")?;
            }
            Err(e) => warn!(error = %e, "proxy splice: only one direction spliced"),
        }
        Ok(handle)
    }

    pub fn stats(&self) -> Result<ProxySpliceStats> {
        let i = &self.inner;
        let mut sum = PxStatsValue::default();
        let per_cpu = i
            .stats
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .unwrap_or_default();
        for v in per_cpu {
            let v = PxStatsValue::from_bytes(&v).context("comb_px_stats value size")?;
            sum.redirected_skbs += v.redirected_skbs;
            sum.redirected_bytes += v.redirected_bytes;
            sum.redirect_failures += v.redirect_failures;
            sum.unpaired_skbs += v.unpaired_skbs;
            sum.unpaired_bytes += v.unpaired_bytes;
        }
        Ok(ProxySpliceStats {
            sockets: i.socks.keys().count() as u64,
            peer_entries: i.peers.keys().count() as u64,
            redirected_skbs: sum.redirected_skbs,
            redirected_bytes: sum.redirected_bytes,
            redirect_failures: sum.redirect_failures,
            unpaired_skbs: sum.unpaired_skbs,
            unpaired_bytes: sum.unpaired_bytes,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.inner.pin_dir
    }

    /// `keep_pins = true`: leave maps and program pinned for the next agent. `false`: detach
    /// the program and remove this module's pins (the directories too when left empty).
    pub fn shutdown(self, keep_pins: bool) -> Result<()> {
        let i = &self.inner;
        if keep_pins {
            info!(pin_dir = %i.pin_dir.display(), "proxy splice left pinned");
            return Ok(());
        }
        let mut errors = Vec::new();
        match sys::prog_detach(
            i.prog.as_fd(),
            i.socks.as_fd(),
            libbpf_sys::BPF_SK_SKB_VERDICT,
        ) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                errors.push(format!("detaching the verdict program: {e}"))
            }
            _ => {}
        }
        let maps = i.pin_dir.join("maps");
        let pins = [MAP_PX_SOCKS, MAP_PX_REDIR, MAP_PX_PEERS, MAP_PX_STATS]
            .iter()
            .map(|n| maps.join(n))
            .chain([i.pin_dir.join("progs").join(PROG_VERDICT)]);
        for p in pins {
            if let Err(e) = remove_pin(&p) {
                errors.push(format!("{e:#}"));
            }
        }
        // Only when empty: the other datapath modules share these directories.
        for d in [maps, i.pin_dir.join("progs"), i.pin_dir.clone()] {
            let _ = std::fs::remove_dir(d);
        }
        ensure!(
            errors.is_empty(),
            "proxy splice shutdown: {}",
            errors.join("; ")
        );
        info!(pin_dir = %i.pin_dir.display(), "proxy splice removed");
        Ok(())
    }
}

impl Inner {
    /// Remove every trace of a pair (a closed socket has already left the sockhashes).
    fn forget(&self, a: u64, b: u64) {
        for c in [a, b] {
            let k = c.to_ne_bytes();
            // The verdict first, then its redirect target, then the peer entries.
            for m in [&self.socks, &self.redir, &self.peers] {
                if let Err(e) = delete_if_present(m, &k) {
                    warn!(cookie = c, error = %e, "proxy splice: removing a pair entry");
                }
            }
        }
    }

    /// Peer entries of sockets that are gone (a previous agent's pairs).
    fn remove_stale_peers(&self) -> Result<usize> {
        let mut n = 0;
        for k in self.peers.keys() {
            let alive = self
                .redir
                .lookup(&k, MapFlags::ANY)
                .is_ok_and(|v| v.is_some());
            if !alive {
                delete_if_present(&self.peers, &k).context("removing a stale peer entry")?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// One spliced pair. Dropping it (or [`PairHandle::unpair`]) removes the pair's entries; do
/// that once both directions are finished (see the module doc).
pub struct PairHandle {
    inner: Arc<Inner>,
    a: u64,
    b: u64,
    spliced: (bool, bool),
}

impl PairHandle {
    /// Bytes the kernel moved (a -> b, b -> a). Bytes userspace forwarded are not included.
    pub fn bytes(&self) -> (u64, u64) {
        (self.side(self.a).bytes, self.side(self.b).bytes)
    }

    /// Skbs whose redirect failed (peer gone), per receiving side (a, b); their bytes were left
    /// to userspace.
    pub fn failures(&self) -> (u64, u64) {
        (self.side(self.a).failures, self.side(self.b).failures)
    }

    /// Which receive directions the kernel handles: (a -> b, b -> a).
    pub fn spliced(&self) -> (bool, bool) {
        self.spliced
    }

    /// Socket cookies (a, b).
    pub fn cookies(&self) -> (u64, u64) {
        (self.a, self.b)
    }

    pub fn unpair(self) {}

    fn side(&self, cookie: u64) -> PxPeer {
        self.inner
            .peers
            .lookup(&cookie.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|v| PxPeer::from_bytes(&v))
            .unwrap_or_default()
    }
}

impl Drop for PairHandle {
    fn drop(&mut self) {
        self.inner.forget(self.a, self.b);
        debug!(a = self.a, b = self.b, "proxy splice pair removed");
    }
}

/// Insert a socket under its cookie. With an 8-byte value the kernel reads the fd as a u64.
fn insert_sock(map: &MapHandle, fd: BorrowedFd<'_>) -> Result<()> {
    let cookie = socket_cookie(fd)?;
    let v = fd.as_raw_fd() as u64;
    map.update(&cookie.to_ne_bytes(), &v.to_ne_bytes(), MapFlags::ANY)
        .map_err(anyhow::Error::from)
}

/// The kernel's unique id of a socket (SO_COOKIE), the key of every map here.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> Result<u64> {
    const SO_COOKIE: libc::c_int = 57;
    let v: u64 = sys::getsockopt(fd, libc::SOL_SOCKET, SO_COOKIE).context("SO_COOKIE")?;
    Ok(v)
}

/// Make the socket's data_ready run now: bytes that were queued before it was spliced are
/// then verdicted (tcp_read_skb drains the queue in order) without waiting for the next
/// packet. Setting SO_RCVLOWAT (to its current value) calls tcp_data_ready().
fn kick(fd: BorrowedFd<'_>) -> Result<()> {
    let lowat: libc::c_int = sys::getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT)?;
    sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, lowat)
        .context("setsockopt SO_RCVLOWAT")
}

/// Bytes ever written into this TCP socket's send queue (its write sequence minus the
/// initial one), exact: snd_una advance (TCP_INFO bytes_acked) plus what is queued past it
/// (SIOCOUTQ), retried until no ACK moved snd_una between the two reads. Used to know when
/// the kernel has handed a spliced socket everything redirected to it.
pub fn tcp_bytes_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    loop {
        let a1 = tcp_bytes_acked(fd)?;
        let outq = sys::outq(fd)?;
        if tcp_bytes_acked(fd)? == a1 {
            return Ok(a1 + outq);
        }
    }
}

fn tcp_bytes_acked(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info: libc::tcp_info = sys::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(info.tcpi_bytes_acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_match_the_object() {
        let mut storage = MaybeUninit::uninit();
        let (_, names) = crate::pin::object_names(ProxySpliceSkelBuilder::default(), &mut storage);
        let mut want = [MAP_PX_SOCKS, MAP_PX_REDIR, MAP_PX_PEERS, MAP_PX_STATS];
        want.sort();
        assert_eq!(names, want);
    }

    /// Unprivileged: the byte count of a loopback socket follows what was written.
    #[test]
    fn tcp_bytes_written_counts_writes() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let before = tcp_bytes_written(c.as_fd()).unwrap();
        c.write_all(&[7u8; 100_000]).unwrap();
        let mut got = vec![0u8; 100_000];
        s.read_exact(&mut got).unwrap();
        assert_eq!(tcp_bytes_written(c.as_fd()).unwrap() - before, 100_000);
        assert_ne!(
            socket_cookie(c.as_fd()).unwrap(),
            socket_cookie(s.as_fd()).unwrap()
        );
    }
}
