//! Comb's lab: nodes and pods as network namespaces, veths and cgroups on one machine.
//!
//! Built from ordinary Pod manifests (see `spec`), named and addressed as in `naming` (and
//! docs/architecture.md "Lab layout"). Safety rules: nothing is added to the root network
//! namespace or root cgroup; everything created is removed by `down`, by `Drop` (also while
//! unwinding from a panic), by the signal handler of `install_signal_cleanup`, or by
//! `down_all` after a crash.

// Unsafe code only where std/nix offer no safe form: pre_exec (process) and the signal
// handler (teardown).
#![deny(unsafe_code)]

mod cgroup;
pub mod kube_bins;
mod kube_certs;
pub mod kube_cluster;
mod kube_objects;
pub mod kubelet;
mod locate;
pub mod naming;
mod netns;
#[allow(unsafe_code)]
mod process;
mod spec;
mod state;
#[allow(unsafe_code)]
mod teardown;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use kube_bins::KubeBinaries;
pub use kube_cluster::{KubeCluster, KubeOptions};
pub use locate::combd_path;
pub use spec::{PodSpec, parse as parse_manifests};
pub use state::{AgentOptions, LabCa, LabKube, LabNode, LabPod, LabState};
pub use teardown::install_signal_cleanup;

#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// `[a-z0-9]{1,8}`; every lab object's name derives from it so labs can coexist.
    pub name: String,
    /// Start one combd per node when set.
    pub agent: Option<AgentOptions>,
}

/// A running lab. Dropping it tears everything down unless it was `detach`ed or `open`ed.
#[derive(Debug)]
pub struct Lab {
    state: LabState,
    /// Drop does nothing when set.
    detached: bool,
    /// Processes this handle started, reaped after teardown so they don't linger as zombies.
    children: Mutex<Vec<u32>>,
}

const AGENT_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
const AGENT_STOP_GRACE: Duration = Duration::from_secs(5);
const CA_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a kubelet stand-in may take to register its node, and a pod to get its sandbox.
const KUBE_NODE_TIMEOUT: Duration = Duration::from_secs(30);
const KUBE_POD_TIMEOUT: Duration = Duration::from_secs(30);
/// The CRDs a Kubernetes-mode lab installs from the shared directory: the Istio kinds the
/// agent reads.
const LAB_CRDS: &[&str] = &["AuthorizationPolicy", "PeerAuthentication"];

impl Lab {
    /// Build a lab from manifest texts (`(path for error messages, text)`).
    pub fn up(opts: LabOptions, manifest_texts: &[(PathBuf, String)]) -> Result<Lab> {
        Self::up_mode(opts, manifest_texts, false)
    }

    /// Build a lab as a Kubernetes cluster (docs/kubernetes.md, "The lab as a cluster"): a
    /// control plane on the machine's loopback, a kubelet stand-in per node that makes the
    /// pods' sandboxes through the real CNI chain, and agents watching the API server. The
    /// manifests' objects are created through the API (Pods bound to their `spec.nodeName`).
    pub fn up_kubernetes(opts: LabOptions, manifest_texts: &[(PathBuf, String)]) -> Result<Lab> {
        Self::up_mode(opts, manifest_texts, true)
    }

    fn up_mode(
        opts: LabOptions,
        manifest_texts: &[(PathBuf, String)],
        kubernetes: bool,
    ) -> Result<Lab> {
        naming::validate_lab_name(&opts.name)?;
        let inputs = spec::parse(manifest_texts)?;
        if inputs.pods.is_empty() {
            bail!("no Pod in the lab manifests");
        }
        let cgroup2 = comb_host::cgroup2_mount()?;
        let state = plan(&opts, &inputs, cgroup2, kubernetes)?;
        teardown::refuse_existing(&opts.name)?;
        // Registered before the first object exists so a signal mid-build cleans up too.
        teardown::register(&opts.name);
        let mut lab = Lab {
            state,
            detached: false,
            children: Mutex::new(Vec::new()),
        };
        // On error, `lab` drops here and tears down whatever was built.
        if kubernetes {
            lab.build_kubernetes(&inputs)?;
        } else {
            lab.build(&inputs)?;
        }
        tracing::info!(lab = %lab.state.name, nodes = lab.state.nodes.len(), pods = lab.state.pods.len(), "lab up");
        Ok(lab)
    }

    /// A handle on a lab built by another process (or earlier); its Drop does nothing.
    pub fn open(name: &str) -> Result<Lab> {
        naming::validate_lab_name(name)?;
        let path = naming::state_dir(name).join("state.json");
        if !path.exists() {
            bail!("no lab named {name:?} (no {})", path.display());
        }
        let state = LabState::load(&path)?;
        let mut lab = Lab {
            state,
            detached: true,
            children: Mutex::new(Vec::new()),
        };
        lab.refresh_pods();
        Ok(lab)
    }

    /// Kubernetes mode: the pods as the kubelet stand-ins have them now (Pods come and go
    /// through the API); the lab's own pods otherwise.
    pub fn refresh_pods(&mut self) {
        if self.state.kube.is_some() {
            self.state.pods = self.kube_pods();
        }
    }

    fn kube_pods(&self) -> Vec<LabPod> {
        self.state
            .nodes
            .iter()
            .flat_map(|n| {
                kubelet::sandbox::load_records(&kubelet::records_dir(&self.state.name, &n.name))
            })
            .map(|r| r.pod)
            .collect()
    }

    /// The kubeconfig of a Kubernetes-mode lab (`comb lab kubeconfig`).
    pub fn kubeconfig(&self) -> Result<&Path> {
        Ok(&self.kube()?.kubeconfig)
    }

    fn kube(&self) -> Result<&LabKube> {
        self.state.kube.as_ref().with_context(|| {
            format!(
                "lab {} is not a Kubernetes lab (`comb lab up --kubernetes`)",
                self.state.name
            )
        })
    }

    /// kubectl against a Kubernetes-mode lab; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_stdin(args, None)
    }

    /// `kubectl apply -f -` of `yaml` against a Kubernetes-mode lab. Without kubectl's
    /// client-side schema check: kubectl 1.20 does not know every field of today's CRDs, and
    /// the server validates all the same.
    pub fn kube_apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_stdin(&["apply", "--validate=false", "-f", "-"], Some(yaml))
    }

    /// kubectl against a Kubernetes-mode lab with `stdin`.
    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        self.kubectl_stdin(args, Some(stdin))
    }

    fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let bins = KubeBinaries::locate()?;
        kube_cluster::run_kubectl(
            Command::new("timeout"),
            &bins.kubectl,
            &self.kube()?.kubeconfig,
            args,
            stdin,
        )
    }

    /// Keep everything running after this handle goes away (`comb lab up`).
    pub fn detach(mut self) {
        self.detached = true;
        teardown::unregister(&self.state.name);
    }

    /// Remove everything; errors are collected and reported after trying every step.
    pub fn down(mut self) -> Result<()> {
        self.detached = true; // Drop must not repeat it
        let r = teardown::teardown(&self.state.name);
        process::reap(&self.children.lock().unwrap());
        teardown::unregister(&self.state.name);
        r
    }

    /// Sweep every lab on the machine (leftovers of crashed runs); returns what was removed.
    /// Do not call this from tests that run in parallel with other labs.
    pub fn down_all() -> Result<Vec<String>> {
        teardown::down_all()
    }

    /// Names of labs that have a state directory.
    pub fn list() -> Result<Vec<String>> {
        teardown::state_dirs()
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn state(&self) -> &LabState {
        &self.state
    }

    pub fn state_dir(&self) -> PathBuf {
        naming::state_dir(&self.state.name)
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.state_dir().join("manifests")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir().join("logs")
    }

    pub fn nodes(&self) -> &[LabNode] {
        &self.state.nodes
    }

    pub fn pods(&self) -> &[LabPod] {
        &self.state.pods
    }

    /// `ns/name`, or a bare name when it is unique across namespaces.
    pub fn pod(&self, name_or_ns_slash_name: &str) -> Result<&LabPod> {
        let q = name_or_ns_slash_name;
        let found: Vec<&LabPod> = match q.split_once('/') {
            Some((ns, name)) => self
                .state
                .pods
                .iter()
                .filter(|p| p.namespace == ns && p.name == name)
                .collect(),
            None => self.state.pods.iter().filter(|p| p.name == q).collect(),
        };
        match found[..] {
            [p] => Ok(p),
            [] => bail!("lab {}: no pod {q:?}", self.state.name),
            _ => bail!(
                "lab {}: pod name {q:?} is ambiguous, use namespace/name",
                self.state.name
            ),
        }
    }

    fn node(&self, node: &str) -> Result<&LabNode> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == node)
            .with_context(|| format!("lab {}: no node {node:?}", self.state.name))
    }

    pub fn node_netns(&self, node: &str) -> Result<String> {
        Ok(self.node(node)?.netns.clone())
    }

    pub fn agent_socket(&self, node: &str) -> PathBuf {
        self.state_dir().join(format!("{node}.sock"))
    }

    /// The cgroup the node's agents run in (during an upgrade, the draining one too).
    pub fn agent_cgroup(&self, node: &str) -> Result<PathBuf> {
        Ok(self.node(node)?.cgroup.join(naming::AGENT_CGROUP))
    }

    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.logs_dir().join(format!("combd-{node}.log"))
    }

    pub fn pod_log(&self, pod: &LabPod) -> PathBuf {
        self.logs_dir()
            .join(format!("{}_{}.log", pod.namespace, pod.name))
    }

    /// A command that runs inside the pod's network namespace and cgroup.
    pub fn command(&self, pod: &str, program: &str, args: &[&str]) -> Result<Command> {
        let pod = self.pod(pod)?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        process::place(&mut cmd, Some(&pod.netns), &pod.cgroup, false)?;
        Ok(cmd)
    }

    /// A command that runs inside the node's network namespace (in cgroup `<node>/_node`).
    pub fn node_command(&self, node: &str, program: &str, args: &[&str]) -> Result<Command> {
        let n = self.node(node)?;
        let cg = n.cgroup.join(naming::NODE_CGROUP);
        cgroup::create(&self.state.cgroup2, &cg)?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        process::place(&mut cmd, Some(&n.netns), &cg, false)?;
        Ok(cmd)
    }

    /// A command in the router namespace of a multi-node lab: a host outside the cluster
    /// (its address, 198.18.254.254, is neither a pod nor a node).
    pub fn router_command(&self, program: &str, args: &[&str]) -> Result<Command> {
        let router =
            self.state.router_netns.as_ref().with_context(|| {
                format!("lab {} has one node and so no router", self.state.name)
            })?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", router, program]).args(args);
        Ok(cmd)
    }

    /// Where the node's agent keeps what must survive its restarts (identity numbers).
    pub fn agent_state_dir(&self, node: &str) -> PathBuf {
        self.state_dir().join(format!("{node}-agent"))
    }

    /// Start the node's combd and wait for its admin socket.
    pub fn start_agent(&self, node: &str) -> Result<()> {
        let cg = self.node(node)?.cgroup.join(naming::AGENT_CGROUP);
        cgroup::create(&self.state.cgroup2, &cg)?;
        if cgroup::populated(&cg) {
            bail!("agent of node {node} is already running");
        }
        let socket = self.agent_socket(node);
        let _ = std::fs::remove_file(&socket); // stale from a killed agent
        self.spawn_agent(node, None, None)?;
        Ok(())
    }

    /// Upgrade or restart the node's combd without losing a connection (docs/upgrades.md):
    /// start a new one (`combd`, or the lab's binary) while the running one serves; it asks
    /// the running one to hand over, which then drains its proxied connections and exits on
    /// its own. Returns once the new agent answers on the admin socket; its pid.
    pub fn upgrade_agent(&self, node: &str, combd: Option<&Path>) -> Result<u32> {
        let socket = self.agent_socket(node);
        let old = agent_pid(&socket).with_context(|| {
            format!(
                "the agent of node {node} does not answer on {}",
                socket.display()
            )
        })?;
        self.spawn_agent(node, combd, Some(old))
    }

    /// The agent's process, in the node's agent cgroup; waits until it answers on the admin
    /// socket (and, with `replacing`, is not that pid any more).
    fn spawn_agent(&self, node: &str, combd: Option<&Path>, replacing: Option<u32>) -> Result<u32> {
        let agent = self
            .state
            .agent
            .as_ref()
            .with_context(|| format!("lab {} has no agent options", self.state.name))?;
        let n = self.node(node)?;
        if !n.agent {
            bail!("node {node} runs no Comb agent (Node annotation comb.dev/agent: \"false\")");
        }
        let cg = n.cgroup.join(naming::AGENT_CGROUP);
        cgroup::create(&self.state.cgroup2, &cg)?;
        comb_host::ensure_bpffs()?;
        let socket = self.agent_socket(node);
        let log = self.agent_log(node);
        let mut cmd = Command::new(combd.unwrap_or(&agent.combd));
        cmd.arg("--node").arg(node);
        match &self.state.kube {
            Some(kube) => {
                cmd.arg("--kubeconfig").arg(&kube.kubeconfig);
                cmd.arg("--cni-spool")
                    .arg(kubelet::spool_dir(&self.state.name, node));
                cmd.arg("--kubelet-cgroup-root")
                    .arg(naming::node_cgroup(&self.state.name, node).join(naming::KUBEPODS_CGROUP));
            }
            None => {
                cmd.arg("--manifests").arg(self.manifests_dir());
            }
        }
        cmd.arg("--admin-socket").arg(&socket);
        // The socket LB serves the node's cgroup subtree (its pods and node processes),
        // never the host's root cgroup.
        cmd.arg("--lb-cgroup")
            .arg(Path::new("/").join(naming::node_cgroup(&self.state.name, node)));
        cmd.arg("--pin-dir")
            .arg(naming::pin_dir(&self.state.name, node));
        cmd.arg("--state-dir").arg(self.agent_state_dir(node));
        if let Some(ca) = &self.state.ca {
            cmd.arg("--ca-address").arg(&ca.listen);
            cmd.arg("--ca-root-cert").arg(self.ca_root_cert());
            cmd.arg("--ca-token-file").arg(self.ca_token_file(node));
        }
        cmd.args(&agent.extra_args);
        let pid = process::spawn_detached(cmd, Some(&n.netns), &cg, &log)?;
        self.children.lock().unwrap().push(pid);
        let deadline = Instant::now() + AGENT_SOCKET_TIMEOUT;
        let answering = || match replacing {
            None => socket.exists(),
            Some(_) => agent_pid(&socket).is_some_and(|p| p == pid),
        };
        while !answering() {
            process::reap(&[pid]);
            if !process::alive(pid) {
                bail!(
                    "combd for node {node} exited before answering on {}; log tail:\n{}",
                    socket.display(),
                    process::log_tail(&log, 20)
                );
            }
            if Instant::now() > deadline {
                process::kill_pid(pid);
                bail!(
                    "combd for node {node} did not answer on {} within {AGENT_SOCKET_TIMEOUT:?}; log tail:\n{}",
                    socket.display(),
                    process::log_tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(pid)
    }

    /// SIGTERM the node's combd (it detaches its programs), SIGKILL after 5 s.
    pub fn stop_agent(&self, node: &str) -> Result<()> {
        let cg = self.node(node)?.cgroup.join(naming::AGENT_CGROUP);
        process::stop_cgroup(&self.state.cgroup2, &cg, AGENT_STOP_GRACE)?;
        process::reap(&self.children.lock().unwrap());
        let _ = std::fs::remove_file(self.agent_socket(node));
        Ok(())
    }

    /// SIGKILL the node's combd (a crash: nothing is cleaned up; the pins stay for the next
    /// agent). Returns once its cgroup is empty.
    pub fn kill_agent(&self, node: &str) -> Result<()> {
        let cg = self.node(node)?.cgroup.join(naming::AGENT_CGROUP);
        cgroup::kill_all(&self.state.cgroup2, &cg, Duration::from_secs(5))?;
        process::reap(&self.children.lock().unwrap());
        Ok(())
    }

    /// The CA's directory: its keys, `root-cert.pem`, the tokens file and each node's token.
    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir().join("ca")
    }

    /// The root the agents trust (written by the CA when it is serving).
    pub fn ca_root_cert(&self) -> PathBuf {
        self.ca_dir().join("root-cert.pem")
    }

    pub fn ca_token_file(&self, node: &str) -> PathBuf {
        self.ca_dir().join(format!("{node}.token"))
    }

    pub fn ca_log(&self) -> PathBuf {
        self.logs_dir().join("ca.log")
    }

    /// One random token per node, in the CA's tokens file and in a file of the node's own
    /// (mode 0600). Nodes without a Comb agent get one too: it is what their own node agent
    /// (e.g. a ztunnel pointed at the CA) authenticates with.
    fn write_ca_tokens(&self) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.ca_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut all = String::from("# TOKEN NODE (written by comb lab)\n");
        for n in self.state.nodes.iter() {
            let b: [u8; 16] = rand::random();
            let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
            all.push_str(&format!("{token} {}\n", n.name));
            let path = self.ca_token_file(&n.name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.write_all(token.as_bytes())?;
        }
        state::write_atomic(&dir.join("tokens"), &all)
    }

    /// Start the lab's CA (`comb ca`) and wait until it serves (it writes root-cert.pem
    /// once listening).
    pub fn start_ca(&self) -> Result<()> {
        let ca = self
            .state
            .ca
            .as_ref()
            .with_context(|| format!("lab {} has no CA", self.state.name))?;
        if !ca.comb.is_file() {
            bail!(
                "the lab's CA needs the comb binary at {} (beside combd); build it with `cargo build --workspace --bins`",
                ca.comb.display()
            );
        }
        cgroup::create(&self.state.cgroup2, &ca.cgroup)?;
        if cgroup::populated(&ca.cgroup) {
            bail!("the CA of lab {} is already running", self.state.name);
        }
        let root = self.ca_root_cert();
        let _ = std::fs::remove_file(&root);
        let log = self.ca_log();
        let mut cmd = Command::new(&ca.comb);
        cmd.arg("ca")
            .arg("--listen")
            .arg(&ca.listen)
            .arg("--dir")
            .arg(self.ca_dir())
            .arg("--tokens")
            .arg(self.ca_dir().join("tokens"))
            .arg("--manifests")
            .arg(self.manifests_dir());
        let pid = process::spawn_detached(cmd, Some(&ca.netns), &ca.cgroup, &log)?;
        self.children.lock().unwrap().push(pid);
        let deadline = Instant::now() + CA_START_TIMEOUT;
        while !root.exists() {
            process::reap(&[pid]);
            if !cgroup::populated(&ca.cgroup) {
                bail!(
                    "the CA exited before serving; log tail:\n{}",
                    process::log_tail(&log, 20)
                );
            }
            if Instant::now() > deadline {
                let _ =
                    process::stop_cgroup(&self.state.cgroup2, &ca.cgroup, Duration::from_secs(1));
                bail!(
                    "the CA did not serve within {CA_START_TIMEOUT:?}; log tail:\n{}",
                    process::log_tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGTERM the CA, SIGKILL after 5 s. Its keys stay (a restart serves the same root).
    pub fn stop_ca(&self) -> Result<()> {
        let ca = self
            .state
            .ca
            .as_ref()
            .with_context(|| format!("lab {} has no CA", self.state.name))?;
        process::stop_cgroup(&self.state.cgroup2, &ca.cgroup, AGENT_STOP_GRACE)?;
        process::reap(&self.children.lock().unwrap());
        Ok(())
    }

    fn build(&mut self, inputs: &spec::Inputs) -> Result<()> {
        let st = &self.state;
        let dir = self.state_dir();
        for d in [dir.clone(), self.manifests_dir(), self.logs_dir()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        st.save(&dir.join("state.json"))?;
        build_network(st, &st.pods)?;
        for n in &st.nodes {
            cgroup::create(&st.cgroup2, &n.cgroup)?;
        }
        for p in &st.pods {
            cgroup::create(&st.cgroup2, &p.cgroup)?;
        }
        let manifests = self.manifests_dir();
        state::write_atomic(&manifests.join("nodes.yaml"), &state::nodes_yaml(st)?)?;
        state::write_atomic(
            &manifests.join("pods.yaml"),
            &state::pods_yaml(st, &inputs.pods)?,
        )?;
        if !inputs.others.is_empty() {
            state::write_atomic(
                &manifests.join("resources.yaml"),
                &state::others_yaml(&inputs.others)?,
            )?;
        }
        // Agents before pod processes, as on a real node: the datapath is in place before the
        // first connection.
        if st.agent.is_some() {
            if st.ca.is_some() {
                self.write_ca_tokens()?;
                self.start_ca()?;
            }
            for n in st.nodes.iter().filter(|n| n.agent) {
                self.start_agent(&n.name)?;
            }
        }
        let mut pids = Vec::new();
        for (pod, spec) in st.pods.iter().zip(&inputs.pods) {
            pids.push(self.start_pod_process(pod, spec)?);
        }
        for (pod, pid) in self.state.pods.iter_mut().zip(pids) {
            pod.pid = pid;
        }
        self.state.save(&dir.join("state.json"))
    }

    /// Kubernetes mode: nodes, control plane, kubelet stand-ins, agents, then the objects
    /// through the API, the Pods one at a time (so each node hands out addresses in manifest
    /// order, as the directory-mode lab does).
    fn build_kubernetes(&mut self, inputs: &spec::Inputs) -> Result<()> {
        let dir = self.state_dir();
        for d in [dir.clone(), self.logs_dir()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let planned = std::mem::take(&mut self.state.pods);
        self.state.save(&dir.join("state.json"))?;
        build_network(&self.state, &[])?;
        let st = &self.state;
        for n in &st.nodes {
            cgroup::create(&st.cgroup2, &n.cgroup)?;
        }
        let kube_cg = st
            .cgroup2
            .join(naming::lab_cgroup(&st.name))
            .join(naming::KUBE_CGROUP);
        cgroup::create(&st.cgroup2, &kube_cg)?;
        let comb = locate::combd_path()?.with_file_name("comb");
        if !comb.is_file() {
            bail!(
                "a Kubernetes lab needs the comb binary at {} (beside combd); build it with `cargo build --workspace --bins`",
                comb.display()
            );
        }
        let cluster = KubeCluster::start(KubeOptions {
            netns: None,
            controller_manager: true,
            dir: Some(dir.join("kube")),
            cgroup: Some(kube_cg),
        })?;
        self.state.kube = Some(LabKube {
            dir: cluster.dir().to_path_buf(),
            kubeconfig: cluster.kubeconfig().to_path_buf(),
            api_port: cluster.api_port(),
            comb,
        });
        self.state.save(&dir.join("state.json"))?;
        cluster.install_crds(LAB_CRDS)?;
        for n in &self.state.nodes {
            self.start_kubelet(&n.name)?;
        }
        self.wait_nodes_registered()?;
        if self.state.agent.is_some() {
            for n in self.state.nodes.iter().filter(|n| n.agent) {
                self.start_agent(&n.name)?;
            }
        }
        let served = self.kubectl(&["api-versions"])?;
        let objects = kube_objects::prepare(&inputs.others, &inputs.pods, &served)?;
        if !objects.namespaces.is_empty() {
            self.kube_apply(&objects.namespaces)?;
        }
        if !objects.others.is_empty() {
            self.kube_apply(&objects.others)?;
        }
        let mut pods = Vec::new();
        for (spec, yaml) in inputs.pods.iter().zip(&objects.pods) {
            self.kube_apply(yaml)
                .with_context(|| format!("creating pod {}", spec.key()))?;
            let pod = self.wait_kube_pod(spec)?;
            if let Some(want) = planned.iter().find(|p| p.key() == spec.key())
                && want.ip != pod.ip
            {
                tracing::warn!(pod = %spec.key(), planned = %want.ip, got = %pod.ip, "the pod's address differs from the directory-mode lab's");
            }
            pods.push(pod);
        }
        self.state.pods = pods;
        self.state.save(&dir.join("state.json"))?;
        // From here on the lab's teardown stops the control plane.
        cluster.detach();
        Ok(())
    }

    pub fn kubelet_log(&self, node: &str) -> PathBuf {
        self.logs_dir().join(format!("kubelet-{node}.log"))
    }

    /// Start node `node`'s kubelet stand-in (`comb lab kubelet`) in the node's
    /// `_kubelet` cgroup, in the machine's namespace (it reaches the API server there).
    fn start_kubelet(&self, node: &str) -> Result<()> {
        let kube = self.kube()?;
        let cg = self.node(node)?.cgroup.join(naming::KUBELET_CGROUP);
        cgroup::create(&self.state.cgroup2, &cg)?;
        let mut cmd = Command::new(&kube.comb);
        cmd.args(["lab", "kubelet", "--name", &self.state.name, "--node", node]);
        let pid = process::spawn_detached(cmd, None, &cg, &self.kubelet_log(node))?;
        self.children.lock().unwrap().push(pid);
        Ok(())
    }

    fn wait_nodes_registered(&self) -> Result<()> {
        let deadline = Instant::now() + KUBE_NODE_TIMEOUT;
        loop {
            let out =
                self.kubectl(&["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"])?;
            let have: Vec<&str> = out.split_whitespace().collect();
            let missing: Vec<&str> = self
                .state
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .filter(|n| !have.contains(n))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let n = missing[0];
                bail!(
                    "node {n} was not registered within {KUBE_NODE_TIMEOUT:?}; its kubelet's log:\n{}",
                    process::log_tail(&self.kubelet_log(n), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until the pod's sandbox exists; its lab view.
    fn wait_kube_pod(&self, spec: &PodSpec) -> Result<LabPod> {
        let dir = kubelet::records_dir(&self.state.name, &spec.node);
        let deadline = Instant::now() + KUBE_POD_TIMEOUT;
        loop {
            if let Some(r) = kubelet::sandbox::load_records(&dir)
                .into_iter()
                .find(|r| r.pod.key() == spec.key())
            {
                return Ok(r.pod);
            }
            if Instant::now() > deadline {
                bail!(
                    "pod {} got no sandbox within {KUBE_POD_TIMEOUT:?}; the kubelet's log on {}:\n{}",
                    spec.key(),
                    spec.node,
                    process::log_tail(&self.kubelet_log(&spec.node), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_pod_process(&self, pod: &LabPod, spec: &PodSpec) -> Result<Option<u32>> {
        let Some((program, args)) = spec.command.split_first() else {
            return Ok(None);
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("POD_NAME", &pod.name)
            .env("POD_NAMESPACE", &pod.namespace)
            .env("POD_IP", pod.ip.to_string())
            .env("NODE_NAME", &pod.node)
            .envs(spec.env.iter().map(|(k, v)| (k, v)));
        let pid = process::spawn_detached(cmd, Some(&pod.netns), &pod.cgroup, &self.pod_log(pod))
            .with_context(|| format!("starting the command of pod {}", pod.key()))?;
        self.children.lock().unwrap().push(pid);
        Ok(Some(pid))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(e) = teardown::teardown(&self.state.name) {
            eprintln!("comb-lab: tearing down lab {}: {e:#}", self.state.name);
        }
        process::reap(&self.children.lock().unwrap_or_else(|e| e.into_inner()));
        teardown::unregister(&self.state.name);
    }
}

/// Decide names, addresses and cgroups for every node and pod; no side effects.
fn plan(
    opts: &LabOptions,
    inputs: &spec::Inputs,
    cgroup2: PathBuf,
    kubernetes: bool,
) -> Result<LabState> {
    let pods = &inputs.pods;
    let lab = &opts.name;
    let mut nodes: Vec<LabNode> = Vec::new();
    let mut per_node: Vec<usize> = Vec::new();
    let mut lab_pods = Vec::new();
    for p in pods {
        let k = match nodes.iter().position(|n| n.name == p.node) {
            Some(i) => i,
            None => {
                if nodes.len() == naming::MAX_NODES {
                    bail!("more than {} nodes", naming::MAX_NODES);
                }
                let index = nodes.len() + 1;
                nodes.push(LabNode {
                    name: p.node.clone(),
                    index,
                    netns: naming::node_netns(lab, &p.node),
                    pod_cidr: naming::node_cidr(index),
                    cgroup: cgroup2.join(naming::node_cgroup(lab, &p.node)),
                    uplink_ip: None,
                    agent: true,
                    annotations: Default::default(),
                });
                per_node.push(0);
                index - 1
            }
        };
        if per_node[k] == naming::MAX_PODS_PER_NODE {
            bail!(
                "node {} has more than {} pods",
                p.node,
                naming::MAX_PODS_PER_NODE
            );
        }
        let ip = naming::pod_ip(nodes[k].index, per_node[k]);
        per_node[k] += 1;
        lab_pods.push(LabPod {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            node: p.node.clone(),
            ip,
            netns: naming::pod_netns(lab, &p.node, &p.namespace, &p.name),
            host_veth: naming::host_veth(ip),
            cgroup: cgroup2.join(naming::pod_cgroup(lab, &p.node, &p.namespace, &p.name)),
            labels: p.labels.clone(),
            service_account: p.service_account.clone(),
            pid: None,
        });
    }
    for (name, annotations) in &inputs.node_annotations {
        let Some(n) = nodes.iter_mut().find(|n| n.name == *name) else {
            bail!(
                "Node {name} has no pod in the lab manifests (lab nodes come from pods' spec.nodeName)"
            );
        };
        n.agent = annotations
            .get(comb_model::mesh::ANNOTATION_NODE_AGENT)
            .map(String::as_str)
            != Some("false");
        n.annotations = annotations.clone();
    }
    let router_netns = (nodes.len() > 1).then(|| naming::router_netns(lab));
    if router_netns.is_some() {
        for n in &mut nodes {
            n.uplink_ip = Some(naming::uplink_ip(n.index));
        }
    }
    // Sanitizing and truncation could in theory map two objects onto one namespace.
    let mut seen = std::collections::BTreeMap::new();
    let all = nodes
        .iter()
        .map(|n| (n.netns.clone(), format!("node {}", n.name)))
        .chain(
            lab_pods
                .iter()
                .map(|p| (p.netns.clone(), format!("pod {}", p.key()))),
        )
        .chain(
            router_netns
                .iter()
                .map(|r| (r.clone(), "the router".to_string())),
        );
    for (ns, what) in all {
        if let Some(prev) = seen.insert(ns.clone(), what.clone()) {
            bail!("{prev} and {what} would share network namespace {ns}; rename one");
        }
    }
    // The CA runs whenever agents do: in the router namespace when there is one (every node
    // reaches 198.18.254.254), else beside the single node's agent on its loopback.
    // A Kubernetes-mode lab has no CA: a cluster's CA authenticates agents by their pods'
    // ServiceAccount tokens (docs/kubernetes.md), which a lab's agents do not run as.
    let ca = match &opts.agent {
        Some(a) if !kubernetes && nodes.iter().any(|n| n.agent) => Some(LabCa {
            comb: a.combd.with_file_name("comb"),
            netns: router_netns
                .clone()
                .unwrap_or_else(|| nodes[0].netns.clone()),
            listen: match &router_netns {
                Some(_) => format!("{}:{}", naming::ROUTER_IP, naming::CA_PORT),
                None => format!("127.0.0.1:{}", naming::CA_PORT),
            },
            cgroup: cgroup2
                .join(naming::lab_cgroup(lab))
                .join(naming::CA_CGROUP),
        }),
        _ => None,
    };
    Ok(LabState {
        name: lab.clone(),
        cgroup2,
        nodes,
        pods: lab_pods,
        router_netns,
        agent: opts.agent.clone(),
        ca,
        kube: None,
    })
}

/// Namespaces, veths, addresses and routes. Pure routing, no bridges: each pod's host veth
/// carries the gateway address and a /32 route to the pod.
fn build_network(st: &LabState, pods: &[LabPod]) -> Result<()> {
    // IPv6 off everywhere: the lab is IPv4, and DAD/router solicitations only add noise.
    const NO_V6: [(&str, &str); 2] = [
        ("net/ipv6/conf/all/disable_ipv6", "1"),
        ("net/ipv6/conf/default/disable_ipv6", "1"),
    ];
    let routing = [
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/default/rp_filter", "0"),
    ];
    let mut node_ns: Vec<&str> = st.nodes.iter().map(|n| n.netns.as_str()).collect();
    node_ns.extend(st.router_netns.as_deref());
    for ns in node_ns {
        netns::add(ns)?;
        netns::sysctls(ns, &[&routing[..], &NO_V6[..]].concat())?;
        netns::ip_batch(ns, &["link set lo up".to_string()])?;
    }
    if let Some(router) = &st.router_netns {
        let r = naming::ROUTER_IP;
        for n in &st.nodes {
            let up = n.uplink_ip.expect("uplink set with a router");
            let rv = naming::router_veth(n.index);
            netns::ip_batch(
                &n.netns,
                &[
                    format!("link add uplink type veth peer name {rv} netns {router}"),
                    format!("addr add {up}/32 dev uplink"),
                    "link set uplink up".into(),
                    format!("route add {r}/32 dev uplink scope link"),
                    format!("route add default via {r} dev uplink"),
                ],
            )?;
            netns::ip_batch(
                router,
                &[
                    format!("addr add {r}/32 dev {rv}"),
                    format!("link set {rv} up"),
                    format!("route add {up}/32 dev {rv} scope link"),
                    format!("route add {} via {up} dev {rv}", n.pod_cidr),
                ],
            )?;
        }
    }
    for p in pods {
        let node = st.nodes.iter().find(|n| n.name == p.node).expect("planned");
        let gw = naming::node_gateway(node.index);
        netns::add(&p.netns)?;
        netns::sysctls(&p.netns, &NO_V6)?;
        netns::ip_batch(
            &p.netns,
            &[
                format!(
                    "link add eth0 type veth peer name {} netns {}",
                    p.host_veth, node.netns
                ),
                format!("addr add {}/32 dev eth0", p.ip),
                "link set lo up".into(),
                "link set eth0 up".into(),
                format!("route add {gw}/32 dev eth0 scope link"),
                format!("route add default via {gw} dev eth0"),
            ],
        )?;
        netns::ip_batch(
            &node.netns,
            &[
                format!("addr add {gw}/32 dev {}", p.host_veth),
                format!("link set {} up", p.host_veth),
                format!("route add {}/32 dev {} scope link", p.ip, p.host_veth),
            ],
        )?;
    }
    Ok(())
}

/// Remove lab `name` by name alone, also when its state.json is missing (crashed `up`).
pub fn teardown(name: &str) -> Result<()> {
    naming::validate_lab_name(name)?;
    teardown::teardown(name)
}

/// For tests and tools: where a lab's state would be.
pub fn state_dir(name: &str) -> PathBuf {
    naming::state_dir(name)
}

/// The pid of the agent answering on `socket` (its `status`), if one answers.
fn agent_pid(socket: &Path) -> Option<u32> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    v.get("data")?
        .get("pid")?
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
}
