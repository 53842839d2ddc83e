//! Privileged soak test of the node proxy's memory (docs/l7.md "Limits"): 10,000 concurrent
//! keep-alive connections through the L7 redirect, each sending a request every 10 s (1,000
//! requests/s in all), for `COMB_SOAK_SECS` seconds (600 unless set). The agent's RSS must
//! stay under `RSS_BOUND_MIB` and not grow: its RSS at the end is at most 10 % above its RSS
//! once every connection is open and the first minutes have passed.

mod common;

use std::time::{Duration, Instant};

use comb_lab::Lab;
use common::*;

const COMB: &str = env!("CARGO_BIN_EXE_comb");
const HTTP: u16 = 8080;
const CONNS: usize = 10_000;
/// What 10,000 idle-ish proxied connections may cost the whole agent (proxy, datapath and
/// control plane): about 250 MiB measured on this kind of machine (debug build, 2 cores).
const RSS_BOUND_MIB: f64 = 300.0;

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn active(lab: &Lab) -> u64 {
    call(&lab.agent_socket("n1"), comb_api::Query::ProxyStats)
        .ok()
        .and_then(|v| v["active_connections"].as_u64())
        .unwrap_or(0)
}

#[test]
fn ten_thousand_connections_for_ten_minutes() {
    if !privileged() {
        return;
    }
    let secs: u64 = std::env::var("COMB_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let pods = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: soak, annotations: {{comb.dev/l7: \"true\"}}}}\nspec:\n  nodeName: n1\n  containers:\n  - name: c\n    image: none\n    command: [{COMB}, probe, http-serve, --port, \"{HTTP}\", --threads, \"2\"]\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: soak}}\nspec: {{nodeName: n1, containers: [{{name: c, image: none, command: [sleep, infinity]}}]}}\n"
    );
    let lab = lab_up("soak", &pods, &[]);
    wait_ready(&lab, "n1", 2);
    wait_listening(&lab, "soak/web", HTTP);
    let pid = status(&lab, "n1").pid;
    let to = format!("{}:{HTTP}", ip(&lab, "soak/web"));
    let (conns, s) = (CONNS.to_string(), secs.to_string());
    let load = lab
        .command(
            "soak/client",
            COMB,
            &[
                "probe",
                "http-load",
                "--to",
                &to,
                "--conns",
                &conns,
                "--rate",
                "1000",
                "--secs",
                &s,
            ],
        )
        .unwrap()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Connections open over the first 10 s (one request each every 10 s); "settled" is when
    // a fifth of the run has passed, at least 2 minutes unless the run is shorter.
    let settled = Duration::from_secs((secs / 5).max(120).min(secs * 3 / 4));
    let t0 = Instant::now();
    let (mut rss_settled, mut rss_max, mut rss_last, mut max_active) = (0.0, 0.0f64, 0.0, 0);
    while t0.elapsed() < Duration::from_secs(secs.saturating_sub(5)) {
        std::thread::sleep(Duration::from_secs(5));
        let rss = rss_mib(pid);
        rss_max = rss_max.max(rss);
        rss_last = rss;
        max_active = max_active.max(active(&lab));
        if rss_settled == 0.0 && t0.elapsed() >= settled {
            rss_settled = rss;
        }
    }
    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| {
            panic!(
                "no load report ({e}): {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!(
        "soak {secs} s: {report}\nproxy connections (max seen) {max_active}; combd RSS settled {rss_settled:.1} MiB, end {rss_last:.1} MiB, max {rss_max:.1} MiB"
    );
    assert_eq!(report["failed"], 0, "{report}");
    let expected = 1000.0 * secs as f64;
    assert!(
        report["ok"].as_f64().unwrap() > expected * 0.9,
        "{report}: fewer than 90 % of {expected} requests"
    );
    assert!(
        max_active as usize >= CONNS,
        "the proxy held {max_active} connections, not {CONNS}"
    );
    assert!(
        rss_max <= RSS_BOUND_MIB,
        "combd RSS {rss_max:.1} MiB above the bound {RSS_BOUND_MIB} MiB"
    );
    assert!(
        rss_last <= rss_settled * 1.10,
        "combd RSS grew from {rss_settled:.1} to {rss_last:.1} MiB"
    );
    lab.down().unwrap();
}
