//! comb: Comb's command line. It parses and dispatches: agents are asked through comb-api,
//! labs are comb-lab, benchmarks and probes are comb-testkit.

#![forbid(unsafe_code)]

mod agent_cmds;
mod ask;
mod ca_cmds;
mod cni_cmds;
mod lab_cmds;
mod manifest_cmds;
mod policy_cmds;
mod proxy_cmds;
mod service_cmds;
mod stderr_log;
mod tunnel_cmds;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// How to reach an agent.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// The node whose agent to ask (needed when several run).
    #[arg(long, global = true)]
    pub node: Option<String>,
    /// The agent's admin socket, instead of looking it up by node.
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    pub output: Output,
}

#[derive(Parser)]
#[command(
    name = "comb",
    version,
    about = "Comb: a sidecar-free service mesh with an eBPF datapath"
)]
struct Cli {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The agent's health, State generation and configuration errors.
    Status {
        /// Exit non-zero unless the agent holds a State and its datapath applied it (a
        /// readiness probe).
        #[arg(long)]
        ready: bool,
    },
    /// Endpoints (pods) the agent knows.
    Endpoint {
        #[command(subcommand)]
        cmd: agent_cmds::EndpointCmd,
    },
    /// Security identities of the policy datapath.
    Identity {
        #[command(subcommand)]
        cmd: policy_cmds::IdentityCmd,
    },
    /// Live flow verdicts of the identity policy (until interrupted).
    Monitor(policy_cmds::MonitorArgs),
    /// Workload certificates (SPIFFE X.509) the agent holds.
    Cert {
        #[command(subcommand)]
        cmd: agent_cmds::CertCmd,
    },
    /// Services load-balanced at the socket.
    Service {
        #[command(subcommand)]
        cmd: service_cmds::ServiceCmd,
    },
    /// The local socket splice.
    Splice {
        #[command(subcommand)]
        cmd: agent_cmds::SpliceCmd,
    },
    /// The node L7 proxy.
    Proxy {
        #[command(subcommand)]
        cmd: proxy_cmds::ProxyCmd,
    },
    /// The node proxy's HBONE tunnels (mutual TLS between nodes).
    Tunnel {
        #[command(subcommand)]
        cmd: tunnel_cmds::TunnelCmd,
    },
    /// The agent's Prometheus metrics.
    Metrics,
    /// Validate manifests and write them into the manifests directory.
    Apply(manifest_cmds::FileArgs),
    /// Remove the objects of a manifest file from the manifests directory.
    Delete(manifest_cmds::FileArgs),
    /// The certificate authority (Istio's CA API), in this process until SIGTERM.
    Ca(Box<ca_cmds::CaArgs>),
    /// Chain the comb-cni plugin into the node's CNI configuration, or take it out.
    Cni {
        #[command(subcommand)]
        cmd: cni_cmds::CniCmd,
    },
    /// Nodes and pods as network namespaces on this machine.
    Lab {
        #[command(subcommand)]
        cmd: lab_cmds::LabCmd,
    },
    /// Benchmarks comparing Comb against a baseline in the same run.
    Bench {
        #[command(subcommand)]
        cmd: comb_testkit::bench::BenchCmd,
    },
    /// Traffic tool used by tests and benchmarks inside lab pods.
    #[command(hide = true)]
    Probe {
        #[command(subcommand)]
        cmd: comb_testkit::probe::ProbeCmd,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let t = &cli.target;
    let result = match cli.cmd {
        Cmd::Status { ready } => agent_cmds::status(t, ready),
        Cmd::Endpoint { cmd } => agent_cmds::endpoint(t, cmd),
        Cmd::Service { cmd } => service_cmds::run(t, cmd),
        Cmd::Cert { cmd } => agent_cmds::cert(t, cmd),
        Cmd::Identity { cmd } => policy_cmds::identity(t, cmd),
        Cmd::Monitor(a) => policy_cmds::monitor(t, a),
        Cmd::Splice { cmd } => agent_cmds::splice(t, cmd),
        Cmd::Proxy { cmd } => proxy_cmds::proxy(t, cmd),
        Cmd::Tunnel { cmd } => tunnel_cmds::tunnel(t, cmd),
        Cmd::Metrics => agent_cmds::metrics(t),
        Cmd::Apply(a) => manifest_cmds::apply(&a),
        Cmd::Delete(a) => manifest_cmds::delete(&a),
        Cmd::Ca(a) => ca_cmds::run(*a),
        Cmd::Cni { cmd } => cni_cmds::run(cmd),
        Cmd::Lab { cmd } => lab_cmds::run(cmd),
        Cmd::Bench { cmd } => comb_testkit::bench::run(cmd),
        Cmd::Probe { cmd } => comb_testkit::probe::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("comb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
