//! Privileged lab test of zero-drop agent upgrades (docs/upgrades.md): while traffic of every
//! kind runs through the node proxies, the agents are restarted five times and replaced by
//! another binary once (`Lab::upgrade_agent`: a new combd beside the running one, which
//! hands over and drains). Nothing may fail: no HTTP request, no gRPC or WebSocket stream,
//! no byte of an opaque TCP stream, no new connection during a hand-over.
//!
//! Topology: `client` on n1 and `local` and `web` on n2, all in the mesh; `web` has
//! `comb.dev/l7: "true"`, so `client`'s flows cross nodes through HBONE and reach the L7
//! proxy of n2, and `local`'s flows take the same-node L7 redirect.
//!
//! Traffic, all at once for the whole run:
//! - HTTP/1.1 keep-alive GETs, 500 req/s from `client` and 500 req/s from `local`
//!   (`comb probe http-load`: a request that does not complete is a failure, never retried;
//!   a connection closed after `Connection: close` is reopened);
//! - 100 gRPC bidirectional streams from `client` (one HTTP/2 connection, HBONE);
//! - 50 WebSockets from `local` (same-node L7, upgraded connections);
//! - 50 opaque TCP streams from `client` (HBONE), each verifying its echo.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use comb_lab::Lab;
use common::*;

const COMB: &str = env!("CARGO_BIN_EXE_comb");
const PY: &str = "/usr/bin/python3";
const L7_SUPPORT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/l7_support");
const HTTP: u16 = 8080;
const GRPC: u16 = 50051;
const WS: u16 = 8765;
const TCP: u16 = 9000;

fn pod(name: &str, node: &str, annotations: &str, serve: bool) -> String {
    let cmd = if serve {
        format!(
            "command: [/bin/sh, -c, \"{COMB} probe http-serve --port {HTTP} --threads 2 & \
             {PY} {L7_SUPPORT}/grpc_echo.py serve {GRPC} & \
             {PY} {L7_SUPPORT}/ws_echo.py serve {WS} & \
             {COMB} probe serve --port {TCP} --mode echo & wait\"]"
        )
    } else {
        "command: [sleep, infinity]".to_string()
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {name}}}\n  annotations: {{{annotations}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {name}\n  containers:\n  - name: c\n    image: none\n    {cmd}\n---\n"
    )
}

/// A client running in a pod; its stdout lines are collected as they come.
struct Bg {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    what: &'static str,
}

fn spawn(lab: &Lab, pod: &str, program: &str, args: &[&str], what: &'static str) -> Bg {
    use std::io::{BufRead, BufReader};
    let mut child = lab
        .command(pod, program, args)
        .unwrap()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Bg { child, lines, what }
}

impl Bg {
    /// Wait for a line starting with `prefix` (the client's "all open").
    fn wait_line(&mut self, prefix: &str) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(l) if l.starts_with(prefix) => return,
                Ok(_) => {}
                Err(_) => {
                    let err = self.stderr();
                    panic!("{}: no `{prefix}` line: {err}", self.what)
                }
            }
        }
    }

    fn stderr(&mut self) -> String {
        use std::io::Read;
        let _ = self.child.kill();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// Wait for the client to end and parse its last line (a JSON report).
    fn report(mut self) -> serde_json::Value {
        let status = self.child.wait().unwrap();
        let lines: Vec<String> = self.lines.iter().collect();
        let last = lines.last().cloned().unwrap_or_default();
        match serde_json::from_str(&last) {
            Ok(v) => v,
            Err(e) => {
                let err = self.stderr();
                panic!(
                    "{} ({status}): no JSON report ({e}): {lines:?} {err}",
                    self.what
                )
            }
        }
    }
}

fn agents(lab: &Lab, node: &str) -> usize {
    let cg = lab.agent_cgroup(node).unwrap();
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn upgrades_and_restarts_drop_nothing() {
    if !privileged() {
        return;
    }
    let pods = pod("client", "n1", "", false)
        + &pod("local", "n2", "", false)
        + &pod("web", "n2", "comb.dev/l7: \"true\"", true);
    let lab = lab_up("upg", &pods, &[]);
    for (node, attached) in [("n1", 1), ("n2", 2)] {
        wait_ready(&lab, node, attached);
        wait_for(Duration::from_secs(20), "workload certificates", || {
            let s = status(&lab, node);
            s.certificates.enabled && s.certificates.valid == s.certificates.wanted
        });
    }
    let web = ip(&lab, "shop/web");
    for port in [HTTP, GRPC, WS, TCP] {
        wait_listening(&lab, "shop/web", port);
    }
    let (http, tcp) = (format!("{web}:{HTTP}"), format!("{web}:{TCP}"));
    // Warm the tunnel pool (the first handshake on a loaded machine is not the subject).
    wait_for(Duration::from_secs(30), "a first tunnelled request", || {
        probe(
            &lab,
            "shop/client",
            &["churn", "--to", &tcp, "--count", "1"],
        )
        .0
    });

    let stop = lab.state_dir().join("upgrade-stop");
    let _ = std::fs::remove_file(&stop);
    let stop_s = stop.to_str().unwrap();
    let secs = "40";
    let load = [
        "probe",
        "http-load",
        "--to",
        &http,
        "--conns",
        "8",
        "--rate",
        "500",
        "--secs",
        secs,
    ];
    let load_remote = spawn(&lab, "shop/client", COMB, &load, "HTTP load from n1");
    let load_local = spawn(&lab, "shop/local", COMB, &load, "HTTP load on n2");
    let grpc_py = format!("{L7_SUPPORT}/grpc_echo.py");
    let mut grpc = spawn(
        &lab,
        "shop/client",
        PY,
        &[&grpc_py, "hold", &format!("{web}:{GRPC}"), "100", stop_s],
        "gRPC streams",
    );
    let ws_py = format!("{L7_SUPPORT}/ws_echo.py");
    let mut ws = spawn(
        &lab,
        "shop/local",
        PY,
        &[&ws_py, "hold", &format!("ws://{web}:{WS}/u"), "50", stop_s],
        "WebSockets",
    );
    let mut streams = spawn(
        &lab,
        "shop/client",
        COMB,
        &[
            "probe", "stream", "--to", &tcp, "--conns", "50", "--secs", "36",
        ],
        "TCP streams",
    );
    grpc.wait_line("open");
    ws.wait_line("open");
    streams.wait_line("connected");

    // Five restarts, alternating nodes, then a different binary on n2.
    let next = lab.state_dir().join("combd-next");
    std::fs::copy(comb_lab::combd_path().unwrap(), &next).unwrap();
    let t0 = Instant::now();
    let plan: [(&str, Option<&Path>); 6] = [
        ("n2", None),
        ("n1", None),
        ("n2", None),
        ("n1", None),
        ("n2", None),
        ("n2", Some(&next)),
    ];
    for (i, (node, combd)) in plan.iter().enumerate() {
        std::thread::sleep(Duration::from_secs(4));
        let pid = lab
            .upgrade_agent(node, *combd)
            .unwrap_or_else(|e| panic!("upgrade {i} of {node}: {e:#}"));
        eprintln!("{:?}: {node} now served by combd {pid}", t0.elapsed());
    }
    // The replaced binary serves n2 now.
    let s = status(&lab, "n2");
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", s.pid)).unwrap(),
        next,
        "n2 runs the new binary"
    );

    let remote = load_remote.report();
    let local = load_local.report();
    let tcp_report = streams.report();
    std::fs::write(&stop, b"").unwrap();
    let grpc = grpc.report();
    let ws = ws.report();
    eprintln!("http n1->n2: {remote}\nhttp n2: {local}\ntcp: {tcp_report}\ngrpc: {grpc}\nws: {ws}");

    let logs = || agent_log_excerpt(&lab, &["n1", "n2"], 40);
    for (r, what) in [(&remote, "HTTP through HBONE"), (&local, "HTTP same node")] {
        assert_eq!(r["failed"], 0, "{what}: {r}\n{}", logs());
        // 500 req/s for 40 s; a loaded CI machine may pace slower, never fail.
        assert!(r["ok"].as_u64().unwrap() > 5_000, "{what}: {r}");
        assert!(
            r["connections"].as_u64().unwrap() > 8,
            "{what}: drained connections were reopened: {r}"
        );
    }
    assert_eq!(
        tcp_report["failures"].as_array().unwrap().len(),
        0,
        "{tcp_report}\n{}",
        logs()
    );
    assert!(tcp_report["bytes"].as_u64().unwrap() > 0, "{tcp_report}");
    assert_eq!(grpc["failed"], 0, "{grpc}\n{}", logs());
    assert!(grpc["echoed"].as_u64().unwrap() >= 100 * 50, "{grpc}");
    assert_eq!(ws["failed"], 0, "{ws}\n{}", logs());
    assert!(ws["echoed"].as_u64().unwrap() >= 50 * 50, "{ws}");

    // With every stream ended, the drained agents leave on their own: one per node.
    wait_for(Duration::from_secs(30), "drained agents to exit", || {
        agents(&lab, "n1") == 1 && agents(&lab, "n2") == 1
    });
    lab.down().unwrap();
}

/// A crash (SIGKILL, nothing cleaned up) is not an upgrade: what the kernel carries survives,
/// what the proxy process held does not. Streams on the kernel path (pod to pod on one node,
/// no L7) go on through the crash and the restart; streams through the L7 proxy break; once
/// the next agent runs (adopting the pinned datapath), new connections of both kinds work.
#[test]
fn a_crash_loses_only_the_proxied_connections() {
    if !privileged() {
        return;
    }
    let pods = pod("local", "n1", "", false)
        + &pod("web", "n1", "comb.dev/l7: \"true\"", true)
        + &pod("plain", "n1", "", true);
    let lab = lab_up("ucr", &pods, &[]);
    wait_ready(&lab, "n1", 3);
    let (web, plain) = (ip(&lab, "shop/web"), ip(&lab, "shop/plain"));
    wait_listening(&lab, "shop/web", TCP);
    wait_listening(&lab, "shop/plain", TCP);
    let (to_web, to_plain) = (format!("{web}:{TCP}"), format!("{plain}:{TCP}"));
    let stream = |to: &str, what| {
        spawn(
            &lab,
            "shop/local",
            COMB,
            &[
                "probe", "stream", "--to", to, "--conns", "10", "--secs", "12",
            ],
            what,
        )
    };
    let mut kernel = stream(&to_plain, "kernel-path streams");
    let mut proxied = stream(&to_web, "proxied streams");
    kernel.wait_line("connected");
    proxied.wait_line("connected");
    std::thread::sleep(Duration::from_secs(2));
    let pid = status(&lab, "n1").pid;
    lab.kill_agent("n1").unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "combd {pid} was killed"
    );
    // Down for a while, as after a real crash, then the next agent.
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    lab.start_agent("n1").unwrap();
    wait_ready(&lab, "n1", 3);
    eprintln!("agent back after {:?}", t.elapsed());
    let kernel = kernel.report();
    let proxied = proxied.report();
    eprintln!("kernel path: {kernel}\nproxied: {proxied}");
    assert_eq!(kernel["failures"].as_array().unwrap().len(), 0, "{kernel}");
    assert!(kernel["bytes"].as_u64().unwrap() > 0, "{kernel}");
    assert_eq!(
        proxied["failures"].as_array().unwrap().len(),
        10,
        "every proxied stream ends with the process that held it: {proxied}"
    );
    // New connections of both kinds work with the next agent.
    for to in [&to_plain, &to_web] {
        wait_for(
            Duration::from_secs(10),
            "new connections after the crash",
            || probe(&lab, "shop/local", &["churn", "--to", to, "--count", "5"]).0,
        );
    }
    lab.down().unwrap();
}
