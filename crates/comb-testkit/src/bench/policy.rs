//! `comb bench policy`: identity policy enforced against the same lab with no policy, in one
//! run; and how long a manifest change takes to be enforced.
//!
//! The lab: one node, a client and a server pod, both with `comb.dev/splice: "off"` so TCP
//! data crosses the veths and the policy programs on them. The agent runs the whole time, so
//! the policy programs are attached (and track connections) in both arms; the arms differ only
//! in whether the policy objects are in the manifests directory:
//!
//! - baseline: no NetworkPolicy or AuthorizationPolicy (the server's ingress is not enforced);
//! - comb: 200 NetworkPolicies selecting the server, one per peer identity, each allowing its
//!   identity on 5 TCP ports (one in ten with a port range) out of a pool of 32 the server
//!   exposes: 1,000 identity × port rules over 200 identities. Plus an Istio ALLOW
//!   AuthorizationPolicy (the four bench namespaces, the pool's ports) and a DENY one (one
//!   synthetic principal), so both layers are compiled into the server's entries. The client is
//!   identity 136 (not the first policy); it is allowed on `RR_PORT` and `CONN_PORT`, and
//!   denied on `FLIP_PORT`, which is checked before every comb arm.
//!
//! The 199 other identities belong to synthetic pods that exist only in the manifests: on a
//! fake node (`remote1`, a Node object whose podCIDRs hold their `status.podIP`s), in four
//! namespaces, no network namespaces or processes. They stay in both arms, so the ipcache is
//! the same and only the policy differs.
//!
//! Metrics:
//! - `rr_p50`/`rr_p99`: sockperf TCP ping-pong (64 B, one connection) client → server; the
//!   percentiles of each run, median over the pairs. Conntrack judges only new flows, so this
//!   is mostly the per-packet cost of the programs with 1,000 rules loaded.
//! - `conn_rate`: `comb probe connrate` (connect, 1 byte, server closes) client → server,
//!   connections per second: every connection is a new flow, judged by the policy lookup.
//! - `update_p50_ms`/`update_p99_ms`: with 1,000 synthetic pods (200 identities × 5 replicas)
//!   and 500 policies in the manifests, one NetworkPolicy (`flip`) is rewritten so that the
//!   client's flow to `FLIP_PORT` flips between allowed and denied. Time from the atomic rename
//!   into the manifests directory until the flip is seen from the client's network namespace:
//!   a prober thread (setns into the client pod's netns; not in its cgroup, which the policy
//!   programs do not look at) starts a non-blocking connect every millisecond; a connect
//!   that does not complete in `DENY_AFTER` counts as denied (the program drops the SYN); the
//!   flip time is the start of the first of `RUN` consecutive attempts that all see the new
//!   state. The new file is written in the lab's state directory and renamed into the
//!   manifests directory (same filesystem), so the rename is the one event the agent's watcher
//!   sees; `--tmp-in-dir` instead writes it as a dotfile inside the directory right before the
//!   rename, as `comb apply` does. Samples are spaced by a random delay so they do not lock
//!   onto the agent's fallback polling. Baseline: none (NaN in the table, `null` in JSON),
//!   ratio = the comb value. With fewer than 100 samples the nearest-rank p99 is the maximum.
//!
//! The run also reports (on stderr, not in `--json`) where the update time goes: when the
//! change replaced the agent's State and when its datapath held it completely (the
//! generation's `replaced_at` and `applied_at` from `comb status`, read after the sample), and
//! this process's own timing of the agent's steps on the same directory: reading and parsing
//! it (`load_dir`), validating and converting it (`build_snapshot`), and the agent's pipeline
//! (`comb_model::pipeline::compute`: identities, the local pods' policy entries, Service
//! frontends, the proxy table) — the same function the agent runs.
//!
//! Knobs: `--pairs` (default 5), `--secs` per measurement (default 3), `--samples` for the
//! update latency (default 40), `--parallel` connrate threads (default 2), `--poll-ms` to pass
//! the agent a manifests polling interval other than its default and `--tmp-in-dir` (both
//! named in the output when used). About two minutes with the defaults.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use comb_api::{EndpointPolicy, Query, Status};
use comb_lab::Lab;
use rand::Rng;

use super::flip_probe::{FLIP_TIMEOUT, Prober};
use super::report::{Metric, Report, median, percentile};
use super::{Common, lab, tools};
use comb_api::client;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Manifest changes timed for the update latency.
    #[arg(long, default_value = "40")]
    pub samples: usize,
    /// Client threads of `comb probe connrate`, each one connection at a time.
    #[arg(long, default_value = "2")]
    pub parallel: usize,
    /// Pass the agent `--poll-ms` (its manifests polling interval); default: the agent's own.
    #[arg(long)]
    pub poll_ms: Option<u64>,
    /// Write each change's temporary file inside the manifests directory right before the
    /// rename, as `comb apply` does (default: next to it, so only the rename is an event).
    #[arg(long)]
    pub tmp_in_dir: bool,
}

const NS: &str = "bench";
/// Namespaces of the identities; identity k lives in `NAMESPACES[k % 4]`.
const NAMESPACES: [&str; 4] = [NS, "bench-a", "bench-b", "bench-c"];
const IDENTITIES: usize = 200;
/// The real client's identity (namespace `bench`; not the first policy in any order).
const CLIENT_K: usize = 136;
/// The synthetic principal the DENY AuthorizationPolicy names (identity 6, in bench-b).
const DENIED_K: usize = 6;
const PORTS_PER_IDENTITY: usize = 5;
/// The server's port pool: POOL_BASE .. POOL_BASE + POOL_SIZE.
const POOL_BASE: u16 = 8000;
const POOL_SIZE: u16 = 32;
/// Both among the client's ports (unit-tested).
const RR_PORT: u16 = 8010;
const CONN_PORT: u16 = 8016;
/// Allowed for the client only by the `flip` policy (update phase); denied in the comb arm.
const FLIP_PORT: u16 = 9000;
/// Where `flip` points when the client's flow to FLIP_PORT is to be denied.
const FLIP_OTHER_PORT: u16 = 9001;
/// Update phase: replicas per identity (1,000 pods) and policies in all.
const REPLICAS: usize = 5;
const POLICIES: usize = 500;
/// Fake node of the synthetic pods and its pod range (2,048 addresses).
const FAKE_NODE: &str = "remote1";
const FAKE_CIDR: &str = "198.18.128.0/21";
const FAKE_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 2);
const FAKE_NODE_IP: &str = "198.18.136.1";

const PODS_FILE: &str = "bench-policy-pods.yaml";
const SYNTH_FILE: &str = "bench-policy-synthetic.yaml";
const POLICY_FILE: &str = "bench-policy-policies.yaml";
const FLIP_FILE: &str = "bench-policy-flip.yaml";

const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

fn ns(k: usize) -> &'static str {
    NAMESPACES[k % NAMESPACES.len()]
}

fn app(k: usize) -> String {
    format!("w{k:03}")
}

fn sa(k: usize) -> String {
    format!("sa-w{k:03}")
}

/// Identity k's allowed ports on the server: (port, endPort).
fn ports(k: usize) -> Vec<(u16, Option<u16>)> {
    (0..PORTS_PER_IDENTITY)
        .map(|j| {
            let p = POOL_BASE + ((k * 7 + j * 6) % usize::from(POOL_SIZE)) as u16;
            if k % 10 == 3 && j == PORTS_PER_IDENTITY - 1 {
                let end = (p + 3).min(POOL_BASE + POOL_SIZE - 1);
                (p, Some(end))
            } else {
                (p, None)
            }
        })
        .collect()
}

/// A NetworkPolicy peer naming identity k's pods (any namespace).
fn peer(k: usize, indent: &str) -> String {
    format!(
        "{indent}- namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {}}}}}\n{indent}  podSelector: {{matchLabels: {{app: {}}}}}\n",
        ns(k),
        app(k)
    )
}

/// The lab's real pods (the lab adds IPs, cgroups and interfaces).
fn real_pods() -> String {
    let pod = |name: &str, labels: &str, sa: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {labels}\n  annotations: {{comb.dev/splice: \"off\"}}\nspec:\n  nodeName: node1\n  serviceAccountName: {sa}\n  containers: [{{name: c, image: none}}]\n---\n"
        )
    };
    pod(
        "client",
        &format!("{{app: {}}}", app(CLIENT_K)),
        &sa(CLIENT_K),
    ) + &pod("server", "{app: server}", "server")
}

/// The fake node and `replicas` synthetic pods per identity; identity CLIENT_K's only when
/// `with_client_identity` (the real client always has it).
fn synthetic_yaml(replicas: usize, with_client_identity: bool) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {FAKE_NODE}}}\nspec: {{podCIDR: \"{FAKE_CIDR}\", podCIDRs: [\"{FAKE_CIDR}\"]}}\nstatus: {{addresses: [{{type: InternalIP, address: \"{FAKE_NODE_IP}\"}}]}}\n---\n"
    );
    for (ns, _) in NAMESPACES.iter().zip(0..) {
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n"
        );
    }
    let mut n = 0u32;
    for k in 0..IDENTITIES {
        if k == CLIENT_K && !with_client_identity {
            continue;
        }
        for r in 0..replicas {
            let ip = Ipv4Addr::from(u32::from(FAKE_BASE) + n);
            n += 1;
            let _ = write!(
                s,
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}-r{r}, namespace: {}, labels: {{app: {}}}}}\nspec: {{nodeName: {FAKE_NODE}, serviceAccountName: {}, containers: [{{name: c, image: none}}]}}\nstatus: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n---\n",
                app(k),
                ns(k),
                app(k),
                sa(k)
            );
        }
    }
    s
}

/// 200 NetworkPolicies on the server (1,000 identity × port rules) and the two
/// AuthorizationPolicies.
fn server_policies_yaml() -> String {
    let mut s = String::new();
    for k in 0..IDENTITIES {
        let ports: String = ports(k)
            .iter()
            .map(|(p, end)| match end {
                Some(e) => format!("{{protocol: TCP, port: {p}, endPort: {e}}}"),
                None => format!("{{protocol: TCP, port: {p}}}"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            s,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server-from-{}, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n{}    ports: [{ports}]\n---\n",
            app(k),
            peer(k, "    ")
        );
    }
    let pool: Vec<String> = (POOL_BASE..POOL_BASE + POOL_SIZE)
        .chain([FLIP_PORT, FLIP_OTHER_PORT])
        .map(|p| format!("\"{p}\""))
        .collect();
    let namespaces: Vec<String> = NAMESPACES.iter().map(|n| format!("\"{n}\"")).collect();
    let _ = write!(
        s,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: server-allow-mesh, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: ALLOW\n  rules:\n  - from: [{{source: {{namespaces: [{}]}}}}]\n    to: [{{operation: {{ports: [{}]}}}}]\n---\n",
        namespaces.join(", "),
        pool.join(", ")
    );
    let _ = write!(
        s,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: server-deny-one, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/{}/sa/{}\"]}}}}]\n---\n",
        ns(DENIED_K),
        sa(DENIED_K)
    );
    s
}

/// `n` NetworkPolicies among the synthetic workloads (none selects a local pod): workload k
/// accepts port 8080 from two other workloads.
fn other_policies_yaml(n: usize) -> String {
    let mut s = String::new();
    let targets = (0..IDENTITIES).filter(|&k| k != CLIENT_K).cycle();
    for (i, k) in targets.take(n).enumerate() {
        let (a, b) = ((k + 1 + i) % IDENTITIES, (k + 7 + 3 * i) % IDENTITIES);
        let _ = write!(
            s,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {}-in-{i:03}, namespace: {}}}\nspec:\n  podSelector: {{matchLabels: {{app: {}}}}}\n  ingress:\n  - from:\n{}{}    ports: [{{protocol: TCP, port: 8080}}]\n---\n",
            app(k),
            ns(k),
            app(k),
            peer(a, "    "),
            peer(b, "    ")
        );
    }
    s
}

/// The policy the update latency flips: the client may reach FLIP_PORT (`allowed`) or only
/// FLIP_OTHER_PORT. The comment makes the two states differ in size as well as content.
fn flip_yaml(allowed: bool, sample: usize) -> String {
    let (port, state) = if allowed {
        (FLIP_PORT, "allowed")
    } else {
        (FLIP_OTHER_PORT, "denied")
    };
    format!(
        "# comb bench policy: sample {sample}, client -> server:{FLIP_PORT} {state}\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: flip, namespace: {NS}}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n{}    ports: [{{protocol: TCP, port: {port}}}]\n",
        peer(CLIENT_K, "    ")
    )
}

fn status(socket: &Path) -> Result<Status> {
    Ok(serde_json::from_value(client::call(
        socket,
        Query::Status,
    )?)?)
}

fn endpoint_policy(socket: &Path, pod: &str) -> Result<EndpointPolicy> {
    Ok(serde_json::from_value(client::call(
        socket,
        Query::EndpointPolicy { pod: pod.into() },
    )?)?)
}

/// Wait until the agent applied a generation after `before`.
fn wait_applied(socket: &Path, before: u64, timeout: Duration) -> Result<Status> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(socket)?;
        if !s.config_errors.is_empty() {
            bail!(
                "the agent rejected the bench manifests: {:?}",
                s.config_errors
            );
        }
        if s.generation > before && s.applied_generation == s.generation {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!(
                "agent did not apply the bench manifests within {timeout:?}: generation {} applied {}, datapath errors {:?}",
                s.generation,
                s.applied_generation,
                s.datapath_errors
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until the policy programs are on `pods` pods' interfaces.
fn wait_policy_endpoints(socket: &Path, pods: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(socket)?;
        if s.policy_endpoints >= pods && s.applied_generation == s.generation {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "policy programs on {} of {pods} pods after 15 s: unenforced {:?}, errors {:?}",
                s.policy_endpoints,
                s.policy_unenforced,
                s.datapath_errors
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Write (or with `None` remove) manifest files at once and wait until the agent applied
/// them; returns the seconds that took (0 when nothing changed).
fn apply_files(lab: &Lab, files: &[(&str, Option<&str>)]) -> Result<f64> {
    let socket = lab.agent_socket("node1");
    let dir = lab.manifests_dir();
    let before = status(&socket)?.generation;
    let t = Instant::now();
    let mut changed = false;
    for (name, text) in files {
        let path = dir.join(name);
        let old = std::fs::read_to_string(&path).ok();
        if old.as_deref() == *text {
            continue;
        }
        changed = true;
        match text {
            Some(text) => {
                let tmp = tmp_path(lab, name, false)?;
                std::fs::write(&tmp, text)?;
                std::fs::rename(&tmp, &path)?;
            }
            None => std::fs::remove_file(&path)
                .with_context(|| format!("removing {}", path.display()))?,
        }
    }
    if changed {
        wait_applied(&socket, before, APPLY_TIMEOUT)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Where a manifest is written before it is renamed into the manifests directory: a
/// dotfile inside it (what `comb apply` does; the agent's watcher sees it being written), or
/// the lab's state directory next to it (same filesystem, so the rename stays atomic).
fn tmp_path(lab: &Lab, name: &str, in_dir: bool) -> Result<PathBuf> {
    if in_dir {
        return Ok(lab.manifests_dir().join(format!(".{name}.tmp")));
    }
    let dir = lab.state_dir().join("bench-tmp");
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(name))
}

/// Check the server's policy as the kernel holds it: enforced with entries, or open.
fn check_server_policy(lab: &Lab, enforced: bool) -> Result<EndpointPolicy> {
    let p = endpoint_policy(&lab.agent_socket("node1"), &format!("{NS}/server"))?;
    if !p.in_sync {
        bail!("the server's policy entries are not in sync with the compiled policy");
    }
    if enforced && (!p.ingress_enforced || p.entries.is_empty()) {
        bail!(
            "the server's ingress is not enforced ({} entries) with the policies in place",
            p.entries.len()
        );
    }
    if !enforced && (p.ingress_enforced || !p.entries.is_empty()) {
        bail!(
            "the server still has policy ({} entries) after the policies were removed",
            p.entries.len()
        );
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------

/// What one update sample measured, in milliseconds from the rename.
struct Sample {
    /// The client saw the new verdict.
    observed: f64,
    /// The change replaced the agent's State (noticed, read, parsed, validated), ms after the
    /// rename; from the generation's times in `comb status`.
    replaced: Option<f64>,
    /// The agent's datapath held the generation completely (pipeline and map reconcile done),
    /// ms after the rename.
    applied: Option<f64>,
}

/// One flip. The agent's status is read only after the client saw the new verdict, so the
/// measurement does not compete with the agent for the CPU.
fn update_sample(
    lab: &Lab,
    prober: &Prober,
    want_allowed: bool,
    sample: usize,
    tmp_in_dir: bool,
) -> Result<Sample> {
    let socket = lab.agent_socket("node1");
    let before = status(&socket)?;
    if before.applied_generation != before.generation {
        bail!("agent busy before sample {sample}");
    }
    let tmp = tmp_path(lab, FLIP_FILE, tmp_in_dir)?;
    std::fs::write(&tmp, flip_yaml(want_allowed, sample))?;
    let dst = lab.manifests_dir().join(FLIP_FILE);
    let rename = move || {
        std::fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))
    };
    let f = prober.flip(Box::new(rename), want_allowed)?;
    let after = wait_applied(&socket, before.generation, FLIP_TIMEOUT)?;
    if after.generation != before.generation + 1 {
        bail!(
            "one change made generation {} into {}",
            before.generation,
            after.generation
        );
    }
    let t0_wall = f.t0_wall.duration_since(UNIX_EPOCH)?.as_secs_f64();
    let times = after
        .generations
        .iter()
        .find(|g| g.generation == after.generation);
    Ok(Sample {
        observed: f.seen.saturating_duration_since(f.t0).as_secs_f64() * 1e3,
        replaced: times.map(|g| (g.replaced_at - t0_wall) * 1e3),
        applied: times
            .and_then(|g| g.applied_at)
            .map(|t| (t - t0_wall) * 1e3),
    })
}

/// This process's timing of what the agent does on a change, on the same directory, in
/// milliseconds (medians of 3).
struct AgentSteps {
    /// Reading the files and YAML into typed objects (`load_dir`).
    parse: f64,
    /// Validation and conversion into the model (`build_snapshot`).
    build: f64,
    /// The agent's pipeline: identities, the local pods' policy entries, Service frontends,
    /// the proxy table, the flow index.
    pipeline: f64,
}

fn agent_steps(dir: &Path) -> Result<AgentSteps> {
    use comb_model::State;
    use comb_model::identity::IdentityAllocator;
    use comb_model::pipeline::{self, PipelineConfig};
    let mut runs: [Vec<f64>; 3] = Default::default();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    for _ in 0..3 {
        let t = Instant::now();
        let docs = comb_config::load_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        runs[0].push(ms(t));
        let t = Instant::now();
        let snap = comb_config::build_snapshot(&docs).map_err(|e| anyhow::anyhow!("{e}"))?;
        runs[1].push(ms(t));
        let mut state = State::new();
        state.replace(snap);
        // The agent reads its interfaces' indexes; any distinct numbers compile the same.
        let interfaces = pipeline::interface_names(&state, "node1")
            .zip(1u32..)
            .map(|(name, i)| (name.to_owned(), i))
            .collect();
        let config = PipelineConfig {
            policy: true,
            socket_lb: true,
            proxy_cgroup: None,
            ..Default::default()
        };
        let t = Instant::now();
        let desired = pipeline::compute(
            &state,
            "node1",
            &mut IdentityAllocator::default(),
            &config,
            &interfaces,
        );
        runs[2].push(ms(t));
        ensure!(
            !desired.policy.entries.is_empty(),
            "the pipeline compiled no policy entries for the lab's pods"
        );
    }
    Ok(AgentSteps {
        parse: median(&runs[0]),
        build: median(&runs[1]),
        pipeline: median(&runs[2]),
    })
}

pub fn run(a: &Args) -> Result<Report> {
    let c = &a.common;
    if c.pairs == 0 || a.samples == 0 {
        bail!("--pairs and --samples must be at least 1");
    }
    let say = |m: String| {
        if !c.json {
            eprintln!("{m}");
        }
    };
    let comb = std::env::current_exe()?;
    let comb_s = comb.to_str().context("comb path")?.to_string();
    let poll = a.poll_ms.map(|p| p.to_string());
    let agent_args: Vec<&str> = match &poll {
        Some(p) => vec!["--poll-ms", p],
        None => vec![],
    };
    // Splice-off pods get no cgroup attachment: wait for their policy programs instead.
    let lab = lab::up("bp", &agent_args, PODS_FILE, real_pods(), 0)?;
    let socket = lab.agent_socket("node1");
    wait_policy_endpoints(&socket, 2)?;
    let server_ip = lab.pod(&format!("{NS}/server"))?.ip;
    let client_netns = lab.pod(&format!("{NS}/client"))?.netns.clone();
    let server = format!("{NS}/server");
    let _rr = tools::start_server(
        &lab,
        &server,
        "sockperf",
        &["server", "--tcp", "-p", &RR_PORT.to_string()],
        RR_PORT,
    )?;
    let _pong = tools::start_server(
        &lab,
        &server,
        &comb_s,
        &[
            "probe",
            "serve",
            "--port",
            &CONN_PORT.to_string(),
            "--mode",
            "pong",
        ],
        CONN_PORT,
    )?;
    let _flip = super::flip_probe::start_server(&lab, &server, FLIP_PORT)?;
    // The prober leaves each allowed connection in TIME_WAIT on the client: more ports.
    let out = lab
        .command(
            &format!("{NS}/client"),
            "sysctl",
            &["-qw", "net.ipv4.ip_local_port_range=10000 65000"],
        )?
        .output()?;
    if !out.status.success() {
        bail!(
            "sysctl in the client pod: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let prober = Prober::start(&client_netns, SocketAddrV4::new(server_ip, FLIP_PORT))?;
    let logs = tempfile::tempdir()?;

    // Phase 1: 200 identities, the policies on and off.
    let secs = apply_files(&lab, &[(SYNTH_FILE, Some(&synthetic_yaml(1, false)))])?;
    let st = status(&socket)?;
    say(format!(
        "199 synthetic pods applied in {secs:.1} s; {} identities",
        st.identities
    ));
    let policies = server_policies_yaml();
    let mut entries = 0;
    // (baseline, comb) runs of rr p50, rr p99, conn rate.
    let mut runs: [(Vec<f64>, Vec<f64>); 3] = Default::default();
    let server_addr = format!("{server_ip}:{CONN_PORT}");
    for pair in 0..c.pairs {
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_policy in order {
            let secs = apply_files(
                &lab,
                &[(POLICY_FILE, with_policy.then_some(policies.as_str()))],
            )?;
            let p = check_server_policy(&lab, with_policy)?;
            entries = entries.max(p.entries.len());
            // The client may reach FLIP_PORT only without policy: enforcement is live.
            if prober.once()? == with_policy {
                bail!(
                    "client -> server:{FLIP_PORT} was {} with policy {}",
                    if with_policy { "allowed" } else { "denied" },
                    if with_policy { "on" } else { "off" }
                );
            }
            let (p50, p99) = tools::sockperf_rr(
                &lab,
                &format!("{NS}/client"),
                &server_ip.to_string(),
                RR_PORT,
                1,
                c.secs,
                logs.path(),
            )?;
            let rate = tools::connrate(
                &lab,
                &format!("{NS}/client"),
                &comb,
                &["--to", &server_addr],
                c.secs,
                a.parallel,
            )?
            .per_sec;
            for (i, v) in [p50, p99, rate].into_iter().enumerate() {
                if with_policy {
                    runs[i].1.push(v)
                } else {
                    runs[i].0.push(v)
                }
            }
            say(format!(
                "pair {}/{} policy {:3} (applied in {secs:.2} s): rr p50 {p50:.2} us, p99 {p99:.2} us, {rate:.0} conn/s",
                pair + 1,
                c.pairs,
                if with_policy { "on" } else { "off" },
            ));
        }
    }
    let stats: comb_api::SpliceStats =
        serde_json::from_value(client::call(&socket, Query::SpliceStats)?)?;
    if stats.redirected_bytes != 0 {
        bail!(
            "the splice redirected {} bytes: traffic did not cross the policy programs",
            stats.redirected_bytes
        );
    }

    // Phase 2: 1,000 synthetic pods, 500 policies; flip one.
    let others = other_policies_yaml(POLICIES - IDENTITIES - 3);
    let big = format!("{policies}{others}");
    let secs = apply_files(
        &lab,
        &[
            (SYNTH_FILE, Some(&synthetic_yaml(REPLICAS, true))),
            (POLICY_FILE, Some(&big)),
            (FLIP_FILE, Some(&flip_yaml(false, 0))),
        ],
    )?;
    let st = status(&socket)?;
    say(format!(
        "update phase: {} pods in the manifests, {} policies; applied in {secs:.1} s; {} identities",
        IDENTITIES * REPLICAS + 2,
        POLICIES,
        st.identities
    ));
    check_server_policy(&lab, true)?;
    if prober.once()? {
        bail!("client -> server:{FLIP_PORT} allowed before the first flip");
    }
    let poll_ms = a.poll_ms.unwrap_or(250) as f64;
    let mut rng = rand::rng();
    let mut samples = Vec::new();
    let mut allowed = false;
    for s in 0..a.samples {
        // Random phase against the agent's polling.
        let pause = 20.0 + rng.random_range(0.0..poll_ms);
        std::thread::sleep(Duration::from_secs_f64(pause / 1e3));
        allowed = !allowed;
        let m = update_sample(&lab, &prober, allowed, s + 1, a.tmp_in_dir)?;
        say(format!(
            "  sample {:2}/{}: {:7} after {:6.1} ms",
            s + 1,
            a.samples,
            if allowed { "allowed" } else { "denied" },
            m.observed,
        ));
        samples.push(m);
    }
    drop(prober);
    let steps = agent_steps(&lab.manifests_dir())?;
    drop((_rr, _pong, _flip));
    lab.down()?;

    let mut observed: Vec<f64> = samples.iter().map(|s| s.observed).collect();
    let (p50, p99) = (
        percentile(&mut observed, 50.0),
        percentile(&mut observed, 99.0),
    );
    let settings = match (a.poll_ms, a.tmp_in_dir) {
        (None, false) => "agent defaults".to_string(),
        (p, t) => [
            p.map(|p| format!("agent --poll-ms {p}")),
            t.then(|| "temporary files in the manifests directory".to_string()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", "),
    };
    let AgentSteps {
        parse,
        build,
        pipeline,
    } = steps;
    let mut replaced: Vec<f64> = samples.iter().filter_map(|s| s.replaced).collect();
    let mut applied: Vec<f64> = samples
        .iter()
        .filter_map(|s| Some(s.applied? - s.replaced?))
        .collect();
    let mut after: Vec<f64> = samples
        .iter()
        .filter_map(|s| Some(s.observed - s.applied?))
        .collect();
    let split = if replaced.len() == samples.len() && applied.len() == samples.len() {
        format!(
            "from the agent's status, State was replaced (change noticed, directory read, parsed and validated) p50 {:.1} ms, p99 {:.1} ms after the rename; \
             the datapath held it p50 {:.1} ms, p99 {:.1} ms after that (pipeline, map reconcile); the client saw the new verdict p50 {:.1} ms, p99 {:.1} ms after that",
            percentile(&mut replaced, 50.0),
            percentile(&mut replaced, 99.0),
            percentile(&mut applied, 50.0),
            percentile(&mut applied, 99.0),
            percentile(&mut after, 50.0),
            percentile(&mut after, 99.0),
        )
    } else {
        "the agent's status did not give the times of every sample's generation (more than 64 generations apart?)".into()
    };
    say(format!(
        "update latency ({} samples, {settings}): p50 {p50:.1} ms, p99 {p99:.1} ms from the rename to the client seeing the new verdict\n\
         \x20 {split}\n\
         \x20 this process on the same files ({} pods, {POLICIES} policies): read + YAML {parse:.1} ms, validate + convert {build:.1} ms, the agent's pipeline (identities, policy entries, frontends, proxy table) {pipeline:.1} ms",
        samples.len(),
        IDENTITIES * REPLICAS + 2,
    ));
    say(format!(
        "server's kernel entries with the 1,000 rules: {entries}; the agent polls the manifests every {poll_ms:.0} ms besides inotify"
    ));
    let update = |name: &str, v: f64| Metric {
        name: name.into(),
        unit: "ms".into(),
        baseline: f64::NAN,
        comb: v,
        ratio: v,
    };
    Ok(Report {
        scenario: "policy".into(),
        metrics: vec![
            Metric::from_runs("rr_p50", "us", &runs[0].0, &runs[0].1),
            Metric::from_runs("rr_p99", "us", &runs[1].0, &runs[1].1),
            Metric::from_runs("conn_rate", "conn/s", &runs[2].0, &runs[2].1),
            update("update_p50_ms", p50),
            update("update_p99_ms", p99),
        ],
        pairs: c.pairs,
        baseline_label: "policy programs attached, no policy objects".into(),
        comb_label: format!(
            "1,000 rules over 200 identities (200 NetworkPolicies + 2 AuthorizationPolicies); update_*: {} samples, 1,000 pods + 500 policies, no baseline (ratio = value), {}",
            a.samples, settings
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_model::identity::{IdentityAllocator, IdentityKey};
    use comb_model::policy_compile::{compile_endpoint, lookup, policy_cidrs};
    use comb_model::terms::{Direction, IPPROTO_TCP, Verdict};
    use comb_model::{ObjKey, Snapshot};

    /// The real pods as the lab writes them (IPs, node1 and its CIDR).
    fn lab_side() -> String {
        let pod = |name: &str, ip: &str, labels: &str, sa: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, labels: {labels}, annotations: {{comb.dev/splice: \"off\", comb.dev/interface: lxc{}}}}}\nspec: {{nodeName: node1, serviceAccountName: {sa}, containers: [{{name: c, image: none}}]}}\nstatus: {{phase: Running, podIP: \"{ip}\"}}\n---\n",
                &ip[ip.rfind('.').unwrap() + 1..]
            )
        };
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nspec: {{podCIDR: 198.18.1.0/24}}\n---\n{}{}",
            pod(
                "client",
                "198.18.1.2",
                &format!("{{app: {}}}", app(CLIENT_K)),
                &sa(CLIENT_K)
            ),
            pod("server", "198.18.1.3", "{app: server}", "server")
        )
    }

    fn snapshot(text: &str) -> Snapshot {
        let docs = comb_config::parse_file_text(Path::new("t.yaml"), text)
            .unwrap_or_else(|e| panic!("{e}"));
        comb_config::build_snapshot(&docs).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The server's verdict for the client's TCP flows to `ports`.
    fn client_verdicts(snap: &Snapshot, ports: &[u16]) -> Vec<Verdict> {
        let table = IdentityAllocator::default().resolve(snap, "node1", &policy_cidrs(snap));
        let server = &snap.pods[&ObjKey::new(NS, "server")];
        let client = &snap.pods[&ObjKey::new(NS, "client")];
        let id = table.pod_identity[&client.key];
        let c = compile_endpoint(snap, &table, server);
        ports
            .iter()
            .map(|&p| {
                lookup(&c.entries, id, Direction::Ingress, IPPROTO_TCP, p)
                    .map_or(Verdict::Allow, |v| v.verdict)
            })
            .collect()
    }

    #[test]
    fn client_ports_hold_the_measured_ones() {
        let p: Vec<u16> = ports(CLIENT_K).iter().map(|(p, _)| *p).collect();
        assert!(p.contains(&RR_PORT) && p.contains(&CONN_PORT), "{p:?}");
        assert_eq!(ns(CLIENT_K), NS);
        assert!(ports(CLIENT_K).iter().all(|(_, e)| e.is_none()));
        assert_eq!(ns(DENIED_K), "bench-b");
    }

    #[test]
    fn phase_one_has_200_identities_and_1000_rules() {
        let text = format!(
            "{}{}{}",
            lab_side(),
            synthetic_yaml(1, false),
            server_policies_yaml()
        );
        let snap = snapshot(&text);
        assert_eq!(snap.pods.len(), 201);
        assert_eq!(snap.network_policies.len(), IDENTITIES);
        assert_eq!(snap.authorization_policies.len(), 2);
        let rules: usize = snap
            .network_policies
            .values()
            .flat_map(|np| &np.ingress)
            .map(|r| r.peers.len() * r.ports.len())
            .sum();
        assert_eq!(rules, 1000);
        let peers: std::collections::BTreeSet<_> = snap
            .pods
            .values()
            .filter(|p| p.key.name != "server")
            .map(IdentityKey::of_pod)
            .collect();
        assert_eq!(peers.len(), IDENTITIES);
        assert_eq!(
            client_verdicts(&snap, &[RR_PORT, CONN_PORT, FLIP_PORT, 8000]),
            [Verdict::Allow, Verdict::Allow, Verdict::Deny, Verdict::Deny]
        );
        // Without the policies everything is open.
        let open = snapshot(&format!("{}{}", lab_side(), synthetic_yaml(1, false)));
        assert_eq!(client_verdicts(&open, &[FLIP_PORT]), [Verdict::Allow]);
    }

    #[test]
    fn phase_two_has_1000_pods_500_policies_and_flips() {
        let base = format!(
            "{}{}{}{}",
            lab_side(),
            synthetic_yaml(REPLICAS, true),
            server_policies_yaml(),
            other_policies_yaml(POLICIES - IDENTITIES - 3)
        );
        let on = snapshot(&format!("{base}---\n{}", flip_yaml(true, 1)));
        assert_eq!(on.pods.len(), 1002);
        assert_eq!(
            on.network_policies.len() + on.authorization_policies.len(),
            POLICIES
        );
        assert_eq!(
            client_verdicts(&on, &[FLIP_PORT, RR_PORT]),
            [Verdict::Allow, Verdict::Allow]
        );
        let off = snapshot(&format!("{base}---\n{}", flip_yaml(false, 2)));
        assert_eq!(
            client_verdicts(&off, &[FLIP_PORT, RR_PORT]),
            [Verdict::Deny, Verdict::Allow]
        );
        assert_ne!(flip_yaml(true, 1).len(), flip_yaml(false, 1).len());
    }
}
