//! The CA in Kubernetes mode against a real API server: an agent authenticates with its pod's
//! bound ServiceAccount token (checked by a TokenReview), its node is its pod's, and it
//! obtains the identity of a ServiceAccount with a pod on that node and nothing else. A bogus
//! token, a token of another ServiceAccount, and a token whose pod is gone are refused.

mod common;

use std::time::Duration;

use comb_ca::{CaClient, CaConfig, CaServer, Callers};
use comb_identity::{SpiffeId, key_and_csr};
use comb_lab::{KubeCluster, KubeOptions};
use common::*;
use tonic::Code;

const OBJECTS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: comb-system}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: t}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: comb-agent, namespace: comb-system}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: other, namespace: comb-system}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: agent-n1, namespace: comb-system}\nspec: {nodeName: n1, serviceAccountName: comb-agent, containers: [{name: c, image: x}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: intruder-n1, namespace: comb-system}\nspec: {nodeName: n1, serviceAccountName: other, containers: [{name: c, image: x}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: t}\nspec: {nodeName: n1, serviceAccountName: web, containers: [{name: c, image: x}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: t}\nspec: {nodeName: n2, serviceAccountName: db, containers: [{name: c, image: x}]}\n";

/// A TokenRequest token of `sa`, bound to pod `pod` (as a projected volume gives a pod).
fn bound_token(kube: &KubeCluster, sa: &str, pod: &str) -> String {
    let uid = kube
        .kubectl(&[
            "get",
            "pod",
            "-n",
            "comb-system",
            pod,
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .unwrap();
    let req = kube.dir().join(format!("token-{sa}-{pod}.json"));
    std::fs::write(
        &req,
        format!(
            r#"{{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{{"expirationSeconds":3600,"boundObjectRef":{{"kind":"Pod","apiVersion":"v1","name":"{pod}","uid":"{}"}}}}}}"#,
            uid.trim()
        ),
    )
    .unwrap();
    let out = kube
        .kubectl(&[
            "create",
            "--raw",
            &format!("/api/v1/namespaces/comb-system/serviceaccounts/{sa}/token"),
            "-f",
            &req.display().to_string(),
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["status"]["token"].as_str().unwrap().to_owned()
}

#[test]
fn kubernetes_callers_get_only_their_nodes_identities() {
    if !privileged() {
        return;
    }
    let kube = KubeCluster::start(KubeOptions::default()).unwrap_or_else(|e| panic!("{e:#}"));
    kube.apply(OBJECTS).unwrap();
    let agent = bound_token(&kube, "comb-agent", "agent-n1");
    let intruder = bound_token(&kube, "other", "intruder-n1");
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = CaServer::start(CaConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: dir.path().join("ca"),
            cacerts: None,
            callers: Callers::Kubernetes {
                kubeconfig: Some(kube.kubeconfig().to_path_buf()),
                agent: ("comb-system".into(), "comb-agent".into()),
            },
            trust_domain: "cluster.local".into(),
            max_ttl: Duration::from_secs(3600),
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        let ask = |token: &str, id: &str| {
            let client =
                CaClient::new(&server.local_addr.to_string(), &server.root_pem, token).unwrap();
            let id: SpiffeId = id.parse().unwrap();
            async move {
                let kc = key_and_csr(&id).unwrap();
                client
                    .create_certificate(&kc.csr_pem, Duration::from_secs(600))
                    .await
            }
        };
        let web = "spiffe://cluster.local/ns/t/sa/web";
        let db = "spiffe://cluster.local/ns/t/sa/db";
        let chain = ask(&agent, web).await.expect("n1's agent obtains t/web");
        assert!(chain.len() >= 2, "leaf and root");
        let e = ask(&agent, db).await.expect_err("t/db has no pod on n1");
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
        let e = ask("not-a-token", web).await.expect_err("bogus token");
        assert_eq!(e.code(), Some(Code::Unauthenticated), "{e}");
        let e = ask(&intruder, web)
            .await
            .expect_err("another ServiceAccount");
        assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
        assert!(e.to_string().contains("comb-system/other"), "{e}");

        // The agent's pod is gone: its token no longer names a node.
        kube.delete_pod("comb-system", "agent-n1").unwrap();
        let e = ask(&agent, web).await.expect_err("the pod is gone");
        assert!(
            matches!(
                e.code(),
                Some(Code::Unauthenticated | Code::PermissionDenied)
            ),
            "{e}"
        );
        server.shutdown().await.unwrap();
    });
}
