//! `comb bench l7`, part two: what the kernel splice buys the node proxy ("decide once, then
//! splice") for opaque TCP.
//!
//! Two labs up at the same time, the same pods in each: `client`, and `bulk` (an iperf3
//! server, annotation `comb.dev/l7: "true"`: visibility, so its ingress is redirected into the
//! node proxy; iperf3 is not HTTP, so the proxy relays it as opaque TCP). One agent runs with
//! `--proxy-splice off` (baseline: the proxy copies the bytes through userspace), the other
//! with `--proxy-splice on` (comb: after the decision the two sockets are joined by an sk_skb
//! verdict on a sockhash). Each pair runs one iperf3 upload (one stream, `--secs`) in each lab,
//! alternating which goes first.
//!
//! Metrics:
//! - `relay_gbps`: bytes the iperf3 *receiver* got during the test × 8 / seconds;
//! - `relay_proxy_cpu_s_per_gib`: CPU seconds of combd (utime + stime) per GiB received;
//! - `relay_lab_cpu_s_per_gib`: CPU seconds of the lab's node cgroup (combd, iperf3 client
//!   and server; `cpu.stat` usage_usec) per GiB received. Kernel work done in softirq or
//!   kernel threads on behalf of the splice is charged to whichever task it interrupts or to
//!   no cgroup at all, so this is a lower bound for both sides.
//!
//! iperf3's sender count is printed too: with the splice, the sender can get far ahead of the
//! receiver (the verdict queues the bytes towards the upstream socket), which the bench makes
//! visible rather than hides.

use anyhow::{Context, Result, bail};
use comb_api::{ProxyStatsReply, Query};
use comb_lab::Lab;

use super::l7_tools as t;
use super::report::Metric;
use super::{Common, lab};
use comb_api::client;

const NS: &str = "bench";
const PORT: u16 = 5201;

fn pods() -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: {NS}}}\nspec: {{nodeName: node1, containers: [{{name: c, image: none}}]}}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: bulk\n  namespace: {NS}\n  annotations: {{comb.dev/l7: \"true\"}}\nspec:\n  nodeName: node1\n  containers:\n  - name: c\n    image: none\n    command: [iperf3, -s, -p, \"{PORT}\"]\n---\n"
    )
}

fn stats(lab: &Lab) -> Result<ProxyStatsReply> {
    let v = client::call(&lab.agent_socket("node1"), Query::ProxyStats)?;
    Ok(serde_json::from_value(v)?)
}

/// CPU seconds used so far by every process of the lab's node cgroup (and its children).
fn node_cgroup_cpu_secs(lab: &Lab) -> Result<f64> {
    let node = lab.nodes().first().context("lab has no node")?;
    let path = node.cgroup.join("cpu.stat");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let usec: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no usage_usec in {}", path.display()))?;
    Ok(usec as f64 / 1e6)
}

/// One upload through the proxy of `lab`: (Gbit/s received, combd CPU-s/GiB, lab CPU-s/GiB,
/// GiB sent, GiB received).
fn upload(lab: &Lab, secs: u32) -> Result<[f64; 5]> {
    let server = lab.pod(&format!("{NS}/bulk"))?.ip.to_string();
    let combd = t::combd_pid(lab)?;
    let (cpu0, lab0) = (t::cpu_secs(combd)?, node_cgroup_cpu_secs(lab)?);
    let (sent, received) = t::iperf3_bytes(lab, &format!("{NS}/client"), &server, secs)?;
    let (cpu, labcpu) = (
        t::cpu_secs(combd)? - cpu0,
        node_cgroup_cpu_secs(lab)? - lab0,
    );
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    if received == 0 {
        bail!("iperf3 through the proxy received nothing");
    }
    Ok([
        received as f64 * 8.0 / f64::from(secs) / 1e9,
        cpu / gib(received),
        labcpu / gib(received),
        gib(sent),
        gib(received),
    ])
}

pub fn run(c: &Common) -> Result<Vec<Metric>> {
    let off = lab::up(
        "bpof",
        &["--proxy-splice", "off"],
        "bench-l7-relay.yaml",
        pods(),
        2,
    )?;
    let on = lab::up(
        "bpon",
        &["--proxy-splice", "on"],
        "bench-l7-relay.yaml",
        pods(),
        2,
    )?;
    for l in [&off, &on] {
        super::tools::wait_listening(l, &format!("{NS}/bulk"), PORT)?;
    }
    // Per metric: (splice off runs, splice on runs).
    let mut runs: [(Vec<f64>, Vec<f64>); 3] = Default::default();
    for pair in 0..c.pairs {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for spliced in order {
            let m = upload(if spliced { &on } else { &off }, c.secs)?;
            for (i, v) in m.iter().take(3).enumerate() {
                if spliced {
                    runs[i].1.push(*v)
                } else {
                    runs[i].0.push(*v)
                }
            }
            if !c.json {
                eprintln!(
                    "relay pair {}/{} splice {:3}: {:.2} Gbit/s received ({:.2} GiB sent, {:.2} GiB received), combd {:.3} CPU-s/GiB, lab {:.3} CPU-s/GiB",
                    pair + 1,
                    c.pairs,
                    if spliced { "on" } else { "off" },
                    m[0],
                    m[3],
                    m[4],
                    m[1],
                    m[2]
                );
            }
        }
    }
    // Each side must have run as labelled.
    let (s_off, s_on) = (stats(&off)?, stats(&on)?);
    if s_off.stats.tcp.connections == 0 || s_off.stats.tcp.spliced != 0 {
        bail!(
            "splice-off lab: the proxy relayed {} opaque connections, {} spliced (expected >0 and 0)",
            s_off.stats.tcp.connections,
            s_off.stats.tcp.spliced
        );
    }
    if s_on.stats.tcp.spliced == 0 || s_on.spliced_bytes.unwrap_or(0) == 0 {
        bail!(
            "splice-on lab: {} connections spliced, {:?} bytes moved by the kernel (expected >0)",
            s_on.stats.tcp.spliced,
            s_on.spliced_bytes
        );
    }
    on.down()?;
    off.down()?;
    let names = [
        ("relay_gbps", "Gbit/s"),
        ("relay_proxy_cpu_s_per_gib", "CPU-s/GiB"),
        ("relay_lab_cpu_s_per_gib", "CPU-s/GiB"),
    ];
    Ok(names
        .iter()
        .zip(&runs)
        .map(|((n, u), (b, s))| Metric::from_runs(n, u, b, s))
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn relay_lab_manifests_are_valid_config() {
        let text = super::pods();
        let docs = comb_config::parse_file_text(std::path::Path::new("t.yaml"), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(docs.len(), 2);
        comb_config::build_snapshot(&docs).unwrap_or_else(|e| panic!("{e}"));
        assert!(text.contains("comb.dev/l7: \"true\""));
    }
}
