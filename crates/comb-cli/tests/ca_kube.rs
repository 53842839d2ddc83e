//! The CA in Kubernetes mode against a real API server: an agent authenticates with its pod's
//! bound ServiceAccount token (checked by a TokenReview), its node is its pod's, and it
//! obtains the identity of a ServiceAccount with a pod on that node and nothing else. A bogus
//! token, a token of another ServiceAccount, and a token whose pod is gone are refused.
//! Its keys live in a Secret (generated and stored, or a plug-in CA in Istio's cacerts
//! layout) so a restarted CA with an empty disk serves the same root, and the root is
//! published in a ConfigMap for the agents.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use comb_ca::{CaClient, CaConfig, CaServer, Callers, KubeKeys};
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
        let server = CaServer::start(ca_config(
            &kube,
            &dir.path().join("ca"),
            KubeKeys::default(),
        ))
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

fn ca_config(kube: &KubeCluster, dir: &Path, keys: KubeKeys) -> CaConfig {
    CaConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: dir.to_path_buf(),
        cacerts: None,
        callers: Callers::Kubernetes {
            kubeconfig: Some(kube.kubeconfig().to_path_buf()),
            agent: ("comb-system".into(), "comb-agent".into()),
        },
        trust_domain: "cluster.local".into(),
        max_ttl: Duration::from_secs(3600),
        kube_keys: Some(keys),
    }
}

/// A key of a Secret or ConfigMap in comb-system, decoded.
fn object_key(kube: &KubeCluster, kind: &str, name: &str, key: &str) -> Option<String> {
    let out = kube
        .kubectl(&["get", kind, "-n", "comb-system", name, "-o", "json"])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text = v["data"][key].as_str()?;
    Some(if kind == "secret" {
        let out = Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(text.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    } else {
        text.to_owned()
    })
}

/// A root and an intermediate CA (PKCS#8 P-256 keys) made with openssl in `dir`.
fn openssl_chain(dir: &Path) {
    let script = r#"set -e
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out root.key
openssl req -x509 -new -key root.key -subj "/O=cluster.local/CN=Plug-in Root" -days 30 -out root.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out int.key
openssl req -new -key int.key -subj "/O=cluster.local/CN=Plug-in Intermediate" -out int.csr
printf 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n' > int.ext
openssl x509 -req -in int.csr -CA root.pem -CAkey root.key -CAcreateserial -days 30 -extfile int.ext -out int.pem 2>/dev/null
"#;
    let st = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "openssl");
}

#[test]
fn cluster_ca_keeps_its_keys_in_a_secret_and_publishes_its_root() {
    if !privileged() {
        return;
    }
    let kube = KubeCluster::start(KubeOptions::default()).unwrap_or_else(|e| panic!("{e:#}"));
    kube.apply(OBJECTS).unwrap();
    let agent = bound_token(&kube, "comb-agent", "agent-n1");
    let tmp = tempfile::tempdir().unwrap();
    let keys = |secret: &str| KubeKeys {
        root_secret: Some(("comb-system".into(), secret.into())),
        publish_root: Some(("comb-system".into(), "comb-ca-root-cert".into())),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let web: SpiffeId = "spiffe://cluster.local/ns/t/sa/web".parse().unwrap();
    let issue = |server: &CaServer| {
        let client =
            CaClient::new(&server.local_addr.to_string(), &server.root_pem, &agent).unwrap();
        let kc = key_and_csr(&web).unwrap();
        async move {
            client
                .create_certificate(&kc.csr_pem, Duration::from_secs(600))
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    // The same certificate(s), whatever the line breaks.
    let same_pem = |a: &str, b: &str| {
        let norm = |s: &str| s.split_whitespace().collect::<String>();
        norm(a) == norm(b)
    };
    rt.block_on(async {
        // First start: no Secret, so a root is generated and stored; the root is published.
        let first = CaServer::start(ca_config(
            &kube,
            &tmp.path().join("a"),
            keys("comb-ca-root"),
        ))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        let root = first.root_pem.clone();
        let stored = object_key(&kube, "secret", "comb-ca-root", "ca-cert.pem").unwrap();
        assert!(same_pem(&stored, &root), "the Secret holds the root");
        assert!(object_key(&kube, "secret", "comb-ca-root", "ca-key.pem").is_some());
        let published =
            object_key(&kube, "configmap", "comb-ca-root-cert", "root-cert.pem").unwrap();
        assert!(same_pem(&published, &root), "the ConfigMap holds the root");
        let chain = issue(&first).await;
        assert!(same_pem(chain.last().unwrap(), &root), "{chain:?}");
        first.shutdown().await.unwrap();

        // A restart on an empty disk (a rescheduled pod) serves the same root, and puts back
        // a ConfigMap someone deleted.
        kube.kubectl(&[
            "delete",
            "configmap",
            "-n",
            "comb-system",
            "comb-ca-root-cert",
        ])
        .unwrap();
        let second = CaServer::start(ca_config(
            &kube,
            &tmp.path().join("b"),
            keys("comb-ca-root"),
        ))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            same_pem(&second.root_pem, &root),
            "same root after a restart"
        );
        let chain = issue(&second).await;
        assert!(same_pem(chain.last().unwrap(), &root));
        let published =
            object_key(&kube, "configmap", "comb-ca-root-cert", "root-cert.pem").unwrap();
        assert!(same_pem(&published, &root));
        second.shutdown().await.unwrap();

        // A plug-in CA in Istio's cacerts layout: certificates come from the intermediate,
        // and the published root changes to the plug-in's root.
        let pki = tmp.path().join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        openssl_chain(&pki);
        kube.kubectl(&[
            "create",
            "secret",
            "generic",
            "cacerts",
            "-n",
            "comb-system",
            &format!("--from-file=ca-cert.pem={}", pki.join("int.pem").display()),
            &format!("--from-file=ca-key.pem={}", pki.join("int.key").display()),
            &format!(
                "--from-file=cert-chain.pem={}",
                pki.join("int.pem").display()
            ),
            &format!(
                "--from-file=root-cert.pem={}",
                pki.join("root.pem").display()
            ),
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
        let plugin = CaServer::start(ca_config(&kube, &tmp.path().join("c"), keys("cacerts")))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let plugin_root = std::fs::read_to_string(pki.join("root.pem")).unwrap();
        assert!(same_pem(&plugin.root_pem, &plugin_root));
        let chain = issue(&plugin).await;
        assert_eq!(chain.len(), 3, "leaf, intermediate, root: {chain:?}");
        let intermediate = std::fs::read_to_string(pki.join("int.pem")).unwrap();
        assert!(same_pem(&chain[1], &intermediate));
        let published =
            object_key(&kube, "configmap", "comb-ca-root-cert", "root-cert.pem").unwrap();
        assert!(
            same_pem(&published, &plugin_root),
            "the plug-in's root is published"
        );
        plugin.shutdown().await.unwrap();

        // A Secret in neither layout: a clear error naming it, no CA.
        kube.kubectl(&[
            "create",
            "secret",
            "generic",
            "wrong",
            "-n",
            "comb-system",
            "--from-literal=tls.crt=x",
        ])
        .unwrap();
        let e = CaServer::start(ca_config(&kube, &tmp.path().join("d"), keys("wrong")))
            .await
            .err()
            .expect("a Secret without CA keys is refused");
        let e = format!("{e:#}");
        assert!(
            e.contains("comb-system/wrong") && e.contains("neither"),
            "{e}"
        );
    });
}
