//! `comb bench service-lb`: connection rate and latency through N Service VIPs, kube-proxy
//! style iptables DNAT in the node namespace (baseline) against the socket LB, in one lab.
//!
//! Two disjoint VIP sets with the same two backends: set A (198.19.0.0/17) is in the
//! manifests the agent reads, set B (198.19.128.0/17) only in the iptables ruleset, which is
//! loaded in the node namespace for the baseline runs and flushed after each. The socket LB
//! does not know set B, so baseline connects leave the pod untranslated and are DNATed by
//! iptables; Comb's connects to set A are translated at connect() and see no kube-proxy rule.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comb_api::{Query, Status};
use comb_lab::Lab;

use super::report::{Metric, Report, median};
use super::{Common, lab, tools};
use comb_api::client;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Client threads of `comb probe connrate`, each one connection at a time.
    #[arg(long, default_value = "2")]
    pub parallel: usize,
}

const SIZES: [usize; 3] = [10, 1000, 10_000];
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const NS: &str = "bench";

/// VIP `i` of set A (`set_b` false) or B: 198.19.{0..127 | 128..255}.{1..250}.
pub fn vip(i: usize, set_b: bool) -> Ipv4Addr {
    let third = (i / 250) as u8 + if set_b { 128 } else { 0 };
    Ipv4Addr::new(198, 19, third, (i % 250) as u8 + 1)
}

/// N Services with one port (80 → 8080) and an EndpointSlice each, all on `backends`.
pub fn services_yaml(n: usize, backends: &[Ipv4Addr]) -> String {
    let mut s = String::with_capacity(n * 600);
    let eps: String = backends
        .iter()
        .map(|b| {
            format!("- addresses: [\"{b}\"]\n  conditions: {{ready: true}}\n  nodeName: node1\n")
        })
        .collect();
    for i in 0..n {
        let name = format!("svc-{i:05}");
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  clusterIP: \"{}\"\n  ports: [{{name: http, port: {SERVICE_PORT}, targetPort: {BACKEND_PORT}, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-0\n  namespace: {NS}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: {BACKEND_PORT}, protocol: TCP}}]\nendpoints:\n{eps}---\n",
            vip(i, false)
        );
    }
    s
}

/// A kube-proxy (iptables mode) style nat table for N services of set B: PREROUTING and
/// OUTPUT jump to KUBE-SERVICES, one rule per service to its KUBE-SVC chain, which picks a
/// KUBE-SEP chain with `statistic --mode random` and DNATs there.
pub fn iptables_rules(n: usize, backends: &[Ipv4Addr]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    chains.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    for i in 0..n {
        let svc = format!("KUBE-SVC-{i:016X}");
        let name = format!("{NS}/svc-{i:05}:http");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}",
            vip(i, true)
        );
        for (k, b) in backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:014X}{k:02X}");
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let left = backends.len() - k;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{name} -> {b}:{BACKEND_PORT}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{name} -> {b}:{BACKEND_PORT}\" -j {sep}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {b}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {b}:{BACKEND_PORT}"
            );
        }
    }
    chains + &rules + "COMMIT\n"
}

/// An empty nat table (base chains only): loaded before the first run so that both sides
/// run with conntrack and the nat hooks registered in the node namespace.
const EMPTY_NAT: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

/// `iptables-restore` (whole-table replace) inside the lab's node namespace only.
fn iptables_restore(lab: &Lab, rules: &str) -> Result<()> {
    let mut child = lab
        .node_command("node1", "iptables-restore", &[])?
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context(
            "running iptables-restore in the node namespace (is iptables installed? `make deps`)",
        )?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Connections conntrack tracks in the node namespace (None when it cannot be read).
fn conntrack_count(lab: &Lab) -> Option<u64> {
    let out = lab
        .node_command(
            "node1",
            "sysctl",
            &["-n", "net.netfilter.nf_conntrack_count"],
        )
        .ok()?
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Number of rules in the node namespace's nat table.
fn nat_rules(lab: &Lab) -> Result<usize> {
    let out = lab
        .node_command("node1", "iptables-save", &["-t", "nat"])?
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .count())
}

fn pods(comb: &Path) -> String {
    let comb = comb.display();
    let backend = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  nodeName: node1\n  containers:\n  - name: c\n    image: none\n    command: [\"{comb}\", probe, serve, --port, \"{BACKEND_PORT}\", --mode, pong]\n---\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: {NS}}}\nspec: {{nodeName: node1, containers: [{{name: c, image: none}}]}}\n---\n{}{}",
        backend("be1"),
        backend("be2")
    )
}

/// Write the Services for set A and wait until the agent applied them and the last VIP
/// answers through the socket LB.
fn apply_services(lab: &Lab, comb: &Path, n: usize, backends: &[Ipv4Addr]) -> Result<()> {
    let socket = lab.agent_socket("node1");
    let before: Status = serde_json::from_value(client::call(&socket, Query::Status)?)?;
    let dir = lab.manifests_dir();
    let tmp = dir.join(".bench-services.yaml.tmp");
    std::fs::write(&tmp, services_yaml(n, backends))?;
    std::fs::rename(&tmp, dir.join("bench-services.yaml"))?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let last = format!("{}:{SERVICE_PORT}", vip(n - 1, false));
    let mut why = String::new();
    while Instant::now() < deadline {
        let s: Status = serde_json::from_value(client::call(&socket, Query::Status)?)?;
        if !s.config_errors.is_empty() {
            bail!(
                "the agent rejected the bench Services: {:?}",
                s.config_errors
            );
        }
        if s.generation > before.generation && s.applied_generation == s.generation {
            let out = lab
                .command(
                    &format!("{NS}/client"),
                    comb.to_str().context("comb path")?,
                    &["probe", "connect", "--to", &last],
                )?
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.starts_with("connected") {
                return Ok(());
            }
            why = format!("connect to {last}: {text}");
        } else {
            why = format!(
                "generation {} applied {} errors {:?}",
                s.generation, s.applied_generation, s.datapath_errors
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{n} Services not in force after 180 s: {why}")
}

pub fn run(a: &Args) -> Result<Report> {
    let c = &a.common;
    if c.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    let comb = std::env::current_exe()?;
    // Splice off: both sides run plain TCP over the veths, so only the Service path differs.
    let lab = lab::up(
        "bl",
        &["--splice", "off"],
        "bench-service-lb.yaml",
        pods(&comb),
        3,
    )?;
    let backends: Vec<Ipv4Addr> = ["be1", "be2"]
        .iter()
        .map(|p| Ok(lab.pod(&format!("{NS}/{p}"))?.ip))
        .collect::<Result<_>>()?;
    // TCP timestamps without per-destination random offsets in the client pod. With the
    // default offsets, a client port reused against a backend whose server side still holds
    // TIME_WAIT from a connection made through a *different* destination address (another
    // VIP, or the backend directly) fails PAWS and the SYN waits a 1 s retransmit: an artifact
    // of one client opening tens of thousands of connections a second to two backends through
    // two paths, which would otherwise poison whichever side runs after the other.
    let out = lab
        .command(
            &format!("{NS}/client"),
            "sysctl",
            &["-qw", "net.ipv4.tcp_timestamps=2"],
        )?
        .output()?;
    if !out.status.success() {
        bail!(
            "sysctl in the client pod: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    iptables_restore(&lab, EMPTY_NAT)?;
    let files = tempfile::tempdir()?;
    // Per size: (baseline rate, comb rate, baseline p99, comb p99) runs.
    let mut runs: Vec<[Vec<f64>; 4]> = Vec::new();
    for &n in &SIZES {
        let mut r: [Vec<f64>; 4] = Default::default();
        let list = |set_b: bool| -> String {
            (0..n)
                .map(|i| format!("{}:{SERVICE_PORT}\n", vip(i, set_b)))
                .collect()
        };
        let (file_a, file_b) = (
            files.path().join(format!("a-{n}.txt")),
            files.path().join(format!("b-{n}.txt")),
        );
        std::fs::write(&file_a, list(false))?;
        std::fs::write(&file_b, list(true))?;
        let rules = iptables_rules(n, &backends);
        let t = Instant::now();
        apply_services(&lab, &comb, n, &backends)?;
        if !c.json {
            eprintln!(
                "{n} services: agent applied them in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        for pair in 0..c.pairs {
            let order = if pair % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for comb_side in order {
                let tracked = conntrack_count(&lab);
                let client = format!("{NS}/client");
                let connrate = |vips: &Path| {
                    let vips = vips.to_str().context("vips path")?;
                    tools::connrate(&lab, &client, &comb, &["--vips", vips], c.secs, a.parallel)
                };
                let m = if comb_side {
                    connrate(&file_a)?
                } else {
                    let t = Instant::now();
                    iptables_restore(&lab, &rules)?;
                    let loaded = nat_rules(&lab)?;
                    let load_secs = t.elapsed().as_secs_f64();
                    let m = connrate(&file_b);
                    iptables_restore(&lab, EMPTY_NAT)?;
                    if !c.json {
                        eprintln!("  iptables: {loaded} nat rules loaded in {load_secs:.1} s");
                    }
                    m?
                };
                let (rate, p99) = (m.per_sec, m.p99_us);
                let i = usize::from(comb_side);
                r[i].push(rate);
                r[2 + i].push(p99);
                if !c.json {
                    eprintln!(
                        "  N={n} pair {}/{} {:8}: {rate:.0} conn/s, p99 {p99:.0} us (conntrack entries at start: {})",
                        pair + 1,
                        c.pairs,
                        if comb_side { "socketlb" } else { "iptables" },
                        tracked.map_or("?".into(), |t| t.to_string())
                    );
                }
            }
        }
        runs.push(r);
    }
    if nat_rules(&lab)? != 0 {
        bail!("the node namespace's nat table was not flushed");
    }
    lab.down()?;
    let mut metrics = Vec::new();
    for (k, &n) in SIZES.iter().enumerate() {
        metrics.push(Metric::from_runs(
            &format!("conn_rate_{n}"),
            "conn/s",
            &runs[k][0],
            &runs[k][1],
        ));
    }
    for (k, &n) in SIZES.iter().enumerate() {
        metrics.push(Metric::from_runs(
            &format!("conn_p99_{n}"),
            "us",
            &runs[k][2],
            &runs[k][3],
        ));
    }
    let (r10, r10k) = (median(&runs[0][1]), median(&runs[2][1]));
    metrics.push(Metric {
        name: "comb_rate_10000_vs_10".into(),
        unit: "conn/s".into(),
        baseline: r10,
        comb: r10k,
        ratio: r10k / r10,
    });
    Ok(Report {
        scenario: "service-lb".into(),
        metrics,
        pairs: c.pairs,
        baseline_label: "kube-proxy-style iptables DNAT in the node namespace".into(),
        comb_label: "socket LB (cgroup connect4)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_sets_are_disjoint_and_cover_ten_thousand() {
        assert_eq!(vip(0, false), Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(vip(9999, false), Ipv4Addr::new(198, 19, 39, 250));
        assert_eq!(vip(9999, true), Ipv4Addr::new(198, 19, 167, 250));
        let a: std::collections::BTreeSet<_> = (0..10_000).map(|i| vip(i, false)).collect();
        assert_eq!(a.len(), 10_000);
        assert!((0..10_000).all(|i| !a.contains(&vip(i, true))));
    }

    #[test]
    fn iptables_rules_look_like_kube_proxy() {
        let b = [Ipv4Addr::new(198, 18, 1, 3), Ipv4Addr::new(198, 18, 1, 4)];
        let r = iptables_rules(3, &b);
        assert_eq!(
            r.lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES"))
                .count(),
            3
        );
        assert!(r.contains("--probability 0.50000000000 -j KUBE-SEP-"));
        assert!(r.contains("-j DNAT --to-destination 198.18.1.4:8080"));
        assert!(r.contains("-d 198.19.128.3/32"));
        assert!(r.lines().all(|l| !l.starts_with(':') || l.len() <= 40));
        assert!(r.ends_with("COMMIT\n"));
    }

    #[test]
    fn services_yaml_is_valid_config() {
        let b = [Ipv4Addr::new(198, 18, 1, 3), Ipv4Addr::new(198, 18, 1, 4)];
        let docs = comb_config::parse_file_text(Path::new("t.yaml"), &services_yaml(3, &b))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(docs.len(), 6);
        comb_config::build_snapshot(&docs).unwrap_or_else(|e| panic!("{e}"));
    }
}
