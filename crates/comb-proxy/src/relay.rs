//! Opaque TCP relay between a downstream and an upstream socket: in userspace, or spliced in
//! the kernel (sockmap) once nothing more needs to be seen.
//!
//! One loop serves both modes. Each direction waits for its source to be readable, forwards
//! whatever userspace can read, and on EOF half-closes the destination; an error resets both.
//! Spliced, the kernel moves the bytes and a read only ever returns EOF, an error, or (rarely)
//! bytes the verdict could not redirect; before half-closing, the direction waits until the
//! kernel has handed the destination socket every byte it redirected (FIN is not spliced, and
//! a shutdown earlier would make the kernel drop the rest).

use std::io;
use std::os::fd::AsFd;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use comb_datapath::proxy_splice::tcp_bytes_written;
use comb_datapath::{PairHandle, ProxySplice};
use tokio::net::TcpStream;
use tracing::{debug, warn};

mod bench;
mod idle;

pub use bench::{BenchResult, bench_relay};
pub(crate) use idle::{Counted, silent_for};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayOutcome {
    /// Bytes delivered downstream -> upstream (buffered ones included).
    pub sent: u64,
    /// Bytes delivered upstream -> downstream (buffered ones included).
    pub received: u64,
    pub spliced: bool,
    pub error: Option<String>,
    /// Closed (FIN both ways) after no byte moved for the idle timeout.
    pub idle_timeout: bool,
}

/// Relay until both directions reached EOF or one failed. `down_buffered` was read from `down`
/// and goes to `up` first (and `up_buffered` the other way). With `splice`, the two sockets
/// are spliced in the kernel after that; a pairing failure is logged (once) and the relay
/// stays in userspace. With `idle`, a relay that moves no byte for that long is closed
/// (spliced pairs excepted: the kernel moves their bytes out of sight).
pub async fn relay(
    down: TcpStream,
    down_buffered: Bytes,
    up: TcpStream,
    up_buffered: Bytes,
    splice: Option<&ProxySplice>,
    idle: Option<Duration>,
) -> RelayOutcome {
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let in_kernel = AtomicBool::new(false);
    let mut out = RelayOutcome::default();
    let relayed = run(
        &down,
        down_buffered,
        &up,
        up_buffered,
        splice,
        [&sent, &received],
        &mut out.spliced,
        &in_kernel,
    );
    let r = match idle {
        None => relayed.await,
        Some(idle) => tokio::select! {
            r = relayed => r,
            _ = silent_for(idle, [&sent, &received], &in_kernel) => {
                out.idle_timeout = true;
                Ok(())
            }
        },
    };
    if let Err(e) = r {
        // Tell both ends the connection broke rather than ended: RST, not FIN.
        for s in [&down, &up] {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
        out.error = Some(e.to_string());
    }
    out.sent = sent.load(Ordering::Relaxed);
    out.received = received.load(Ordering::Relaxed);
    out
}

/// `counts` = [down -> up, up -> down], updated as bytes are delivered (also when it fails).
#[allow(clippy::too_many_arguments)]
async fn run(
    down: &TcpStream,
    down_buffered: Bytes,
    up: &TcpStream,
    up_buffered: Bytes,
    splice: Option<&ProxySplice>,
    counts: [&AtomicU64; 2],
    spliced: &mut bool,
    in_kernel: &AtomicBool,
) -> io::Result<()> {
    tokio::try_join!(
        forward_all(up, &down_buffered, counts[0]),
        forward_all(down, &up_buffered, counts[1]),
    )?;
    let mut pair = None;
    if let Some(ps) = splice {
        pair = try_splice(ps, down, up, counts).await?;
        *spliced = pair.is_some();
        in_kernel.store(*spliced, Ordering::Relaxed);
    }
    let mut result = Ok(());
    {
        let d = Dir {
            src: down,
            dst: up,
            count: counts[0],
            kernel: pair.as_ref().map(|p| Kernel {
                pair: &p.handle,
                a_to_b: true,
                base: p.base_up,
                user_base: counts[0].load(Ordering::Relaxed),
            }),
        };
        let u = Dir {
            src: up,
            dst: down,
            count: counts[1],
            kernel: pair.as_ref().map(|p| Kernel {
                pair: &p.handle,
                a_to_b: false,
                base: p.base_down,
                user_base: counts[1].load(Ordering::Relaxed),
            }),
        };
        let (mut d, mut u) = (pin!(d.run()), pin!(u.run()));
        let (mut d_done, mut u_done) = (false, false);
        while !(d_done && u_done) {
            tokio::select! {
                r = &mut d, if !d_done => { result = r; d_done = true; }
                r = &mut u, if !u_done => { result = r; u_done = true; }
            }
            if result.is_err() {
                break;
            }
        }
    }
    if let Some(p) = pair {
        let (k_sent, k_received) = p.handle.bytes();
        counts[0].fetch_add(k_sent, Ordering::Relaxed);
        counts[1].fetch_add(k_received, Ordering::Relaxed);
        // Both directions are finished (or broken): nothing of theirs is left in the kernel.
        p.handle.unpair();
    }
    result
}

struct Spliced {
    handle: PairHandle,
    /// Bytes written into each socket before the pair (see `Dir::wait_flushed`).
    base_down: u64,
    base_up: u64,
}

/// Read both sockets until empty (forwarding what comes), then pair them. None: EOF came
/// first (nothing to splice; the loop sees it again) or pairing failed (logged).
async fn try_splice(
    ps: &ProxySplice,
    down: &TcpStream,
    up: &TcpStream,
    counts: [&AtomicU64; 2],
) -> io::Result<Option<Spliced>> {
    // The verdict gets queued skbs whole: none may be half read when the pair starts.
    let mut buf = vec![0u8; 64 << 10];
    if !drain(down, up, &mut buf, counts[0]).await? || !drain(up, down, &mut buf, counts[1]).await?
    {
        return Ok(None);
    }
    // Redirected skbs that do not fit the peer's send buffer wait for the psock worker's
    // retry (a jiffy later): a large buffer makes that rarer (2 GiB on loopback: 3.8 → 6.8
    // Gbit/s). It is a cap, not an allocation.
    for s in [down, up] {
        let _ = socket2::SockRef::from(s).set_send_buffer_size(8 << 20);
    }
    let base_down = tcp_bytes_written(down.as_fd())?;
    let base_up = tcp_bytes_written(up.as_fd())?;
    match ps.pair(down.as_fd(), up.as_fd()) {
        Ok(handle) => Ok(Some(Spliced {
            handle,
            base_down,
            base_up,
        })),
        Err(e) => {
            static LOGGED: AtomicBool = AtomicBool::new(false);
            if !LOGGED.swap(true, Ordering::Relaxed) {
                warn!(error = %format!("{e:#}"), "proxy splice unavailable, relaying in userspace (logged once)");
            } else {
                debug!(error = %format!("{e:#}"), "proxy splice failed, relaying in userspace");
            }
            Ok(None)
        }
    }
}

/// Forward from `src` to `dst` until a read would block. False on EOF.
async fn drain(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut [u8],
    count: &AtomicU64,
) -> io::Result<bool> {
    loop {
        match src.try_read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => forward_all(dst, &buf[..n], count).await?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

/// Write all of `data` to `dst`, counting it.
async fn forward_all(dst: &TcpStream, mut data: &[u8], count: &AtomicU64) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::Relaxed);
                data = &data[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What the kernel does for one direction of a spliced pair (a = down, b = up).
struct Kernel<'a> {
    pair: &'a PairHandle,
    a_to_b: bool,
    /// `tcp_bytes_written(dst)` when the pair started.
    base: u64,
    /// Userspace-forwarded bytes of this direction when the pair started.
    user_base: u64,
}

struct Dir<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    count: &'a AtomicU64,
    kernel: Option<Kernel<'a>>,
}

impl Dir<'_> {
    async fn run(self) -> io::Result<()> {
        let mut buf = vec![
            0u8;
            if self.kernel.is_some() {
                16 << 10
            } else {
                64 << 10
            }
        ];
        loop {
            self.src.readable().await?;
            match self.src.try_read(&mut buf) {
                Ok(0) => break,
                // Spliced, only bytes the verdict could not redirect get here: forward them.
                Ok(n) => forward_all(self.dst, &buf[..n], self.count).await?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(k) = &self.kernel {
            self.wait_flushed(k).await?;
        }
        socket2::SockRef::from(self.dst).shutdown(std::net::Shutdown::Write)
    }

    /// Wait until `dst` has written every byte of this direction: those the kernel redirected
    /// sit in its psock queue until a kernel worker writes them. Polled with a growing pause
    /// (there is no event for it); normally done at the first look.
    async fn wait_flushed(&self, k: &Kernel<'_>) -> io::Result<()> {
        let mut pause = Duration::from_micros(200);
        loop {
            let (ab, ba) = k.pair.bytes();
            let kernel = if k.a_to_b { ab } else { ba };
            let user = self.count.load(Ordering::Relaxed) - k.user_base;
            let written = tcp_bytes_written(self.dst.as_fd())?.wrapping_sub(k.base);
            if written >= kernel + user {
                return Ok(());
            }
            if let Some(e) = self.dst.take_error()? {
                return Err(e);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests;
