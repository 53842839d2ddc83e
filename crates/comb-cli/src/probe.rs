//! `comb probe`: the traffic tool that tests and benchmarks run inside lab pods.
//!
//! Servers: `echo` (streams back what it reads, closes after the peer's FIN), `reset` (reads
//! a few bytes, then aborts with RST), `hold` (reads and never answers). Clients: `check`
//! (random payloads over many concurrent connections, verified byte for byte), `outcome`
//! (one scenario, prints what the client observed), `churn` (many short connections).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ServerMode {
    Echo,
    Reset,
    Hold,
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
    }
}

fn serve(port: u16, mode: ServerMode) -> Result<ExitCode> {
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
