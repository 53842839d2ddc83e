//! Relay tests on real loopback sockets: in userspace (any user), and spliced (root: BPF,
//! bpffs and a throwaway network namespace; under CI=true a non-root run fails instead of
//! skipping).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::Bytes;
use comb_datapath::ProxySplice;

use super::{RelayOutcome, bench_relay, relay};

/// The relayed connection: client <-> [down relay up] <-> server.
struct Rig {
    client: TcpStream,
    server: TcpStream,
    relay: JoinHandle<RelayOutcome>,
}

fn rig(down_buf: &'static [u8], up_buf: &'static [u8], splice: Option<Arc<ProxySplice>>) -> Rig {
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = back.local_addr().unwrap();
    let (client, relay) = start_relay(addr, down_buf, up_buf, splice);
    let (server, _) = back.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    Rig {
        client,
        server,
        relay,
    }
}

/// A client connected to a relay (on its own thread and runtime) towards `upstream`.
fn start_relay(
    upstream: std::net::SocketAddr,
    down_buf: &'static [u8],
    up_buf: &'static [u8],
    splice: Option<Arc<ProxySplice>>,
) -> (TcpStream, JoinHandle<RelayOutcome>) {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let relay = thread::spawn(move || {
        let (down, _) = front.accept().unwrap();
        let up = TcpStream::connect(upstream).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            down.set_nonblocking(true).unwrap();
            up.set_nonblocking(true).unwrap();
            let down = tokio::net::TcpStream::from_std(down).unwrap();
            let up = tokio::net::TcpStream::from_std(up).unwrap();
            let r = relay(
                down,
                Bytes::from_static(down_buf),
                up,
                Bytes::from_static(up_buf),
                splice.as_deref(),
                None,
            );
            tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .expect("relay did not finish")
        })
    });
    (client, relay)
}

fn pat(seed: u8, i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed ^ (i >> 20) as u8
}

fn write_pattern(s: &mut TcpStream, seed: u8, n: u64) {
    write_pattern_range(s, seed, 0, n);
}

/// Pattern bytes `from..n` (the rest of a payload whose start was written before).
fn write_pattern_range(s: &mut TcpStream, seed: u8, from: u64, n: u64) {
    let mut at = from;
    while at < n {
        // Uneven chunks so the bytes in flight when the relay splices vary.
        let k = (1 + (at * 7919) % 20_000).min(n - at);
        let v: Vec<u8> = (at..at + k).map(|i| pat(seed, i)).collect();
        s.write_all(&v).unwrap();
        at += k;
    }
}

/// Reads `prefix`, then `n` pattern bytes, then expects EOF.
fn read_all_then_eof(s: &mut TcpStream, prefix: &[u8], seed: u8, n: u64) {
    let mut p = vec![0u8; prefix.len()];
    s.read_exact(&mut p).unwrap();
    assert_eq!(p, prefix, "buffered prefix");
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0u64;
    loop {
        let k = s
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read at {at} of {n}: {e}"));
        if k == 0 {
            break;
        }
        for (j, b) in buf[..k].iter().enumerate() {
            let i = at + j as u64;
            assert!(i < n, "more than {n} bytes");
            assert_eq!(*b, pat(seed, i), "byte {i} of {n} differs");
        }
        at += k as u64;
    }
    assert_eq!(at, n, "EOF after {at} of {n} bytes");
}

/// Spliced, the bytes written after the first `HALF_CLOSE_FIRST` went through the kernel (the
/// client waits for the pair before writing them): the caller checks the counters.
const HALF_CLOSE_FIRST: u64 = 100_000;

fn half_close_client_first(splice: Option<Arc<ProxySplice>>) {
    let spliced = splice.is_some();
    let mut r = rig(b"PRE", b"UPBUF", splice.clone());
    let n = 1u64 << 20;
    let mut c = r.client.try_clone().unwrap();
    let w = thread::spawn(move || {
        // The FIN must not reach the relay before it pairs the sockets: a relay that reads
        // EOF while draining stays in userspace (as it should), and this test is about a
        // spliced half-close.
        write_pattern(&mut c, 1, HALF_CLOSE_FIRST);
        if let Some(ps) = &splice {
            wait_paired(ps);
        }
        write_pattern_range(&mut c, 1, HALF_CLOSE_FIRST, n);
        c.shutdown(Shutdown::Write).unwrap();
    });
    read_all_then_eof(&mut r.server, b"PRE", 1, n);
    w.join().unwrap();
    // The other direction still works after the half-close.
    write_pattern(&mut r.server, 2, 300_000);
    r.server.shutdown(Shutdown::Write).unwrap();
    read_all_then_eof(&mut r.client, b"UPBUF", 2, 300_000);
    let out = r.relay.join().unwrap();
    assert_eq!(
        out,
        RelayOutcome {
            sent: 3 + n,
            received: 5 + 300_000,
            spliced,
            error: None,
            idle_timeout: false,
        }
    );
}

fn half_close_server_first(splice: Option<Arc<ProxySplice>>) {
    let mut r = rig(b"", b"", splice);
    write_pattern(&mut r.server, 3, 200_000);
    r.server.shutdown(Shutdown::Write).unwrap();
    read_all_then_eof(&mut r.client, b"", 3, 200_000);
    write_pattern(&mut r.client, 4, 100_000);
    r.client.shutdown(Shutdown::Write).unwrap();
    read_all_then_eof(&mut r.server, b"", 4, 100_000);
    let out = r.relay.join().unwrap();
    assert_eq!(
        (out.sent, out.received, out.error),
        (100_000, 200_000, None)
    );
}

/// The client aborts (RST): the server sees a reset too, the outcome an error.
fn reset_propagates(splice: Option<Arc<ProxySplice>>) {
    let mut r = rig(b"", b"", splice);
    r.client.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    r.server.read_exact(&mut b).unwrap();
    socket2::SockRef::from(&r.client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(r.client);
    let mut buf = [0u8; 64];
    let err = loop {
        match r.server.read(&mut buf) {
            Ok(0) => panic!("server saw FIN, not RST"),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => panic!("no RST within the timeout"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let out = r.relay.join().unwrap();
    assert!(out.error.is_some(), "{out:?}");
    assert_eq!(out.sent, 5);
}

const EXITING_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.sendall(b"z" * 100000)
sys.exit(0)
"#;

/// The upstream process exits after sending: the client gets every byte and EOF.
fn peer_exit(splice: Option<Arc<ProxySplice>>) {
    let mut child = Command::new("python3")
        .args(["-c", EXITING_SERVER])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut port = String::new();
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        port.push(b[0] as char);
    }
    let addr = format!("127.0.0.1:{}", port.trim()).parse().unwrap();
    let (mut client, relay) = start_relay(addr, b"", b"", splice);
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, vec![b'z'; 100_000]);
    assert!(child.wait().unwrap().success());
    client.shutdown(Shutdown::Write).unwrap();
    let out = relay.join().unwrap();
    assert_eq!((out.sent, out.received, out.error), (0, 100_000, None));
}

/// Both ends send from the start, while the relay drains and splices: complete and in order.
fn concurrent_streams(splice: Option<Arc<ProxySplice>>, rounds: u64) {
    for round in 0..rounds {
        let r = rig(b"", b"", splice.clone());
        let n = 256u64 << 10;
        let seed = round as u8;
        let io: Vec<_> = [(&r.client, &r.server, seed), (&r.server, &r.client, !seed)]
            .into_iter()
            .flat_map(|(from, to, sd)| {
                let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                [
                    thread::spawn(move || {
                        write_pattern(&mut from, sd, n);
                        from.shutdown(Shutdown::Write).unwrap();
                    }),
                    thread::spawn(move || read_all_then_eof(&mut to, b"", sd, n)),
                ]
            })
            .collect();
        let out = r.relay.join().unwrap();
        for t in io {
            t.join()
                .unwrap_or_else(|_| panic!("stream damaged in round {round}: {out:?}"));
        }
        assert_eq!(
            (out.sent, out.received, out.error),
            (n, n, None),
            "round {round}"
        );
    }
}

#[test]
fn userspace_half_close_client_first() {
    half_close_client_first(None);
}

#[test]
fn userspace_half_close_server_first() {
    half_close_server_first(None);
}

#[test]
fn userspace_reset_propagates() {
    reset_propagates(None);
}

#[test]
fn userspace_peer_exit() {
    peer_exit(None);
}

#[test]
fn userspace_concurrent_streams() {
    concurrent_streams(None, 20);
}

// --- spliced (privileged) ---

fn privileged() -> bool {
    comb_host::privileged_test("spliced relay (BPF, bpffs, netns)")
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A netns and a bpffs pin directory, both removed on drop.
struct Sandbox {
    netns: String,
    pins: std::path::PathBuf,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// Until the relay's pair is in the kernel's maps (its two sockets).
fn wait_paired(ps: &ProxySplice) {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while ps.stats().unwrap().sockets < 2 {
        assert!(std::time::Instant::now() < until, "the relay never paired");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Run `f` on a thread inside a fresh network namespace (lo up) with a fresh ProxySplice;
/// afterwards no pair may be left in its maps.
fn spliced(f: impl FnOnce(Arc<ProxySplice>) + Send + 'static) {
    comb_host::ensure_bpffs().expect("bpffs");
    let sb = Sandbox {
        netns: unique("comb-relay"),
        pins: std::path::Path::new(comb_host::BPFFS).join(unique("comb-relay-test")),
    };
    for args in [
        vec!["netns", "add", &sb.netns],
        vec!["-n", &sb.netns, "link", "set", "lo", "up"],
    ] {
        assert!(Command::new("ip").args(&args).status().unwrap().success());
    }
    let (ns, pins) = (sb.netns.clone(), sb.pins.clone());
    let r = thread::spawn(move || {
        let f_ns = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // setns is per thread (threads spawned from here inherit it).
        nix::sched::setns(&f_ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let ps = Arc::new(ProxySplice::open(&pins).expect("open proxy splice"));
        f(ps.clone());
        let st = ps.stats().unwrap();
        assert_eq!((st.sockets, st.peer_entries), (0, 0), "{st:?}");
        Arc::into_inner(ps)
            .expect("relays done")
            .shutdown(false)
            .unwrap();
    })
    .join();
    drop(sb);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn spliced_half_close_client_first() {
    if privileged() {
        spliced(|ps| {
            half_close_client_first(Some(ps.clone()));
            let st = ps.stats().unwrap();
            // Everything after the pairing: the rest of the client's MiB, the server's reply.
            let after = (1 << 20) - HALF_CLOSE_FIRST + 300_000;
            assert!(st.redirected_bytes >= after, "{st:?}");
        });
    }
}

#[test]
fn spliced_half_close_server_first() {
    if privileged() {
        spliced(|ps| half_close_server_first(Some(ps)));
    }
}

#[test]
fn spliced_reset_propagates() {
    if privileged() {
        spliced(|ps| reset_propagates(Some(ps)));
    }
}

#[test]
fn spliced_peer_exit() {
    if privileged() {
        spliced(|ps| peer_exit(Some(ps)));
    }
}

#[test]
fn spliced_concurrent_streams() {
    if privileged() {
        spliced(|ps| {
            concurrent_streams(Some(ps.clone()), 200);
            assert_eq!(ps.stats().unwrap().redirect_failures, 0);
        });
    }
}

/// What the splice buys: the same blast through the relay in userspace and spliced.
#[test]
fn bench_userspace_vs_spliced() {
    if privileged() {
        spliced(|ps| {
            let n = 2u64 << 30;
            let user = bench_relay(n, None).expect("userspace bench");
            let kern = bench_relay(n, Some(&ps)).expect("spliced bench");
            for r in [&user, &kern] {
                eprintln!(
                    "relay bench: spliced={} {:.2} Gbit/s, relay thread {:.3} CPU-s/GiB, machine {:.3} CPU-s/GiB ({} bytes in {:.2} s)",
                    r.spliced,
                    r.gbit_per_s,
                    r.relay_cpu_secs_per_gib,
                    r.machine_cpu_secs_per_gib,
                    r.bytes,
                    r.secs
                );
            }
            // Both moved every byte (bench_relay checks); only the second one spliced. The
            // numbers are reported, not asserted: on a shared machine they are not stable.
            assert!(!user.spliced && kern.spliced);
        });
    }
}
