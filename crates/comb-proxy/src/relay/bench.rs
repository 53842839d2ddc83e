//! Throughput and CPU cost of the relay on loopback (in the caller's network namespace): a
//! source thread blasts bytes through [`relay`](super::relay) to a sink thread. Shared by the
//! tests and `comb bench`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use comb_datapath::ProxySplice;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub spliced: bool,
    pub bytes: u64,
    pub secs: f64,
    pub gbit_per_s: f64,
    /// CPU time of the relay's thread (its runtime runs on the calling thread only).
    pub relay_cpu_secs: f64,
    pub relay_cpu_secs_per_gib: f64,
    /// Busy CPU time of the whole machine (/proc/stat) per GiB: includes the source and the
    /// sink, and the kernel workers that move spliced bytes, which the relay thread's time
    /// does not show.
    pub machine_cpu_secs_per_gib: f64,
}

/// Move `bytes` client -> server through one relayed connection; `splice` as for
/// [`relay`](super::relay). Runs a current-thread runtime on the calling thread.
pub fn bench_relay(bytes: u64, splice: Option<&ProxySplice>) -> Result<BenchResult> {
    let front = TcpListener::bind("127.0.0.1:0").context("binding the relay listener")?;
    let back = TcpListener::bind("127.0.0.1:0").context("binding the sink listener")?;
    let (front_addr, back_addr) = (front.local_addr()?, back.local_addr()?);
    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = back.accept()?;
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(n),
                k => n += k as u64,
            }
        }
    });
    let source = std::thread::spawn(move || -> std::io::Result<()> {
        let mut c = TcpStream::connect(front_addr)?;
        let buf = vec![0x5au8; 256 << 10];
        let mut left = bytes;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            c.write_all(&buf[..k])?;
            left -= k as u64;
        }
        c.shutdown(Shutdown::Write)?;
        // Until the relay closes its side: the sink has everything by then.
        let mut b = [0u8; 1];
        while c.read(&mut b)? > 0 {}
        Ok(())
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the relay runtime")?;
    let (down, _) = front.accept().context("accepting the source")?;
    let up = TcpStream::connect(back_addr).context("connecting to the sink")?;
    let busy0 = machine_busy_secs()?;
    let cpu0 = thread_cpu_secs();
    let t0 = Instant::now();
    let out = rt.block_on(async {
        down.set_nonblocking(true)?;
        up.set_nonblocking(true)?;
        let down = tokio::net::TcpStream::from_std(down)?;
        let up = tokio::net::TcpStream::from_std(up)?;
        anyhow::Ok(super::relay(down, Bytes::new(), up, Bytes::new(), splice, None).await)
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let relay_cpu_secs = thread_cpu_secs() - cpu0;
    let got = sink.join().expect("sink thread").context("sink")?;
    let busy = machine_busy_secs()? - busy0;
    source.join().expect("source thread").context("source")?;
    ensure!(out.error.is_none(), "relay failed: {:?}", out.error);
    ensure!(
        got == bytes && out.sent == bytes,
        "sink got {got} bytes, relay counted {}, of {bytes}",
        out.sent
    );
    let gib = bytes as f64 / (1u64 << 30) as f64;
    Ok(BenchResult {
        spliced: out.spliced,
        bytes,
        secs,
        gbit_per_s: bytes as f64 * 8.0 / secs / 1e9,
        relay_cpu_secs,
        relay_cpu_secs_per_gib: relay_cpu_secs / gib,
        machine_cpu_secs_per_gib: busy / gib,
    })
}

fn thread_cpu_secs() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|ts| ts.tv_sec() as f64 + ts.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0)
}

/// Non-idle CPU seconds of all CPUs since boot (the `cpu` line of /proc/stat).
fn machine_busy_secs() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    ensure!(v.len() >= 8, "unexpected /proc/stat line {line:?}");
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    Ok(busy as f64 / hz)
}
