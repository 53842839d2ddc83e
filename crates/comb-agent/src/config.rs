//! The agent's configuration, parsed once from the command line ([`crate::Args`], the only
//! place clap types live) into plain values the rest of the agent reads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use comb_datapath::SocketLbMode;
use comb_datapath::policy::PolicyConfig;
use comb_model::pipeline::PipelineConfig;

use crate::args::{Args, LogFormat, OnOff, SocketLb};
pub use crate::uplinks::UplinkPlan;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: String,
    /// Where the configuration comes from.
    pub source: SourceConfig,
    /// Fallback poll of the manifests directory (inotify wakes it at once).
    pub poll: Duration,
    pub admin_socket: PathBuf,
    pub pin_dir: PathBuf,
    pub metrics_addr: SocketAddr,
    /// Pod cgroup paths are relative to this; None = the cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
    /// Kubernetes mode: where comb-cni reports pod sandboxes.
    pub cni_spool: PathBuf,
    /// Kubernetes mode: the kubelet's pod cgroups, relative to the cgroup root; None =
    /// `kubepods` or `kubepods.slice`.
    pub kubelet_cgroup_root: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub splice: bool,
    /// `--splice-queue-limit`, `--splice-stall-limit`, `--splice-stall-ms`: when a spliced
    /// sender moves to TCP.
    pub splice_backpressure: comb_datapath::Backpressure,
    /// The agent's own cgroup (relative to the cgroup root), where the splice's sockops also
    /// attach so local pods' connections to the proxy are spliced; None: not spliced.
    pub proxy_cgroup: Option<PathBuf>,
    /// Where (cgroup relative to the cgroup root) and how the socket LB attaches, or why it
    /// stays off; fixed for the agent's life.
    pub socket_lb: Result<(PathBuf, SocketLbMode), String>,
    /// The flag as given, to tell "switched off" from "cannot be on" in the log.
    pub socket_lb_flag_off: bool,
    pub policy: bool,
    /// The node's uplinks (HBONE inbound), `--uplink`.
    pub uplinks: UplinkPlan,
    /// Conntrack lifetimes; flow events start off (the monitor switches them).
    pub policy_datapath: PolicyConfig,
    pub ct_gc_interval: Duration,
    pub keep_pins: bool,
    /// After a handover: how long the proxied connections may still be served.
    pub drain_timeout: Duration,
    /// The node proxy; None with `--proxy off`.
    pub proxy: Option<ProxyConfig>,
    pub log_format: LogFormat,
    /// SPIFFE trust domain (`--trust-domain`).
    pub trust_domain: String,
    /// Where a selector-less PeerAuthentication is mesh-wide (`--mtls-root-namespace`).
    pub mtls_root_namespace: String,
    /// The certificate reconciler's CA; None without `--ca-address` (mesh mTLS off).
    pub certs: Option<CertsConfig>,
}

#[derive(Clone, Debug)]
pub struct CertsConfig {
    pub ca_address: String,
    pub ca_root_cert: PathBuf,
    pub token_file: PathBuf,
    pub ttl: Duration,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub port: u16,
    pub workers: usize,
    pub busy_poll: Duration,
    pub splice: bool,
    pub access_log: Option<String>,
    pub otlp_endpoint: Option<String>,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub connect_timeout: Duration,
    pub detect_timeout: Duration,
    pub idle_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub tcp_idle_timeout: Duration,
    pub max_connections: usize,
    /// HBONE listeners (outbound, inbound) when on.
    pub hbone: Option<(u16, u16)>,
}

fn secs(v: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} {v}: must be a positive number of seconds"))
}

/// The configuration source combd runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory of manifests (standalone mode).
    Manifests(PathBuf),
    /// The Kubernetes API; `None`: in-cluster configuration.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

impl SourceConfig {
    /// For `comb status`.
    pub fn describe(&self) -> String {
        match self {
            SourceConfig::Manifests(dir) => dir.display().to_string(),
            SourceConfig::Kubernetes {
                kubeconfig: Some(p),
            } => format!("kubernetes (kubeconfig {})", p.display()),
            SourceConfig::Kubernetes { kubeconfig: None } => "kubernetes (in-cluster)".into(),
        }
    }
}

impl AgentConfig {
    /// Validate and resolve the flags; an error names the flag.
    pub fn from_args(a: &Args) -> Result<Self> {
        Ok(AgentConfig {
            node: a.node.clone(),
            source: match (&a.manifests, &a.kubeconfig) {
                (Some(dir), _) => SourceConfig::Manifests(dir.clone()),
                (None, kubeconfig) => SourceConfig::Kubernetes {
                    kubeconfig: kubeconfig.clone(),
                },
            },
            poll: Duration::from_millis(a.poll_ms.max(1)),
            admin_socket: a.admin_socket(),
            pin_dir: a.pin_dir(),
            metrics_addr: a.metrics_addr,
            cgroup_root: a.cgroup_root.clone(),
            cni_spool: a.cni_spool.clone(),
            kubelet_cgroup_root: a.kubelet_cgroup_root.clone(),
            state_dir: a.state_dir(),
            splice: a.splice == OnOff::On,
            splice_backpressure: comb_datapath::Backpressure {
                queue_limit: a.splice_queue_limit,
                stall_limit: a.splice_stall_limit,
                stall_ms: a.splice_stall_ms,
            },
            proxy_cgroup: (a.splice == OnOff::On
                && a.proxy == OnOff::On
                && a.proxy_splice == OnOff::Off
                && a.proxy_local_splice == OnOff::On)
                .then(own_cgroup)
                .flatten(),
            socket_lb: a.socket_lb_plan().map(|(cg, mode)| {
                let mode = match mode {
                    SocketLb::HostOnly => SocketLbMode::HostOnly,
                    SocketLb::On | SocketLb::Off => SocketLbMode::All,
                };
                (cg, mode)
            }),
            socket_lb_flag_off: a.socket_lb == SocketLb::Off,
            policy: a.policy == OnOff::On,
            uplinks: UplinkPlan::from_flags(&a.uplinks),
            policy_datapath: PolicyConfig {
                events: false,
                ct_tcp: secs(a.ct_tcp_timeout, "--ct-tcp-timeout")?,
                ct_close: secs(a.ct_close_timeout, "--ct-close-timeout")?,
                ct_other: secs(a.ct_other_timeout, "--ct-other-timeout")?,
            },
            ct_gc_interval: secs(a.ct_gc_interval, "--ct-gc-interval")?,
            keep_pins: a.keep_pins,
            drain_timeout: Duration::from_secs(a.drain_timeout_s),
            proxy: (a.proxy == OnOff::On).then(|| ProxyConfig {
                port: a.proxy_port,
                workers: a.proxy_workers.max(1),
                busy_poll: Duration::from_micros(a.proxy_busy_poll_us),
                splice: a.proxy_splice == OnOff::On,
                access_log: a.access_log.clone(),
                otlp_endpoint: a.otlp_endpoint.clone(),
                header_timeout: Duration::from_millis(a.proxy_header_timeout_ms),
                max_header_bytes: a.proxy_max_header_bytes,
                max_body_bytes: a.proxy_max_body_bytes,
                connect_timeout: Duration::from_millis(a.proxy_connect_timeout_ms),
                detect_timeout: Duration::from_millis(a.proxy_detect_timeout_ms),
                idle_timeout: Duration::from_millis(a.proxy_idle_timeout_ms.max(1)),
                upstream_idle_timeout: Duration::from_millis(
                    a.proxy_upstream_idle_timeout_ms.max(1),
                ),
                tcp_idle_timeout: Duration::from_millis(a.proxy_tcp_idle_timeout_ms.max(1)),
                max_connections: a.proxy_max_connections.max(1),
                // HBONE needs workload certificates: without a CA the listeners would only
                // take flows they cannot carry.
                hbone: (a.hbone == OnOff::On && a.ca_address.is_some())
                    .then_some((a.hbone_outbound_port, a.hbone_port)),
            }),
            log_format: a.log_format,
            trust_domain: a.trust_domain.clone(),
            mtls_root_namespace: a.mtls_root_namespace.clone(),
            certs: match &a.ca_address {
                None => None,
                Some(addr) => Some(CertsConfig {
                    ca_address: addr.clone(),
                    ca_root_cert: a
                        .ca_root_cert
                        .clone()
                        .context("--ca-address needs --ca-root-cert")?,
                    token_file: a
                        .ca_token_file
                        .clone()
                        .context("--ca-address needs --ca-token-file")?,
                    ttl: a.cert_ttl,
                }),
            },
        })
    }

    /// What of the configuration changes what the pipeline computes.
    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            mesh: comb_model::pipeline::MeshConfig {
                trust_domain: self.trust_domain.clone(),
                root_namespace: self.mtls_root_namespace.clone(),
            },
            policy: self.policy,
            socket_lb: self.socket_lb.is_ok(),
            proxy_cgroup: self.proxy_cgroup.clone(),
        }
    }

    /// `on`, `host-only` or `off`, as `comb status` says it.
    pub fn socket_lb_mode_name(mode: SocketLbMode) -> &'static str {
        match mode {
            SocketLbMode::All => "on",
            SocketLbMode::HostOnly => "host-only",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<AgentConfig> {
        let mut argv = vec!["combd", "--node", "n1", "--manifests", "/m"];
        argv.extend_from_slice(extra);
        AgentConfig::from_args(&Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn source_is_manifests_or_kubernetes_never_both() {
        assert_eq!(
            parse(&[]).unwrap().source,
            SourceConfig::Manifests("/m".into())
        );
        let kube = |extra: &[&str]| {
            let mut argv = vec!["combd", "--node", "n1"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).map(|a| AgentConfig::from_args(&a).unwrap().source)
        };
        assert_eq!(
            kube(&["--kubeconfig", "/k"]).unwrap(),
            SourceConfig::Kubernetes {
                kubeconfig: Some("/k".into())
            }
        );
        assert_eq!(
            kube(&["--in-cluster"]).unwrap(),
            SourceConfig::Kubernetes { kubeconfig: None }
        );
        assert!(kube(&[]).is_err(), "a source is required");
        assert!(kube(&["--kubeconfig", "/k", "--manifests", "/m"]).is_err());
        assert!(kube(&["--kubeconfig", "/k", "--in-cluster"]).is_err());
    }

    #[test]
    fn defaults_resolve_paths_from_the_node_name() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.admin_socket, PathBuf::from("/run/comb/n1.sock"));
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/comb/n1"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/comb/n1"));
        assert!(c.splice && c.policy && c.proxy.is_some());
        assert!(c.socket_lb.is_err(), "no --lb-cgroup");
        assert!(!c.pipeline().socket_lb);
    }

    #[test]
    fn socket_lb_mode_and_cgroup() {
        let c = parse(&["--lb-cgroup", "/lab/n1/", "--socket-lb", "host-only"]).unwrap();
        assert_eq!(
            c.socket_lb,
            Ok((PathBuf::from("lab/n1"), SocketLbMode::HostOnly))
        );
        assert!(c.pipeline().socket_lb);
        let c = parse(&["--lb-cgroup", "/", "--socket-lb", "off"]).unwrap();
        assert!(c.socket_lb.is_err() && c.socket_lb_flag_off);
    }

    #[test]
    fn bad_durations_name_their_flag() {
        let e = parse(&["--ct-tcp-timeout", "0"]).unwrap_err();
        assert!(format!("{e:#}").contains("--ct-tcp-timeout"), "{e:#}");
        let e = parse(&["--ct-gc-interval=-1"]).unwrap_err();
        assert!(format!("{e:#}").contains("--ct-gc-interval"), "{e:#}");
    }

    #[test]
    fn certificate_flags() {
        let c = parse(&[]).unwrap();
        assert!(c.certs.is_none());
        assert_eq!(c.pipeline().mesh.trust_domain, "cluster.local");
        let e = parse(&["--ca-address", "127.0.0.1:15012"]).unwrap_err();
        assert!(format!("{e:#}").contains("--ca-root-cert"), "{e:#}");
        let c = parse(&[
            "--ca-address",
            "127.0.0.1:15012",
            "--ca-root-cert",
            "/r.pem",
            "--ca-token-file",
            "/t",
            "--cert-ttl",
            "20s",
            "--trust-domain",
            "example.org",
        ])
        .unwrap();
        let certs = c.certs.as_ref().unwrap();
        assert_eq!(certs.ttl, Duration::from_secs(20));
        assert_eq!(c.pipeline().mesh.trust_domain, "example.org");
    }

    #[test]
    fn proxy_off_has_no_proxy_config() {
        let c = parse(&["--proxy", "off", "--proxy-workers", "0"]).unwrap();
        assert!(c.proxy.is_none());
        let c = parse(&["--proxy-workers", "0"]).unwrap();
        assert_eq!(c.proxy.unwrap().workers, 1);
    }

    #[test]
    fn proxy_idle_timeouts_and_connection_cap() {
        let p = parse(&[]).unwrap().proxy.unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(
            (p.idle_timeout, p.upstream_idle_timeout, p.tcp_idle_timeout),
            (hour, hour, hour)
        );
        assert_eq!(p.max_connections, 16384);
        let p = parse(&[
            "--proxy-idle-timeout-ms",
            "1500",
            "--proxy-upstream-idle-timeout-ms",
            "0",
            "--proxy-tcp-idle-timeout-ms",
            "30000",
            "--proxy-max-connections",
            "100",
        ])
        .unwrap()
        .proxy
        .unwrap();
        assert_eq!(p.idle_timeout, Duration::from_millis(1500));
        // Zero would close every pooled connection at once: the floor is 1 ms.
        assert_eq!(p.upstream_idle_timeout, Duration::from_millis(1));
        assert_eq!(p.tcp_idle_timeout, Duration::from_secs(30));
        assert_eq!(p.max_connections, 100);
    }

    #[test]
    fn hbone_is_on_with_a_ca_and_takes_its_ports() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.proxy.unwrap().hbone,
            None,
            "no CA, no certificates, no HBONE"
        );
        let ca = [
            "--ca-address",
            "127.0.0.1:15012",
            "--ca-root-cert",
            "/r.pem",
            "--ca-token-file",
            "/t",
        ];
        let c = parse(&ca).unwrap();
        assert_eq!(c.proxy.unwrap().hbone, Some((15001, 15008)));
        let c = parse(&[&ca[..], &["--hbone", "off"]].concat()).unwrap();
        assert_eq!(c.proxy.unwrap().hbone, None);
        let c = parse(
            &[
                &ca[..],
                &[
                    "--hbone",
                    "on",
                    "--hbone-outbound-port",
                    "1",
                    "--hbone-port",
                    "2",
                ],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(c.proxy.unwrap().hbone, Some((1, 2)));
    }
}

/// This process's cgroup v2 path (`0::/path` in /proc/self/cgroup), relative, unless it is
/// the root: programs are never attached to the machine's root cgroup. In a container with a
/// private cgroup namespace the path reads as the root, so the proxy's sockets are then not
/// spliced.
fn own_cgroup() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own_cgroup_of(&text)?;
    if path == Path::new("/") {
        tracing::info!(
            "the agent runs in the root cgroup (or its namespace's): local pods' connections to the proxy are not spliced"
        );
        return None;
    }
    Some(path)
}

fn own_cgroup_of(proc_cgroup: &str) -> Option<PathBuf> {
    let line = proc_cgroup.lines().find(|l| l.starts_with("0::"))?;
    Some(crate::cgroup_path::normalize_cgroup(Path::new(
        line.trim_start_matches("0::"),
    )))
}

#[cfg(test)]
mod own_cgroup_tests {
    use super::*;

    #[test]
    fn the_unified_line_gives_the_cgroup() {
        let hybrid = "12:pids:/x\n1:name=systemd:/y\n0::/comb-lab-a/n1/_combd\n";
        assert_eq!(
            own_cgroup_of(hybrid),
            Some(PathBuf::from("comb-lab-a/n1/_combd"))
        );
        assert_eq!(own_cgroup_of("0::/\n"), Some(PathBuf::from("/")));
        assert_eq!(own_cgroup_of("1:cpu:/a\n"), None);
    }
}
