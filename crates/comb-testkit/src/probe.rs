//! `comb probe`: the traffic tool that tests and benchmarks run inside lab pods.
//!
//! Servers: `echo` (streams back what it reads, closes after the peer's FIN), `reset` (reads
//! a few bytes, then aborts with RST), `hold` (reads and never answers). Clients: `check`
//! (random payloads over many concurrent connections, verified byte for byte), `outcome`
//! (one scenario, prints what the client observed), `churn` (many short connections).
//!
//! For Service load balancing: servers `ident` (writes the pod name from `POD_NAME`, then
//! closes), `pong` (answers one byte, then closes first so TIME_WAIT stays on the server) and
//! `udp-echo`; clients `spread`, `udp`, `peer`, `connect`, `connrate` and `stream`.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ServerMode {
    Echo,
    Reset,
    Hold,
    /// Write the pod name (env `POD_NAME`) on each connection, then close.
    Ident,
    /// Read one byte, send it back, close (the server closes first).
    Pong,
    /// UDP: send every datagram back to its sender.
    UdpEcho,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Scenario {
    /// Send, shut down the write side, read the echo to EOF.
    HalfClose,
    /// Send to a `reset` server and read: the server aborts the connection.
    Reset,
    /// Send to a `hold` server and block reading until the server process dies.
    PeerExit,
}

#[derive(Subcommand)]
pub enum ProbeCmd {
    /// Run a TCP server until killed.
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long, value_enum, default_value = "echo")]
        mode: ServerMode,
    },
    /// Send random payloads over concurrent connections to an echo server; verify the echo.
    Check {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "1")]
        conns: usize,
        /// Payload sizes in bytes, used round robin over the connections.
        #[arg(long, value_delimiter = ',', default_value = "1,1000,65536")]
        sizes: Vec<usize>,
        #[arg(long, default_value = "1")]
        seed: u64,
    },
    /// Run one scenario and print what the client observed.
    Outcome {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_enum)]
        scenario: Scenario,
    },
    /// Open, use (1 byte echoed) and close COUNT connections one after the other.
    Churn {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// COUNT sequential connections to an `ident` server; prints JSON counts per backend.
    Spread {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// One datagram to a `udp-echo` server; prints the reply's source address.
    Udp {
        #[arg(long)]
        to: SocketAddr,
    },
    /// Connect to an `ident` server; prints getpeername and the ident.
    Peer {
        #[arg(long)]
        to: SocketAddr,
    },
    /// One connect; prints the outcome and the elapsed microseconds (`refused 152`).
    Connect {
        #[arg(long)]
        to: SocketAddr,
        /// Give up after this long (a dropped SYN is never answered).
        #[arg(long, default_value = "5000")]
        timeout_ms: u64,
    },
    /// Short connections (connect, 1 byte to a `pong` server, read the reply, close) to
    /// uniformly random targets for SECS seconds; prints JSON rate and latency percentiles.
    Connrate {
        /// File with one `IP:PORT` target per line.
        #[arg(long)]
        vips: Option<PathBuf>,
        #[arg(long, value_delimiter = ',')]
        to: Vec<SocketAddr>,
        #[arg(long, default_value = "3")]
        secs: f64,
        #[arg(long, default_value = "1")]
        parallel: usize,
    },
    /// HTTP/1.1 + HTTP/2 (prior knowledge) test backend (see `probe_http`).
    HttpServe {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "1")]
        threads: usize,
    },
    /// HTTP/1.1 keep-alive GETs at RATE per second over CONNS connections for SECS seconds;
    /// prints JSON counts (failed requests, connections opened, longest gap, latency).
    HttpLoad {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "16")]
        conns: usize,
        #[arg(long, default_value = "1000")]
        rate: f64,
        #[arg(long, default_value = "10")]
        secs: f64,
        #[arg(long, default_value = "/bytes/1024")]
        path: String,
        /// Write one line per request here: start (unix µs) and latency (µs; -1: failed).
        #[arg(long)]
        samples: Option<std::path::PathBuf>,
    },
    /// CONNS long-lived connections streaming verified data to an echo server for SECS
    /// seconds; prints `connected N` once all are up, then JSON bytes and failures.
    Stream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "50")]
        conns: usize,
        #[arg(long, default_value = "5")]
        secs: f64,
    },
}

pub fn run(cmd: ProbeCmd) -> Result<ExitCode> {
    match cmd {
        ProbeCmd::Serve { port, mode } => serve(port, mode),
        ProbeCmd::Check {
            to,
            conns,
            sizes,
            seed,
        } => check(to, conns, &sizes, seed),
        ProbeCmd::Outcome { to, scenario } => {
            println!("{}", outcome(to, scenario)?);
            Ok(ExitCode::SUCCESS)
        }
        ProbeCmd::Churn { to, count } => churn(to, count),
        ProbeCmd::Spread { to, count } => spread(to, count),
        ProbeCmd::Udp { to } => udp(to),
        ProbeCmd::Peer { to } => peer(to),
        ProbeCmd::Connect { to, timeout_ms } => {
            println!("{}", connect_outcome(to, Duration::from_millis(timeout_ms)));
            Ok(ExitCode::SUCCESS)
        }
        ProbeCmd::Connrate {
            vips,
            to,
            secs,
            parallel,
        } => connrate(vips, to, secs, parallel),
        ProbeCmd::Stream { to, conns, secs } => stream(to, conns, secs),
        ProbeCmd::HttpServe { port, threads } => crate::probe_http::serve(port, threads),
        ProbeCmd::HttpLoad {
            to,
            conns,
            rate,
            secs,
            path,
            samples,
        } => crate::probe_load::run(to, conns, rate, secs, path, samples),
    }
}

fn serve(port: u16, mode: ServerMode) -> Result<ExitCode> {
    if let ServerMode::UdpEcho = mode {
        return udp_echo(port);
    }
    let listener =
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding port {port}"))?;
    // Tests wait for this line before connecting.
    println!("listening on {port}");
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        std::thread::spawn(move || {
            let _ = match mode {
                ServerMode::Echo => echo(stream),
                ServerMode::Reset => reset(stream),
                ServerMode::Hold => hold(stream),
                ServerMode::Ident => ident(stream),
                ServerMode::Pong => pong(stream),
                ServerMode::UdpEcho => unreachable!(),
            };
        });
    }
    Ok(ExitCode::SUCCESS)
}

/// Read like a poll-driven application: a blocking read that returns EAGAIN without data is
/// a spurious wakeup and is retried. (A spliced socket's receive path can return EAGAIN on a
/// blocking socket when a non-data event wakes it; see docs/splice.md.) Counts the retries.
pub fn read_retrying(
    s: &mut TcpStream,
    buf: &mut [u8],
    spurious: &mut u64,
) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                *spurious += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
            r => return r,
        }
    }
}

fn echo(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut spurious = 0;
    loop {
        let n = read_retrying(&mut s, &mut buf, &mut spurious)?;
        if n == 0 {
            s.shutdown(Shutdown::Write)?;
            return Ok(());
        }
        s.write_all(&buf[..n])?;
    }
}

fn reset(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 10];
    let (mut got, mut spurious) = (0, 0);
    while got < buf.len() {
        match read_retrying(&mut s, &mut buf[got..], &mut spurious)? {
            0 => return Ok(()),
            n => got += n,
        }
    }
    // SO_LINGER 0: close sends RST instead of FIN.
    nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    drop(s);
    Ok(())
}

/// Reads and never answers; reports each read so a test knows nothing is left unread.
fn hold(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let mut spurious = 0;
    loop {
        let n = read_retrying(&mut s, &mut buf, &mut spurious)?;
        if n == 0 {
            return Ok(());
        }
        println!("read {n}");
        std::io::stdout().flush()?;
    }
}

fn ident(mut s: TcpStream) -> std::io::Result<()> {
    let name = std::env::var("POD_NAME").unwrap_or_else(|_| "unknown".into());
    s.write_all(name.as_bytes())?;
    s.shutdown(Shutdown::Write)
}

fn pong(mut s: TcpStream) -> std::io::Result<()> {
    let mut b = [0u8; 1];
    if read_retrying(&mut s, &mut b, &mut 0)? == 1 {
        s.write_all(&b)?;
    }
    Ok(())
}

fn udp_echo(port: u16) -> Result<ExitCode> {
    let sock =
        UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("binding UDP port {port}"))?;
    println!("listening on {port}");
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        let _ = sock.send_to(&buf[..n], from);
    }
}

/// One connection of `check`: write the payload while a second thread reads the echo.
fn check_one(to: SocketAddr, payload: Vec<u8>) -> Result<u64> {
    let s = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    let mut r = s.try_clone()?;
    let want = payload.len();
    let reader = std::thread::spawn(move || -> std::io::Result<(Vec<u8>, u64)> {
        let mut got = Vec::with_capacity(want);
        let mut buf = vec![0u8; 256 * 1024];
        let mut spurious = 0;
        loop {
            let n = read_retrying(&mut r, &mut buf, &mut spurious).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("reading the echo after {} bytes: {e}", got.len()),
                )
            })?;
            if n == 0 {
                return Ok((got, spurious));
            }
            got.extend_from_slice(&buf[..n]);
        }
    });
    let mut w = s;
    w.write_all(&payload).context("writing the payload")?;
    w.shutdown(Shutdown::Write)?;
    let (got, spurious) = reader.join().expect("reader thread")?;
    if got != payload {
        let first = got.iter().zip(&payload).position(|(a, b)| a != b);
        bail!(
            "echo differs: sent {} bytes, got {} (first difference at {:?})",
            payload.len(),
            got.len(),
            first
        );
    }
    Ok(spurious)
}

fn check(to: SocketAddr, conns: usize, sizes: &[usize], seed: u64) -> Result<ExitCode> {
    let start = Instant::now();
    let handles: Vec<_> = (0..conns)
        .map(|i| {
            let size = sizes[i % sizes.len()];
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(i as u64));
            let mut payload = vec![0u8; size];
            rng.fill(payload.as_mut_slice());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || check_one(to, payload))
                .expect("spawn")
        })
        .collect();
    let mut failures = Vec::new();
    let (mut bytes, mut spurious) = (0usize, 0u64);
    for (i, h) in handles.into_iter().enumerate() {
        match h.join().expect("client thread") {
            Ok(n) => {
                bytes += sizes[i % sizes.len()];
                spurious += n;
            }
            Err(e) => failures.push(format!("conn {i}: {e:#}")),
        }
    }
    let summary = serde_json::json!({
        "conns": conns, "ok": conns - failures.len(), "bytes_each_way": bytes,
        "secs": start.elapsed().as_secs_f64(), "spurious_eagain": spurious, "failures": failures,
    });
    println!("{summary}");
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn describe_read(r: std::io::Result<usize>) -> String {
    // WouldBlock never reaches here: reads go through read_retrying.
    match r {
        Ok(0) => "eof".into(),
        Ok(n) => format!("data:{n}"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => "reset".into(),
        Err(e) => format!("error:{:?}", e.kind()),
    }
}

fn outcome(to: SocketAddr, scenario: Scenario) -> Result<String> {
    let mut s = TcpStream::connect(to)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = vec![0u8; 4096];
    Ok(match scenario {
        Scenario::HalfClose => {
            s.write_all(&[7u8; 1000])?;
            s.shutdown(Shutdown::Write)?;
            let mut got = Vec::new();
            let mut spurious = 0;
            let end = loop {
                match read_retrying(&mut s, &mut buf, &mut spurious) {
                    Ok(0) => break "eof".to_string(),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => break describe_read(Err(e)),
                }
            };
            let intact = got.iter().all(|b| *b == 7);
            format!("echoed:{} intact:{intact} then:{end}", got.len())
        }
        Scenario::Reset => {
            s.write_all(&[1u8; 10])?;
            let first = describe_read(read_retrying(&mut s, &mut buf, &mut 0));
            let write_after = match s.write(&[1u8; 10]) {
                Ok(_) => "write:ok".to_string(),
                Err(e) => format!("write:{:?}", e.kind()),
            };
            format!("read:{first} {write_after}")
        }
        Scenario::PeerExit => {
            s.write_all(&[1u8; 10])?;
            println!("waiting");
            std::io::stdout().flush()?;
            format!(
                "read:{}",
                describe_read(read_retrying(&mut s, &mut buf, &mut 0))
            )
        }
    })
}

fn churn(to: SocketAddr, count: usize) -> Result<ExitCode> {
    let start = Instant::now();
    for i in 0..count {
        let mut s = TcpStream::connect(to).with_context(|| format!("connection {i}"))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("connection {i}: reading the echo"))?;
        s.shutdown(Shutdown::Write)?;
        let _ = s.read(&mut b);
    }
    println!(
        "{}",
        serde_json::json!({"connections": count, "secs": start.elapsed().as_secs_f64()})
    );
    Ok(ExitCode::SUCCESS)
}

/// Read an `ident` server's answer (its pod name) to EOF.
fn read_ident(s: &mut TcpStream) -> Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match read_retrying(s, &mut buf, &mut 0)? {
            0 => break,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

fn spread(to: SocketAddr, count: usize) -> Result<ExitCode> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors = 0u64;
    let mut first_error = None;
    for i in 0..count {
        let r = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(anyhow::Error::from)
            .and_then(|mut s| read_ident(&mut s));
        match r {
            Ok(name) => *counts.entry(name).or_default() += 1,
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("connection {i}: {e:#}"));
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"counts": counts, "errors": errors, "first_error": first_error})
    );
    Ok(ExitCode::SUCCESS)
}

fn udp(to: SocketAddr) -> Result<ExitCode> {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let payload = format!("probe-{}", rand::random::<u64>());
    sock.send_to(payload.as_bytes(), to)
        .with_context(|| format!("sendto {to}"))?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).context("recvfrom (no reply)")?;
    println!(
        "{}",
        serde_json::json!({"from": from.to_string(), "intact": &buf[..n] == payload.as_bytes()})
    );
    Ok(ExitCode::SUCCESS)
}

fn peer(to: SocketAddr) -> Result<ExitCode> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .with_context(|| format!("connecting to {to}"))?;
    let peer = s.peer_addr()?;
    let ident = read_ident(&mut s)?;
    println!(
        "{}",
        serde_json::json!({"peer": peer.to_string(), "ident": ident})
    );
    Ok(ExitCode::SUCCESS)
}

/// `connected|refused|timeout|error:KIND` and the elapsed microseconds.
fn connect_outcome(to: SocketAddr, timeout: Duration) -> String {
    let start = Instant::now();
    let r = TcpStream::connect_timeout(&to, timeout);
    let us = start.elapsed().as_micros();
    let what = match r {
        Ok(_) => "connected".to_string(),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => "refused".into(),
        Err(e) if e.kind() == ErrorKind::TimedOut => "timeout".into(),
        Err(e) => format!("error:{}", e.raw_os_error().unwrap_or(0)),
    };
    format!("{what} {us}")
}

/// `IP:PORT` per line; blank lines and `#` comments are skipped.
pub fn parse_targets(text: &str) -> Result<Vec<SocketAddr>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.parse().with_context(|| format!("bad target {l:?}")))
        .collect()
}

/// One short connection of `connrate`; the server closes first.
fn one_pong(to: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(to)?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    let mut spurious = 0;
    if read_retrying(&mut s, &mut b, &mut spurious)? != 1 {
        return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "no reply"));
    }
    // Wait for the server's FIN so the client side ends without TIME_WAIT.
    let _ = read_retrying(&mut s, &mut b, &mut spurious);
    Ok(())
}

fn connrate(
    vips: Option<PathBuf>,
    mut targets: Vec<SocketAddr>,
    secs: f64,
    parallel: usize,
) -> Result<ExitCode> {
    if let Some(f) = vips {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        targets.extend(parse_targets(&text)?);
    }
    if targets.is_empty() || parallel == 0 {
        bail!("connrate needs at least one target (--vips or --to) and --parallel >= 1");
    }
    let targets = Arc::new(targets);
    let run = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let handles: Vec<_> = (0..parallel)
        .map(|_| {
            let targets = targets.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rng();
                let mut lat = Vec::new();
                let (mut errors, mut first_error) = (0u64, None);
                while start.elapsed() < run {
                    let to = targets[rng.random_range(0..targets.len())];
                    let t = Instant::now();
                    match one_pong(to) {
                        Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{to}: {e}"));
                        }
                    }
                }
                (lat, errors, first_error)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let (mut errors, mut first_error) = (0u64, None);
    for h in handles {
        let (l, e, f) = h.join().expect("connrate thread");
        lat.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = lat.len();
    let p50 = crate::bench::percentile(&mut lat, 50.0);
    let p99 = crate::bench::percentile(&mut lat, 99.0);
    println!(
        "{}",
        serde_json::json!({
            "connections": n, "secs": elapsed, "conn_per_sec": n as f64 / elapsed,
            "p50_us": p50, "p99_us": p99, "errors": errors, "first_error": first_error,
            "targets": targets.len(),
        })
    );
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Deterministic stream content: byte i of connection c.
fn stream_byte(conn: usize, i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(conn as u64 * 7) % 251) as u8
}

fn stream(to: SocketAddr, conns: usize, secs: f64) -> Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut socks = Vec::new();
    for c in 0..conns {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .with_context(|| format!("connection {c} to {to}"))?;
        socks.push(s);
    }
    println!("connected {conns}");
    std::io::stdout().flush()?;
    let handles: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(c, s)| {
            let stop = stop.clone();
            std::thread::spawn(move || stream_one(c, s, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut bytes = 0u64;
    let mut failures = Vec::new();
    for (c, h) in handles.into_iter().enumerate() {
        match h.join().expect("stream thread") {
            Ok(n) => bytes += n,
            Err(e) => failures.push(format!("conn {c}: {e:#}")),
        }
    }
    println!(
        "{}",
        serde_json::json!({"conns": conns, "bytes": bytes, "failures": failures})
    );
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Write 4 KiB chunks, read each echo back and verify it, until `stop`; then half-close and
/// expect EOF. Returns the bytes verified.
fn stream_one(c: usize, mut s: TcpStream, stop: &AtomicBool) -> Result<u64> {
    const CHUNK: usize = 4096;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (mut sent, mut verified) = (0u64, 0u64);
    let mut buf = vec![0u8; CHUNK];
    let mut spurious = 0;
    while !stop.load(Ordering::Relaxed) {
        let chunk: Vec<u8> = (0..CHUNK as u64)
            .map(|i| stream_byte(c, sent + i))
            .collect();
        s.write_all(&chunk)
            .with_context(|| format!("writing after {sent} bytes"))?;
        sent += CHUNK as u64;
        while verified < sent {
            let want = (sent - verified) as usize;
            let n = read_retrying(&mut s, &mut buf[..want], &mut spurious)
                .with_context(|| format!("reading the echo after {verified} bytes"))?;
            if n == 0 {
                bail!("EOF after {verified} of {sent} bytes");
            }
            if let Some(i) = (0..n).find(|&i| buf[i] != stream_byte(c, verified + i as u64)) {
                bail!("echo differs at byte {}", verified + i as u64);
            }
            verified += n as u64;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    s.shutdown(Shutdown::Write)?;
    match read_retrying(&mut s, &mut buf, &mut spurious)? {
        0 => Ok(verified),
        n => bail!("{n} unexpected bytes after the last echo"),
    }
}
