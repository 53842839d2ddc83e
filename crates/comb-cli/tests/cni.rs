//! Pods found through CNI chaining: a sandbox made the way a container runtime makes one — a
//! network namespace, a cgroup in the kubelet's cgroupfs layout under the lab node's cgroup,
//! Debian's real `ptp` + `host-local` plugins run in the node's namespace — then `comb-cni`
//! chained after them. combd runs with `--kubeconfig` against a real API server; the Pod
//! object carries no `comb.dev/*` annotations, so its interface and cgroup can only come
//! from the spool comb-cni wrote. Checked: the pod is programmed and a NetworkPolicy made
//! with kubectl judges a real curl; a pod created while the agent is killed (SIGKILL) is
//! picked up when it starts again; CNI DEL, and a netns removed without DEL, make the agent
//! forget the sandbox.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use comb_lab::{KubeCluster, KubeOptions, Lab, LabOptions};
use common::kube_agent::{Agent, CONVERGE, lab_pod_cgroup};
use common::*;

const CNI_BIN: &str = "/usr/lib/cni";
const PORT: u16 = 8080;

/// One pod sandbox, torn down (CNI DEL through the chain, its process, netns and cgroup)
/// when dropped.
struct Sandbox {
    node_netns: String,
    id: String,
    netns: String,
    cgroup: PathBuf,
    conf: Conf,
    args: String,
    ip: String,
    host_veth: Option<String>,
    server: Option<Child>,
}

#[derive(Clone)]
struct Conf {
    ipam_dir: PathBuf,
    spool: PathBuf,
}

impl Conf {
    fn ptp(&self) -> serde_json::Value {
        // Addresses .200-.210 of node1's pod /24: the lab's own pods use the low ones.
        serde_json::json!({"cniVersion": "1.0.0", "name": "lab", "type": "ptp", "ipMasq": false,
            "ipam": {"type": "host-local", "dataDir": self.ipam_dir,
                     "ranges": [[{"subnet": "198.18.1.0/24", "rangeStart": "198.18.1.200",
                                  "rangeEnd": "198.18.1.210", "gateway": "198.18.1.1"}]]}})
    }

    fn comb(&self, prev: Option<&serde_json::Value>) -> serde_json::Value {
        let mut c = serde_json::json!({"cniVersion": "1.0.0", "name": "lab", "type": "comb-cni",
                                       "spoolDir": self.spool});
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }
}

fn comb_cni() -> PathBuf {
    // Built beside combd (same workspace, same profile).
    comb_lab::combd_path().unwrap().with_file_name("comb-cni")
}

/// Run one plugin in the node's network namespace, as a runtime does.
fn plugin(
    node_netns: &str,
    bin: &Path,
    cmd: &str,
    id: &str,
    netns: &str,
    args: &str,
    conf: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_netns])
        .arg(bin)
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", format!("/run/netns/{netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_BIN)
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{} {cmd}: {text}{}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&text)
        .map_err(|e| format!("{} {cmd} printed {text:?}: {e}", bin.display()))
}

impl Sandbox {
    /// The runtime's part for Pod `t/name` with `uid`: netns, cgroup, the chain's ADD, and a
    /// curl-able HTTP server inside.
    fn create(lab: &Lab, conf: &Conf, name: &str, uid: &str, with_comb: bool) -> Sandbox {
        let node_netns = lab.node_netns("node1").unwrap();
        let netns = format!("{}{name}", comb_lab::naming::lab_netns_prefix(lab.name()));
        let st = Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {netns}");
        let node_cg = lab
            .state()
            .cgroup2
            .join(comb_lab::naming::node_cgroup(lab.name(), "node1"));
        let cgroup = node_cg.join(format!("kubepods/besteffort/pod{uid}"));
        std::fs::create_dir_all(cgroup.join("ctr")).unwrap();
        let id = format!("c{}", name.replace('-', ""));
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=t;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID={uid}"
        );
        let mut sb = Sandbox {
            node_netns,
            id,
            netns,
            cgroup,
            conf: conf.clone(),
            args,
            ip: String::new(),
            host_veth: None,
            server: None,
        };
        let ptp = Path::new(CNI_BIN).join("ptp");
        let result = plugin(
            &sb.node_netns,
            &ptp,
            "ADD",
            &sb.id,
            &sb.netns,
            &sb.args,
            &conf.ptp(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        sb.ip = result["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        sb.host_veth = result["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i.get("sandbox").is_none())
            .and_then(|i| i["name"].as_str())
            .map(str::to_owned);
        if with_comb {
            let passed = plugin(
                &sb.node_netns,
                &comb_cni(),
                "ADD",
                &sb.id,
                &sb.netns,
                &sb.args,
                &conf.comb(Some(&result)),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                passed, result,
                "comb-cni passes the previous result on unchanged"
            );
        }
        // The "container": an HTTP server in the pod's netns and container cgroup.
        let procs = sb.cgroup.join("ctr/cgroup.procs");
        let script = format!(
            "echo $$ > {} && exec ip netns exec {} python3 -m http.server {PORT} --bind 0.0.0.0",
            procs.display(),
            sb.netns
        );
        sb.server = Some(
            Command::new("sh")
                .args(["-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        sb
    }

    /// CNI DEL through the chain (comb-cni first, as a runtime runs DEL in reverse order).
    fn del(&mut self) -> Result<(), String> {
        plugin(
            &self.node_netns,
            &comb_cni(),
            "DEL",
            &self.id,
            &self.netns,
            &self.args,
            &self.conf.comb(None),
        )?;
        let ptp = Path::new(CNI_BIN).join("ptp");
        plugin(
            &self.node_netns,
            &ptp,
            "DEL",
            &self.id,
            &self.netns,
            &self.args,
            &self.conf.ptp(),
        )?;
        Ok(())
    }

    fn stop_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn remove_netns(&mut self) {
        self.stop_server();
        if Path::new("/run/netns").join(&self.netns).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns])
                .status();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop_server();
        // Never panic here (a failing test is unwinding): DEL is idempotent anyway.
        let _ = self.del();
        self.remove_netns();
        let _ = std::fs::remove_dir(self.cgroup.join("ctr"));
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn uid_of(kube: &KubeCluster, name: &str) -> String {
    kube.kubectl(&[
        "get",
        "pod",
        "-n",
        "t",
        name,
        "-o",
        "jsonpath={.metadata.uid}",
    ])
    .unwrap()
    .trim()
    .to_owned()
}

fn api_pod(kube: &KubeCluster, name: &str, labels: &str, annotations: &str) {
    kube.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: t\n  labels: {{{labels}}}\n  annotations: {{{annotations}}}\nspec:\n  nodeName: node1\n  containers: [{{name: c, image: none}}]\n"
    ))
    .unwrap();
}

/// curl from the lab's client pod; true when the server answered.
fn curl(lab: &Lab, ip: &str) -> bool {
    lab.command(
        "t/client",
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "2",
            &format!("http://{ip}:{PORT}/"),
        ],
    )
    .unwrap()
    .status()
    .unwrap()
    .success()
}

fn row(agent: &Agent, pod: &str) -> Option<comb_api::EndpointRow> {
    agent
        .endpoints()
        .into_iter()
        .find(|e| e.namespace == "t" && e.pod == pod)
}

#[test]
fn pods_are_found_through_the_cni_chain() {
    if !privileged() {
        return;
    }
    for bin in ["ptp", "host-local"] {
        assert!(
            Path::new(CNI_BIN).join(bin).exists(),
            "{CNI_BIN}/{bin} missing: install containernetworking-plugins (scripts/deps.sh)"
        );
    }
    assert!(comb_cni().exists(), "{} not built", comb_cni().display());
    let lab = Lab::up(
        LabOptions {
            name: unique("cn"),
            agent: None,
        },
        &[("pods.yaml".into(), pod("t", "client", "node1", &[]))],
    )
    .expect("lab up");
    let client = lab.pod("t/client").unwrap().clone();
    let client_cg = lab_pod_cgroup(&lab, &client);
    let kube = KubeCluster::start(KubeOptions {
        netns: Some(lab.node_netns("node1").unwrap()),
        controller_manager: false,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap();
    let conf = Conf {
        ipam_dir: dir.path().join("ipam"),
        spool: dir.path().join("spool"),
    };
    kube.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: t}\n")
        .unwrap();
    // The lab's client pod as the API's Pod (the lab's own way: annotations).
    api_pod(
        &kube,
        "client",
        "role: stranger",
        &format!(
            "comb.dev/cgroup: {client_cg}, comb.dev/interface: {}",
            client.host_veth
        ),
    );
    kube.set_pod_status("t", "client", &[&client.ip.to_string()])
        .unwrap();

    // A pod with no annotations: a sandbox through the real chain.
    api_pod(&kube, "web", "app: web", "");
    let web = Sandbox::create(&lab, &conf, "web", &uid_of(&kube, "web"), true);
    kube.set_pod_status("t", "web", &[&web.ip]).unwrap();
    // Deny by default: only role=friend may reach web.
    kube.apply(&format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: t}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Ingress]\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{role: friend}}}}}}], ports: [{{port: {PORT}}}]}}]\n")).unwrap();

    let kubelet_root = Path::new(&comb_lab::naming::node_cgroup(lab.name(), "node1"))
        .join("kubepods")
        .display()
        .to_string();
    let spool = conf.spool.display().to_string();
    let flags = [
        "--cni-spool",
        spool.as_str(),
        "--kubelet-cgroup-root",
        kubelet_root.as_str(),
    ];
    let agent = Agent::start(&lab, "node1", kube.kubeconfig(), dir.path(), &flags);
    let want_cg = format!("{kubelet_root}/besteffort/pod{}", uid_of(&kube, "web"));
    agent.wait("web programmed from its sandbox", |a| {
        row(a, "web").is_some_and(|r| r.local && r.cgroup.as_deref() == Some(want_cg.as_str()))
            && a.policy("t/web").is_some_and(|p| p.ingress_enforced)
    });
    assert!(
        !curl(&lab, &web.ip),
        "role=stranger reached web through the NetworkPolicy"
    );
    kube.kubectl(&[
        "label",
        "pod",
        "-n",
        "t",
        "client",
        "role=friend",
        "--overwrite",
    ])
    .unwrap();
    wait_for(CONVERGE, "role=friend reaches web", || curl(&lab, &web.ip));

    // The agent killed (SIGKILL: no clean shutdown) while a pod is created in the API and
    // its sandbox through CNI ADD: nothing is lost.
    let mut agent = agent;
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    drop(agent);
    api_pod(&kube, "late", "app: web", "");
    let mut late = Sandbox::create(&lab, &conf, "late", &uid_of(&kube, "late"), true);
    kube.set_pod_status("t", "late", &[&late.ip]).unwrap();
    let agent = Agent::start(&lab, "node1", kube.kubeconfig(), dir.path(), &flags);
    agent.wait("late programmed after the agent started", |a| {
        row(a, "late").is_some_and(|r| r.cgroup.is_some())
            && a.policy("t/late").is_some_and(|p| p.ingress_enforced)
    });
    assert!(curl(&lab, &late.ip), "role=friend reaches the late pod");
    assert!(late.host_veth.is_some());

    // CNI DEL: the sandbox is forgotten (the Pod object stays, as during a sandbox restart).
    late.stop_server();
    late.del().unwrap_or_else(|e| panic!("{e}"));
    agent.wait("late forgotten after CNI DEL", |a| {
        row(a, "late").is_some_and(|r| r.cgroup.is_none())
    });

    // A netns gone without a DEL (a runtime crash): forgotten at the next rescan.
    let mut web = web;
    web.remove_netns();
    agent.wait("web forgotten once its netns is gone", |a| {
        row(a, "web").is_some_and(|r| r.cgroup.is_none())
    });
    assert!(
        std::fs::read_dir(&conf.spool).unwrap().count() == 0,
        "the spool is empty"
    );
    drop(agent);
    drop((web, late));
}

/// The plugin's error path as a runtime sees it: the spec's JSON on stdout, exit non-zero.
#[test]
fn bad_input_gets_the_specs_error_object() {
    let dir = tempfile::tempdir().unwrap();
    let run = |cmd: &str, conf: &str| {
        let mut child = Command::new(comb_cni())
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", "x1")
            .env("CNI_NETNS", "/run/netns/none")
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=t;K8S_POD_NAME=p;K8S_POD_UID=u",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = run("VERSION", "");
    assert!(ok && text.contains("\"1.0.0\""), "{text}");
    let spool = dir.path().display().to_string();
    let (ok, text) = run(
        "ADD",
        &format!(r#"{{"cniVersion":"1.0.0","type":"comb-cni","spoolDir":"{spool}"}}"#),
    );
    assert!(!ok, "{text}");
    let e: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["code"], 7, "{text}");
    assert!(e["msg"].as_str().unwrap().contains("prevResult"), "{text}");
    let (ok, _) = run(
        "DEL",
        &format!(r#"{{"cniVersion":"1.0.0","type":"comb-cni","spoolDir":"{spool}"}}"#),
    );
    assert!(ok, "DEL of an unknown sandbox succeeds");
}
