//! Shared fixtures of the privileged end-to-end tests: a lab with agents, the probe tool
//! inside pods, and admin API calls.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use comb_api::SpliceStats;
use comb_api::{Control, EndpointRow, Query, Request, Response, Status};
use comb_lab::{AgentOptions, Lab, LabOptions};

pub mod kube_agent;

pub const COMB: &str = env!("CARGO_BIN_EXE_comb");

/// Privileged tests need root. Under CI they must fail without it, never skip.
pub fn privileged() -> bool {
    comb_host::privileged_test("lab end-to-end (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN)")
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:04x}", rand::random::<u16>())
}

/// A `metadata.annotations` block from `key: value` entries (empty when there are none).
fn annotations_yaml(entries: impl Iterator<Item = String>) -> String {
    let ann: String = entries.map(|e| format!("    {e}\n")).collect();
    if ann.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{ann}")
    }
}

/// A pod manifest for the lab.
pub fn pod(ns: &str, name: &str, node: &str, annotations: &[(&str, &str)]) -> String {
    let ann = annotations_yaml(annotations.iter().map(|(k, v)| format!("{k}: \"{v}\"")));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n{ann}spec:\n  nodeName: {node}\n  containers: [{{name: c, image: none}}]\n---\n"
    )
}

pub fn lab_up(prefix: &str, pods: &str, agent_args: &[&str]) -> Lab {
    lab_up_files(prefix, &[("pods.yaml", pods)], agent_args)
}

/// A lab named after `prefix` whose agents get `agent_args`, with manifest `files` (name, text).
fn lab_up_files(prefix: &str, files: &[(&str, &str)], agent_args: &[&str]) -> Lab {
    lab_up_mode(prefix, files, agent_args, false)
}

/// `lab_up_with` as a Kubernetes cluster (`comb lab up --kubernetes`): the same objects go
/// through a real API server, pods are made by the kubelet stand-ins through the CNI chain.
pub fn lab_up_kube_with(prefix: &str, pods: &str, resources: &str, agent_args: &[&str]) -> Lab {
    lab_up_mode(
        prefix,
        &[("pods.yaml", pods), ("services.yaml", resources)],
        agent_args,
        true,
    )
}

fn lab_up_mode(prefix: &str, files: &[(&str, &str)], agent_args: &[&str], kube: bool) -> Lab {
    let agent = AgentOptions {
        // combd is another package's binary: found in target/<profile>/ at run time.
        combd: comb_lab::combd_path().unwrap_or_else(|e| panic!("{e:#}")),
        extra_args: agent_args.iter().map(|s| s.to_string()).collect(),
    };
    let files: Vec<_> = files
        .iter()
        .map(|(name, text)| (PathBuf::from(name), text.to_string()))
        .collect();
    let opts = LabOptions {
        name: unique(prefix),
        agent: Some(agent),
    };
    let lab = if kube {
        Lab::up_kubernetes(opts, &files)
    } else {
        Lab::up(opts, &files)
    };
    lab.unwrap_or_else(|e| panic!("lab up: {e:#}"))
}

pub fn call(socket: &Path, req: impl Into<Request>) -> Result<serde_json::Value, String> {
    let req: Request = req.into();
    let mut s =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut line = serde_json::to_vec(&req).unwrap();
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
    serde_json::from_value(call(&lab.agent_socket(node), Query::Status).unwrap()).unwrap()
}

pub fn endpoints(lab: &Lab, node: &str) -> Vec<EndpointRow> {
    serde_json::from_value(call(&lab.agent_socket(node), Query::Endpoints).unwrap()).unwrap()
}

pub fn splice_stats(lab: &Lab, node: &str) -> SpliceStats {
    serde_json::from_value(call(&lab.agent_socket(node), Query::SpliceStats).unwrap()).unwrap()
}

pub fn set_splice(lab: &Lab, node: &str, on: bool) {
    call(&lab.agent_socket(node), Control::SetSplice { enabled: on }).unwrap();
}

/// `node`'s agent answers and has applied the newest manifests.
fn applied(lab: &Lab, node: &str) -> bool {
    let Ok(v) = call(&lab.agent_socket(node), Query::Status) else {
        return false;
    };
    let s: Status = serde_json::from_value(v).unwrap();
    s.generation > 0 && s.applied_generation == s.generation
}

/// Wait until `node`'s agent applied the manifests and attached to `attached` pod cgroups.
pub fn wait_ready(lab: &Lab, node: &str, attached: usize) {
    wait_for(
        Duration::from_secs(20),
        &format!("agent on {node} ready with {attached} attached pods"),
        || {
            applied(lab, node)
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
    let cmd = serve_cmd(port, mode);
    let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
    let mut child = lab
        .command(pod, &cmd[0], &args)
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

// ---- Service load balancing ----

/// A pod manifest whose container runs `command` (each element JSON-quoted, a valid YAML
/// flow scalar) and declares named `ports`.
pub fn pod_with(
    ns: &str,
    name: &str,
    node: &str,
    annotations: &[(&str, &str)],
    command: &[&str],
    ports: &[(&str, u16)],
) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let ann = annotations_yaml(
        annotations
            .iter()
            .map(|(k, v)| format!("{}: {}", q(k), q(v))),
    );
    let cmd = if command.is_empty() {
        String::new()
    } else {
        let c: Vec<String> = command.iter().map(|s| q(s)).collect();
        format!("    command: [{}]\n", c.join(", "))
    };
    let ports = if ports.is_empty() {
        String::new()
    } else {
        let p: Vec<String> = ports
            .iter()
            .map(|(n, p)| format!("{{name: {n}, containerPort: {p}}}"))
            .collect();
        format!("    ports: [{}]\n", p.join(", "))
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n{ann}spec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: none\n{cmd}{ports}---\n"
    )
}

/// The command of a pod that runs `comb probe serve --port PORT --mode MODE`.
pub fn serve_cmd(port: u16, mode: &str) -> Vec<String> {
    [
        COMB,
        "probe",
        "serve",
        "--port",
        &port.to_string(),
        "--mode",
        mode,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The IP the lab gives the `pod_index`-th pod (0-based, manifest order) of node `node_index`
/// (1-based), known before the lab is up so EndpointSlices can name it.
pub fn lab_ip(node_index: usize, pod_index: usize) -> String {
    comb_lab::naming::pod_ip(node_index, pod_index).to_string()
}

/// A ClusterIP Service; `ports` are (name, port, targetPort as YAML, protocol); `extra` is
/// appended to `spec` (indented two spaces).
pub fn service_yaml(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    annotations: &[(&str, &str)],
    ports: &[(&str, u16, &str, &str)],
    extra: &str,
) -> String {
    let ann = annotations_yaml(annotations.iter().map(|(k, v)| format!("{k}: \"{v}\"")));
    let p: Vec<String> = ports
        .iter()
        .map(|(n, port, target, proto)| {
            format!("{{name: {n}, port: {port}, targetPort: {target}, protocol: {proto}}}")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n{ann}spec:\n  clusterIP: \"{cluster_ip}\"\n  ports: [{}]\n{extra}---\n",
        p.join(", ")
    )
}

/// Endpoint conditions of a slice entry.
#[derive(Clone, Copy, Debug)]
pub enum Cond {
    Ready,
    /// ready false, serving true, terminating true.
    Terminating,
    /// ready false, serving false.
    NotReady,
}

/// An EndpointSlice of Service `svc`; `ports` are (name, port, protocol).
pub fn slice_yaml(
    ns: &str,
    svc: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(String, Cond)],
) -> String {
    let p: Vec<String> = ports
        .iter()
        .map(|(n, port, proto)| format!("{{name: {n}, port: {port}, protocol: {proto}}}"))
        .collect();
    let eps: String = endpoints
        .iter()
        .map(|(ip, c)| {
            let cond = match c {
                Cond::Ready => "{ready: true, serving: true, terminating: false}",
                Cond::Terminating => "{ready: false, serving: true, terminating: true}",
                Cond::NotReady => "{ready: false, serving: false, terminating: false}",
            };
            format!("- addresses: [\"{ip}\"]\n  conditions: {cond}\n")
        })
        .collect();
    let eps = if eps.is_empty() {
        "endpoints: []\n".to_string()
    } else {
        format!("endpoints:\n{eps}")
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-abc\n  namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {svc}\naddressType: IPv4\nports: [{}]\n{eps}---\n",
        p.join(", ")
    )
}

/// A lab from Pods plus Services/EndpointSlices (copied to manifests/resources.yaml).
pub fn lab_up_with(prefix: &str, pods: &str, resources: &str, agent_args: &[&str]) -> Lab {
    lab_up_files(
        prefix,
        &[("pods.yaml", pods), ("services.yaml", resources)],
        agent_args,
    )
}

/// Replace the lab's Services and EndpointSlices (atomically, as an API server update would).
pub fn write_resources(lab: &Lab, text: &str) {
    let dir = lab.manifests_dir();
    let tmp = dir.join(".resources.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("resources.yaml")).unwrap();
}

/// `Query::Services` rows (JSON: service, port_name, vip, port, protocol, algorithm,
/// affinity_timeout_secs, backends [{ip, port, state, node, weight}], programmed).
pub fn services(lab: &Lab, node: &str) -> Vec<serde_json::Value> {
    let v = call(&lab.agent_socket(node), Query::Services).unwrap();
    serde_json::from_value(v).unwrap()
}

/// The frontend row for `vip:port` in `rows`.
pub fn frontend<'a>(
    rows: &'a [serde_json::Value],
    vip: &str,
    port: u16,
) -> Option<&'a serde_json::Value> {
    rows.iter()
        .find(|r| r["vip"].as_str() == Some(vip) && r["port"].as_u64() == Some(u64::from(port)))
}

/// Wait until `node`'s agent applied the newest manifests and `check` holds on its rows.
pub fn wait_services(
    lab: &Lab,
    node: &str,
    what: &str,
    mut check: impl FnMut(&[serde_json::Value]) -> bool,
) {
    wait_for(Duration::from_secs(20), what, || {
        applied(lab, node) && check(&services(lab, node))
    });
}

/// Every listed frontend is programmed and `n` of them exist.
pub fn all_programmed(rows: &[serde_json::Value], n: usize) -> bool {
    rows.len() == n && rows.iter().all(|r| r["programmed"] == true)
}

/// `node`'s agent's Prometheus exposition text.
pub fn metrics_text(lab: &Lab, node: &str) -> String {
    let v = call(&lab.agent_socket(node), Query::Metrics).unwrap();
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// A counter from the agent's Prometheus metrics (0 when absent).
pub fn metric(lab: &Lab, node: &str, name: &str) -> f64 {
    metrics_text(lab, node)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, val) = l.rsplit_once(' ')?;
            (n == name).then(|| val.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Wait until something listens on TCP `port` in the pod (pods' commands start detached);
/// on timeout the panic shows the pod's log.
pub fn wait_listening(lab: &Lab, pod: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = lab
            .command(pod, "ss", &["-Hltn", &format!("sport = :{port}")])
            .unwrap()
            .output()
            .unwrap();
        if !out.stdout.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(lab.pod_log(lab.pod(pod).unwrap())).unwrap_or_default();
    panic!("{pod}: nothing listens on {port} after 10 s; pod log:\n{log}");
}

/// `comb probe spread`: connections per backend name.
pub fn spread(
    lab: &Lab,
    pod: &str,
    to: &str,
    count: usize,
) -> std::collections::BTreeMap<String, u64> {
    let (ok, out) = probe(
        lab,
        pod,
        &["spread", "--to", to, "--count", &count.to_string()],
    );
    assert!(ok, "spread: {out}");
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["errors"], 0, "spread to {to}: {v}");
    serde_json::from_value(v["counts"].clone()).unwrap()
}

/// A JSON line printed by `comb probe ARGS` in a pod.
pub fn probe_json(lab: &Lab, pod: &str, args: &[&str]) -> serde_json::Value {
    let (ok, out) = probe(lab, pod, args);
    assert!(ok, "probe {args:?}: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The agent's status as raw JSON (fields added by newer agents included).
pub fn status_json(lab: &Lab, node: &str) -> serde_json::Value {
    call(&lab.agent_socket(node), Query::Status).unwrap()
}

// ---- Identity policy ----

/// Replace the whole content of manifest `file` (e.g. `policies.yaml`) in the lab's manifests
/// directory, atomically, as an API server update would.
pub fn write_manifest(lab: &Lab, file: &str, text: &str) {
    let dir = lab.manifests_dir();
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

/// Every `comb_policy_packets_total{...}` series of `node`'s agent, by its full name.
pub fn policy_packet_counters(lab: &Lab, node: &str) -> std::collections::BTreeMap<String, f64> {
    metrics_text(lab, node)
        .lines()
        .filter(|l| l.starts_with("comb_policy_packets_total{"))
        .filter_map(|l| {
            let (n, val) = l.rsplit_once(' ')?;
            Some((n.to_string(), val.parse().ok()?))
        })
        .collect()
}

/// The `comb_policy_packets_total` series name of one pod, direction and reason.
pub fn policy_packets_series(
    namespace: &str,
    pod: &str,
    direction: &str,
    verdict: &str,
    reason: &str,
) -> String {
    format!(
        "comb_policy_packets_total{{namespace=\"{namespace}\",pod=\"{pod}\",direction=\"{direction}\",verdict=\"{verdict}\",reason=\"{reason}\"}}"
    )
}

/// `program args` in `pod` with no stdin: (success, stdout, stderr).
pub fn run(lab: &Lab, pod: &str, program: &str, args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = lab
        .command(pod, program, args)
        .unwrap()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`run`] that must succeed and print one JSON value.
pub fn json_out(lab: &Lab, pod: &str, program: &str, args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = run(lab, pod, program, args);
    let text = String::from_utf8_lossy(&out);
    assert!(ok, "{program} {args:?} failed: {text} {err}");
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text} {err}"))
}

/// What the agents of `nodes` logged that explains a failure: warnings, errors and the
/// proxy's connection-level lines (ANSI colours removed), the last `max` of them per node.
pub fn agent_log_excerpt(lab: &Lab, nodes: &[&str], max: usize) -> String {
    let mut out = String::new();
    for node in nodes {
        let text = std::fs::read_to_string(lab.agent_log(node)).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .map(strip_ansi)
            .filter(|l| {
                l.contains(" WARN ")
                    || l.contains(" ERROR ")
                    || l.contains("hbone")
                    || l.contains("drain")
                    || l.contains("hand")
            })
            .collect();
        out.push_str(&format!("--- combd {node} ---\n"));
        for l in &lines[lines.len().saturating_sub(max)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn strip_ansi(line: &str) -> String {
    let mut s = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            s.push(c);
        }
    }
    s
}
