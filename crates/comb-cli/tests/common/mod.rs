//! Shared fixtures of the privileged end-to-end tests: a lab with agents, the probe tool
//! inside pods, and admin API calls.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use comb_agent::api::{EndpointRow, Request, Response, Status};
use comb_datapath::SpliceStats;
use comb_lab::{AgentOptions, Lab, LabOptions};

pub const COMB: &str = env!("CARGO_BIN_EXE_comb");
pub const COMBD: &str = env!("CARGO_BIN_EXE_combd");

/// Privileged tests need root. Under CI they must fail without it, never skip.
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "this test needs root (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN) and CI=true: refusing to skip"
        );
    }
    eprintln!("notice: not root; skipping a privileged test (it runs in CI as root)");
    false
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:04x}", rand::random::<u16>())
}

/// A pod manifest for the lab.
pub fn pod(ns: &str, name: &str, node: &str, annotations: &[(&str, &str)]) -> String {
    let ann: String = annotations
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let ann = if ann.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{ann}")
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n{ann}spec:\n  nodeName: {node}\n  containers: [{{name: c, image: none}}]\n---\n"
    )
}

pub fn lab_up(prefix: &str, pods: &str, agent_args: &[&str]) -> Lab {
    let agent = AgentOptions {
        combd: PathBuf::from(COMBD),
        extra_args: agent_args.iter().map(|s| s.to_string()).collect(),
    };
    Lab::up(
        LabOptions {
            name: unique(prefix),
            agent: Some(agent),
        },
        &[(PathBuf::from("pods.yaml"), pods.to_string())],
    )
    .expect("lab up")
}

pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, String> {
    let mut s =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    s.write_all(&line).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    BufReader::new(s)
        .read_line(&mut resp)
        .map_err(|e| e.to_string())?;
    match serde_json::from_str::<Response>(&resp).map_err(|e| e.to_string())? {
        Response::Ok { data } => Ok(data),
        Response::Error { message } => Err(message),
    }
}

pub fn status(lab: &Lab, node: &str) -> Status {
    serde_json::from_value(call(&lab.agent_socket(node), &Request::Status).unwrap()).unwrap()
}

pub fn endpoints(lab: &Lab, node: &str) -> Vec<EndpointRow> {
    serde_json::from_value(call(&lab.agent_socket(node), &Request::Endpoints).unwrap()).unwrap()
}

pub fn splice_stats(lab: &Lab, node: &str) -> SpliceStats {
    serde_json::from_value(call(&lab.agent_socket(node), &Request::SpliceStats).unwrap()).unwrap()
}

pub fn set_splice(lab: &Lab, node: &str, on: bool) {
    call(&lab.agent_socket(node), &Request::SetSplice { enabled: on }).unwrap();
}

/// Wait until `node`'s agent applied the manifests and attached to `attached` pod cgroups.
pub fn wait_ready(lab: &Lab, node: &str, attached: usize) {
    wait_for(
        Duration::from_secs(20),
        &format!("agent on {node} ready with {attached} attached pods"),
        || {
            let Ok(v) = call(&lab.agent_socket(node), &Request::Status) else {
                return false;
            };
            let s: Status = serde_json::from_value(v).unwrap();
            s.generation > 0
                && s.applied_generation == s.generation
                && endpoints(lab, node)
                    .iter()
                    .filter(|r| r.local && r.cgroup.is_some())
                    .count()
                    == attached
        },
    );
}

pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// A process in a pod, killed on drop.
pub struct PodProc(pub Child);

impl Drop for PodProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `comb probe serve` in a pod; returns once it listens.
pub fn serve(lab: &Lab, pod: &str, port: u16, mode: &str) -> PodProc {
    let mut child = lab
        .command(
            pod,
            COMB,
            &[
                "probe",
                "serve",
                "--port",
                &port.to_string(),
                "--mode",
                mode,
            ],
        )
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("listening"),
        "probe server did not start: {line:?}"
    );
    PodProc(child)
}

/// Run `comb probe ARGS` in a pod to completion; (success, stdout).
pub fn probe(lab: &Lab, pod: &str, args: &[&str]) -> (bool, String) {
    let mut full = vec!["probe"];
    full.extend_from_slice(args);
    let out = lab.command(pod, COMB, &full).unwrap().output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

pub fn ip(lab: &Lab, pod: &str) -> String {
    lab.pod(pod).unwrap().ip.to_string()
}

/// (rx_bytes, tx_bytes) of a pod's host-side veth, read in its node namespace.
pub fn veth_bytes(lab: &Lab, pod: &str) -> (u64, u64) {
    let p = lab.pod(pod).unwrap();
    let netns = lab.node_netns(&p.node).unwrap();
    let out = Command::new("ip")
        .args([
            "-n",
            &netns,
            "-s",
            "-j",
            "link",
            "show",
            "dev",
            &p.host_veth,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip link show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v[0]["stats64"];
    (
        s["rx"]["bytes"].as_u64().unwrap(),
        s["tx"]["bytes"].as_u64().unwrap(),
    )
}

/// The `comb` CLI itself.
pub fn comb(args: &[&str]) -> std::process::Output {
    Command::new(COMB).args(args).output().unwrap()
}
