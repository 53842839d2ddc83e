//! The install manifests (deploy/kubernetes) against a real API server: they are valid for
//! the server (`kubectl apply -k --dry-run=server`), the agent's ClusterRole grants exactly
//! what it needs, and combd running with the ServiceAccount's own token (not the admin's)
//! syncs everything; with one permission taken away that kind reports an error while the
//! others keep working, and it recovers when the permission is back. The CA's RBAC grants
//! what `comb ca --in-cluster --root-secret --publish-root` needs and no more.

mod common;

use std::path::{Path, PathBuf};

use comb_lab::{KubeCluster, KubeOptions, Lab, LabOptions};
use common::kube_agent::{Agent, lab_pod_cgroup};
use common::*;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");
const AGENT_SA: &str = "system:serviceaccount:comb-system:comb-agent";
const CA_SA: &str = "system:serviceaccount:comb-system:comb-ca";

fn can_i(kube: &KubeCluster, verb: &str, resource: &str) -> bool {
    can_i_as(kube, AGENT_SA, verb, resource, None)
}

/// `kubectl auth can-i VERB RESOURCE --as WHO` (in `namespace`, else all namespaces).
fn can_i_as(
    kube: &KubeCluster,
    who: &str,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let scope = match namespace {
        Some(ns) => format!("--namespace={ns}"),
        None => "--all-namespaces".to_owned(),
    };
    // `kubectl auth can-i` exits 1 for "no": read its answer, not its status.
    let out = kube
        .command(&comb_lab::KubeBinaries::locate().unwrap().kubectl)
        .args([
            &format!("--kubeconfig={}", kube.kubeconfig().display()),
            "auth",
            "can-i",
            verb,
            resource,
            &scope,
            &format!("--as={who}"),
        ])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl auth can-i {verb} {resource}: {answer:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

/// A kubeconfig that authenticates as the agent's ServiceAccount (a TokenRequest token).
fn agent_kubeconfig(kube: &KubeCluster, dir: &Path) -> PathBuf {
    let req = dir.join("tokenrequest.json");
    std::fs::write(
        &req,
        r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":3600}}"#,
    )
    .unwrap();
    let out = kube
        .kubectl(&[
            "create",
            "--raw",
            "/api/v1/namespaces/comb-system/serviceaccounts/comb-agent/token",
            "-f",
            &req.display().to_string(),
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = v["status"]["token"].as_str().expect("a token").to_owned();
    let admin = std::fs::read_to_string(kube.kubeconfig()).unwrap();
    let text: String = admin
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("token:") {
                format!("    token: {token}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.join("agent.kubeconfig");
    std::fs::write(&path, text + "\n").unwrap();
    path
}

/// The `--flags` of the container command in `path` that runs `program` (`- --flag=value`
/// or `- --flag` list items after `- program`).
fn manifest_flags(path: &str, program: &str) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut flags = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let item = line.trim().strip_prefix("- ");
        match item {
            Some(p) if p == program => inside = true,
            Some(arg) if inside && arg.starts_with("--") => {
                flags.push(arg.split('=').next().unwrap().to_owned());
            }
            Some(arg) if inside && !arg.starts_with('-') && !arg.contains(':') => {}
            _ if line.trim_start().starts_with('#') => {}
            _ => inside = false,
        }
    }
    assert!(
        !flags.is_empty(),
        "{path}: no `{program}` command with flags"
    );
    flags
}

#[test]
fn install_manifests_and_least_privilege() {
    if !privileged() {
        return;
    }
    let lab = Lab::up(
        LabOptions {
            name: unique("dp"),
            agent: None,
        },
        &[("pods.yaml".into(), pod("t", "a", "node1", &[]))],
    )
    .expect("lab up");
    let mut kube = KubeCluster::start(KubeOptions {
        netns: Some(lab.node_netns("node1").unwrap()),
        controller_manager: false,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    kube.install_crds(&["AuthorizationPolicy", "PeerAuthentication"])
        .unwrap();

    // Every flag the Deployment gives `comb ca` is one the binary has (a renamed flag would
    // otherwise show only as a crash-looping pod).
    let ca_flags = manifest_flags(&format!("{DEPLOY}/kubernetes/ca.yaml"), "comb");
    for want in [
        "--root-secret",
        "--publish-root",
        "--serving-dns",
        "--in-cluster",
    ] {
        assert!(ca_flags.iter().any(|f| f == want), "ca.yaml passes {want}");
    }
    let help = String::from_utf8(comb(&["ca", "--help"]).stdout).unwrap();
    for flag in &ca_flags {
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "ca.yaml passes {flag}, which `comb ca` lacks:\n{help}"
        );
    }

    // Valid for a real server, as a whole (kubectl's own kustomize). A server-side dry run
    // checks namespaced objects against their namespace, so that one exists first (a real
    // apply creates it before the rest).
    kube.kubectl(&[
        "apply",
        "-f",
        &format!("{DEPLOY}/kubernetes/namespace.yaml"),
    ])
    .unwrap();
    for base in ["kubernetes", "kubernetes-uninstall"] {
        let out = kube
            .kubectl(&[
                "apply",
                "-k",
                &format!("{DEPLOY}/{base}"),
                "--dry-run=server",
            ])
            .unwrap_or_else(|e| panic!("deploy/{base}: {e:#}"));
        assert!(out.contains("daemonset.apps/"), "deploy/{base}: {out}");
        if base == "kubernetes" {
            for want in [
                "deployment.apps/comb-ca",
                "service/comb-ca",
                "role.rbac.authorization.k8s.io/comb-ca",
            ] {
                assert!(out.contains(want), "deploy/{base}: {want} in {out}");
            }
        }
    }

    // The RBAC for real: exactly what the agent uses.
    kube.kubectl(&[
        "apply",
        "-f",
        &format!("{DEPLOY}/kubernetes/namespace.yaml"),
        "-f",
        &format!("{DEPLOY}/kubernetes/rbac.yaml"),
        "-f",
        &format!("{DEPLOY}/kubernetes/ca.yaml"),
    ])
    .unwrap();
    // The CA: TokenReviews and pods cluster-wide; in comb-system its own Secret and the
    // root's ConfigMap by name (plus create, which RBAC cannot limit to a name).
    for (verb, resource, ns) in [
        ("create", "tokenreviews.authentication.k8s.io", None),
        ("list", "pods", None),
        ("get", "secrets/comb-ca-root", Some("comb-system")),
        ("create", "secrets", Some("comb-system")),
        (
            "update",
            "configmaps/comb-ca-root-cert",
            Some("comb-system"),
        ),
        ("create", "configmaps", Some("comb-system")),
    ] {
        assert!(
            can_i_as(&kube, CA_SA, verb, resource, ns),
            "{CA_SA} cannot {verb} {resource} in {ns:?}"
        );
    }
    for (verb, resource, ns) in [
        ("get", "secrets/other", Some("comb-system")),
        ("list", "secrets", Some("comb-system")),
        ("get", "secrets/comb-ca-root", Some("default")),
        ("update", "configmaps/other", Some("comb-system")),
        ("create", "pods", None),
        ("delete", "pods", None),
        ("watch", "networkpolicies.networking.k8s.io", None),
        // Its Secret is read, never rewritten or removed; the ConfigMap never removed.
        ("update", "secrets/comb-ca-root", Some("comb-system")),
        ("patch", "secrets/comb-ca-root", Some("comb-system")),
        ("delete", "secrets/comb-ca-root", Some("comb-system")),
        (
            "delete",
            "configmaps/comb-ca-root-cert",
            Some("comb-system"),
        ),
        ("create", "configmaps", Some("default")),
        ("create", "serviceaccounts/token", Some("comb-system")),
    ] {
        assert!(
            !can_i_as(&kube, CA_SA, verb, resource, ns),
            "{CA_SA} may {verb} {resource} in {ns:?}"
        );
    }
    for (verb, resource) in [
        ("list", "pods"),
        ("watch", "namespaces"),
        ("watch", "nodes"),
        ("watch", "services"),
        ("watch", "endpointslices.discovery.k8s.io"),
        ("watch", "networkpolicies.networking.k8s.io"),
        ("watch", "authorizationpolicies.security.istio.io"),
        ("watch", "peerauthentications.security.istio.io"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(
            can_i(&kube, verb, resource),
            "{AGENT_SA} cannot {verb} {resource}"
        );
    }
    for (verb, resource) in [
        ("create", "pods"),
        ("delete", "services"),
        ("get", "secrets"),
        ("list", "configmaps"),
        ("update", "networkpolicies.networking.k8s.io"),
        ("update", "nodes"),
        ("create", "tokenreviews.authentication.k8s.io"),
    ] {
        assert!(
            !can_i(&kube, verb, resource),
            "{AGENT_SA} may {verb} {resource}"
        );
    }

    // combd with the ServiceAccount's token syncs every kind.
    let lab_pod = lab.pod("t/a").unwrap().clone();
    let cgroup = lab_pod_cgroup(&lab, &lab_pod);
    kube.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: t}}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: t\n  labels: {{app: web}}\n  annotations: {{comb.dev/cgroup: {cgroup}, comb.dev/interface: {}}}\nspec:\n  nodeName: node1\n  containers: [{{name: c, image: none}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: t}}\nspec:\n  selector: {{app: web}}\n  ports: [{{port: 80}}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: t}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Ingress]\n",
        lab_pod.host_veth
    ))
    .unwrap();
    kube.set_pod_status("t", "a", &[&lab_pod.ip.to_string()])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = agent_kubeconfig(&kube, dir.path());
    let agent = Agent::start(&lab, "node1", &kubeconfig, dir.path(), &[]);
    agent.wait("synced with the ServiceAccount's token", |a| {
        let s = a.status();
        s.config_errors.is_empty()
            && s.generation > 0
            && a.services().iter().any(|r| r.service == "t/web")
            && a.policy("t/a").is_some_and(|p| p.ingress_enforced)
    });

    // One permission taken away: that kind says so, the others keep working.
    let rbac = std::fs::read_to_string(format!("{DEPLOY}/kubernetes/rbac.yaml")).unwrap();
    let without = rbac.replace(
        "- apiGroups: [networking.k8s.io]\n  resources: [networkpolicies]\n  verbs: [get, list, watch]\n",
        "",
    );
    assert_ne!(
        without, rbac,
        "the NetworkPolicy rule is where the test expects it"
    );
    kube.apply(&without).unwrap();
    assert!(!can_i(&kube, "watch", "networkpolicies.networking.k8s.io"));
    // Established watches outlive an RBAC change; a restart makes every kind watch anew.
    kube.restart_apiserver().unwrap();
    kube.apply("apiVersion: v1\nkind: Service\nmetadata: {name: later, namespace: t}\nspec:\n  selector: {app: web}\n  ports: [{port: 81}]\n")
        .unwrap();
    agent.wait("NetworkPolicies forbidden, the rest applies", |a| {
        a.errors().contains("networkpolicies")
            && a.errors().to_lowercase().contains("forbidden")
            && a.services().iter().any(|r| r.service == "t/later")
    });
    kube.apply(&rbac).unwrap();
    agent.wait("recovered once the permission is back", |a| {
        a.status().config_errors.is_empty()
    });
}
