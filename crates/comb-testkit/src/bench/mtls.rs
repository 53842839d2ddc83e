//! `comb bench mtls`: traffic between pods on two nodes, (a) in plaintext with no mesh, (b)
//! through the sidecar model with mutual TLS — two haproxy instances, one beside each pod,
//! TLS 1.3 (AES-GCM) between them with ECDSA P-256 SPIFFE certificates from one root — and
//! (c) through Comb's HBONE tunnel (node proxy to node proxy, mutual TLS 1.3), in one lab
//! and interleaved.
//!
//! The lab: nodes `node1` and `node2` joined through the router namespace, release binaries,
//! an agent per node with its defaults and the lab's CA. Pods:
//!
//! - `client` on node1 (service account `client`, in the mesh): h2load, iperf3, connrate, and
//!   the client-side haproxy on 127.0.0.1:`SIDECAR_OUT` → `sidecar`:`SIDECAR_IN` (TLS);
//! - on node2, each running `comb probe http-serve` on `APP_PORT`: `plain` and `sidecar`
//!   (both `istio.io/dataplane-mode: none`: outside the mesh, so the client's flows to them
//!   stay plaintext in the kernel; `sidecar` has the server-side haproxy on :`SIDECAR_IN`
//!   (TLS) → 127.0.0.1:`APP_PORT`), and `comb` (in the mesh: the client's flows to it go
//!   through HBONE). `plain` and `comb` also run an iperf3 server and a `pong` server.
//! - `idN` on node1 (`--identities` − 1 of them, no process): pods with service accounts of
//!   their own, so the client node's agent holds that many workload certificates.
//!
//! Metrics (medians over `--pairs` rounds, each round runs the paths in a rotated order):
//! - `added_p50_ms`/`added_p99_ms`: h2load --h1, 16 connections, 1,000 requests/s in all,
//!   1 KiB responses; added = path − plain of the same round; ratio = Comb / haproxy pair.
//! - `throughput`: iperf3, one stream, `--secs`; ratio = Comb / plain.
//! - `conn_rate`: `comb probe connrate` (connect, 1 byte to the pong server, read the reply,
//!   close), one client thread; ratio = Comb / plain.
//! - `rss_mib`: largest VmRSS of node1's combd (holding `--identities` certificates) during
//!   the 1,000 req/s runs, against the sum of both haproxy processes.
//!
//! Before measuring, the Comb path must be seen in the tunnel table (`comb tunnel list` of
//! node1 shows a pooled connection to `comb`'s address) so a silent plaintext fallback cannot
//! pass for HBONE.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use comb_lab::Lab;

use super::l7_tools::{self as t};
use super::report::{Metric, Report};
use super::three_paths::{LatencyRuns, Load, Path3, Paths, RateArgs};
use super::{AgentArgs, Common, lab, tools};

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub load: RateArgs,
    /// Workload identities (service accounts with a pod) on the client's node.
    #[arg(long, default_value = "100")]
    pub identities: usize,
    #[command(flatten)]
    pub agent: AgentArgs,
}

const NS: &str = "bench";
const APP_PORT: u16 = 8080;
const PONG_PORT: u16 = 9000;
const IPERF_PORT: u16 = 5201;
/// The server-side sidecar's inbound port (Istio's inbound capture port).
const SIDECAR_IN: u16 = 15006;
/// The client-side sidecar's outbound port (Istio's outbound capture port).
const SIDECAR_OUT: u16 = 15001;
const PATH: &str = "/bytes/1024";

fn pods(comb: &Path, identities: usize) -> String {
    let comb = comb.display();
    let server = |name: &str, mesh: bool| {
        let opt_out = if mesh {
            String::new()
        } else {
            ", istio.io/dataplane-mode: none".to_string()
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}{opt_out}}}}}\nspec:\n  nodeName: node2\n  serviceAccountName: {name}\n  containers:\n  - name: c\n    image: none\n    command: [\"{comb}\", probe, http-serve, --port, \"{APP_PORT}\", --threads, \"2\"]\n---\n"
        )
    };
    let mut text = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: {NS}, labels: {{app: client}}}}\nspec: {{nodeName: node1, serviceAccountName: client, containers: [{{name: c, image: none}}]}}\n---\n{}{}{}",
        server("plain", false),
        server("sidecar", false),
        server("comb", true),
    );
    for i in 1..identities {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: id{i}, namespace: {NS}}}\nspec: {{nodeName: node1, serviceAccountName: id{i}, containers: [{{name: c, image: none}}]}}\n---\n"
        ));
    }
    text
}

/// A root and two leaves (`sidecar-client`, `sidecar-server`) like the mesh's: ECDSA P-256,
/// the SPIFFE URI SAN of the pod's service account, made with openssl. Writes `root.pem` and
/// `<name>.pem` (certificate + key, haproxy's `crt` format) into `dir`.
fn sidecar_certs(dir: &Path) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (is it installed? `make deps`)")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut root = vec!["req", "-x509", "-nodes", "-days", "2"];
    root.extend(ec);
    root.extend([
        "-keyout", "root.key", "-out", "root.pem", "-subj", "/O=bench",
    ]);
    run(&root)?;
    for (name, sa) in [("sidecar-client", "client"), ("sidecar-server", "sidecar")] {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(
            dir.join(&ext),
            format!(
                "subjectAltName=critical,URI:spiffe://cluster.local/ns/{NS}/sa/{sa}\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )?;
        let mut req = vec!["req", "-new", "-nodes"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", "/"]);
        run(&req)?;
        run(&[
            "x509", "-req", "-in", &csr, "-CA", "root.pem", "-CAkey", "root.key", "-days", "1",
            "-out", &crt, "-extfile", &ext,
        ])?;
        let pem =
            std::fs::read_to_string(dir.join(&crt))? + &std::fs::read_to_string(dir.join(&key))?;
        std::fs::write(dir.join(format!("{name}.pem")), pem)?;
    }
    Ok(())
}

const HAPROXY_TLS: &str =
    "ssl-min-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384";

/// The client-side sidecar with mutual TLS to its peer.
fn haproxy_client_mtls_cfg(dir: &Path, listen: u16, upstream: &str) -> String {
    let d = dir.display();
    t::haproxy_client_cfg(listen, upstream).replace(
        &format!("server peer {upstream}\n"),
        &format!(
            "server peer {upstream} ssl crt {d}/sidecar-client.pem ca-file {d}/root.pem verify required {HAPROXY_TLS}\n"
        ),
    )
}

/// The server-side sidecar accepting only mutual TLS from the mesh's root, no L7 check.
fn haproxy_server_mtls_cfg(dir: &Path, listen: u16, app: u16) -> String {
    let d = dir.display();
    format!(
        "{}frontend inbound
  bind :{listen} ssl crt {d}/sidecar-server.pem ca-file {d}/root.pem verify required {HAPROXY_TLS}
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:{app}
",
        t::HAPROXY_COMMON
    )
}

/// The pooled HBONE connections node1's proxy holds to `addr` (from `comb tunnel list`).
fn tunnels_to(lab: &Lab, addr: &str) -> Result<usize> {
    let v = comb_api::client::call(&lab.agent_socket("node1"), comb_api::Query::Tunnels)?;
    let r: comb_api::tunnel::TunnelsReply = serde_json::from_value(v)?;
    Ok(r.tunnels
        .iter()
        .filter(|t| t.peer.ip().to_string() == addr)
        .count())
}

/// Wait until every node's agent holds a valid certificate for each identity it needs.
pub(super) fn wait_certificates(lab: &Lab, nodes: &[&str]) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for node in nodes {
        loop {
            let v = comb_api::client::call(&lab.agent_socket(node), comb_api::Query::Status)?;
            let s: comb_api::Status = serde_json::from_value(v)?;
            let c = &s.certificates;
            if c.enabled && c.wanted > 0 && c.valid == c.wanted {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "{node}: {} of {} certificates after 60 s: {:?}",
                    c.valid,
                    c.wanted,
                    c.last_error
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    Ok(())
}

pub fn run(a: &Args) -> Result<Report> {
    let c = &a.common;
    if c.pairs == 0 || c.secs == 0 {
        bail!("--pairs and --secs must be positive");
    }
    a.load.check()?;
    if a.identities == 0 {
        bail!("--identities must be at least 1 (the client's)");
    }
    let comb = std::env::current_exe()?;
    let agent_args = a.agent.as_strs();
    let lab = lab::up_nodes(
        "bmt",
        &agent_args,
        "bench-mtls.yaml",
        pods(&comb, a.identities),
        &[("node1", a.identities), ("node2", 3)],
    )?;
    wait_certificates(&lab, &["node1", "node2"])?;
    let ip = |pod: &str| -> Result<String> { Ok(lab.pod(&format!("{NS}/{pod}"))?.ip.to_string()) };
    let (plain_ip, comb_ip) = (ip("plain")?, ip("comb")?);
    let paths = Paths {
        reference: "plain",
        urls: [
            format!("http://{plain_ip}:{APP_PORT}"),
            format!("http://127.0.0.1:{SIDECAR_OUT}"),
            format!("http://{comb_ip}:{APP_PORT}"),
        ],
    };
    let files = tempfile::tempdir()?;
    let dir = files.path();
    sidecar_certs(dir)?;
    let (server_cfg, client_cfg) = (dir.join("server.cfg"), dir.join("client.cfg"));
    std::fs::write(
        &server_cfg,
        haproxy_server_mtls_cfg(dir, SIDECAR_IN, APP_PORT),
    )?;
    std::fs::write(
        &client_cfg,
        haproxy_client_mtls_cfg(
            dir,
            SIDECAR_OUT,
            &format!("{}:{SIDECAR_IN}", ip("sidecar")?),
        ),
    )?;
    let path_str = |p: &Path| p.to_str().context("temp path").map(str::to_owned);
    let comb_str = path_str(&comb)?;
    // Dropped (killed) before `lab` on every return, since declared after it.
    let mut servers = Vec::new();
    for pod in ["plain", "comb"] {
        let pod = format!("{NS}/{pod}");
        servers.push(tools::start_server(
            &lab,
            &pod,
            "iperf3",
            &["-s", "-p", &IPERF_PORT.to_string()],
            IPERF_PORT,
        )?);
        servers.push(tools::start_server(
            &lab,
            &pod,
            &comb_str,
            &[
                "probe",
                "serve",
                "--port",
                &PONG_PORT.to_string(),
                "--mode",
                "pong",
            ],
            PONG_PORT,
        )?);
    }
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
    let client = format!("{NS}/client");
    for p in Path3::ALL {
        let got = t::http_status(&lab, &client, "GET", &format!("{}{PATH}", paths.url(p)))?;
        if got != 200 {
            bail!(
                "{} path: GET {PATH} answered {got}, expected 200",
                paths.label(p)
            );
        }
    }
    if tunnels_to(&lab, &comb_ip)? == 0 {
        bail!(
            "node1 holds no HBONE connection to {comb_ip} after a request: the Comb path is not tunneled"
        );
    }
    let combd = t::combd_pid_of(&lab, "node1")?;
    let (hc, hs) = (client_proxy.pid(), server_proxy.pid());
    let load = Load {
        lab: &lab,
        client: &client,
        request: PATH,
        rate: &a.load,
        logs: dir,
        progress: !c.json,
    };
    load.warm_up(&paths)?;
    let watched = [vec![], vec![hc, hs], vec![combd]];
    let mut lat = LatencyRuns::default();
    let (mut tput, mut rate) = ([vec![], vec![]], [vec![], vec![]]);
    for round in 0..c.pairs {
        lat.round(&load, &paths, &watched, round, c.pairs)?;
        // Throughput and connection rate: plain vs Comb, order alternating.
        let mut two = [(0, &plain_ip), (1, &comb_ip)];
        if round % 2 == 1 {
            two.reverse();
        }
        for (i, target) in two {
            let gbps = tools::iperf3_gbps(&lab, &client, target, c.secs)?;
            let cr = tools::connrate(
                &lab,
                &client,
                &comb,
                &["--to", &format!("{target}:{PONG_PORT}")],
                c.secs,
                1,
            )?;
            tput[i].push(gbps);
            rate[i].push(cr.per_sec);
            if !c.json {
                eprintln!(
                    "round {}/{} {:5}: iperf3 {gbps:.2} Gbit/s, {:.0} conn/s (p99 {:.0} µs)",
                    round + 1,
                    c.pairs,
                    if i == 0 { "plain" } else { "comb" },
                    cr.per_sec,
                    cr.p99_us
                );
            }
        }
    }
    drop((client_proxy, server_proxy, servers));
    lab.down()?;
    if let Some(w) = lat.steal.warning() {
        eprintln!("{w}");
    }
    if !c.json {
        let (p50, p99) = lat.reference_ms();
        eprintln!("plain path: p50 {p50:.3} ms, p99 {p99:.3} ms (medians)");
    }
    let [added_p50, added_p99] = lat.added_metrics();
    let metrics = vec![
        added_p50,
        added_p99,
        Metric::from_runs("throughput", "Gbit/s", &tput[0], &tput[1]),
        Metric::from_runs("conn_rate", "conn/s", &rate[0], &rate[1]),
        lat.rss_metric(),
    ];
    Ok(Report {
        scenario: "mtls".into(),
        metrics,
        pairs: c.pairs,
        baseline_label: "added_*, rss_mib: haproxy mTLS sidecar pair | throughput, conn_rate: plaintext, no mesh".into(),
        comb_label: format!("Comb HBONE (node proxies, mutual TLS 1.3); {} identities on the client's node", a.identities),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_manifests_are_valid_config() {
        let text = pods(Path::new("/usr/bin/comb"), 5);
        let docs = comb_config::parse_file_text(Path::new("t.yaml"), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(docs.len(), 8);
        let snap = comb_config::build_snapshot(&docs).unwrap_or_else(|e| panic!("{e}"));
        let plain = &snap.pods[&comb_model::ObjKey::new(NS, "plain")];
        assert_eq!(
            snap.dataplane_mode(plain),
            comb_model::mesh::DataplaneMode::None
        );
    }

    #[test]
    fn sidecar_certificates_chain_to_the_root_with_spiffe_ids() {
        let d = tempfile::tempdir().unwrap();
        sidecar_certs(d.path()).unwrap();
        for (name, sa) in [("sidecar-client", "client"), ("sidecar-server", "sidecar")] {
            let out = Command::new("openssl")
                .args(["verify", "-CAfile", "root.pem", &format!("{name}.crt")])
                .current_dir(d.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = Command::new("openssl")
                .args(["x509", "-noout", "-text", "-in", &format!("{name}.crt")])
                .current_dir(d.path())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&text.stdout);
            assert!(
                text.contains(&format!("URI:spiffe://cluster.local/ns/{NS}/sa/{sa}")),
                "{text}"
            );
            assert!(text.contains("prime256v1"), "{text}");
            let pem = std::fs::read_to_string(d.path().join(format!("{name}.pem"))).unwrap();
            assert!(pem.contains("BEGIN CERTIFICATE") && pem.contains("PRIVATE KEY"));
        }
    }

    #[test]
    fn sidecars_speak_mutual_tls_1_3() {
        let d = Path::new("/x");
        let c = haproxy_client_mtls_cfg(d, 15001, "198.18.2.4:15006");
        assert!(c.contains("server peer 198.18.2.4:15006 ssl crt /x/sidecar-client.pem ca-file /x/root.pem verify required ssl-min-ver TLSv1.3"), "{c}");
        let s = haproxy_server_mtls_cfg(d, 15006, 8080);
        assert!(
            s.contains(
                "bind :15006 ssl crt /x/sidecar-server.pem ca-file /x/root.pem verify required"
            ),
            "{s}"
        );
    }
}
