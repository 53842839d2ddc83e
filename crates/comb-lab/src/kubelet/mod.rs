//! A kubelet stand-in for one lab node (Kubernetes mode, `comb lab up --kubernetes`): it
//! registers the node as a Node object, watches the Pods bound to it, makes each one's
//! sandbox through the node's real CNI chain (`sandbox`, `cni`), starts its command, writes
//! its status as a kubelet does (IPs, Running, Ready), and tears it down through CNI DEL when
//! the Pod is deleted, confirming the deletion. It also runs the node's API relay (`relay`),
//! so the node's agents reach the API server from their namespace.
//!
//! Level-triggered: every Pod event and a periodic tick compare the Pods bound to the node
//! with the sandboxes on record, so a failed step is retried and a restarted stand-in picks
//! up where it was.

pub mod cni;
mod relay;
pub mod sandbox;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value, json};

use crate::naming;
use crate::state::{LabNode, LabState};
use sandbox::Record;

/// How often the Pods are compared with the sandboxes without an event (retries).
const TICK: Duration = Duration::from_secs(2);

/// Where the lab keeps node `node`'s CNI files: `ipam/`, `spool/` and the conflist.
pub fn cni_dir(lab: &str, node: &str) -> PathBuf {
    naming::state_dir(lab).join("cni").join(node)
}

/// The spool comb-cni writes on node `node` (the agent's `--cni-spool`).
pub fn spool_dir(lab: &str, node: &str) -> PathBuf {
    cni_dir(lab, node).join("spool")
}

/// Node `node`'s sandbox records.
pub fn records_dir(lab: &str, node: &str) -> PathBuf {
    naming::state_dir(lab).join("kubelet").join(node)
}

/// The address a node reports (InternalIP) and writes as its pods' hostIP: its uplink when
/// the lab has a router, else its address on the pods' veths.
pub fn node_ip(n: &LabNode) -> std::net::Ipv4Addr {
    n.uplink_ip.unwrap_or_else(|| naming::node_gateway(n.index))
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// The status a kubelet writes for a pod whose sandbox is up and whose container runs.
pub fn pod_status(pod: &Pod, rec: &Record, host_ip: &str, started: &str) -> Value {
    let ip = rec.pod.ip.to_string();
    let containers: Vec<Value> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            json!({
                "name": c.name,
                "ready": true,
                "started": true,
                "restartCount": 0,
                "image": c.image.clone().unwrap_or_default(),
                "imageID": "",
                "state": {"running": {"startedAt": started}},
            })
        })
        .collect();
    let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": started});
    json!({
        "status": {
            "phase": "Running",
            "hostIP": host_ip,
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": started,
            "conditions": [cond("Initialized"), cond("Ready"), cond("ContainersReady"), cond("PodScheduled")],
            "containerStatuses": containers,
        }
    })
}

/// Whether the Pod's status already says what `pod_status` would write.
fn status_written(pod: &Pod, rec: &Record) -> bool {
    let Some(s) = &pod.status else { return false };
    s.phase.as_deref() == Some("Running")
        && s.pod_ip.as_deref() == Some(rec.pod.ip.to_string().as_str())
        && s.conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// A Pod this node should run: bound here, not being deleted, not finished.
fn wanted(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// What one comparison decided: sandboxes to remove, Pods whose deletion to confirm, Pods
/// to create a sandbox for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub remove: Vec<String>,
    pub confirm: Vec<(String, String, String)>,
    pub create: Vec<String>,
}

/// Compare the Pods bound to the node with the sandboxes (both by UID).
pub fn plan(pods: &[&Pod], sandboxes: &BTreeMap<String, Record>) -> Plan {
    let uid = |p: &Pod| p.metadata.uid.clone().unwrap_or_default();
    let want: BTreeMap<String, &Pod> = pods
        .iter()
        .filter(|p| wanted(p))
        .map(|p| (uid(p), *p))
        .collect();
    let mut plan = Plan::default();
    for u in sandboxes.keys() {
        if !want.contains_key(u) {
            plan.remove.push(u.clone());
        }
    }
    for p in pods {
        let u = uid(p);
        if p.metadata.deletion_timestamp.is_some() && !sandboxes.contains_key(&u) {
            plan.confirm.push((
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
                u,
            ));
        }
    }
    for (u, _) in want {
        if !sandboxes.contains_key(&u) {
            plan.create.push(u);
        }
    }
    plan
}

/// Run the stand-in for `node` of lab `lab` until killed.
pub fn run(lab: &str, node: &str) -> Result<()> {
    let state = LabState::load(&naming::state_dir(lab).join("state.json"))?;
    let kube = state
        .kube
        .clone()
        .with_context(|| format!("lab {lab} has no Kubernetes control plane"))?;
    let n = state
        .nodes
        .iter()
        .find(|n| n.name == node)
        .with_context(|| format!("lab {lab}: no node {node:?}"))?
        .clone();
    relay::start(&n.netns, kube.api_port)?;
    let dir = cni_dir(lab, node);
    let spool = spool_dir(lab, node);
    let records = records_dir(lab, node);
    for d in [&dir, &spool, &records] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let conflist = cni::conflist(
        &n.pod_cidr,
        &naming::node_gateway(n.index).to_string(),
        &dir.join("ipam"),
        &spool,
    );
    // What a runtime would read from /etc/cni/net.d; written for whoever looks.
    crate::state::write_atomic(
        &dir.join("10-comb-lab.conflist"),
        &serde_json::to_string_pretty(&conflist)?,
    )?;
    let ctx = sandbox::Node {
        lab: lab.to_owned(),
        cgroup2: state.cgroup2.clone(),
        node_ip: node_ip(&n),
        chain: cni::Chain {
            conflist,
            bin_dirs: vec![
                PathBuf::from(cni::DEBIAN_CNI_BIN),
                kube.comb
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            ],
            node_netns: n.netns.clone(),
        },
        node: n,
        records,
        logs: naming::state_dir(lab).join("logs"),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(ctx, &kube.kubeconfig))
}

async fn client(kubeconfig: &Path) -> Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(Client::try_from(config)?)
}

/// The Node object as a kubelet registers it.
pub fn node_object(n: &LabNode) -> Result<NodeObject> {
    let mut obj = crate::state::node_object(n);
    obj.status = None;
    obj.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("kubernetes.io/os".into(), "linux".into());
    Ok(obj)
}

async fn register(client: &Client, n: &LabNode) -> Result<()> {
    let api: Api<NodeObject> = Api::all(client.clone());
    let obj = node_object(n)?;
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            api.patch(&n.name, &PatchParams::default(), &Patch::Merge(&obj))
                .await?;
        }
        Err(e) => return Err(e).context("registering the Node"),
    }
    let addresses: Vec<Value> = crate::state::node_object(n)
        .status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .map(|a| json!({"type": a.type_, "address": a.address}))
        .chain([json!({"type": "Hostname", "address": n.name})])
        .collect();
    let t = now();
    let status = json!({"status": {
        "addresses": addresses,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "comb lab kubelet stand-in", "lastHeartbeatTime": t,
                        "lastTransitionTime": t}],
        "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                     "osImage": "comb lab", "containerRuntimeVersion": "comb-lab://0",
                     "kubeletVersion": "v0.0.0-comb-lab", "kubeProxyVersion": "",
                     "operatingSystem": "linux", "architecture": std::env::consts::ARCH},
    }});
    api.patch_status(&n.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("writing the Node's status")?;
    Ok(())
}

async fn serve(ctx: sandbox::Node, kubeconfig: &Path) -> Result<()> {
    let client = client(kubeconfig).await?;
    // The API server may still be starting with the lab: retry registration for a while.
    let mut tries = 0;
    loop {
        match register(&client, &ctx.node).await {
            Ok(()) => break,
            Err(e) if tries < 60 => {
                tries += 1;
                tracing::warn!(error = %format!("{e:#}"), "registering the node; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
    tracing::info!(node = %ctx.node.name, "node registered");
    let mut sandboxes: BTreeMap<String, Record> = ctx
        .load_records()
        .into_iter()
        .map(|r| (r.uid.clone(), r))
        .collect();
    let pods: Api<Pod> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node.name));
    let mut events = reflector(writer, watcher(pods, cfg))
        .default_backoff()
        .boxed();
    let mut tick = tokio::time::interval(TICK);
    let mut synced = false;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(watcher::Event::InitDone)) => synced = true,
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching Pods");
                    continue;
                }
                None => anyhow::bail!("the Pod watch ended"),
            },
            _ = tick.tick() => {}
        }
        if !synced {
            continue;
        }
        let snapshot = store.state();
        let list: Vec<&Pod> = snapshot.iter().map(|p| p.as_ref()).collect();
        reconcile(&ctx, &client, &list, &mut sandboxes).await;
    }
}

async fn reconcile(
    ctx: &sandbox::Node,
    client: &Client,
    pods: &[&Pod],
    sandboxes: &mut BTreeMap<String, Record>,
) {
    let p = plan(pods, sandboxes);
    for uid in &p.remove {
        let Some(rec) = sandboxes.get(uid).cloned() else {
            continue;
        };
        match tokio::task::block_in_place(|| ctx.remove(&rec)) {
            Ok(()) => {
                tracing::info!(pod = %rec.pod.key(), uid, "sandbox removed");
                sandboxes.remove(uid);
            }
            Err(e) => {
                tracing::warn!(pod = %rec.pod.key(), error = %format!("{e:#}"), "removing the sandbox; retrying")
            }
        }
    }
    // The Pod's containers are gone: confirm its deletion, as a kubelet does.
    for (ns, name, uid) in &p.confirm {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => {
                tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "confirming the deletion")
            }
        }
    }
    for uid in &p.create {
        let Some(pod) = pods.iter().find(|p| p.metadata.uid.as_deref() == Some(uid)) else {
            continue;
        };
        match tokio::task::block_in_place(|| ctx.create(pod)) {
            Ok(rec) => {
                tracing::info!(pod = %rec.pod.key(), uid, ip = %rec.pod.ip, "sandbox created");
                sandboxes.insert(uid.clone(), rec);
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "retrying later"),
        }
    }
    let pids: Vec<u32> = sandboxes.values().filter_map(|r| r.pod.pid).collect();
    crate::process::reap(&pids);
    let host_ip = ctx.node_ip.to_string();
    for pod in pods.iter().filter(|p| wanted(p)) {
        let Some(rec) = pod.metadata.uid.as_ref().and_then(|u| sandboxes.get(u)) else {
            continue;
        };
        if status_written(pod, rec) {
            continue;
        }
        let api: Api<Pod> = Api::namespaced(client.clone(), &rec.pod.namespace);
        let status = pod_status(pod, rec, &host_ip, &now());
        if let Err(e) = api
            .patch_status(
                &rec.pod.name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
        {
            tracing::warn!(pod = %rec.pod.key(), error = %e, "writing the Pod's status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, uid: &str, deleting: bool, phase: Option<&str>) -> Pod {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "t", "uid": uid},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "none"}]},
        }))
        .unwrap();
        if deleting {
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
        }
        if let Some(ph) = phase {
            p.status = Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some(ph.into()),
                ..Default::default()
            });
        }
        p
    }

    fn rec(name: &str, uid: &str) -> Record {
        Record {
            uid: uid.into(),
            container_id: format!("comb{uid}"),
            pod_cgroup: PathBuf::from("/cg"),
            host_network: false,
            pod: crate::state::LabPod {
                namespace: "t".into(),
                name: name.into(),
                node: "n1".into(),
                ip: "198.18.1.5".parse().unwrap(),
                netns: "comb-x-n1-p-t-a".into(),
                host_veth: "veth0".into(),
                cgroup: PathBuf::from("/cg/c"),
                labels: Default::default(),
                service_account: "default".into(),
                pid: None,
            },
        }
    }

    #[test]
    fn new_pods_get_sandboxes_and_gone_ones_lose_them() {
        let a = pod("a", "u1", false, None);
        let b = pod("b", "u2", false, Some("Running"));
        let sandboxes =
            BTreeMap::from([("u2".into(), rec("b", "u2")), ("u9".into(), rec("z", "u9"))]);
        let p = plan(&[&a, &b], &sandboxes);
        assert_eq!(p.create, ["u1"]);
        assert_eq!(p.remove, ["u9"]);
        assert!(p.confirm.is_empty());
    }

    #[test]
    fn a_deleted_pod_is_torn_down_then_its_deletion_confirmed() {
        let a = pod("a", "u1", true, Some("Running"));
        let with = BTreeMap::from([("u1".into(), rec("a", "u1"))]);
        let p = plan(&[&a], &with);
        assert_eq!(p.remove, ["u1"]);
        assert!(
            p.confirm.is_empty(),
            "confirmed only once the sandbox is gone"
        );
        let p = plan(&[&a], &BTreeMap::new());
        assert_eq!(p.confirm, [("t".into(), "a".into(), "u1".into())]);
        assert!(p.create.is_empty());
    }

    #[test]
    fn a_pod_recreated_under_its_name_is_a_new_sandbox() {
        // Same name, new UID: the old sandbox goes first (its netns name is reused).
        let new = pod("a", "u2", false, None);
        let p = plan(&[&new], &BTreeMap::from([("u1".into(), rec("a", "u1"))]));
        assert_eq!(p.remove, ["u1"]);
        assert_eq!(p.create, ["u2"]);
    }

    #[test]
    fn finished_pods_get_no_sandbox() {
        let done = pod("a", "u1", false, Some("Succeeded"));
        assert!(plan(&[&done], &BTreeMap::new()).create.is_empty());
    }

    #[test]
    fn the_status_says_running_and_ready_with_the_sandbox_address() {
        let p = pod("a", "u1", false, None);
        let r = rec("a", "u1");
        let s = pod_status(&p, &r, "198.18.254.1", "2026-12-05T00:00:00Z");
        assert_eq!(s["status"]["phase"], "Running");
        assert_eq!(s["status"]["podIP"], "198.18.1.5");
        assert_eq!(s["status"]["podIPs"][0]["ip"], "198.18.1.5");
        assert_eq!(s["status"]["hostIP"], "198.18.254.1");
        assert_eq!(s["status"]["containerStatuses"][0]["name"], "c");
        let mut written = p.clone();
        written.status = Some(serde_json::from_value(s["status"].clone()).unwrap());
        assert!(status_written(&written, &r));
        assert!(!status_written(&p, &r));
    }
}
