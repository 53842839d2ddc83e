//! The lab as a Kubernetes cluster, driven as a user drives it: `comb lab up --kubernetes`,
//! `comb lab kubeconfig`, kubectl, `comb lab down`. Checked: the nodes register, the Pods run
//! with the addresses their sandboxes got from the real CNI chain (ptp + host-local, then
//! comb-cni), the agents program them and a Service (its EndpointSlice made by the real
//! controller manager) carries a curl across nodes; a Pod created with kubectl gets a
//! sandbox, and its connections with a pod of its node are spliced; a Pod deleted with
//! kubectl is torn down through CNI DEL (its address released, its spool record gone) before
//! its deletion completes; a deleted Namespace takes its pods' sandboxes with it;
//! `comb lab down` leaves nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const LAB: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: n1
  containers:
  - name: server
    image: none
    command: [python3, -m, http.server, "8080", --bind, 0.0.0.0]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  nodeName: n2
  containers: [{name: c, image: none}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

const WEB2: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web2, namespace: shop, labels: {app: web}}
spec:
  nodeName: n2
  containers:
  - name: server
    image: none
    command: [python3, -m, http.server, "8080", --bind, 0.0.0.0]
"#;

/// Removes the lab if the test fails before `comb lab down`.
struct Guard(String);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = comb_lab::teardown(&self.0);
    }
}

fn comb(args: &[&str]) -> String {
    let out = Command::new(COMB).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "comb {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let bins = comb_lab::KubeBinaries::locate().unwrap();
    comb_lab::kube_cluster::run_kubectl(
        Command::new("timeout"),
        &bins.kubectl,
        kubeconfig,
        args,
        stdin,
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

fn jsonpath(kubeconfig: &Path, what: &[&str], path: &str) -> String {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    let p = format!("jsonpath={path}");
    args.extend_from_slice(&["-o", &p]);
    kubectl(kubeconfig, &args, None)
}

fn curl_status(name: &str, pod: &str, url: &str) -> String {
    let out = Command::new(COMB)
        .args(["lab", "exec", "--name", name, pod, "--"])
        .args([
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pods the node's agent holds with a cgroup (programmed), by `ns/name`.
fn programmed(socket: &Path) -> Vec<String> {
    let v = call(socket, comb_api::Query::Endpoints).unwrap();
    let rows: Vec<comb_api::EndpointRow> = serde_json::from_value(v).unwrap();
    rows.into_iter()
        .filter(|r| r.local && r.cgroup.is_some())
        .map(|r| format!("{}/{}", r.namespace, r.pod))
        .collect()
}

/// Files in `dir` and below whose name is `name`.
fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == name) {
                out.push(p);
            }
        }
    }
    out
}

fn netns_of_lab(name: &str) -> Vec<String> {
    let prefix = comb_lab::naming::lab_netns_prefix(name);
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
fn lab_up_kubernetes_runs_pods_through_the_cni_chain() {
    if !privileged() {
        return;
    }
    let name = unique("lk");
    let _guard = Guard(name.clone());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lab.yaml");
    std::fs::write(&file, LAB).unwrap();
    let up = comb(&[
        "lab",
        "up",
        "--kubernetes",
        "--name",
        &name,
        "--agent-arg=--proxy=off",
        file.to_str().unwrap(),
    ]);
    assert!(up.contains("Kubernetes cluster"), "{up}");
    let kc = PathBuf::from(comb(&["lab", "kubeconfig", "--name", &name]).trim());
    assert!(kc.is_file(), "{}", kc.display());
    let state = comb_lab::state_dir(&name);

    // The nodes registered and Ready; the Pods Running with their sandboxes' addresses.
    let nodes = jsonpath(
        &kc,
        &["nodes"],
        r#"{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status} {end}"#,
    );
    assert_eq!(nodes.trim(), "n1=True n2=True");
    let pods = jsonpath(
        &kc,
        &["pods", "-n", "shop"],
        r#"{range .items[*]}{.metadata.name}={.status.phase}@{.status.podIP} {end}"#,
    );
    let lab = comb_lab::Lab::open(&name).unwrap();
    for p in lab.pods() {
        assert!(
            pods.contains(&format!("{}=Running@{}", p.name, p.ip)),
            "{p:?} in {pods}"
        );
        // The address is host-local's: a lease file named after it.
        assert_eq!(
            files_named(&state.join("cni"), &p.ip.to_string()).len(),
            1,
            "host-local lease of {}",
            p.ip
        );
    }

    // Programmed by the agents from the comb-cni spool, and a Service across nodes.
    let sock = |n: &str| lab.agent_socket(n);
    wait_for(Duration::from_secs(20), "web programmed on n1", || {
        programmed(&sock("n1")) == ["shop/web"]
    });
    let vip = jsonpath(&kc, &["service", "-n", "shop", "web"], "{.spec.clusterIP}");
    wait_for(Duration::from_secs(20), "the Service answers", || {
        curl_status(&name, "shop/client", &format!("http://{vip}/")) == "200"
    });

    // A Pod made with kubectl: sandbox, status, agent.
    kubectl(&kc, &["apply", "-f", "-"], Some(WEB2));
    wait_for(Duration::from_secs(30), "web2 Running", || {
        jsonpath(&kc, &["pod", "-n", "shop", "web2"], "{.status.phase}") == "Running"
    });
    let web2_ip = jsonpath(&kc, &["pod", "-n", "shop", "web2"], "{.status.podIP}");
    wait_for(Duration::from_secs(20), "web2 programmed on n2", || {
        programmed(&sock("n2")).contains(&"shop/web2".to_string())
    });
    // Its server may still be starting.
    wait_for(Duration::from_secs(10), "web2 answers", || {
        curl_status(&name, "shop/client", &format!("http://{web2_ip}:8080/")) == "200"
    });

    // Same node: the two sockets are spliced by the kernel, as in the directory-mode lab.
    let spliced = || {
        let v = call(&sock("n2"), comb_api::Query::SpliceStats).unwrap();
        serde_json::from_value::<comb_api::SpliceStats>(v)
            .unwrap()
            .redirected_bytes
    };
    let before = spliced();
    assert_eq!(
        curl_status(&name, "shop/client", &format!("http://{web2_ip}:8080/")),
        "200"
    );
    assert!(spliced() > before, "client -> web2 on n2 is spliced");

    // A graceful deletion completes once the kubelet tore the sandbox down (CNI DEL).
    let web = lab.pod("shop/web").unwrap().clone();
    kubectl(
        &kc,
        &[
            "delete",
            "pod",
            "-n",
            "shop",
            "web",
            "--wait=true",
            "--timeout=60s",
        ],
        None,
    );
    assert!(!Path::new("/run/netns").join(&web.netns).exists());
    assert!(
        files_named(&state.join("cni"), &web.ip.to_string()).is_empty(),
        "the lease of {} is released",
        web.ip
    );
    wait_for(Duration::from_secs(20), "web forgotten on n1", || {
        programmed(&sock("n1")).is_empty()
    });
    let spooled = std::fs::read_dir(comb_lab::kubelet::spool_dir(&name, "n1"))
        .unwrap()
        .count();
    assert_eq!(spooled, 0, "n1's spool is empty");

    // A Namespace deletion takes its pods' sandboxes along.
    kubectl(&kc, &["delete", "namespace", "shop", "--timeout=90s"], None);
    wait_for(Duration::from_secs(30), "no pod netns left", || {
        netns_of_lab(&name).iter().all(|n| !n.contains("-p-"))
    });

    comb(&["lab", "down", "--name", &name]);
    assert!(netns_of_lab(&name).is_empty(), "{:?}", netns_of_lab(&name));
    assert!(!state.exists(), "{} removed", state.display());
    let cg = comb_host::cgroup2_mount()
        .unwrap()
        .join(comb_lab::naming::lab_cgroup(&name));
    assert!(!cg.exists(), "{} removed", cg.display());
    // No control-plane process of this lab survives (they named its directory).
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    let leftover: Vec<&str> = ps
        .lines()
        .filter(|l| l.contains(&*state.to_string_lossy()))
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");
}
