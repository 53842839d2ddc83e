//! A real Kubernetes control plane for tests: etcd, kube-apiserver and optionally
//! kube-controller-manager, listening on 127.0.0.1 only (of the machine, or of a lab node's
//! network namespace so that node's agent can reach it), with fresh credentials in a
//! temporary directory. Everything it started is stopped and the directory removed when it
//! is dropped, also while unwinding from a failed test.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::kube_bins::KubeBinaries;
use crate::kube_certs::{KubeCredentials, generate};

/// The first `shared/crds` found beside the repository or above it (a checkout may sit
/// deeper than the shared data).
fn default_crds_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .map(|d| d.join("shared/crds"))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| here.join("../../../shared/crds"))
}

/// Where the CRDs to install are (default: `shared/crds` beside the repository).
pub const ENV_CRDS_DIR: &str = "COMB_CRDS_DIR";

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_GRACE: Duration = Duration::from_secs(10);
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// Run everything inside this network namespace (a lab node's), on its loopback.
    pub netns: Option<String>,
    /// Also run kube-controller-manager (EndpointSlice, Endpoints, namespace and
    /// garbage-collector controllers).
    pub controller_manager: bool,
    /// Keep data, credentials and logs here (created if missing) instead of a temporary
    /// directory that goes with the cluster: a lab's cluster outlives the process that
    /// started it, and `comb lab down` removes the lab's state directory.
    pub dir: Option<PathBuf>,
    /// Start the processes in this cgroup (absolute; a lab cgroup), so the lab's teardown
    /// finds them.
    pub cgroup: Option<PathBuf>,
}

/// Where a cluster keeps its files.
enum Dir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Temp(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }
}

pub struct KubeCluster {
    bins: KubeBinaries,
    opts: KubeOptions,
    dir: Dir,
    creds: KubeCredentials,
    etcd_port: u16,
    etcd_peer_port: u16,
    api_port: u16,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    controller_manager: Option<Child>,
    /// Drop leaves everything running (`detach`).
    detached: bool,
}

/// A port nothing on this machine's loopback uses now (a fresh network namespace has all
/// ports free, so the same choice works there).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl KubeCluster {
    /// Start etcd and kube-apiserver (and the controller manager if asked) and wait until
    /// the API server is ready.
    pub fn start(opts: KubeOptions) -> Result<Self> {
        let bins = KubeBinaries::locate()?;
        let dir = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                Dir::Kept(d.clone())
            }
            None => Dir::Temp(tempfile::Builder::new().prefix("comb-kube-").tempdir()?),
        };
        let api_port = free_port()?;
        let creds = generate(dir.path(), api_port)?;
        let mut c = KubeCluster {
            bins,
            opts,
            creds,
            etcd_port: free_port()?,
            etcd_peer_port: free_port()?,
            api_port,
            dir,
            etcd: None,
            apiserver: None,
            controller_manager: None,
            detached: false,
        };
        c.start_etcd()?;
        c.start_apiserver()?;
        if c.opts.controller_manager {
            c.start_controller_manager()?;
        }
        Ok(c)
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.creds.kubeconfig
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// `program args` inside the cluster's network namespace (if it has one).
    pub fn command(&self, program: &Path) -> Command {
        match &self.opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Leave the processes running and the directory in place when this handle goes away
    /// (a lab's cluster: its teardown stops them by cgroup and removes the directory).
    pub fn detach(mut self) {
        self.detached = true;
    }

    fn spawn(&self, program: &Path, args: &[String], log: &str) -> Result<Child> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(log))?;
        let mut cmd = self.command(program);
        if let Some(cg) = &self.opts.cgroup {
            crate::process::place(&mut cmd, None, cg, true)?;
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))
    }

    /// The last lines of one of the cluster's logs (`etcd.log`, `kube-apiserver.log`,
    /// `kube-controller-manager.log`), for failure messages.
    pub fn log_tail(&self, log: &str, n: usize) -> String {
        crate::process::log_tail(&self.dir.path().join(log), n)
    }

    fn start_etcd(&mut self) -> Result<()> {
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let args = vec![
            "--name=default".to_owned(),
            format!("--data-dir={}", self.dir.path().join("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=default={peer}"),
            "--log-level=warn".to_owned(),
        ];
        self.etcd = Some(self.spawn(&self.bins.etcd.clone(), &args, "etcd.log")?);
        Ok(())
    }

    fn apiserver_args(&self) -> Vec<String> {
        let c = &self.creds;
        vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.api_port),
            "--insecure-port=0".into(),
            format!("--tls-cert-file={}", c.serving_cert.display()),
            format!("--tls-private-key-file={}", c.serving_key.display()),
            format!("--token-auth-file={}", c.tokens.display()),
            "--authorization-mode=RBAC".into(),
            // As kubeadm and managed clusters run it: node agents (CNI, Comb) need privileged
            // steps such as mounting bpffs on the host.
            "--allow-privileged=true".into(),
            format!("--service-account-key-file={}", c.sa_pub.display()),
            format!("--service-account-signing-key-file={}", c.sa_key.display()),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            // The lab's service VIP range (docs/architecture.md).
            "--service-cluster-ip-range=198.19.0.0/16".into(),
            // No kubelet mounts tokens here: pods need no ServiceAccount token secret.
            "--disable-admission-plugins=ServiceAccount".into(),
            // The `kubernetes` Service would point at 127.0.0.1, which Endpoints refuse.
            "--endpoint-reconciler-type=none".into(),
            format!("--cert-dir={}", self.dir.path().join("certs").display()),
            "--profiling=false".into(),
        ]
    }

    fn start_apiserver(&mut self) -> Result<()> {
        let args = self.apiserver_args();
        self.apiserver =
            Some(self.spawn(&self.bins.apiserver.clone(), &args, "kube-apiserver.log")?);
        self.wait_ready()
    }

    fn start_controller_manager(&mut self) -> Result<()> {
        let args = vec![
            format!("--kubeconfig={}", self.creds.kubeconfig.display()),
            "--controllers=endpointslice,endpoint,namespace,garbagecollector".into(),
            "--leader-elect=false".into(),
            // Serves nothing: no port is opened.
            "--port=0".into(),
            "--secure-port=0".into(),
            "--use-service-account-credentials=false".into(),
        ];
        self.controller_manager = Some(self.spawn(
            &self.bins.controller_manager.clone(),
            &args,
            "kube-controller-manager.log",
        )?);
        Ok(())
    }

    /// `/readyz` answers ok (etcd reachable, bootstrap done).
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(out) = self.kubectl(&["get", "--raw", "/readyz"])
                && out.trim() == "ok"
            {
                return Ok(());
            }
            for (child, log) in [
                (&mut self.etcd, "etcd.log"),
                (&mut self.apiserver, "kube-apiserver.log"),
            ] {
                if let Some(c) = child
                    && let Ok(Some(status)) = c.try_wait()
                {
                    *child = None;
                    bail!(
                        "{log}: exited ({status}) before the API server was ready:\n{}",
                        crate::process::log_tail(&self.dir.path().join(log), 20)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready within {READY_TIMEOUT:?}:\n{}",
                    self.log_tail("kube-apiserver.log", 20)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Run kubectl against the cluster; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_stdin(args, None)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
    }

    fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        run_kubectl(
            self.command(Path::new("timeout")),
            &self.bins.kubectl,
            &self.creds.kubeconfig,
            args,
            stdin,
        )
    }

    /// Write a Pod's status as a kubelet does (phase Running, Ready, the given IPs).
    pub fn set_pod_status(&self, namespace: &str, name: &str, ips: &[&str]) -> Result<()> {
        let pod = self.kubectl(&["get", "pod", "-n", namespace, name, "-o", "json"])?;
        let mut pod: serde_json::Value = serde_json::from_str(&pod)?;
        pod["status"] = serde_json::json!({
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "podIP": ips.first(),
            "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>(),
        });
        let file = self
            .dir
            .path()
            .join(format!("status-{namespace}-{name}.json"));
        std::fs::write(&file, pod.to_string())?;
        self.kubectl(&[
            "replace",
            "--raw",
            &format!("/api/v1/namespaces/{namespace}/pods/{name}/status"),
            "-f",
            &file.display().to_string(),
        ])?;
        Ok(())
    }

    /// Delete a Pod and confirm it at once, as a kubelet does once the pod's containers
    /// have stopped (no kubelet runs here, so a graceful deletion would never finish).
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<()> {
        self.kubectl(&[
            "delete",
            "pod",
            "-n",
            namespace,
            name,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ])?;
        Ok(())
    }

    /// The kubelet's part of a namespace deletion: confirm the deletion of its pods.
    pub fn delete_pods(&self, namespace: &str) -> Result<()> {
        self.kubectl(&[
            "delete",
            "pods",
            "--all",
            "-n",
            namespace,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ])?;
        Ok(())
    }

    /// Install the CRDs that define `kinds` (e.g. `AuthorizationPolicy`) from the shared
    /// CRD directory, and wait until the server serves them.
    pub fn install_crds(&self, kinds: &[&str]) -> Result<()> {
        let dir = std::env::var_os(ENV_CRDS_DIR)
            .map(PathBuf::from)
            .unwrap_or_else(default_crds_dir);
        let crds = crds_for(&dir, kinds)?;
        // kubectl 1.20's client-side schema check does not know every field of today's CRDs;
        // the server accepts them (it prunes what it does not know).
        self.kubectl_stdin(&["apply", "--validate=false", "-f", "-"], Some(&crds.yaml))?;
        for name in &crds.names {
            self.kubectl(&[
                "wait",
                "--for=condition=established",
                "--timeout=60s",
                &format!("crd/{name}"),
            ])?;
        }
        Ok(())
    }

    /// Stop and start kube-apiserver (same port, same etcd); returns once it is ready.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        if let Some(c) = self.apiserver.take() {
            stop(c);
        }
        self.start_apiserver()
    }

    /// Compact etcd's history up to its current revision (through its HTTP gateway), so
    /// a watch resumed from an older resourceVersion gets `410 Gone`. Returns the revision.
    pub fn compact_etcd(&self) -> Result<u64> {
        let url = |path: &str| format!("http://127.0.0.1:{}/v3/{path}", self.etcd_port);
        let post = |path: &str, body: &str| -> Result<serde_json::Value> {
            let out = self
                .command(Path::new("curl"))
                .args(["-sS", "--fail", "-X", "POST", "-d", body, &url(path)])
                .output()
                .context("running curl")?;
            if !out.status.success() {
                bail!("etcd {path}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(serde_json::from_slice(&out.stdout)?)
        };
        let head = post("kv/range", r#"{"key":"AA==","limit":1}"#)?;
        let revision: u64 = head["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .with_context(|| format!("no revision in {head}"))?;
        post(
            "kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        )?;
        Ok(revision)
    }
}

/// Run kubectl through `timeout` (the command given, e.g. inside a netns) with `kubeconfig`;
/// its stdout, or an error with its stderr.
pub fn run_kubectl(
    mut timeout: Command,
    kubectl: &Path,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    // A kubectl that waits on something that never happens (e.g. a graceful pod deletion
    // no kubelet confirms) must fail, not hang.
    timeout
        .arg(KUBECTL_TIMEOUT.as_secs().to_string())
        .arg(kubectl)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = timeout.spawn().context("starting kubectl")?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// SIGTERM, then SIGKILL after the grace period.
fn stop(mut child: Child) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        for c in [
            self.controller_manager.take(),
            self.apiserver.take(),
            self.etcd.take(),
        ]
        .into_iter()
        .flatten()
        {
            stop(c);
        }
        // The TempDir (etcd data, credentials, logs) is removed after this.
    }
}

struct Crds {
    yaml: String,
    /// `plural.group` of each.
    names: Vec<String>,
}

/// The CustomResourceDefinitions in `dir` (recursively) whose `spec.names.kind` is one of
/// `kinds`; an error names any kind not found.
fn crds_for(dir: &Path, kinds: &[&str]) -> Result<Crds> {
    use serde::Deserialize;
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut out = Crds {
        yaml: String::new(),
        names: Vec::new(),
    };
    let mut found = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for de in serde_yaml_ng::Deserializer::from_str(&text) {
            let doc = serde_yaml_ng::Value::deserialize(de)
                .with_context(|| format!("parsing {}", f.display()))?;
            if doc.get("kind").and_then(|k| k.as_str()) != Some("CustomResourceDefinition") {
                continue;
            }
            let spec = &doc["spec"];
            let Some(kind) = spec["names"]["kind"].as_str() else {
                continue;
            };
            if !kinds.contains(&kind) || found.contains(&kind.to_owned()) {
                continue;
            }
            found.push(kind.to_owned());
            out.names.push(format!(
                "{}.{}",
                spec["names"]["plural"].as_str().unwrap_or_default(),
                spec["group"].as_str().unwrap_or_default()
            ));
            out.yaml.push_str("---\n");
            out.yaml.push_str(&serde_yaml_ng::to_string(&doc)?);
        }
    }
    let missing: Vec<_> = kinds
        .iter()
        .filter(|k| !found.iter().any(|f| f == *k))
        .collect();
    if !missing.is_empty() {
        bail!("no CRD for {missing:?} under {}", dir.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_crds_of_the_kinds_asked_for() {
        let dir = std::env::var_os(ENV_CRDS_DIR)
            .map(PathBuf::from)
            .unwrap_or_else(default_crds_dir);
        if !dir.exists() {
            // The tests of a clone without shared/ beside it cannot check this.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{} missing",
                dir.display()
            );
            return;
        }
        let crds = crds_for(&dir, &["AuthorizationPolicy", "PeerAuthentication"]).unwrap();
        assert_eq!(
            crds.names,
            [
                "authorizationpolicies.security.istio.io",
                "peerauthentications.security.istio.io"
            ]
        );
        assert_eq!(
            crds.yaml.matches("kind: CustomResourceDefinition").count(),
            2
        );
        let e = crds_for(&dir, &["NoSuchKind"]).err().unwrap().to_string();
        assert!(e.contains("NoSuchKind"), "{e}");
    }
}
