//! `comb bench kube`: the agent fed by a real Kubernetes API server against the same agent
//! fed by the same objects as a manifests directory, in one run.
//!
//! The objects: 5,000 pods (the lab's two real ones on node1, the rest API objects only,
//! 250 to each of 20 nodes that have no network namespace), 1,000 Services with one
//! EndpointSlice each (five backends), 500 NetworkPolicies, in four namespaces plus the
//! bench's own. The slices are written by the bench, not the EndpointSlice controller, so
//! both arms hold exactly the same objects (the API server is 1.20: `discovery.k8s.io/v1beta1`
//! there when the server has no v1; v1 in the directory). The real pods are `bench/client`
//! and `bench/server` (splice off, so the verdict is the policy programs'); a NetworkPolicy
//! `flip` lets only pods labelled `flip: "on"` reach the server's `FLIP_PORT`.
//!
//! Arms, alternated `--pairs` times, one agent at a time on node1:
//! - baseline: combd `--manifests` on a directory holding the objects as JSON documents;
//! - comb: combd `--kubeconfig` on etcd + kube-apiserver (in node1's network namespace,
//!   loopback only) holding the same objects, created before the first pair.
//!
//! Metrics:
//! - `initial_sync_s`: agent process started → State applied with every pod, Service and the
//!   real pods' policy programs in place (median over the pairs);
//! - `update_p50_ms`/`update_p99_ms`: the client pod's `flip` label changed — a merge PATCH to
//!   the API server (timed from its answer), or the pods file rewritten and renamed into the
//!   directory (timed from the rename) — until the client's flow to the server shows the new
//!   verdict, seen from the client's network namespace by the flip prober (`flip_probe`);
//!   `--samples` flips per arm and pair, percentiles over all of an arm's samples;
//! - `rss_mib`: combd's resident memory after its samples (median over the pairs).

use std::fmt::Write as _;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use comb_api::{Query, Status, client};
use comb_lab::{KubeCluster, KubeOptions, Lab, LabOptions};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use rand::Rng;
use serde_json::{Value, json};

use super::Common;
use super::flip_probe::{FLIP_TIMEOUT, Prober, Trigger};
use super::report::{Metric, Report, median, percentile};

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Label flips timed per arm and pair.
    #[arg(long, default_value = "20")]
    pub samples: usize,
    /// Pods in all (two of them real).
    #[arg(long, default_value = "5000")]
    pub pods: usize,
    /// Services, one EndpointSlice each.
    #[arg(long, default_value = "1000")]
    pub services: usize,
    /// NetworkPolicies besides the bench's own.
    #[arg(long, default_value = "500")]
    pub policies: usize,
}

/// The bench's namespace: the real pods and the flip policy.
const NS: &str = "bench";
/// Namespaces of the API-only objects.
const OTHER_NS: [&str; 4] = ["kb-a", "kb-b", "kb-c", "kb-d"];
/// Nodes of the API-only pods: `remote<k>`, pod CIDR 10.200.k.0/24.
const FAKE_NODES: usize = 20;
const PODS_PER_FAKE_NODE: usize = 250;
const SERVICE_CIDR_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 0);
const FLIP_PORT: u16 = 9000;
/// The lab writes its pods there; the bench rewrites it with the client's label.
const PODS_FILE: &str = "pods.yaml";
const OBJECTS_FILE: &str = "bench-kube-objects.yaml";
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);
/// API requests in flight while the objects are created.
const IN_FLIGHT: usize = 32;

/// Service `s`'s namespace; its pods live there too.
fn svc_ns(s: usize) -> &'static str {
    OTHER_NS[s % OTHER_NS.len()]
}

/// API-only pod `i`: its Service, name, IP and node.
fn synthetic_pod(i: usize, services: usize) -> (usize, String, Ipv4Addr, String) {
    let s = i % services;
    let node = i / PODS_PER_FAKE_NODE;
    let host = (i % PODS_PER_FAKE_NODE + 2) as u8;
    (
        s,
        format!("svc-{s}-{}", i / services),
        Ipv4Addr::new(10, 200, node as u8, host),
        format!("remote{node}"),
    )
}

/// Everything but the real pods, as (API resource, object) in creation order: Namespaces,
/// Nodes, Pods (with status), Services, EndpointSlices (`slice_version`), NetworkPolicies.
fn objects(a: &Args, slice_version: &str) -> Result<Vec<Value>> {
    let synthetic = a.pods.checked_sub(2).context("--pods must be at least 2")?;
    ensure!(
        synthetic <= FAKE_NODES * PODS_PER_FAKE_NODE,
        "--pods at most {}",
        FAKE_NODES * PODS_PER_FAKE_NODE + 2
    );
    ensure!(
        (1..=60_000).contains(&a.services),
        "--services from 1 to 60000"
    );
    ensure!(a.policies <= a.services, "--policies at most --services");
    let mut out = Vec::new();
    for ns in std::iter::once(NS).chain(OTHER_NS) {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}));
    }
    for k in 0..FAKE_NODES {
        let cidr = format!("10.200.{k}.0/24");
        out.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("remote{k}")}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}));
    }
    let mut backends: Vec<Vec<(String, Ipv4Addr, String)>> = vec![Vec::new(); a.services];
    for i in 0..synthetic {
        let (s, name, ip, node) = synthetic_pod(i, a.services);
        out.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": svc_ns(s), "labels": {"app": format!("svc-{s}")}},
            "spec": {"nodeName": node, "serviceAccountName": format!("sa-{}", s % 50),
                     "containers": [{"name": "c", "image": "none", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": running_status(ip),
        }));
        backends[s].push((name, ip, node));
    }
    for (s, pods) in backends.iter().enumerate() {
        let ns = svc_ns(s);
        let vip = Ipv4Addr::from(u32::from(SERVICE_CIDR_BASE) + s as u32);
        out.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{s}"), "namespace": ns},
            "spec": {"clusterIP": vip.to_string(), "selector": {"app": format!("svc-{s}")},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
        }));
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|(name, ip, node)| {
                let mut e = json!({"addresses": [ip.to_string()], "conditions": {"ready": true},
                                   "targetRef": {"kind": "Pod", "namespace": ns, "name": name}});
                if slice_version == "v1" {
                    e["nodeName"] = json!(node);
                } else {
                    e["topology"] = json!({"kubernetes.io/hostname": node});
                }
                e
            })
            .collect();
        out.push(json!({
            "apiVersion": format!("discovery.k8s.io/{slice_version}"), "kind": "EndpointSlice",
            "metadata": {"name": format!("svc-{s}-bench"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": format!("svc-{s}"),
                                    "endpointslice.kubernetes.io/managed-by": "comb-bench"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }));
    }
    for p in 0..a.policies {
        // Service p's pods admit Service p+4's (the same namespace) on their port.
        let from = (p + OTHER_NS.len()) % a.services;
        out.push(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("np-{p}"), "namespace": svc_ns(p)},
            "spec": {"podSelector": {"matchLabels": {"app": format!("svc-{p}")}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("svc-{from}")}}}],
                                  "ports": [{"protocol": "TCP", "port": 8080}]}]},
        }));
    }
    out.push(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "flip", "namespace": NS},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"flip": "on"}}}],
                              "ports": [{"protocol": "TCP", "port": FLIP_PORT}]}]},
    }));
    Ok(out)
}

/// What a kubelet reports for a running pod.
fn running_status(ip: Ipv4Addr) -> Value {
    json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
           "conditions": [{"type": "Ready", "status": "True"}]})
}

/// The lab's real pods as API objects (with status), the client's `flip` label as given.
fn real_pods(lab: &Lab, flip_on: bool) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (name, labels) in [
        (
            "client",
            json!({"app": "client", "flip": if flip_on { "on" } else { "off" }}),
        ),
        ("server", json!({"app": "server"})),
    ] {
        let p = lab.pod(&format!("{NS}/{name}"))?;
        let cgroup = p
            .cgroup
            .strip_prefix(&lab.state().cgroup2)
            .unwrap_or(&p.cgroup)
            .display()
            .to_string();
        out.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels,
                         // What the CNI plugin reports on a real node; the lab's way here.
                         "annotations": {"comb.dev/splice": "off", "comb.dev/cgroup": cgroup,
                                         "comb.dev/interface": p.host_veth}},
            "spec": {"nodeName": "node1", "serviceAccountName": name,
                     "containers": [{"name": "c", "image": "none"}]},
            "status": running_status(p.ip),
        }));
    }
    Ok(out)
}

/// JSON documents as one multi-document YAML file (JSON is YAML).
fn docs_text(docs: &[Value]) -> String {
    let mut s = String::new();
    for d in docs {
        let _ = writeln!(s, "---\n{d}");
    }
    s
}

fn lab_pods_yaml() -> String {
    let pod = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}}}, annotations: {{comb.dev/splice: \"off\"}}}}\nspec: {{nodeName: node1, serviceAccountName: {name}, containers: [{{name: c, image: none}}]}}\n---\n"
        )
    };
    format!("{}{}", pod("client"), pod("server"))
}

// ---------------------------------------------------------------------------------------
// The API server client: a thread in node1's network namespace (where the API server
// listens) running a single-threaded runtime, so every connection it opens is made there.

type Work = Box<dyn FnOnce(&tokio::runtime::Runtime, &kube::Client) + Send>;

#[derive(Clone)]
struct KubeApi {
    jobs: mpsc::Sender<Work>,
}

impl KubeApi {
    fn start(netns: &str, kubeconfig: &Path) -> Result<KubeApi> {
        let path = Path::new("/run/netns").join(netns);
        let fd = std::fs::File::open(&path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        let kubeconfig = kubeconfig.to_path_buf();
        let (jobs, job_rx) = mpsc::channel::<Work>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        std::thread::Builder::new()
            .name("bench-kube-api".into())
            .spawn(move || {
                let setup = || -> Result<(tokio::runtime::Runtime, kube::Client)> {
                    nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("setns into node1")?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let client = rt.block_on(async {
                        let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
                        let mut cfg = kube::Config::from_custom_kubeconfig(
                            kc,
                            &kube::config::KubeConfigOptions::default(),
                        )
                        .await?;
                        cfg.read_timeout = Some(Duration::from_secs(60));
                        anyhow::Ok(kube::Client::try_from(cfg)?)
                    })?;
                    Ok((rt, client))
                };
                let (rt, client) = match setup() {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for work in job_rx {
                    work(&rt, &client);
                }
            })?;
        ready_rx.recv().context("API client thread")??;
        Ok(KubeApi { jobs })
    }

    /// Run `f` on the API thread and wait for its result.
    fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(kube::Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>>,
    {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move |rt, c| {
                let _ = tx.send(rt.block_on(f(c.clone())));
            }))
            .ok()
            .context("API client thread gone")?;
        rx.recv().context("API client thread gone")?
    }

    /// Does the server serve `discovery.k8s.io/v1`?
    fn slice_version(&self) -> Result<&'static str> {
        self.call(|c| async move {
            let groups = c.list_api_groups().await?;
            let v1 = groups
                .groups
                .iter()
                .filter(|g| g.name == "discovery.k8s.io")
                .flat_map(|g| &g.versions)
                .any(|v| v.version == "v1");
            Ok(if v1 { "v1" } else { "v1beta1" })
        })
    }

    /// Create `docs` (at most IN_FLIGHT at once, kinds in the given order), then write the
    /// status of those that carry one, as a kubelet would.
    fn create_all(&self, docs: Vec<Value>) -> Result<()> {
        self.call(move |c| async move {
            let mut set = tokio::task::JoinSet::new();
            let mut kind = String::new();
            for doc in docs {
                let k = doc["kind"].as_str().unwrap_or_default().to_owned();
                // Namespaces before what lives in them, Services before their slices.
                if k != kind || set.len() >= IN_FLIGHT {
                    let drain = k != kind;
                    while set.len() >= if drain { 1 } else { IN_FLIGHT } {
                        set.join_next().await.context("join")???;
                    }
                    kind = k;
                }
                set.spawn(create_one(c.clone(), doc));
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            anyhow::Ok(())
        })
    }

    /// Set the client pod's `flip` label; returns once the API server answered.
    fn flip_label(&self, on: bool) -> Result<()> {
        self.call(move |c| async move {
            let pods: Api<DynamicObject> = Api::namespaced_with(
                c,
                NS,
                &resource(&json!({"apiVersion": "v1", "kind": "Pod"}))?,
            );
            let patch = json!({"metadata": {"labels": {"flip": if on { "on" } else { "off" }}}});
            pods.patch("client", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .context("patching the client pod's labels")?;
            Ok(())
        })
    }
}

fn resource(doc: &Value) -> Result<ApiResource> {
    let api_version = doc["apiVersion"].as_str().context("apiVersion")?;
    let kind = doc["kind"].as_str().context("kind")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Ok(ApiResource::from_gvk(&GroupVersionKind::gvk(
        group, version, kind,
    )))
}

async fn create_one(c: kube::Client, mut doc: Value) -> Result<()> {
    let ar = resource(&doc)?;
    let status = doc.as_object_mut().and_then(|o| o.remove("status"));
    let ns = doc["metadata"]["namespace"].as_str().map(str::to_owned);
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let api: Api<DynamicObject> = match &ns {
        Some(ns) => Api::namespaced_with(c, ns, &ar),
        None => Api::all_with(c, &ar),
    };
    let obj: DynamicObject = serde_json::from_value(doc)?;
    api.create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("creating {} {name}", ar.kind))?;
    if let (Some(status), "Pod") = (status, ar.kind.as_str()) {
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await
        .with_context(|| format!("writing pod {name}'s status"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The agent under test.

/// combd on node1 in one arm's mode; stopped (SIGTERM: it detaches and unpins) on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    started: Instant,
}

impl Agent {
    fn start(lab: &Lab, source: &[&str], dir: &Path, arm: &str) -> Result<Agent> {
        let socket = dir.join(format!("{arm}.sock"));
        let log = dir.join(format!("{arm}-combd.log"));
        let combd = comb_lab::combd_path()?;
        let node_cgroup = Path::new("/").join(comb_lab::naming::node_cgroup(lab.name(), "node1"));
        let pin_dir = format!("/sys/fs/bpf/comb/{}-node1-{arm}", lab.name());
        let state = dir.join(format!("{arm}-state"));
        let mut args: Vec<String> = ["--node", "node1"].map(String::from).to_vec();
        args.extend(source.iter().map(|s| s.to_string()));
        args.extend([
            "--admin-socket".into(),
            socket.display().to_string(),
            "--pin-dir".into(),
            pin_dir,
            "--state-dir".into(),
            state.display().to_string(),
            "--lb-cgroup".into(),
            node_cgroup.display().to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = std::fs::File::create(&log)?;
        let started = Instant::now();
        let child = lab
            .node_command("node1", &combd.display().to_string(), &args)?
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting combd")?;
        Ok(Agent {
            child,
            socket,
            log,
            started,
        })
    }

    fn status(&self) -> Result<Status> {
        Ok(serde_json::from_value(client::call(
            &self.socket,
            Query::Status,
        )?)?)
    }

    /// Seconds from the start until the agent holds all `pods` and `services` and has the
    /// real pods' policy programs in place.
    fn wait_synced(&self, pods: usize, services: usize) -> Result<f64> {
        let deadline = self.started + SYNC_TIMEOUT;
        let mut last = String::from("no admin socket yet");
        while Instant::now() < deadline {
            if let Ok(s) = self.status() {
                ensure!(
                    s.config_errors.is_empty(),
                    "combd rejected the bench's objects: {:?}",
                    s.config_errors
                );
                let ready = s.generation > 0
                    && s.applied_generation == s.generation
                    && s.lb_services >= services
                    && s.policy_endpoints >= 2;
                if ready {
                    let rows: Vec<comb_api::EndpointRow> =
                        serde_json::from_value(client::call(&self.socket, Query::Endpoints)?)?;
                    if rows.len() >= pods {
                        return Ok(self.started.elapsed().as_secs_f64());
                    }
                    last = format!("{} of {pods} pods", rows.len());
                } else {
                    last = format!(
                        "generation {} applied {}, {} services, {} policy endpoints, config errors {:?}, datapath errors {:?}",
                        s.generation,
                        s.applied_generation,
                        s.lb_services,
                        s.policy_endpoints,
                        s.config_errors,
                        s.datapath_errors
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "combd not in sync {SYNC_TIMEOUT:?} after its start: {last}\n{}",
            log_tail(&self.log, 20)
        )
    }

    /// Wait until a generation after `before` is applied; returns its status.
    fn wait_applied(&self, before: u64) -> Result<Status> {
        let deadline = Instant::now() + FLIP_TIMEOUT;
        loop {
            let s = self.status()?;
            if s.generation > before && s.applied_generation == s.generation {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "no new generation applied within {FLIP_TIMEOUT:?}: generation {}, applied {}, errors {:?}",
                    s.generation,
                    s.applied_generation,
                    s.config_errors
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn rss_mib(&self) -> Result<f64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS in /proc/PID/status")?;
        Ok(kib / 1024.0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One arm's measurements in one pair.
struct ArmRun {
    sync_s: f64,
    updates_ms: Vec<f64>,
    /// Per sample, ms after the change: the agent's State replaced (source done), and the
    /// datapath holding it (pipeline and maps done); from `comb status`.
    replaced_ms: Vec<f64>,
    applied_ms: Vec<f64>,
    rss_mib: f64,
}

/// How an arm changes the client's label.
enum Change<'a> {
    Directory { lab: &'a Lab },
    Api(KubeApi),
}

impl Change<'_> {
    fn trigger(&self, on: bool) -> Result<Trigger> {
        Ok(match self {
            Change::Directory { lab } => {
                let text = docs_text(&real_pods(lab, on)?);
                let tmp = lab.state_dir().join(format!("{PODS_FILE}.tmp"));
                std::fs::write(&tmp, text)?;
                let dst = lab.manifests_dir().join(PODS_FILE);
                Box::new(move || {
                    std::fs::rename(&tmp, &dst)
                        .with_context(|| format!("renaming to {}", dst.display()))
                })
            }
            Change::Api(api) => {
                let api = api.clone();
                Box::new(move || api.flip_label(on))
            }
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn run_arm(
    lab: &Lab,
    source: &[&str],
    change: &Change<'_>,
    prober: &Prober,
    a: &Args,
    dir: &Path,
    arm: &str,
    say: &dyn Fn(String),
) -> Result<ArmRun> {
    let agent = Agent::start(lab, source, dir, arm)?;
    let sync_s = agent.wait_synced(a.pods, a.services)?;
    // The client starts with `flip: off`: denied.
    ensure!(
        !prober.once()?,
        "{arm}: client -> server:{FLIP_PORT} allowed before the first flip"
    );
    let mut rng = rand::rng();
    let mut updates_ms = Vec::new();
    let (mut replaced_ms, mut applied_ms) = (Vec::new(), Vec::new());
    let mut on = false;
    for s in 0..a.samples {
        std::thread::sleep(Duration::from_millis(rng.random_range(20..270)));
        on = !on;
        let before = agent.status()?.generation;
        let f = prober.flip(change.trigger(on)?, on)?;
        let after = agent.wait_applied(before)?;
        let ms = f.seen.saturating_duration_since(f.t0).as_secs_f64() * 1e3;
        let t0 = f.t0_wall.duration_since(UNIX_EPOCH)?.as_secs_f64();
        // The generation that made the flip: the newest one.
        if let Some(g) = after
            .generations
            .iter()
            .find(|g| g.generation == after.generation)
        {
            replaced_ms.push((g.replaced_at - t0) * 1e3);
            if let Some(at) = g.applied_at {
                applied_ms.push((at - t0) * 1e3);
            }
        }
        if s == 0 || (s + 1) % 10 == 0 {
            say(format!(
                "  {arm} sample {}/{}: {ms:.1} ms",
                s + 1,
                a.samples
            ));
        }
        updates_ms.push(ms);
    }
    // Leave the label off for the next arm.
    if on {
        let before = agent.status()?.generation;
        prober.flip(change.trigger(false)?, false)?;
        agent.wait_applied(before)?;
    }
    let rss_mib = agent.rss_mib()?;
    Ok(ArmRun {
        sync_s,
        updates_ms,
        replaced_ms,
        applied_ms,
        rss_mib,
    })
}

pub fn run(a: &Args) -> Result<Report> {
    let c = &a.common;
    ensure!(
        c.pairs >= 1 && a.samples >= 1,
        "--pairs and --samples must be at least 1"
    );
    let say = |m: String| {
        if !c.json {
            eprintln!("{m}");
        }
    };
    // Fail on bad sizes before anything starts.
    objects(a, "v1")?;
    let lab = Lab::up(
        LabOptions {
            name: format!("bk{:04x}", rand::random::<u16>()),
            agent: None,
        },
        &[(PathBuf::from("lab-pods.yaml"), lab_pods_yaml())],
    )?;
    let dir = tempfile::Builder::new()
        .prefix("comb-bench-kube-")
        .tempdir()?;
    let server = lab.pod(&format!("{NS}/server"))?.clone();
    let client_netns = lab.pod(&format!("{NS}/client"))?.netns.clone();

    // The directory arm's files.
    let manifests = lab.manifests_dir();
    for (name, docs) in [
        (PODS_FILE, real_pods(&lab, false)?),
        (OBJECTS_FILE, objects(a, "v1")?),
    ] {
        let tmp = lab.state_dir().join(format!("{name}.tmp"));
        std::fs::write(&tmp, docs_text(&docs))?;
        std::fs::rename(&tmp, manifests.join(name))?;
    }

    // The API arm's server, filled once.
    let kube = KubeCluster::start(KubeOptions {
        netns: Some(lab.node_netns("node1")?),
        controller_manager: false,
        ..Default::default()
    })?;
    // The agent watches these kinds when they are served (none are created).
    kube.install_crds(&["AuthorizationPolicy", "PeerAuthentication"])?;
    let api = KubeApi::start(&lab.node_netns("node1")?, kube.kubeconfig())?;
    let slice_version = api.slice_version()?;
    let t = Instant::now();
    let mut docs = objects(a, slice_version)?;
    // The real pods after the namespaces, with the other pods.
    let real = real_pods(&lab, false)?;
    let at = docs
        .iter()
        .position(|d| d["kind"] == "Pod")
        .unwrap_or(docs.len());
    docs.splice(at..at, real);
    let n = docs.len();
    api.create_all(docs)?;
    say(format!(
        "API server filled: {n} objects ({} pods, {} Services and EndpointSlices {slice_version}, {} NetworkPolicies) in {:.1} s",
        a.pods,
        a.services,
        a.policies + 1,
        t.elapsed().as_secs_f64()
    ));

    let _flip = super::flip_probe::start_server(&lab, &format!("{NS}/server"), FLIP_PORT)?;
    let prober = Prober::start(&client_netns, SocketAddrV4::new(server.ip, FLIP_PORT))?;

    let manifests_s = manifests.display().to_string();
    let kubeconfig_s = kube.kubeconfig().display().to_string();
    let dir_source = ["--manifests", manifests_s.as_str()];
    let api_source = ["--kubeconfig", kubeconfig_s.as_str()];
    let dir_change = Change::Directory { lab: &lab };
    let api_change = Change::Api(api.clone());
    let mut runs: [Vec<ArmRun>; 2] = Default::default();
    for pair in 0..c.pairs {
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for arm in order {
            let (name, source, change) = if arm == 0 {
                ("manifests", &dir_source[..], &dir_change)
            } else {
                ("kubernetes", &api_source[..], &api_change)
            };
            let r = run_arm(&lab, source, change, &prober, a, dir.path(), name, &say)
                .with_context(|| format!("pair {}, {name} arm", pair + 1))?;
            say(format!(
                "pair {}/{} {name:10}: in sync {:.2} s after start, update p50 {:.1} ms (State replaced {:.1} ms, datapath {:.1} ms after the change), rss {:.1} MiB",
                pair + 1,
                c.pairs,
                r.sync_s,
                median(&r.updates_ms),
                median(&r.replaced_ms),
                median(&r.applied_ms),
                r.rss_mib
            ));
            runs[arm].push(r);
        }
    }
    drop(prober);
    drop(_flip);
    drop(kube);
    lab.down()?;

    let per_arm = |arm: usize| {
        let sync: Vec<f64> = runs[arm].iter().map(|r| r.sync_s).collect();
        let rss: Vec<f64> = runs[arm].iter().map(|r| r.rss_mib).collect();
        let mut updates: Vec<f64> = runs[arm]
            .iter()
            .flat_map(|r| r.updates_ms.iter().copied())
            .collect();
        (
            median(&sync),
            percentile(&mut updates, 50.0),
            percentile(&mut updates, 99.0),
            median(&rss),
        )
    };
    let (dir_sync, dir_p50, dir_p99, dir_rss) = per_arm(0);
    let (api_sync, api_p50, api_p99, api_rss) = per_arm(1);
    let metric = |name: &str, unit: &str, baseline: f64, comb: f64| Metric {
        name: name.into(),
        unit: unit.into(),
        baseline,
        comb,
        ratio: comb / baseline,
    };
    Ok(Report {
        scenario: "kube".into(),
        metrics: vec![
            metric("initial_sync_s", "s", dir_sync, api_sync),
            metric("update_p50_ms", "ms", dir_p50, api_p50),
            metric("update_p99_ms", "ms", dir_p99, api_p99),
            metric("rss_mib", "MiB", dir_rss, api_rss),
        ],
        pairs: c.pairs,
        baseline_label: format!(
            "combd --manifests: {} pods, {} Services + EndpointSlices, {} NetworkPolicies in a directory",
            a.pods,
            a.services,
            a.policies + 1
        ),
        comb_label: format!(
            "combd --kubeconfig: the same objects in kube-apiserver (slices {slice_version}); update_*: {} label flips per arm",
            a.samples * c.pairs
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            common: Common {
                json: false,
                pairs: 1,
                secs: 1,
            },
            samples: 1,
            pods: 5000,
            services: 1000,
            policies: 500,
        }
    }

    /// The directory arm's objects build a valid State of the stated size.
    #[test]
    fn objects_make_the_stated_state() {
        let docs = objects(&args(), "v1").unwrap();
        let text = docs_text(&docs);
        let parsed = comb_config::parse_file_text(Path::new("objects.yaml"), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        let snap = comb_config::build_snapshot(&parsed).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(snap.pods.len(), 4998);
        assert_eq!(snap.services.len(), 1000);
        assert_eq!(snap.network_policies.len(), 501);
        let counts = |k: &str| docs.iter().filter(|d| d["kind"] == k).count();
        assert_eq!(counts("EndpointSlice"), 1000);
        // Five backends to a Service, each pod in one slice.
        let addrs: usize = docs
            .iter()
            .filter(|d| d["kind"] == "EndpointSlice")
            .map(|d| d["endpoints"].as_array().unwrap().len())
            .sum();
        assert_eq!(addrs, 4998);
    }

    #[test]
    fn v1beta1_slices_carry_topology() {
        let docs = objects(&args(), "v1beta1").unwrap();
        let slice = docs.iter().find(|d| d["kind"] == "EndpointSlice").unwrap();
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1beta1");
        assert!(slice["endpoints"][0]["topology"]["kubernetes.io/hostname"].is_string());
        assert!(slice["endpoints"][0].get("nodeName").is_none());
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        let mut a = args();
        a.pods = 1;
        assert!(objects(&a, "v1").is_err());
        a.pods = 6000;
        assert!(objects(&a, "v1").is_err());
        let mut a = args();
        a.policies = 2000;
        assert!(objects(&a, "v1").is_err());
    }

    #[test]
    fn synthetic_pods_have_distinct_ips_in_their_node_cidr() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..4998 {
            let (_, _, ip, node) = synthetic_pod(i, 1000);
            assert!(seen.insert(ip), "{ip} twice");
            let k: u8 = node.trim_start_matches("remote").parse().unwrap();
            assert_eq!(ip.octets()[..3], [10, 200, k]);
        }
    }

    /// The agent's pipeline on the bench's objects, with the two real pods on node1: every
    /// Service a frontend with its backends, policy on both real pods.
    #[test]
    fn bench_objects_through_the_pipeline() {
        use comb_model::State;
        use comb_model::identity::IdentityAllocator;
        use comb_model::pipeline::{self, PipelineConfig};
        let mut docs = objects(&args(), "v1").unwrap();
        docs.push(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
                         "spec": {"podCIDR": "198.18.1.0/24"}}),
        );
        for (i, name) in ["client", "server"].iter().enumerate() {
            docs.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NS, "labels": {"app": name},
                             "annotations": {"comb.dev/interface": format!("lxc{i}")}},
                "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "none"}]},
                "status": running_status(Ipv4Addr::new(198, 18, 1, 2 + i as u8))}));
        }
        let parsed = comb_config::parse_file_text(Path::new("o.yaml"), &docs_text(&docs))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut state = State::new();
        state.replace(comb_config::build_snapshot(&parsed).unwrap_or_else(|e| panic!("{e}")));
        let interfaces = pipeline::interface_names(&state, "node1")
            .zip(1u32..)
            .map(|(n, i)| (n.to_owned(), i))
            .collect();
        let config = PipelineConfig {
            policy: true,
            socket_lb: true,
            proxy_cgroup: None,
            ..Default::default()
        };
        let d = pipeline::compute(
            &state,
            "node1",
            &mut IdentityAllocator::default(),
            &config,
            &interfaces,
        );
        assert_eq!(d.services.len(), 1000);
        // 4,998 API-only pods over 1,000 Services: five backends each but two with four.
        let backends: usize = d.services.values().map(|s| s.backends.len()).sum();
        assert_eq!(backends, 4998);
        assert_eq!(d.policy.endpoints.len(), 2);
        assert!(!d.policy.entries.is_empty(), "the flip policy compiles");
    }
}
