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

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
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
    let (http, tcp) = (format!("{web_ip}:{HTTP}"), format!("{web_ip}:{TCP}"));
    let rate = a.rate.to_string();
    let http_load = |secs: u64| -> Result<[Client; 2]> {
        let s = secs.to_string();
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
        ];
        Ok([
            spawn(&lab, "client", &comb_s, &args, "HTTP load from node1")?,
            spawn(&lab, "local", &comb_s, &args, "HTTP load on node2")?,
        ])
    };
    // Warm up (first tunnel, pools), then the steady run.
    for r in http_load(2)? {
        r.report()?;
    }
    let steady: Vec<serde_json::Value> = http_load(u64::from(c.secs))?
        .into_iter()
        .map(Client::report)
        .collect::<Result<_>>()?;
    eprintln!("steady: {steady:?}");

    let stop = lab.state_dir().join("bench-stop");
    let stop_s = p(&stop)?;
    let secs = a.restarts as u64 * 4 + 8;
    let loads = http_load(secs)?;
    let grpc = spawn(
        &lab,
        "client",
        PY,
        &[
            &grpc_py,
            "hold",
            &format!("{web_ip}:{GRPC}"),
            "100",
            &stop_s,
        ],
        "gRPC streams",
    )?;
    let ws = spawn(
        &lab,
        "local",
        PY,
        &[
            &ws_py,
            "hold",
            &format!("ws://{web_ip}:{WS}/b"),
            "50",
            &stop_s,
        ],
        "WebSockets",
    )?;
    let tcp_streams = spawn(
        &lab,
        "client",
        &comb_s,
        &[
            "probe",
            "stream",
            "--to",
            &tcp,
            "--conns",
            "50",
            "--secs",
            &(secs - 2).to_string(),
        ],
        "TCP streams",
    )?;
    for i in 0..a.restarts {
        std::thread::sleep(Duration::from_secs(4));
        let node = if i % 2 == 0 { "node2" } else { "node1" };
        let pid = lab.upgrade_agent(node, None)?;
        eprintln!("restart {}: {node} now served by combd {pid}", i + 1);
    }
    let during: Vec<serde_json::Value> = loads
        .into_iter()
        .map(Client::report)
        .collect::<Result<_>>()?;
    let tcp_r = tcp_streams.report()?;
    std::fs::write(&stop, b"")?;
    let (grpc_r, ws_r) = (grpc.report()?, ws.report()?);
    eprintln!("during: {during:?}\ntcp: {tcp_r}\ngrpc: {grpc_r}\nws: {ws_r}");

    let failed = |runs: &[serde_json::Value]| runs.iter().map(|r| num(r, "failed")).sum::<f64>();
    let resets = num(&grpc_r, "failed")
        + num(&ws_r, "failed")
        + tcp_r["failures"]
            .as_array()
            .map_or(f64::NAN, |f| f.len() as f64);
    let steady_p99 = steady.iter().map(|r| num(r, "p99_ms")).fold(0.0, f64::max);
    let stall = during
        .iter()
        .map(|r| num(r, "max_gap_ms"))
        .fold(0.0, f64::max);
    let zero_goal = |name: &str, unit: &str, baseline: f64, comb: f64| Metric {
        name: name.into(),
        unit: unit.into(),
        baseline,
        comb,
        // Goal 0: the ratio is Comb's count itself over a baseline that is 0 too.
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
                failed(&steady),
                failed(&during),
            ),
            zero_goal("reset_connections", "connections", 0.0, resets),
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
            "HTTP load without restarts ({} s; max_stall_ms baseline: its p99 latency)",
            c.secs
        ),
        comb_label: format!(
            "the same load plus 100 gRPC streams, 50 WebSockets, 50 TCP streams, {} agent restarts",
            a.restarts
        ),
    })
}
