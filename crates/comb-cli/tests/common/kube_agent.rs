//! combd in Kubernetes mode inside a lab node's network namespace, for the tests that run a
//! real API server (kubernetes.rs, cni.rs).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use comb_api::{EndpointPolicy, Query, ServiceRow, Status};
use comb_lab::Lab;

use super::{call, wait_for};

/// A lab pod's cgroup as its `comb.dev/cgroup` annotation names it (relative to the cgroup2
/// mount): how the tests' API Pods point the agent at a lab pod.
pub fn lab_pod_cgroup(lab: &Lab, pod: &comb_lab::LabPod) -> String {
    pod.cgroup
        .strip_prefix(&lab.state().cgroup2)
        .unwrap()
        .display()
        .to_string()
}

/// Convergence after a change: the watch delivers in milliseconds; the slack is for the
/// controller manager's EndpointSlice sync, a relist after a restart, and a slow CI machine.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// combd in the node's network namespace, stopped (SIGTERM, it detaches its programs and
/// removes its pins) when dropped.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// `extra`: more combd flags (e.g. the CNI spool).
    pub fn start(lab: &Lab, node: &str, kubeconfig: &Path, dir: &Path, extra: &[&str]) -> Agent {
        let socket = dir.join(format!("{node}.sock"));
        let log = dir.join(format!("{node}-combd.log"));
        let combd = comb_lab::combd_path().unwrap();
        let node_cgroup = Path::new("/").join(comb_lab::naming::node_cgroup(lab.name(), node));
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/comb/{}-{node}-kube", lab.name()));
        let args: Vec<String> = vec![
            "--node".into(),
            node.into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--admin-socket".into(),
            socket.display().to_string(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--lb-cgroup".into(),
            node_cgroup.display().to_string(),
        ];
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        // Through `ip netns exec`: combd gets a private mount namespace, so its bpffs pins
        // go with it even if it is killed; it detaches its programs when stopped.
        let out = std::fs::File::create(&log).unwrap();
        let child = lab
            .node_command(node, &combd.display().to_string(), &args)
            .unwrap()
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let agent = Agent { child, socket, log };
        // Answering, not just present: a killed predecessor leaves its socket file behind.
        wait_for(Duration::from_secs(20), "combd's admin socket", || {
            call(&agent.socket, Query::Status).is_ok()
        });
        agent
    }

    pub fn status(&self) -> Status {
        serde_json::from_value(call(&self.socket, Query::Status).unwrap()).unwrap()
    }

    pub fn services(&self) -> Vec<ServiceRow> {
        serde_json::from_value(call(&self.socket, Query::Services).unwrap()).unwrap()
    }

    pub fn endpoints(&self) -> Vec<comb_api::EndpointRow> {
        serde_json::from_value(call(&self.socket, Query::Endpoints).unwrap()).unwrap()
    }

    pub fn policy(&self, pod: &str) -> Option<EndpointPolicy> {
        let q = Query::EndpointPolicy { pod: pod.into() };
        call(&self.socket, q)
            .ok()
            .map(|v| serde_json::from_value(v).unwrap())
    }

    /// Backend IPs of `service` (namespace/name) on its first port.
    pub fn backends(&self, service: &str) -> Option<Vec<String>> {
        self.services()
            .into_iter()
            .find(|s| s.service == service)
            .map(|s| s.backends.iter().map(|b| b.ip.to_string()).collect())
    }

    pub fn errors(&self) -> String {
        self.status().config_errors.join("\n")
    }

    /// Wait for `what`, showing the agent's errors and log tail if it never happens.
    pub fn wait(&self, what: &str, mut f: impl FnMut(&Agent) -> bool) {
        let deadline = std::time::Instant::now() + CONVERGE;
        while std::time::Instant::now() < deadline {
            if f(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "timed out after {CONVERGE:?} waiting for: {what}\nconfig errors:\n{}\ncombd log (newest first):\n{}",
            self.errors(),
            tail.join("\n")
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
