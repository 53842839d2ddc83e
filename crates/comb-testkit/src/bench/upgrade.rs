//! `comb bench upgrade`: traffic of every kind through the node proxies while the agents are
//! restarted (docs/upgrades.md), against the same traffic with no restart.
//!
//! The lab: `client` on node1, `local` and `web` (`comb.dev/l7: "true"`) on node2, all in the
//! mesh, the lab's CA: `client`'s flows cross nodes through HBONE into node2's L7 proxy,
//! `local`'s take the same-node L7 redirect. Release binaries (the ones beside `comb`).
//!
//! Load, as in the upgrade lab test: HTTP/1.1 keep-alive GETs at `--rate` from each client over
//! 8 connections each (`comb probe http-load`, a request that fails is never retried), 100 gRPC
//! bidirectional streams from `client`, 50 WebSockets from `local` (Debian's python3-grpcio
//! and python3-websockets, the lab tests' scripts embedded), 50 opaque TCP streams from
//! `client`, each verifying its echo.
//!
//! Phases: a steady run of the HTTP load alone (`--secs`), then the whole load for
//! `--restarts` × 4 s + 8 s with a restart every 4 s, alternating node2 and node1.
//! Metrics (baseline = the steady run, comb = the run with restarts):
//! - `failed_requests`: HTTP requests without a complete 200 (goal 0);
//! - `reset_connections`: streams (gRPC, WebSocket, TCP) that failed (goal 0);
//! - `max_stall_ms`: the longest time in which neither client completed a request, against the
//!   steady run's p99 latency (ratio goal ≤ 2).

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use comb_lab::Lab;

use super::report::{Metric, Report};
use super::{Common, lab, tools};

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Agent restarts during the measured run.
    #[arg(long, default_value = "5")]
    pub restarts: usize,
    /// HTTP requests per second from each of the two clients.
    #[arg(long, default_value = "500")]
    pub rate: f64,
}

const NS: &str = "bench";
const HTTP: u16 = 8080;
const GRPC: u16 = 50051;
const WS: u16 = 8765;
const TCP: u16 = 9000;
const GRPC_PY: &str = include_str!("../../../comb-cli/tests/l7_support/grpc_echo.py");
const WS_PY: &str = include_str!("../../../comb-cli/tests/l7_support/ws_echo.py");
const PY: &str = "/usr/bin/python3";

fn pods() -> String {
    let pod = |name: &str, node: &str, l7: bool| {
        let ann = if l7 {
            "  annotations: {comb.dev/l7: \"true\"}\n"
        } else {
            ""
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{app: {name}}}\n{ann}spec: {{nodeName: {node}, serviceAccountName: {name}, containers: [{{name: c, image: none}}]}}\n---\n"
        )
    };
    pod("client", "node1", false) + &pod("local", "node2", false) + &pod("web", "node2", true)
}

/// A load client: its process, and what it is called in errors.
struct Client(Child, &'static str);

fn spawn(lab: &Lab, pod: &str, program: &str, args: &[&str], what: &'static str) -> Result<Client> {
    let child = lab
        .command(&format!("{NS}/{pod}"), program, args)?
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    Ok(Client(child, what))
}

impl Client {
    /// Its last output line, parsed (every client ends with a JSON report).
    fn report(self) -> Result<serde_json::Value> {
        let out = self.0.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default();
        serde_json::from_str(last).with_context(|| {
            format!(
                "{}: no report in {text:?} ({})",
                self.1,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }
}

pub fn run(a: &Args) -> Result<Report> {
    let c = &a.common;
    if c.secs == 0 || a.rate <= 0.0 {
        bail!("--secs and --rate must be positive");
    }
    let comb = std::env::current_exe()?;
    let comb_s = comb.to_str().context("comb path")?.to_owned();
    let lab = lab::up_nodes(
        "bup",
        &[],
        "bench-upgrade.yaml",
        pods(),
        &[("node1", 1), ("node2", 2)],
    )?;
    super::mtls::wait_certificates(&lab, &["node1", "node2"])?;
    let scripts = lab.state_dir().join("bench-scripts");
    std::fs::create_dir_all(&scripts)?;
    let (grpc_py, ws_py) = (scripts.join("grpc_echo.py"), scripts.join("ws_echo.py"));
    std::fs::write(&grpc_py, GRPC_PY)?;
    std::fs::write(&ws_py, WS_PY)?;
    let p = |p: &Path| p.to_str().context("script path").map(str::to_owned);
    let (grpc_py, ws_py) = (p(&grpc_py)?, p(&ws_py)?);
    let web = format!("{NS}/web");
    // Dropped (killed) before `lab`, since declared after it.
    let _servers = [
        tools::start_server(
            &lab,
            &web,
            &comb_s,
            &[
                "probe",
                "http-serve",
                "--port",
                &HTTP.to_string(),
                "--threads",
                "2",
            ],
            HTTP,
        )?,
        tools::start_server(
            &lab,
            &web,
            PY,
            &[&grpc_py, "serve", &GRPC.to_string()],
            GRPC,
        )?,
        tools::start_server(&lab, &web, PY, &[&ws_py, "serve", &WS.to_string()], WS)?,
        tools::start_server(
            &lab,
            &web,
            &comb_s,
            &[
                "probe",
                "serve",
                "--port",
                &TCP.to_string(),
                "--mode",
                "echo",
            ],
            TCP,
        )?,
    ];
    let web_ip = lab.pod(&web)?.ip.to_string();
    let setup = Setup {
        lab: &lab,
        comb: comb_s,
        grpc_py,
        ws_py,
        web_ip,
        rate: a.rate,
    };
    // Warm up (the first tunnel, the pools), then the same load without and with restarts.
    setup.phase(0, 3)?;
    let secs = u64::from(c.secs).max(8);
    let steady = setup.phase(0, secs)?;
    let upgrades = setup.phase(a.restarts, a.restarts as u64 * 4 + 8)?;

    let in_window = |t: u64| upgrades.windows.iter().any(|&(a, b)| t >= a && t <= b);
    // The same run's requests outside the hand-overs: its steady-state latency.
    let mut outside: Vec<f64> = upgrades
        .samples
        .iter()
        .filter(|(start, lat)| *lat >= 0 && !in_window(*start))
        .map(|(_, lat)| *lat as f64 / 1000.0)
        .collect();
    let steady_p99 = super::report::percentile(&mut outside, 99.0);
    let stall = max_gap_ms(&upgrades.samples, &upgrades.windows);
    let steady_gap = max_gap_ms(&steady.samples, &[(0, u64::MAX)]);
    eprintln!(
        "steady run: longest gap {steady_gap:.1} ms; run with restarts: p99 outside the hand-overs {steady_p99:.2} ms, longest gap in a hand-over {stall:.1} ms"
    );
    let zero_goal = |name: &str, unit: &str, baseline: f64, comb: f64| Metric {
        name: name.into(),
        unit: unit.into(),
        baseline,
        comb,
        // Goal 0: with a baseline of 0 the ratio is Comb's count itself.
        ratio: if baseline == 0.0 {
            comb
        } else {
            comb / baseline
        },
    };
    Ok(Report {
        scenario: "upgrade".into(),
        metrics: vec![
            zero_goal(
                "failed_requests",
                "requests",
                steady.failed as f64,
                upgrades.failed as f64,
            ),
            zero_goal(
                "reset_connections",
                "connections",
                steady.resets as f64,
                upgrades.resets as f64,
            ),
            Metric {
                name: "max_stall_ms".into(),
                unit: "ms".into(),
                baseline: steady_p99,
                comb: stall,
                ratio: stall / steady_p99,
            },
        ],
        pairs: 1,
        baseline_label: format!(
            "the load without restarts ({secs} s); for max_stall_ms: the p99 latency of the run with restarts outside its hand-overs"
        ),
        comb_label: format!(
            "HTTP {} req/s x 2, 100 gRPC streams, 50 WebSockets, 50 TCP streams, {} agent restarts",
            a.rate, a.restarts
        ),
    })
}

/// The longest time (ms) between consecutive request completions (both clients merged) that
/// overlaps one of `windows` (unix µs).
fn max_gap_ms(samples: &[(u64, i64)], windows: &[(u64, u64)]) -> f64 {
    let mut done: Vec<u64> = samples
        .iter()
        .filter(|(_, lat)| *lat >= 0)
        .map(|(start, lat)| start + *lat as u64)
        .collect();
    done.sort_unstable();
    done.windows(2)
        .filter(|w| windows.iter().any(|&(a, b)| w[1] >= a && w[0] <= b))
        .map(|w| (w[1] - w[0]) as f64 / 1000.0)
        .fold(0.0, f64::max)
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Setup<'a> {
    lab: &'a Lab,
    comb: String,
    grpc_py: String,
    ws_py: String,
    web_ip: String,
    rate: f64,
}

/// What one run measured.
struct Phase {
    failed: u64,
    /// Streams (gRPC, WebSocket, TCP) that failed.
    resets: u64,
    /// (start unix µs, latency µs or -1) of every HTTP request of both clients.
    samples: Vec<(u64, i64)>,
    /// The hand-overs: from asking for a restart to 2 s after the new agent answered.
    windows: Vec<(u64, u64)>,
}

impl Setup<'_> {
    /// The whole load for `secs` seconds, with `restarts` agent restarts 4 s apart
    /// (alternating node2 and node1).
    fn phase(&self, restarts: usize, secs: u64) -> Result<Phase> {
        let lab = self.lab;
        let dir = lab.state_dir().join("bench-upgrade");
        std::fs::create_dir_all(&dir)?;
        let stop = dir.join("stop");
        let _ = std::fs::remove_file(&stop);
        let path = |p: &Path| p.to_str().context("path").map(str::to_owned);
        let stop_s = path(&stop)?;
        let (http, tcp) = (
            format!("{}:{HTTP}", self.web_ip),
            format!("{}:{TCP}", self.web_ip),
        );
        let (rate, s) = (self.rate.to_string(), secs.to_string());
        let mut loads = Vec::new();
        let mut sample_files = Vec::new();
        for (pod, what) in [
            ("client", "HTTP load from node1"),
            ("local", "HTTP load on node2"),
        ] {
            let f = dir.join(format!("samples-{pod}"));
            let fs = path(&f)?;
            let args = [
                "probe",
                "http-load",
                "--to",
                &http,
                "--conns",
                "8",
                "--rate",
                &rate,
                "--secs",
                &s,
                "--samples",
                &fs,
            ];
            loads.push(spawn(lab, pod, &self.comb, &args, what)?);
            sample_files.push(f);
        }
        let grpc = spawn(
            lab,
            "client",
            PY,
            &[
                &self.grpc_py,
                "hold",
                &format!("{}:{GRPC}", self.web_ip),
                "100",
                &stop_s,
            ],
            "gRPC streams",
        )?;
        let ws = spawn(
            lab,
            "local",
            PY,
            &[
                &self.ws_py,
                "hold",
                &format!("ws://{}:{WS}/b", self.web_ip),
                "50",
                &stop_s,
            ],
            "WebSockets",
        )?;
        let stream_secs = secs.saturating_sub(2).max(1).to_string();
        let tcp_streams = spawn(
            lab,
            "client",
            &self.comb,
            &[
                "probe",
                "stream",
                "--to",
                &tcp,
                "--conns",
                "50",
                "--secs",
                &stream_secs,
            ],
            "TCP streams",
        )?;
        let mut windows = Vec::new();
        for i in 0..restarts {
            std::thread::sleep(Duration::from_secs(4));
            let node = if i % 2 == 0 { "node2" } else { "node1" };
            let from = unix_us();
            let pid = lab.upgrade_agent(node, None)?;
            windows.push((from, unix_us() + 2_000_000));
            eprintln!("restart {}: {node} now served by combd {pid}", i + 1);
        }
        let http_reports: Vec<serde_json::Value> = loads
            .into_iter()
            .map(Client::report)
            .collect::<Result<_>>()?;
        let tcp_r = tcp_streams.report()?;
        std::fs::write(&stop, b"")?;
        let (grpc_r, ws_r) = (grpc.report()?, ws.report()?);
        eprintln!("http: {http_reports:?}\ntcp: {tcp_r}\ngrpc: {grpc_r}\nws: {ws_r}");
        let count = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(u64::MAX);
        let mut samples = Vec::new();
        for f in &sample_files {
            for line in std::fs::read_to_string(f)?.lines() {
                let mut it = line.split(' ');
                if let (Some(a), Some(b)) = (it.next(), it.next()) {
                    samples.push((a.parse()?, b.parse()?));
                }
            }
        }
        Ok(Phase {
            failed: http_reports.iter().map(|r| count(r, "failed")).sum(),
            resets: count(&grpc_r, "failed")
                + count(&ws_r, "failed")
                + tcp_r["failures"]
                    .as_array()
                    .map_or(u64::MAX, |f| f.len() as u64),
            samples,
            windows,
        })
    }
}
