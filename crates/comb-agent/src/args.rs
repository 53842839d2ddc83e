//! combd's command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::cgroup_path::normalize_cgroup;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// `--socket-lb`: which sockets get Service VIPs translated at connect/sendmsg.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SocketLb {
    /// Every socket in `--lb-cgroup` (pods and host processes).
    On,
    /// Only sockets in the host network namespace (pods keep another path, e.g. kube-proxy).
    HostOnly,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// combd: Comb's node agent.
#[derive(Clone, Debug, Parser)]
// Later flags override earlier ones, so a launcher (the lab) can set defaults that callers
// then override through its extra arguments.
#[command(name = "combd", version, args_override_self = true)]
pub struct Args {
    /// The node this agent runs on; only its pods get datapath state.
    #[arg(long)]
    pub node: String,
    /// Directory of Kubernetes YAML manifests (hot-reloaded): standalone mode, the default.
    #[arg(long, required_unless_present_any = ["kubeconfig", "in_cluster"], conflicts_with_all = ["kubeconfig", "in_cluster"])]
    pub manifests: Option<PathBuf>,
    /// Kubernetes mode: watch the API server this kubeconfig names (its current context)
    /// instead of a manifests directory.
    #[arg(long, conflicts_with = "in_cluster")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode with the pod's service account (KUBERNETES_SERVICE_HOST and the
    /// mounted token), as in a DaemonSet.
    #[arg(long)]
    pub in_cluster: bool,
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
    /// Kubernetes mode: the directory where the comb-cni plugin reports pod sandboxes (its
    /// `spoolDir`).
    #[arg(long, default_value = comb_cni::DEFAULT_SPOOL_DIR)]
    pub cni_spool: PathBuf,
    /// Kubernetes mode: the kubelet's pod cgroups, relative to the cgroup root [default:
    /// `kubepods` (cgroupfs driver) or `kubepods.slice` (systemd driver), whichever exists].
    #[arg(long)]
    pub kubelet_cgroup_root: Option<PathBuf>,
    /// Local pod-to-pod socket splice.
    #[arg(long, value_enum, default_value = "on")]
    pub splice: OnOff,
    /// Backpressure for spliced connections (the kernel's redirect has no bound of its own):
    /// the unread bytes a receiving socket may hold before its sender moves to TCP for good,
    /// where flow control applies. At least 64 KiB.
    #[arg(long, default_value_t = 128 << 20, value_parser = clap::value_parser!(u32).range(65536..))]
    pub splice_queue_limit: u32,
    /// Backpressure for a receiver that stopped reading: a sender whose peer holds this many
    /// unread bytes or more for `--splice-stall-ms` moves to TCP. At least 64 KiB.
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u32).range(65536..))]
    pub splice_stall_limit: u32,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub splice_stall_ms: u32,
    /// Service load balancing at the socket (kube-proxy replacement).
    #[arg(long, value_enum, default_value = "on")]
    pub socket_lb: SocketLb,
    /// cgroup, relative to the cgroup root, where the socket-LB programs attach; `/` is the
    /// cgroup root itself (a real node). No default: without it socket LB stays off, because
    /// attaching at the root of a shared machine would capture every process on it.
    #[arg(long)]
    pub lb_cgroup: Option<PathBuf>,
    /// Leave programs attached and pinned at shutdown, so the datapath keeps working while
    /// the agent restarts.
    #[arg(long)]
    pub keep_pins: bool,
    /// After handing over to a successor (a new combd started while this one runs,
    /// docs/upgrades.md): how long to keep serving the proxied connections this agent holds
    /// before cutting what is left, in seconds.
    #[arg(long, default_value = "600")]
    pub drain_timeout_s: u64,
    /// How often the manifests directory is checked for changes, in milliseconds.
    #[arg(long, default_value = "250")]
    pub poll_ms: u64,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Where the agent keeps what must survive its restarts (identity numbers)
    /// [default: /var/lib/comb/NODE].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Identity policy programs on the pods' host-side interfaces.
    #[arg(long, value_enum, default_value = "on")]
    pub policy: OnOff,
    /// A node uplink interface (repeatable), where the uplink program (HBONE inbound to local
    /// mesh pods on port 15008) attaches; `none`: no uplink program. Default: the interfaces
    /// of the default routes of the agent's network namespace, except in the machine's root
    /// network namespace (its own interfaces are never picked implicitly).
    #[arg(long = "uplink", value_name = "IFACE")]
    pub uplinks: Vec<String>,
    /// Conntrack lifetime of an established TCP flow without packets, in seconds.
    #[arg(long, default_value = "21600")]
    pub ct_tcp_timeout: f64,
    /// Conntrack lifetime after FIN/RST and of an unanswered SYN, in seconds.
    #[arg(long, default_value = "10")]
    pub ct_close_timeout: f64,
    /// Conntrack lifetime of UDP and other flows without packets, in seconds.
    #[arg(long, default_value = "60")]
    pub ct_other_timeout: f64,
    /// How often expired conntrack entries are removed, in seconds.
    #[arg(long, default_value = "10")]
    pub ct_gc_interval: f64,
    /// The node L7 proxy (flows whose policy needs L7, or with `comb.dev/l7: "true"`).
    /// Off: such flows fail closed (L7 policy) or keep the kernel path (visibility).
    #[arg(long, value_enum, default_value = "on")]
    pub proxy: OnOff,
    /// The proxy's transparent listener port (127.0.0.1 and [::1]).
    #[arg(long, default_value = "15006")]
    pub proxy_port: u16,
    /// Worker threads of the proxy.
    #[arg(long, default_value = "2")]
    pub proxy_workers: usize,
    /// The longest a proxy thread keeps polling for events after it woke up, in
    /// microseconds, before sleeping again (adaptive: shrinks to nothing when events come far
    /// apart, stops when another thread wants the CPU). It trades CPU time for fewer
    /// wake-ups: measured, +18 % HBONE connections per second, -9 % requests per CPU-second
    /// at saturation. 0 = never, the default (docs/l7.md, "Threads").
    #[arg(long, default_value = "0")]
    pub proxy_busy_poll_us: u64,
    /// Hand allowed opaque TCP and upgraded (WebSocket) connections to the kernel (sockmap,
    /// sk_skb verdict) once the proxy has decided, so their bytes stop crossing userspace.
    /// Off by default: on kernel 6.18 the kernel's redirect path moved bulk data slower and
    /// with more CPU than the userspace relay, and it has no backpressure towards the sender
    /// (docs/l7.md, docs/benchmarks.md).
    #[arg(long, value_enum, default_value = "off")]
    pub proxy_splice: OnOff,
    /// Splice local pods' connections to and from the node proxy socket to socket, as two
    /// local pods' connections are (the splice's sockops on the agent's own cgroup), so those
    /// hops skip the TCP/IP stack. A sender faster than its reader moves to TCP by the splice's
    /// backpressure rules (docs/splice.md). Needs `--splice on`; ignored with
    /// `--proxy-splice on`; never on the root cgroup.
    #[arg(long, value_enum, default_value = "on")]
    pub proxy_local_splice: OnOff,
    /// JSON access log of the proxy: `stdout`, `stderr` or a file path (appended).
    #[arg(long)]
    pub access_log: Option<String>,
    /// OTLP/HTTP collector for the proxy's spans, e.g. http://127.0.0.1:4318.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Time a client has to send a complete request head (slowloris), in milliseconds.
    #[arg(long, default_value = "10000")]
    pub proxy_header_timeout_ms: u64,
    /// Largest request head (request line + headers), in bytes (431 beyond).
    #[arg(long, default_value = "65536")]
    pub proxy_max_header_bytes: usize,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value = "1073741824")]
    pub proxy_max_body_bytes: u64,
    /// Upstream connect timeout, in milliseconds (503 UF beyond).
    #[arg(long, default_value = "5000")]
    pub proxy_connect_timeout_ms: u64,
    /// A downstream HTTP connection with no request in flight this long is closed (HTTP/2:
    /// GOAWAY), in milliseconds. Default 1 h (Envoy's `idle_timeout`).
    #[arg(long, default_value = "3600000")]
    pub proxy_idle_timeout_ms: u64,
    /// A pooled upstream connection unused this long is closed, in milliseconds. Default 1 h.
    #[arg(long, default_value = "3600000")]
    pub proxy_upstream_idle_timeout_ms: u64,
    /// An opaque TCP (or upgraded) connection with no bytes either way this long is closed,
    /// in milliseconds. Default 1 h (Istio's TCP idle timeout).
    #[arg(long, default_value = "3600000")]
    pub proxy_tcp_idle_timeout_ms: u64,
    /// Connections the proxy serves at once; more wait in the listen backlog.
    #[arg(long, default_value = "16384")]
    pub proxy_max_connections: usize,
    /// How long the proxy waits for a client's first bytes before relaying the connection as
    /// opaque TCP (server-first protocols), in milliseconds.
    #[arg(long, default_value = "500")]
    pub proxy_detect_timeout_ms: u64,
    /// The CA (Istio's CA API, `comb ca`), `host:port`. Without it the agent obtains no
    /// workload certificates (mesh mTLS off).
    #[arg(long)]
    pub ca_address: Option<String>,
    /// PEM root(s) of the CA: verifies the CA's TLS certificate and are the trust roots of
    /// mutual TLS between nodes. Required with --ca-address.
    #[arg(long)]
    pub ca_root_cert: Option<PathBuf>,
    /// File holding the bearer token presented to the CA (read at each request). Required
    /// with --ca-address.
    #[arg(long)]
    pub ca_token_file: Option<PathBuf>,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = comb_model::mesh::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime asked for workload certificates (renewed at half-life), e.g. 24h, 90m, 20s.
    #[arg(long, default_value = "24h", value_parser = comb_ca::parse_duration)]
    pub cert_ttl: std::time::Duration,
    /// HBONE tunnels between nodes in the node proxy (docs/mtls.md): an outbound listener
    /// for local pods' flows to remote mesh pods and the inbound listener for tunnels from
    /// other nodes. Needs the proxy and a CA (`--ca-address`): without certificates it stays
    /// off, and flows between nodes are plaintext.
    #[arg(long, value_enum, default_value = "on")]
    pub hbone: OnOff,
    /// Istio's root namespace: a PeerAuthentication without selector there is mesh-wide.
    #[arg(long, default_value = comb_model::mesh::DEFAULT_ROOT_NAMESPACE)]
    pub mtls_root_namespace: String,
    /// HBONE outbound transparent listener port (127.0.0.1 and [::1]).
    #[arg(long, default_value = "15001")]
    pub hbone_outbound_port: u16,
    /// HBONE inbound listener port (0.0.0.0, transparent; peers dial `<pod-ip>:this`).
    #[arg(long, default_value = "15008")]
    pub hbone_port: u16,
}

impl Args {
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/comb/{}.sock", self.node)))
    }

    /// Where and how the socket LB attaches (cgroup relative to the cgroup root, mode), or
    /// why it stays off.
    pub fn socket_lb_plan(&self) -> Result<(PathBuf, SocketLb), String> {
        if self.socket_lb == SocketLb::Off {
            return Err("--socket-lb off".into());
        }
        let Some(cg) = &self.lb_cgroup else {
            return Err("no --lb-cgroup given (use `/` for the whole node)".into());
        };
        Ok((normalize_cgroup(cg), self.socket_lb))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/comb/{}", self.node)))
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/comb/{}", self.node)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["combd", "--node", "n1", "--manifests", "/m"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn socket_lb_needs_a_cgroup() {
        let a = parse(&[]);
        assert_eq!(a.socket_lb, SocketLb::On);
        assert!(a.socket_lb_plan().unwrap_err().contains("--lb-cgroup"));
        let a = parse(&["--lb-cgroup", "/comb-lab-x/n1/"]);
        assert_eq!(
            a.socket_lb_plan(),
            Ok((PathBuf::from("comb-lab-x/n1"), SocketLb::On))
        );
    }

    #[test]
    fn slash_is_the_cgroup_root() {
        let a = parse(&["--lb-cgroup", "/", "--socket-lb", "host-only"]);
        assert_eq!(
            a.socket_lb_plan(),
            Ok((PathBuf::from("/"), SocketLb::HostOnly))
        );
    }

    #[test]
    fn later_flags_override_the_launchers() {
        let a = parse(&["--lb-cgroup", "/a", "--lb-cgroup", "/b", "--splice", "on"]);
        assert_eq!(a.lb_cgroup, Some(PathBuf::from("/b")));
    }

    #[test]
    fn off_wins_over_a_cgroup() {
        let a = parse(&["--lb-cgroup", "/", "--socket-lb", "off"]);
        assert_eq!(a.socket_lb_plan(), Err("--socket-lb off".into()));
    }
}
