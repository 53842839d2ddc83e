//! Privileged tests of the proxy splice (sk_skb verdict on a sockhash) with real loopback TCP
//! inside a throwaway network namespace. Needs root (BPF, bpffs, netns). Without privileges it
//! fails under CI=true and is skipped with a notice otherwise.

#[allow(dead_code)] // shared with the cgroup-based tests
mod common;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use comb_datapath::ProxySplice;
use comb_datapath::proxy_splice::tcp_bytes_written;
use common::PinGuard;

fn privileged() -> bool {
    common::privileged("proxy splice")
}

/// A network namespace with lo up, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = common::unique("comb-pxs");
        run(&["ip", "netns", "add", &name]);
        let ns = Self(name);
        run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

/// The calling thread (and threads it spawns later) enter namespace `name`; setns is per
/// thread, so the test harness's other threads stay where they are.
fn enter_netns(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).expect("open netns");
    // SAFETY: valid fd of a network namespace file.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("run");
    assert!(st.success(), "{args:?} failed");
}

/// Run `f` on a fresh thread inside a fresh namespace, with a fresh ProxySplice.
fn in_netns(f: impl FnOnce(&ProxySplice) + Send + 'static) {
    comb_host::ensure_bpffs().expect("bpffs");
    let ns = Netns::new();
    let pins = PinGuard::fresh();
    let name = ns.0.clone();
    let dir = pins.0.clone();
    let r = thread::spawn(move || {
        enter_netns(&name);
        let ps = ProxySplice::open(&dir).expect("open proxy splice");
        f(&ps);
        let st = ps.stats().unwrap();
        assert_eq!(st.sockets, 0, "sockets left in the sockhash: {st:?}");
        assert_eq!(st.peer_entries, 0, "peer entries left: {st:?}");
        ps.shutdown(false).expect("shutdown");
    })
    .join();
    drop(ns);
    drop(pins);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

/// The proxy's view of one relayed connection: client <-> down ... up <-> server.
struct Conn {
    client: TcpStream,
    down: TcpStream,
    up: TcpStream,
    server: TcpStream,
}

fn conn() -> Conn {
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(l1.local_addr().unwrap()).unwrap();
    let (down, _) = l1.accept().unwrap();
    let up = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
    let (server, _) = l2.accept().unwrap();
    for s in [&client, &down, &up, &server] {
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    Conn {
        client,
        down,
        up,
        server,
    }
}

/// Byte `i` of a stream: a pattern where a lost, duplicated or reordered chunk shows.
fn pat(seed: u8, i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed ^ (i >> 20) as u8
}

fn read_exact_pattern(s: &mut TcpStream, seed: u8, from: u64, n: u64) {
    let mut buf = vec![0u8; 64 << 10];
    let mut at = from;
    while at < from + n {
        let want = ((from + n - at) as usize).min(buf.len());
        let got = s.read(&mut buf[..want]).unwrap_or_else(|e| {
            panic!("reading at offset {at} of {}: {e}", from + n);
        });
        assert!(got > 0, "EOF at offset {at} of {}", from + n);
        for (k, b) in buf[..got].iter().enumerate() {
            let i = at + k as u64;
            assert_eq!(*b, pat(seed, i), "byte {i} differs (seed {seed})");
        }
        at += got as u64;
    }
}

fn write_pattern(s: &mut TcpStream, seed: u8, from: u64, n: u64) {
    let v: Vec<u8> = (from..from + n).map(|i| pat(seed, i)).collect();
    s.write_all(&v).unwrap();
}

/// A blocking read of a spliced socket: one woken by bytes the verdict then redirected
/// returns EAGAIN (tcp_bpf_recvmsg_parser), so retry those.
fn read_spliced(s: &TcpStream) -> usize {
    let mut b = [0u8; 64];
    loop {
        match (&*s).read(&mut b) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            r => return r.expect("read"),
        }
    }
}

/// Nothing queued for userspace on a socket: a non-blocking read would block.
fn nothing_readable(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = (&*s).read(&mut b);
    s.set_nonblocking(false).unwrap();
    matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

#[test]
fn spliced_bytes_skip_userspace_and_are_counted() {
    if !privileged() {
        return;
    }
    in_netns(|ps| {
        let mut c = conn();
        let h = ps.pair(c.down.as_fd(), c.up.as_fd()).expect("pair");
        assert_eq!(h.spliced(), (true, true));
        let n = 4u64 << 20;
        let mut client = c.client.try_clone().unwrap();
        let t = thread::spawn(move || write_pattern(&mut client, 1, 0, n));
        read_exact_pattern(&mut c.server, 1, 0, n);
        t.join().unwrap();
        write_pattern(&mut c.server, 2, 0, 1000);
        read_exact_pattern(&mut c.client, 2, 0, 1000);
        assert_eq!(h.bytes(), (n, 1000));
        assert!(nothing_readable(&c.down) && nothing_readable(&c.up));
        let st = ps.stats().unwrap();
        assert_eq!(st.sockets, 2);
        assert_eq!(st.peer_entries, 2);
        assert!(st.redirected_bytes >= n + 1000, "{st:?}");
        assert_eq!(h.failures(), (0, 0));

        // Half-close: the FIN is not forwarded but userspace sees EOF on `down`.
        c.client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_spliced(&c.down), 0, "EOF on down");
        // The other direction keeps working.
        write_pattern(&mut c.server, 3, 0, 5000);
        read_exact_pattern(&mut c.client, 3, 0, 5000);
        h.unpair();
    });
}

/// Bytes that reached a socket before it was spliced and are followed by no further packet
/// still flow: the pair's kick runs the verdict on them.
#[test]
fn bytes_queued_before_pairing_flow_without_new_packets() {
    if !privileged() {
        return;
    }
    in_netns(|ps| {
        for round in 0..20u8 {
            let mut c = conn();
            write_pattern(&mut c.client, round, 0, 3000);
            write_pattern(&mut c.server, round ^ 0x55, 0, 7000);
            // Let both land in down's and up's receive queues, unread.
            wait_for("bytes queued", || {
                inq(&c.down) == 3000 && inq(&c.up) == 7000
            });
            let h = ps.pair(c.down.as_fd(), c.up.as_fd()).expect("pair");
            read_exact_pattern(&mut c.server, round, 0, 3000);
            read_exact_pattern(&mut c.client, round ^ 0x55, 0, 7000);
            assert_eq!(h.bytes(), (3000, 7000));
        }
    });
}

/// Both ends send continuously while the proxy forwards by hand, stops, and splices: the
/// streams arrive complete and in order. 200 connections.
#[test]
fn splicing_mid_stream_keeps_order() {
    if !privileged() {
        return;
    }
    in_netns(|ps| {
        const N: u64 = 256 << 10;
        for round in 0..200u64 {
            let c = conn();
            let seed = round as u8;
            // Senders: small writes with short pauses so bytes are in flight at the switch.
            let senders: Vec<_> = [(&c.client, seed), (&c.server, !seed)]
                .into_iter()
                .map(|(s, sd)| {
                    let mut s = s.try_clone().unwrap();
                    thread::spawn(move || {
                        let mut at = 0;
                        while at < N {
                            let n = (1 + (at * 7919 % 4096)).min(N - at);
                            write_pattern(&mut s, sd, at, n);
                            at += n;
                            if at % 8 == 0 {
                                thread::yield_now();
                            }
                        }
                    })
                })
                .collect();
            let receivers: Vec<_> = [(&c.server, seed), (&c.client, !seed)]
                .into_iter()
                .map(|(s, sd)| {
                    let mut s = s.try_clone().unwrap();
                    thread::spawn(move || read_exact_pattern(&mut s, sd, 0, N))
                })
                .collect();
            // The proxy: forward by hand for a while (a varying amount), then splice.
            let hand = 1 + (round as usize * 37) % 300;
            let (mut fwd_d, mut fwd_u) = (0u64, 0u64);
            c.down.set_nonblocking(true).unwrap();
            c.up.set_nonblocking(true).unwrap();
            let mut buf = vec![0u8; 16 << 10];
            for _ in 0..hand {
                fwd_d += forward(&c.down, &c.up, &mut buf);
                fwd_u += forward(&c.up, &c.down, &mut buf);
            }
            // The pairing rule: the last read of each socket found it empty, so no skb is
            // left half read (the verdict would get it whole and send its head again).
            fwd_d += drain(&c.down, &c.up, &mut buf);
            fwd_u += drain(&c.up, &c.down, &mut buf);
            c.down.set_nonblocking(false).unwrap();
            c.up.set_nonblocking(false).unwrap();
            let h = ps.pair(c.down.as_fd(), c.up.as_fd()).expect("pair");
            for t in senders.into_iter().chain(receivers) {
                t.join().expect("stream damaged");
            }
            let (kd, ku) = h.bytes();
            assert_eq!((fwd_d + kd, fwd_u + ku), (N, N), "round {round}");
            assert_eq!(h.failures(), (0, 0));
        }
        let st = ps.stats().unwrap();
        assert_eq!(st.redirect_failures, 0, "{st:?}");
    });
}

/// Read what is available on `from` (non-blocking) and write it all to `to`.
fn forward(from: &TcpStream, to: &TcpStream, buf: &mut [u8]) -> u64 {
    match (&*from).read(buf) {
        Ok(n) => {
            let mut w = 0;
            while w < n {
                match (&*to).write(&buf[w..n]) {
                    Ok(k) => w += k,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => thread::yield_now(),
                    Err(e) => panic!("forwarding: {e}"),
                }
            }
            n as u64
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
        Err(e) => panic!("reading: {e}"),
    }
}

/// Forward until a read finds `from` empty.
fn drain(from: &TcpStream, to: &TcpStream, buf: &mut [u8]) -> u64 {
    let mut total = 0;
    loop {
        match forward(from, to, buf) {
            0 => return total,
            n => total += n,
        }
    }
}

/// Bytes in the receive queue (SIOCINQ).
fn inq(s: &TcpStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: valid fd, pointer to a live c_int.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0);
    n
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// The proxy's drain rule: after the upstream finished, `down` has written everything the
/// kernel redirected to it by the time its written-byte count says so; then shutting it down
/// delivers every byte and the FIN.
#[test]
fn shutdown_after_drain_delivers_everything() {
    if !privileged() {
        return;
    }
    in_netns(|ps| {
        let c = conn();
        let base = tcp_bytes_written(c.down.as_fd()).unwrap();
        let h = ps.pair(c.down.as_fd(), c.up.as_fd()).expect("pair");
        let n = 8u64 << 20;
        let mut server = c.server.try_clone().unwrap();
        let t = thread::spawn(move || {
            write_pattern(&mut server, 9, 0, n);
            server.shutdown(Shutdown::Write).unwrap();
        });
        assert_eq!(read_spliced(&c.up), 0, "EOF on up");
        t.join().unwrap();
        let redirected = h.bytes().1;
        // All of it was redirected although the client has not read yet: it waits in down's
        // psock queue (no backpressure to up's receive window).
        assert_eq!(redirected, n);
        let mut client = c.client.try_clone().unwrap();
        let reader = thread::spawn(move || {
            read_exact_pattern(&mut client, 9, 0, n);
            let mut b = [0u8; 1];
            client.read(&mut b).unwrap()
        });
        wait_for("down drained", || {
            tcp_bytes_written(c.down.as_fd()).unwrap() - base >= redirected
        });
        c.down.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            reader.join().unwrap(),
            0,
            "FIN reached the client after every byte"
        );
    });
}

/// 10,000 pairs come and go (unpaired while open, or dropped after their sockets closed):
/// nothing is left in any map.
#[test]
fn ten_thousand_pairs_leave_no_entries() {
    if !privileged() {
        return;
    }
    in_netns(|ps| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut done = 0;
        while done < 10_000 {
            let mut batch = Vec::new();
            for _ in 0..100 {
                let a = TcpStream::connect(addr).unwrap();
                let (b, _) = l.accept().unwrap();
                let h = ps.pair(a.as_fd(), b.as_fd()).expect("pair");
                batch.push((a, b, h));
            }
            assert_eq!(ps.stats().unwrap().peer_entries, 200);
            for (i, (a, b, h)) in batch.into_iter().enumerate() {
                if i % 2 == 0 {
                    h.unpair();
                    drop((a, b));
                } else {
                    drop((a, b));
                    drop(h);
                }
            }
            done += 100;
        }
        let st = ps.stats().unwrap();
        assert_eq!((st.sockets, st.peer_entries), (0, 0), "{st:?}");
    });
}

/// An agent restart: the maps are adopted, stale peers of a dead process's sockets are
/// removed, and splicing works with the new program.
#[test]
fn reopen_adopts_pins_and_drops_stale_peers() {
    if !privileged() {
        return;
    }
    in_netns(|ps| {
        let dir = ps.pin_dir().to_owned();
        let c = conn();
        let h = ps.pair(c.down.as_fd(), c.up.as_fd()).expect("pair");
        // The old agent dies without cleaning up: its sockets close, its handle never drops.
        std::mem::forget(h);
        drop(c);
        assert_eq!(ps.stats().unwrap().peer_entries, 2);
        let again = ProxySplice::open(&dir).expect("reopen");
        assert_eq!(again.stats().unwrap().peer_entries, 0);
        let mut c = conn();
        let h = again.pair(c.down.as_fd(), c.up.as_fd()).expect("pair");
        write_pattern(&mut c.client, 4, 0, 10_000);
        read_exact_pattern(&mut c.server, 4, 0, 10_000);
        assert_eq!(h.bytes().0, 10_000);
        drop(h);
        again.shutdown(true).expect("keep pins");
    });
}
