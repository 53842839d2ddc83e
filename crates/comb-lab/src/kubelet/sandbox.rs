//! One pod's sandbox on a lab node, made as a container runtime makes it: a network
//! namespace, a cgroup in the kubelet's cgroupfs layout, the node's CNI chain (ADD), and the
//! container's command started inside both. Each sandbox is recorded in a file of its own
//! (`<lab state>/kubelet/<node>/<uid>.json`), so the lab (and a restarted kubelet) knows
//! what exists and can remove it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use super::cni::{self, Chain, Invocation};
use crate::state::{LabNode, LabPod, write_atomic};
use crate::{cgroup, naming, netns, process};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub uid: String,
    /// `CNI_CONTAINERID` of the sandbox.
    pub container_id: String,
    /// Absolute: `…/kubepods/besteffort/pod<uid>` (the container's is `pod.cgroup`).
    pub pod_cgroup: PathBuf,
    /// A `hostNetwork` pod: no namespace, no CNI; its address is the node's.
    #[serde(default)]
    pub host_network: bool,
    pub pod: LabPod,
}

/// What a node's kubelet needs to make and remove sandboxes.
pub struct Node {
    pub lab: String,
    pub cgroup2: PathBuf,
    pub node: LabNode,
    /// The node's address written as the Pods' hostIP (and a hostNetwork pod's IP).
    pub node_ip: std::net::Ipv4Addr,
    pub chain: Chain,
    /// Sandbox records.
    pub records: PathBuf,
    /// Container logs (`<ns>_<name>.log`, as the lab names them).
    pub logs: PathBuf,
}

/// IPv6 stays off in pods as in the rest of the lab.
const NO_V6: [(&str, &str); 2] = [
    ("net/ipv6/conf/all/disable_ipv6", "1"),
    ("net/ipv6/conf/default/disable_ipv6", "1"),
];

impl Node {
    pub fn record_path(&self, uid: &str) -> PathBuf {
        self.records.join(format!("{uid}.json"))
    }

    /// Every sandbox recorded on this node (a kubelet restart finds its pods again).
    pub fn load_records(&self) -> Vec<Record> {
        load_records(&self.records)
    }

    /// Make the sandbox of `pod` and start its command; on error nothing of it is left.
    pub fn create(&self, pod: &Pod) -> Result<Record> {
        let spec = crate::spec::pod_spec(pod.clone())?;
        let uid = pod
            .metadata
            .uid
            .clone()
            .context("a Pod without metadata.uid")?;
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .map_or("c".to_owned(), |c| c.name.clone());
        naming::validate_object_name("container name", &container)?;
        let pod_cgroup =
            self.cgroup2
                .join(naming::kube_pod_cgroup(&self.lab, &self.node.name, &uid));
        let mut rec = Record {
            container_id: format!("comb{}", uid.replace('-', "")),
            uid,
            pod_cgroup: pod_cgroup.clone(),
            host_network,
            pod: LabPod {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                node: self.node.name.clone(),
                ip: self.node_ip,
                netns: if host_network {
                    self.node.netns.clone()
                } else {
                    naming::pod_netns(&self.lab, &self.node.name, &spec.namespace, &spec.name)
                },
                host_veth: String::new(),
                cgroup: pod_cgroup.join(&container),
                labels: spec.labels.clone(),
                service_account: spec.service_account.clone(),
                pid: None,
            },
        };
        if let Err(e) = self.build(&mut rec, &spec) {
            if let Err(e2) = self.remove(&rec) {
                tracing::warn!(pod = %rec.pod.key(), error = %format!("{e2:#}"), "cleaning up a failed sandbox");
            }
            return Err(e.context(format!("creating the sandbox of pod {}", rec.pod.key())));
        }
        write_atomic(
            &self.record_path(&rec.uid),
            &serde_json::to_string_pretty(&rec)?,
        )?;
        Ok(rec)
    }

    fn build(&self, rec: &mut Record, spec: &crate::spec::PodSpec) -> Result<()> {
        cgroup::create(&self.cgroup2, &rec.pod.cgroup)?;
        if !rec.host_network {
            if netns::exists(&rec.pod.netns) {
                // A sandbox of an earlier pod of this name that no record owns any more.
                bail!(
                    "network namespace {} exists already (an earlier pod of this name is still being removed)",
                    rec.pod.netns
                );
            }
            netns::add(&rec.pod.netns)?;
            netns::sysctls(&rec.pod.netns, &NO_V6)?;
            netns::ip_batch(&rec.pod.netns, &["link set lo up".to_string()])?;
            let result = self.chain.add(&invocation(rec))?;
            let a = cni::attached(&result)?;
            rec.pod.ip = a.ip;
            rec.pod.host_veth = a.host_veth;
        }
        if let Some((program, args)) = spec.command.split_first() {
            let mut cmd = Command::new(program);
            cmd.args(args)
                .env("POD_NAME", &rec.pod.name)
                .env("POD_NAMESPACE", &rec.pod.namespace)
                .env("POD_IP", rec.pod.ip.to_string())
                .env("NODE_NAME", &rec.pod.node)
                .envs(spec.env.iter().map(|(k, v)| (k, v)));
            let log = self
                .logs
                .join(format!("{}_{}.log", rec.pod.namespace, rec.pod.name));
            rec.pod.pid = Some(
                process::spawn_detached(cmd, Some(&rec.pod.netns), &rec.pod.cgroup, &log)
                    .context("starting the container's command")?,
            );
        }
        Ok(())
    }

    /// Stop the pod's processes, CNI DEL, remove its namespace, cgroup and record. Keeps
    /// going past errors; returns the first.
    pub fn remove(&self, rec: &Record) -> Result<()> {
        let mut first: Option<anyhow::Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        note(cgroup::kill_all(
            &self.cgroup2,
            &rec.pod_cgroup,
            Duration::from_secs(5),
        ));
        if let Some(pid) = rec.pod.pid {
            process::reap(&[pid]);
        }
        if !rec.host_network {
            note(self.chain.del(&invocation(rec)));
            note(netns::delete(&rec.pod.netns));
        }
        note(cgroup::remove_tree(&self.cgroup2, &rec.pod_cgroup));
        let path = self.record_path(&rec.uid);
        if path.exists() {
            note(
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display())),
            );
        }
        first.map_or(Ok(()), Err)
    }
}

fn invocation(rec: &Record) -> Invocation<'_> {
    Invocation {
        container_id: &rec.container_id,
        netns: &rec.pod.netns,
        namespace: &rec.pod.namespace,
        pod: &rec.pod.name,
        uid: &rec.uid,
    }
}

/// The records under `dir` (unreadable ones are skipped with a warning).
pub fn load_records(dir: &Path) -> Vec<Record> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Record> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            serde_json::from_str(&text)
                .map_err(|e| tracing::warn!(file = %p.display(), error = %e, "unreadable sandbox record"))
                .ok()
        })
        .collect();
    out.sort_by_key(|r| r.pod.key());
    out
}
