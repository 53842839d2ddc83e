//! Kubernetes mode end to end: a real etcd + kube-apiserver 1.20 + kube-controller-manager
//! inside a lab node's network namespace, objects made with kubectl, and combd on that node
//! started with `--kubeconfig`. The agent's view (admin API, `comb status`) must follow the
//! API server through creation, update, deletion, a rejected object, an API server restart,
//! `410 Gone` after an etcd compaction, and a CRD installed after the agent started.

mod common;

use std::process::Command;

use comb_lab::{KubeCluster, KubeOptions, Lab, LabOptions};
use common::kube_agent::{Agent, CONVERGE, lab_pod_cgroup};
use common::*;

fn kube_pod(name: &str, node: &str, labels: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: t\n  labels: {{{labels}}}\n  annotations: {{{annotations}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: none, ports: [{{name: http, containerPort: 8080}}]}}]\n"
    )
}

/// A lab with pod t/a on node1 and no agent: the tests start combd themselves.
fn lab_without_agent(prefix: &str) -> Lab {
    Lab::up(
        LabOptions {
            name: unique(prefix),
            agent: None,
        },
        &[("pods.yaml".into(), pod("t", "a", "node1", &[]))],
    )
    .expect("lab up")
}

const OBJECTS: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node2}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: t, labels: {team: a}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: t}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: http}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-ingress, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  ingress: [{from: [{podSelector: {}}], ports: [{port: 8080}]}]\n";

#[test]
fn agent_follows_the_api_server() {
    if !privileged() {
        return;
    }
    let lab = lab_without_agent("ku");
    let lab_pod = lab.pod("t/a").unwrap().clone();
    let cgroup = lab_pod_cgroup(&lab, &lab_pod);
    let mut kube = KubeCluster::start(KubeOptions {
        netns: Some(lab.node_netns("node1").unwrap()),
        controller_manager: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    // PeerAuthentication now; AuthorizationPolicy only after the agent runs.
    kube.install_crds(&["PeerAuthentication"]).unwrap();

    // The lab pod as the API's Pod, with what a CNI plugin will report later (its cgroup
    // and host interface) as annotations; a second backend on a node of the API only.
    kube.apply(OBJECTS).unwrap();
    let annotations = format!(
        "comb.dev/cgroup: {cgroup}, comb.dev/interface: {}",
        lab_pod.host_veth
    );
    kube.apply(&kube_pod("a", "node1", "app: web", &annotations))
        .unwrap();
    kube.apply(&kube_pod("web-1", "node2", "app: web", ""))
        .unwrap();
    let a_ip = lab_pod.ip.to_string();
    kube.set_pod_status("t", "a", &[&a_ip]).unwrap();
    kube.set_pod_status("t", "web-1", &["198.18.2.5"]).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&lab, "node1", kube.kubeconfig(), dir.path(), &[]);

    // Creation: the pod on this node attached, the remote one known, the Service's
    // backends from the slice the EndpointSlice controller made (discovery.k8s.io/v1beta1).
    agent.wait("pods, service and slice applied", |a| {
        let eps = a.endpoints();
        eps.iter()
            .any(|e| e.pod == "a" && e.local && e.cgroup.is_some())
            && eps.iter().any(|e| e.pod == "web-1" && !e.local)
            && a.backends("t/web").is_some_and(|b| b.len() == 2)
            // In the socket LB's maps, not just in State.
            && a.services().iter().any(|s| s.service == "t/web" && s.programmed)
    });
    let s = agent.status();
    assert!(
        s.manifests.starts_with("kubernetes (kubeconfig "),
        "{}",
        s.manifests
    );
    assert_eq!(s.applied_generation, s.generation);
    assert!(
        agent.policy("t/a").is_some_and(
            |p| p.ingress_enforced && p.policies.iter().any(|n| n.contains("t/web-ingress"))
        ),
        "{:?}",
        agent.policy("t/a")
    );
    // A CRD that is not installed is reported, nothing else is.
    let errors = agent.errors();
    assert!(
        errors.contains("kubernetes authorizationpolicies.security.istio.io: not served"),
        "{errors}"
    );
    assert_eq!(s.config_errors.len(), 1, "{errors}");
    let out = comb(&["status", "--socket", &agent.socket.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("source:          kubernetes (kubeconfig"),
        "{text}"
    );

    // Update: a new backend, a removed one.
    kube.apply(&kube_pod("web-2", "node2", "app: web", ""))
        .unwrap();
    kube.set_pod_status("t", "web-2", &["198.18.2.6"]).unwrap();
    kube.delete_pod("t", "web-1").unwrap();
    agent.wait("backends follow the pods", |a| {
        a.backends("t/web") == Some(vec![a_ip.clone(), "198.18.2.6".into()])
    });

    // A rejected object: a new pod Comb refuses is left out, and a bad new version of a
    // good pod leaves its last good version in force; everything else keeps applying.
    kube.apply(&kube_pod(
        "odd",
        "node2",
        "app: odd",
        "comb.dev/splice: maybe",
    ))
    .unwrap();
    kube.apply(&kube_pod(
        "a",
        "node1",
        "app: web",
        &format!("{annotations}, comb.dev/l7: sometimes"),
    ))
    .unwrap();
    kube.apply("apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: t}\nspec:\n  selector: {app: web}\n  ports: [{port: 81, targetPort: http}]\n")
        .unwrap();
    agent.wait("rejections reported, the rest applied", |a| {
        let e = a.errors();
        e.contains("Pod t/odd: metadata.annotations[\"comb.dev/splice\"]")
            && e.contains("(left out)")
            && e.contains("Pod t/a: ")
            && e.contains("(the last good version stays in force)")
            && a.backends("t/other").is_some_and(|b| b.len() == 2)
    });
    assert!(
        agent
            .endpoints()
            .iter()
            .any(|e| e.pod == "a" && e.local && e.cgroup.is_some()),
        "the last good version of t/a stays attached"
    );
    assert!(!agent.endpoints().iter().any(|e| e.pod == "odd"));
    // Each rejected object carries a Warning Event with the located error, reported once.
    let rejected_events = || -> Vec<serde_json::Value> {
        let text = kube
            .kubectl(&["get", "events", "-n", "t", "-o", "json"])
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == "CombRejected")
            .cloned()
            .collect()
    };
    wait_for(CONVERGE, "Events on t/odd and t/a", || {
        let ev = rejected_events();
        let on = |name: &str, text: &str| {
            ev.iter().any(|e| {
                e["involvedObject"]["name"] == name
                    && e["type"] == "Warning"
                    && e["message"].as_str().is_some_and(|m| m.contains(text))
            })
        };
        on("odd", "comb.dev/splice") && on("a", "comb.dev/l7")
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    let ev = rejected_events();
    assert_eq!(
        ev.len(),
        2,
        "one Event per rejected object version: {ev:#?}"
    );
    assert!(
        ev.iter().all(|e| e["count"].as_i64().unwrap_or(1) == 1
            && e["reportingComponent"] == "comb-agent"
            && e["reportingInstance"] == "node1"),
        "{ev:#?}"
    );
    kube.delete_pod("t", "odd").unwrap();
    kube.apply(&kube_pod("a", "node1", "app: web", &annotations))
        .unwrap();
    agent.wait("errors gone once fixed", |a| !a.errors().contains("Pod t/"));

    // A CRD installed after the agent started is picked up.
    kube.install_crds(&["AuthorizationPolicy"]).unwrap();
    kube.apply("apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: deny-other, namespace: t}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{from: [{source: {namespaces: [other]}}]}]\n")
        .unwrap();
    agent.wait("the AuthorizationPolicy applies", |a| {
        a.status().config_errors.is_empty()
            && a.policy("t/a").is_some_and(|p| {
                p.policies
                    .iter()
                    .any(|n| n.contains("AuthorizationPolicy t/deny-other"))
            })
    });

    // API server restart: the watches reconnect and later changes apply.
    kube.restart_apiserver().unwrap();
    kube.kubectl(&["delete", "service", "-n", "t", "other"])
        .unwrap();
    agent.wait("a change after the restart applies", |a| {
        a.backends("t/other").is_none()
    });

    // 410 Gone: history the agent's resourceVersions point into is compacted away (a
    // ConfigMap write moves etcd's revision past every watched object's), then the
    // restarted API server refuses to resume those watches and the agent relists.
    kube.kubectl(&["create", "configmap", "-n", "t", "bump"])
        .unwrap();
    kube.compact_etcd().unwrap();
    kube.restart_apiserver().unwrap();
    kube.apply(&kube_pod("web-3", "node2", "app: web", ""))
        .unwrap();
    kube.set_pod_status("t", "web-3", &["198.18.2.7"]).unwrap();
    agent.wait("converged after 410 Gone", |a| {
        a.backends("t/web").is_some_and(|b| b.len() == 3)
    });
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        log.contains("too old resource version"),
        "no 410 Gone seen by the agent:\n{log}"
    );

    // Deleting the namespace (the namespace controller removes its objects).
    kube.kubectl(&["delete", "namespace", "t", "--wait=false"])
        .unwrap();
    kube.delete_pods("t").unwrap();
    agent.wait("the namespace's objects are gone", |a| {
        a.backends("t/web").is_none() && a.endpoints().is_empty()
    });
    // The watch failures of the restarts are no longer reported once watches run again.
    agent.wait("no errors left", |a| a.status().config_errors.is_empty());
    drop(agent);
    drop(kube);
    drop(lab);
}

/// `--kubeconfig` naming a file that does not exist: the agent runs and says why it has
/// no configuration, rather than exiting or applying an empty State silently.
#[test]
fn unusable_kubeconfig_is_reported() {
    if !privileged() {
        return;
    }
    let lab = lab_without_agent("kv");
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-kubeconfig");
    let agent = Agent::start(&lab, "node1", &missing, dir.path(), &[]);
    agent.wait("the kubeconfig error is reported", |a| {
        a.errors().contains("no-such-kubeconfig") && a.status().generation == 0
    });
    let out = Command::new(COMB)
        .args(["status", "--socket", &agent.socket.display().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 problem(s)") && text.contains("no-such-kubeconfig"),
        "{text}"
    );
}
