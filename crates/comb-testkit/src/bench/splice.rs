//! `comb bench splice`: local pod-to-pod TCP with the splice off (plain TCP over the veths,
//! the baseline) and on, interleaved in one lab.

use anyhow::{Result, bail};
use comb_api::{Control, Query};

use super::report::{Metric, Report};
use super::{AgentArgs, Common, lab, tools};
use comb_api::client;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
"#;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub agent: AgentArgs,
}

const RR_PORT: u16 = 11111;
const BULK_PORT: u16 = 5201;

pub fn run(a: &Args) -> Result<Report> {
    let c = &a.common;
    if c.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    let agent_args = a.agent.as_strs();
    let lab = lab::up("bs", &agent_args, "bench-splice.yaml", PODS.to_string(), 2)?;
    let socket = lab.agent_socket("node1");
    let server_ip = lab.pod("bench/server")?.ip.to_string();
    let _rr = tools::start_server(
        &lab,
        "bench/server",
        "sockperf",
        &["server", "--tcp", "-p", &RR_PORT.to_string()],
        RR_PORT,
    )?;
    let _bulk = tools::start_server(
        &lab,
        "bench/server",
        "iperf3",
        &["-s", "-p", &BULK_PORT.to_string()],
        BULK_PORT,
    )?;
    let logs = tempfile::tempdir()?;

    // Per metric: (baseline runs, comb runs).
    let mut runs: [(Vec<f64>, Vec<f64>); 4] = Default::default();
    for pair in 0..c.pairs {
        // Alternate which side goes first so drift over time does not favour one.
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for splice in order {
            client::call(&socket, Control::SetSplice { enabled: splice })?;
            let (p50_1, p99_1) = tools::sockperf_rr(
                &lab,
                "bench/client",
                &server_ip,
                RR_PORT,
                1,
                c.secs,
                logs.path(),
            )?;
            let (p50_16, _) = tools::sockperf_rr(
                &lab,
                "bench/client",
                &server_ip,
                RR_PORT,
                16,
                c.secs,
                logs.path(),
            )?;
            let gbps = tools::iperf3_gbps(&lab, "bench/client", &server_ip, c.secs)?;
            for (i, v) in [p50_1, p99_1, p50_16, gbps].into_iter().enumerate() {
                if splice {
                    runs[i].1.push(v)
                } else {
                    runs[i].0.push(v)
                }
            }
            if !c.json {
                eprintln!(
                    "pair {}/{} splice {:3}: rr p50 {p50_1:.2} us, p99 {p99_1:.2} us, 16 conns p50 {p50_16:.2} us, {gbps:.2} Gbit/s",
                    pair + 1,
                    c.pairs,
                    if splice { "on" } else { "off" }
                );
            }
        }
    }
    let stats: comb_api::SpliceStats =
        serde_json::from_value(client::call(&socket, Query::SpliceStats)?)?;
    if !c.json {
        eprintln!(
            "splice counters: {} bytes redirected, {} over TCP; sockets moved to TCP: {} (peer \
             queue full), {} (peer stalled); at most {} bytes unread at a peer",
            stats.redirected_bytes,
            stats.passed_bytes,
            stats.queue_fallbacks,
            stats.stall_fallbacks,
            stats.max_unread
        );
    }
    if stats.redirected_bytes == 0 {
        bail!(
            "the splice redirected no bytes: the Comb side of this benchmark did not run spliced"
        );
    }
    drop((_rr, _bulk));
    lab.down()?;
    let names = [
        ("rr_p50_1conn", "us"),
        ("rr_p99_1conn", "us"),
        ("rr_p50_16conn", "us"),
        ("throughput", "Gbit/s"),
    ];
    Ok(Report {
        scenario: "splice".into(),
        metrics: names
            .iter()
            .zip(&runs)
            .map(|((n, u), (b, c))| Metric::from_runs(n, u, b, c))
            .collect(),
        pairs: c.pairs,
        baseline_label: "plain TCP over veths (splice off)".into(),
        comb_label: "sockops + sk_msg socket splice".into(),
    })
}
