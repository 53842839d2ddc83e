//! Driving the load tools (sockperf, iperf3) inside lab pods and reading their results.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comb_lab::Lab;

use super::report::percentile;

/// What one `comb probe connrate` run measured.
pub struct ConnRate {
    pub per_sec: f64,
    pub p99_us: f64,
}

/// One `comb probe connrate` run in `pod` with `targets` (e.g. `["--to", "IP:PORT"]` or
/// `["--vips", FILE]`); any failed connection fails the run.
pub fn connrate(
    lab: &Lab,
    pod: &str,
    comb: &Path,
    targets: &[&str],
    secs: u32,
    parallel: usize,
) -> Result<ConnRate> {
    let (secs, parallel) = (secs.to_string(), parallel.to_string());
    let mut args = vec!["probe", "connrate"];
    args.extend_from_slice(targets);
    args.extend(["--secs", &secs, "--parallel", &parallel]);
    let out = lab
        .command(pod, comb.to_str().context("comb path")?, &args)?
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "connrate output: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if !out.status.success() || v["errors"].as_u64() != Some(0) {
        bail!("connrate had errors against {}: {v}", targets.join(" "));
    }
    Ok(ConnRate {
        per_sec: v["conn_per_sec"].as_f64().context("conn_per_sec")?,
        p99_us: v["p99_us"].as_f64().context("p99_us")?,
    })
}

/// A server process in a pod, killed when dropped.
pub struct Server(Child);

impl Server {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_server(
    lab: &Lab,
    pod: &str,
    program: &str,
    args: &[&str],
    port: u16,
) -> Result<Server> {
    let child = lab
        .command(pod, program, args)?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program} in {pod} (is it installed? `make deps`)"))?;
    let server = Server(child);
    wait_listening(lab, pod, port)?;
    Ok(server)
}

/// Wait until something in the pod listens on `port` (ss inside the pod).
pub fn wait_listening(lab: &Lab, pod: &str, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = lab
            .command(pod, "ss", &["-Hltn", &format!("sport = :{port}")])?
            .output()?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port} in pod {pod} after 10 s")
}

/// Latency samples in microseconds from a sockperf `--full-log` file
/// (`packet, txTime, rxTime, latency` lines; sockperf's latency is half the round trip).
pub fn parse_sockperf_log(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            if f.len() != 4 || f[0].parse::<u64>().is_err() {
                return None;
            }
            f[3].parse::<f64>().ok()
        })
        .collect()
}

/// Ping-pong latency over `conns` connections (one sockperf client each, run together);
/// returns (p50, p99) of all samples merged, in microseconds.
pub fn sockperf_rr(
    lab: &Lab,
    pod: &str,
    server: &str,
    port: u16,
    conns: usize,
    secs: u32,
    dir: &Path,
) -> Result<(f64, f64)> {
    let mut children = Vec::new();
    for i in 0..conns {
        let log = dir.join(format!("sockperf-{i}.csv"));
        let _ = std::fs::remove_file(&log);
        let args = [
            "ping-pong",
            "--tcp",
            "-i",
            server,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-m",
            "64",
            "--full-log",
            log.to_str().context("log path")?,
        ];
        let child = lab
            .command(pod, "sockperf", &args)?
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        children.push((child, log));
    }
    let mut samples = Vec::new();
    for (child, log) in children {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("sockperf failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        samples.extend(parse_sockperf_log(&std::fs::read_to_string(&log)?));
    }
    if samples.is_empty() {
        bail!("sockperf produced no samples");
    }
    Ok((
        percentile(&mut samples, 50.0),
        percentile(&mut samples, 99.0),
    ))
}

/// One iperf3 client run (one stream, `secs`) from `pod` to `server`: its `-J` report.
pub fn iperf3_json(lab: &Lab, pod: &str, server: &str, secs: u32) -> Result<serde_json::Value> {
    let out = lab
        .command(
            pod,
            "iperf3",
            &["-c", server, "-t", &secs.to_string(), "-J"],
        )?
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    Ok(v)
}

/// Bulk throughput in Gbit/s (iperf3, one stream, receiver side).
pub fn iperf3_gbps(lab: &Lab, pod: &str, server: &str, secs: u32) -> Result<f64> {
    let v = iperf3_json(lab, pod, server, secs)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no sum_received")?;
    Ok(bps / 1e9)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_sockperf_full_log() {
        let text = "------\nsockperf: ---> percentile 50.000 = 6.1\n0, 1.0, 1.00001, 5.000\n1, 1.1, 1.10002, 10.5\n-----\n";
        assert_eq!(super::parse_sockperf_log(text), vec![5.0, 10.5]);
    }
}
