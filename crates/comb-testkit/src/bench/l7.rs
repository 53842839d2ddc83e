//! `comb bench l7`: Comb's node L7 proxy against the sidecar model (two haproxy instances,
//! one beside the client and one beside the server, as Envoy sidecars are), with no proxy as
//! the reference, in one lab and interleaved; then, separately, what the kernel splice buys
//! for opaque TCP through the node proxy (`l7_splice`).
//!
//! The lab: one node, release binaries, the agent with its defaults (proxy on, 2 workers,
//! socket splice on: the pod-to-pod hops of the direct and sidecar paths are spliced too,
//! which only helps the baseline). Pods, each server `comb probe http-serve --threads 2` on
//! `APP_PORT`:
//!
//! - `client` (service account `client`): h2load, and the client-side haproxy on
//!   127.0.0.1:`SIDECAR_OUT` → `sidecar`:`SIDECAR_IN`;
//! - `direct`: no policy, no proxy (path a);
//! - `sidecar`: the server-side haproxy on :`SIDECAR_IN` → 127.0.0.1:`APP_PORT`, denying
//!   (403) anything but GET under /bytes/ (path b);
//! - `l7`: an AuthorizationPolicy ALLOW from `cluster.local/ns/bench/sa/client`, GET, paths
//!   `/bytes/*`, so the datapath redirects its ingress into the node proxy (path c).
//!
//! Both haproxy instances (`l7_tools::haproxy_*_cfg`): `mode http`, keep-alive both sides,
//! `http-reuse always`, `nbthread 2` (Istio's default sidecar concurrency and the node
//! proxy's default workers), run inside the pod's network namespace and cgroup and killed on
//! drop (and by the lab teardown, which empties the pod cgroups). Before measuring, each path
//! must answer GET /bytes/1024 with 200, and the sidecar and Comb paths must answer GET /other
//! and POST /bytes/1 with 403, so the L7 check is known to be in force.
//!
//! Metrics (medians over `--pairs` rounds):
//! - `added_p50_ms`/`added_p99_ms`: h2load --h1, `--conns` (16) connections, `--rate` (1,000)
//!   requests/s in all (`--rps` per connection, a fraction), `--latency-secs` per run; p50/p99
//!   of the per-request latencies of `--log-file`; added = path − direct of the same round.
//!   A round runs a, b, c in an order rotated every round. Baseline = sidecar pair.
//! - `max_rps_per_core`: saturating h2load (no `--rps`) for `--secs` through each path;
//!   requests completed / CPU seconds (utime + stime from /proc) the proxy process used in
//!   that run: all of combd (agent included) for Comb, the server-side haproxy for the
//!   baseline ("one haproxy"). `max_rps`: the raw requests/s of the same runs. Everything
//!   (h2load, both haproxy, the servers, combd) shares the machine's cores, so `max_rps`
//!   depends on the machine; the per-core figure much less.
//! - `rss_mib`: largest VmRSS seen every 50 ms during the 1,000 req/s runs: combd (the whole
//!   agent: datapath and control plane too, not only the proxy) against the sum of both
//!   haproxy processes.
//!
//! The relay part's metrics (`relay_*`) are described in `l7_splice`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use comb_api::{ProxyStatsReply, Query};
use comb_lab::Lab;

use super::l7_tools::{self as t, H2load};
use super::report::{Metric, Report, median};
use super::three_paths::{LatencyRuns, Load, Path3, Paths, RateArgs};
use super::{AgentArgs, Common, l7_splice, lab, tools};
use comb_api::client;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub load: RateArgs,
    #[command(flatten)]
    pub agent: AgentArgs,
}

const NS: &str = "bench";
const APP_PORT: u16 = 8080;
/// The server-side sidecar's inbound port (Istio's inbound capture port).
const SIDECAR_IN: u16 = 15006;
/// The client-side sidecar's outbound port (Istio's outbound capture port).
const SIDECAR_OUT: u16 = 15001;
const PATH: &str = "/bytes/1024";

fn pods(comb: &Path) -> String {
    let comb = comb.display();
    let server = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}}}}}\nspec:\n  nodeName: node1\n  containers:\n  - name: c\n    image: none\n    command: [\"{comb}\", probe, http-serve, --port, \"{APP_PORT}\", --threads, \"2\"]\n---\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: {NS}, labels: {{app: client}}}}\nspec: {{nodeName: node1, serviceAccountName: client, containers: [{{name: c, image: none}}]}}\n---\n{}{}{}{}",
        server("direct"),
        server("sidecar"),
        server("l7"),
        policy()
    )
}

/// The L7 ALLOW policy of pod `l7`; its rule has L7 fields (methods, paths), so the pod's
/// ingress is redirected into the node proxy (REDIRECT entries with reason
/// `proxy-unavailable`, the drop reported when the proxy cannot be reached).
fn policy() -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: l7-allow, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: l7}}}}\n  action: ALLOW\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/{NS}/sa/client\"]}}}}]\n    to: [{{operation: {{methods: [\"GET\"], paths: [\"/bytes/*\"]}}}}]\n"
    )
}

/// 200 for the benchmark's request on every path; 403 for what the L7 check refuses on the
/// sidecar and Comb paths.
fn check_paths(lab: &Lab, paths: &Paths) -> Result<()> {
    let client = format!("{NS}/client");
    for p in Path3::ALL {
        let base = paths.url(p);
        let mut want = vec![("GET", PATH, 200)];
        if p != Path3::Reference {
            want.extend([("GET", "/other", 403), ("POST", "/bytes/1", 403)]);
        }
        for (method, path, code) in want {
            let got = t::http_status(lab, &client, method, &format!("{base}{path}"))?;
            if got != code {
                bail!(
                    "{} path: {method} {path} answered {got}, expected {code}",
                    paths.label(p)
                );
            }
        }
    }
    Ok(())
}

/// Processes whose cost each path adds: Comb's proxy and the two sidecars.
struct Pids {
    combd: u32,
    haproxy_client: u32,
    haproxy_server: u32,
}

/// Per-round results of the saturating runs: (requests/s, requests per CPU second).
#[derive(Default)]
struct MaxRuns {
    rps: [Vec<f64>; 3],
    per_core: [Vec<f64>; 3],
}

fn saturating_rounds(a: &Args, lab: &Lab, paths: &Paths, pids: &Pids) -> Result<MaxRuns> {
    let c = &a.common;
    let client = format!("{NS}/client");
    let mut r = MaxRuns::default();
    for round in 0..c.pairs {
        for p in Path3::rotated(round) {
            let url = format!("{}{PATH}", paths.url(p));
            // CPU of the process(es) the path adds, before and after.
            let cpu = |p: Path3| -> Result<[f64; 3]> {
                Ok(match p {
                    Path3::Reference => [0.0; 3],
                    Path3::Sidecar => [
                        t::cpu_secs(pids.haproxy_server)?,
                        t::cpu_secs(pids.haproxy_client)?,
                        0.0,
                    ],
                    Path3::Comb => [
                        t::cpu_secs(pids.combd)?,
                        t::thread_cpu_secs(pids.combd, "comb-proxy")?,
                        0.0,
                    ],
                })
            };
            let before = cpu(p)?;
            let h: H2load = t::h2load(lab, &client, &url, a.load.conns, None, c.secs, None)?;
            let after = cpu(p)?;
            let used: Vec<f64> = after.iter().zip(before).map(|(x, y)| x - y).collect();
            let per_core = h.done as f64 / used[0];
            let i = p as usize;
            r.rps[i].push(h.req_per_sec);
            if p != Path3::Reference {
                r.per_core[i].push(per_core);
            }
            if !c.json {
                let detail = match p {
                    Path3::Reference => String::new(),
                    Path3::Sidecar => format!(
                        ", server haproxy {:.2} CPU-s ({per_core:.0} req/CPU-s), client haproxy {:.2} CPU-s",
                        used[0], used[1]
                    ),
                    Path3::Comb => format!(
                        ", combd {:.2} CPU-s ({per_core:.0} req/CPU-s), of which proxy workers {:.2}",
                        used[0], used[1]
                    ),
                };
                eprintln!(
                    "saturating round {}/{} {:7}: {:.0} req/s{detail}",
                    round + 1,
                    c.pairs,
                    paths.label(p),
                    h.req_per_sec
                );
            }
        }
    }
    Ok(r)
}

/// Requests the node proxy forwarded to pod `l7` (its destination row in `proxy stats`).
fn proxied_requests(lab: &Lab) -> Result<u64> {
    let v = client::call(&lab.agent_socket("node1"), Query::ProxyStats)?;
    let r: ProxyStatsReply = serde_json::from_value(v)?;
    Ok(r.stats
        .destinations
        .iter()
        .filter(|d| d.key == format!("{NS}/l7"))
        .map(|d| d.status_2xx)
        .sum())
}

/// Part one: direct, sidecar pair and node proxy in one lab.
fn proxy_vs_sidecars(a: &Args) -> Result<Vec<Metric>> {
    let c = &a.common;
    let comb = std::env::current_exe()?;
    let agent_args = a.agent.as_strs();
    let lab = lab::up("bl7", &agent_args, "bench-l7.yaml", pods(&comb), 4)?;
    let ip = |pod: &str| -> Result<String> { Ok(lab.pod(&format!("{NS}/{pod}"))?.ip.to_string()) };
    let paths = Paths {
        reference: "direct",
        urls: [
            format!("http://{}:{APP_PORT}", ip("direct")?),
            format!("http://127.0.0.1:{SIDECAR_OUT}"),
            format!("http://{}:{APP_PORT}", ip("l7")?),
        ],
    };
    let files = tempfile::tempdir()?;
    let (server_cfg, client_cfg) = (
        files.path().join("server.cfg"),
        files.path().join("client.cfg"),
    );
    std::fs::write(&server_cfg, t::haproxy_server_cfg(SIDECAR_IN, APP_PORT))?;
    std::fs::write(
        &client_cfg,
        t::haproxy_client_cfg(SIDECAR_OUT, &format!("{}:{SIDECAR_IN}", ip("sidecar")?)),
    )?;
    let path_str = |p: &Path| p.to_str().context("temp path").map(str::to_owned);
    // Dropped (killed) before `lab` on every return, since declared after it.
    let server_proxy = tools::start_server(
        &lab,
        &format!("{NS}/sidecar"),
        "haproxy",
        &["-db", "-f", &path_str(&server_cfg)?],
        SIDECAR_IN,
    )?;
    let client_proxy = tools::start_server(
        &lab,
        &format!("{NS}/client"),
        "haproxy",
        &["-db", "-f", &path_str(&client_cfg)?],
        SIDECAR_OUT,
    )?;
    check_paths(&lab, &paths)?;
    let pids = Pids {
        combd: t::combd_pid(&lab)?,
        haproxy_client: client_proxy.pid(),
        haproxy_server: server_proxy.pid(),
    };
    let client = format!("{NS}/client");
    let load = Load {
        lab: &lab,
        client: &client,
        request: PATH,
        rate: &a.load,
        logs: files.path(),
        progress: !c.json,
    };
    load.warm_up(&paths)?;
    let before = proxied_requests(&lab)?;
    let watched = [
        vec![],
        vec![pids.haproxy_client, pids.haproxy_server],
        vec![pids.combd],
    ];
    let mut lat = LatencyRuns::default();
    for round in 0..c.pairs {
        lat.round(&load, &paths, &watched, round, c.pairs)?;
    }
    if let Some(w) = lat.steal.warning() {
        eprintln!("{w}");
    }
    let max = saturating_rounds(a, &lab, &paths, &pids)?;
    let proxied = proxied_requests(&lab)? - before;
    // At least the fixed-rate runs' requests must have crossed the proxy.
    let expected = (a.load.rate * f64::from(a.load.latency_secs) * c.pairs as f64 * 0.9) as u64;
    if proxied < expected {
        bail!(
            "the node proxy forwarded {proxied} requests to {NS}/l7, expected at least {expected}: the Comb path did not run through it"
        );
    }
    if !c.json {
        eprintln!("node proxy forwarded {proxied} requests to {NS}/l7 during the measurements");
    }
    drop((client_proxy, server_proxy));
    lab.down()?;

    let (s, k) = (Path3::Sidecar as usize, Path3::Comb as usize);
    if !c.json {
        let (p50, p99) = lat.reference_ms();
        eprintln!(
            "direct path: p50 {p50:.3} ms, p99 {p99:.3} ms, saturating {:.0} req/s (medians)",
            median(&max.rps[Path3::Reference as usize])
        );
    }
    let [added_p50, added_p99] = lat.added_metrics();
    Ok(vec![
        added_p50,
        added_p99,
        Metric::from_runs(
            "max_rps_per_core",
            "req/CPU-s",
            &max.per_core[s],
            &max.per_core[k],
        ),
        Metric::from_runs("max_rps", "req/s", &max.rps[s], &max.rps[k]),
        lat.rss_metric(),
    ])
}

pub fn run(a: &Args) -> Result<Report> {
    let c = &a.common;
    if c.pairs == 0 || c.secs == 0 {
        bail!("--pairs and --secs must be positive");
    }
    a.load.check()?;
    let mut metrics = proxy_vs_sidecars(a)?;
    metrics.extend(l7_splice::run(c)?);
    Ok(Report {
        scenario: "l7".into(),
        metrics,
        pairs: c.pairs,
        baseline_label: "haproxy sidecar pair (added_*, max_rps, rss_mib: both; max_rps_per_core: the server-side one) | relay_*: proxy splice off (userspace relay)".into(),
        comb_label: "combd node proxy with an L7 AuthorizationPolicy | relay_*: proxy splice on (sk_skb)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_manifests_are_valid_config() {
        let text = pods(Path::new("/usr/bin/comb"));
        let docs = comb_config::parse_file_text(Path::new("t.yaml"), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(docs.len(), 5);
        comb_config::build_snapshot(&docs).unwrap_or_else(|e| panic!("{e}"));
        assert!(text.contains("serviceAccountName: client"));
    }
}
