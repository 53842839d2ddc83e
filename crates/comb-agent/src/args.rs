//! combd's command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// combd: Comb's node agent.
#[derive(Clone, Debug, Parser)]
#[command(name = "combd", version)]
pub struct Args {
    /// The node this agent runs on; only its pods get datapath state.
    #[arg(long)]
    pub node: String,
    /// Directory of Kubernetes YAML manifests (hot-reloaded).
    #[arg(long)]
    pub manifests: PathBuf,
    /// Admin API socket [default: /run/comb/NODE.sock].
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// Where programs, maps and links are pinned [default: /sys/fs/bpf/comb/NODE].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Prometheus /metrics listen address (loopback of the namespace combd runs in).
    #[arg(long, default_value = "127.0.0.1:9962")]
    pub metrics_addr: SocketAddr,
    /// Pod cgroup paths are relative to this [default: the cgroup2 mount].
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Local pod-to-pod socket splice.
    #[arg(long, value_enum, default_value = "on")]
    pub splice: OnOff,
    /// Leave programs attached and pinned at shutdown, so the datapath keeps working while
    /// the agent restarts.
    #[arg(long)]
    pub keep_pins: bool,
    /// How often the manifests directory is checked for changes, in milliseconds.
    #[arg(long, default_value = "250")]
    pub poll_ms: u64,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Args {
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/comb/{}.sock", self.node)))
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/comb/{}", self.node)))
    }
}
