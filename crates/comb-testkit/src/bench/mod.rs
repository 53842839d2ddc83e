//! `comb bench`: each scenario builds its own lab, runs the baseline and Comb's path
//! interleaved, and reports medians and ratios measured in the same run.

mod flip_probe;
mod host_steal;
mod kube;
mod l7;
mod l7_splice;
mod l7_tools;
mod lab;
mod mtls;
mod policy;
mod report;
mod service_lb;
mod splice;
mod three_paths;
mod tools;
mod upgrade;

pub use report::percentile;

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Baseline/Comb pairs to run (interleaved; at least 5 for figures you quote).
    #[arg(long, default_value = "5")]
    pub pairs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value = "3")]
    pub secs: u32,
}

/// `--agent-arg`, for the benches whose lab agent can be started with other settings.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AgentArgs {
    /// Extra argument for the lab's combd (repeatable), e.g. `--agent-arg=--proxy-workers=1`,
    /// to measure what a setting buys.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
}

impl AgentArgs {
    pub fn as_strs(&self) -> Vec<&str> {
        self.agent_args.iter().map(String::as_str).collect()
    }
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Local pod-to-pod TCP: plain TCP over veths (baseline) against the socket splice.
    Splice(splice::Args),
    /// Service load balancing: kube-proxy-style iptables DNAT (baseline) against the socket LB.
    ServiceLb(service_lb::Args),
    /// Identity policy: 1,000 rules over 200 identities against no policy (request/response,
    /// connection rate), and the time from a manifest change to enforcement.
    Policy(policy::Args),
    /// Node L7 proxy against a pair of haproxy sidecars (added latency at 1,000 req/s,
    /// requests per CPU second, memory), and what the kernel splice buys for opaque TCP.
    L7(l7::Args),
    /// Pods on two nodes: plaintext, a pair of haproxy sidecars with mutual TLS, and Comb's
    /// HBONE tunnel (added latency, throughput, connection rate, memory).
    Mtls(mtls::Args),
    /// The agent fed by kube-apiserver against the same objects in a manifests directory:
    /// 5,000 pods, 1,000 Services, 500 NetworkPolicies (initial sync, label change to
    /// enforcement, memory).
    Kube(kube::Args),
    /// Traffic of every kind through the node proxies while the agents restart (failed
    /// requests, reset connections, longest stall), against the same load with no restart.
    Upgrade(upgrade::Args),
}

pub fn run(cmd: BenchCmd) -> Result<ExitCode> {
    comb_lab::install_signal_cleanup();
    let (common, report) = match cmd {
        BenchCmd::Splice(a) => {
            let r = splice::run(&a)?;
            (a.common, r)
        }
        BenchCmd::ServiceLb(a) => {
            let r = service_lb::run(&a)?;
            (a.common, r)
        }
        BenchCmd::Policy(a) => {
            let r = policy::run(&a)?;
            (a.common, r)
        }
        BenchCmd::L7(a) => {
            let r = l7::run(&a)?;
            (a.common, r)
        }
        BenchCmd::Mtls(a) => {
            let r = mtls::run(&a)?;
            (a.common, r)
        }
        BenchCmd::Kube(a) => {
            let r = kube::run(&a)?;
            (a.common, r)
        }
        BenchCmd::Upgrade(a) => {
            let r = upgrade::run(&a)?;
            (a.common, r)
        }
    };
    if common.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(ExitCode::SUCCESS)
}
