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
        serving_dns: Vec::new(),
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

/// A `comb ca` process (the binary, as the Deployment runs it), its log in a file; killed
/// when dropped if still running.
struct CaProcess {
    child: std::process::Child,
    log: std::path::PathBuf,
    addr: String,
}

impl CaProcess {
    /// Start `comb ca --kubeconfig … --listen 127.0.0.1:0 --dir DIR ARGS` and wait until it
    /// serves (its "serving on ADDR" line).
    fn start(kube: &KubeCluster, dir: &Path, args: &[&str]) -> Self {
        let log = dir.with_extension("log");
        let child = Command::new(COMB)
            .args(["ca", "--kubeconfig"])
            .arg(kube.kubeconfig())
            .args(["--listen", "127.0.0.1:0", "--dir"])
            .arg(dir)
            .args(args)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut p = Self {
            child,
            log,
            addr: String::new(),
        };
        wait_for(Duration::from_secs(30), "comb ca serving", || {
            if let Some(st) = p.child.try_wait().unwrap() {
                panic!("comb ca exited ({st}): {}", p.log_text());
            }
            p.log_text()
                .lines()
                .find_map(|l| l.strip_prefix("comb ca: serving on "))
                .map(|a| p.addr = a.trim().to_owned())
                .is_some()
        });
        p
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and a clean exit.
    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "comb ca: {st}: {}", self.log_text());
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Write `text` to `dir/name` and return the path.
fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `comb cert request` against `ca` (trusting `root`): the chain's PEM blocks.
fn cert_request(ca: &str, root: &Path, token_file: &Path) -> Vec<String> {
    let out = comb(&[
        "cert",
        "request",
        "--ca",
        ca,
        "--root",
        &root.display().to_string(),
        "--token-file",
        &token_file.display().to_string(),
        "--identity",
        "spiffe://cluster.local/ns/t/sa/web",
        "--ttl",
        "10m",
    ]);
    assert!(
        out.status.success(),
        "comb cert request: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_inclusive("-----END CERTIFICATE-----")
        .map(|b| b.trim().to_owned() + "\n")
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .collect()
}

/// `openssl verify`: `chain[0]` (the leaf) up to a root of the bundle `roots`, through the
/// chain's intermediates.
fn openssl_verifies(dir: &Path, chain: &[String], roots: &Path) -> Result<(), String> {
    let leaf = write(dir, "leaf.pem", &chain[0]);
    let middle = write(dir, "untrusted.pem", &chain[1..].concat());
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(roots)
        .arg("-untrusted")
        .arg(&middle)
        .arg(&leaf)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// `openssl s_client`: the CA at `addr` presents a certificate valid for `name` under `roots`.
fn openssl_name_verifies(addr: &str, roots: &Path, name: &str) -> bool {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", addr, "-servername", name])
        .args(["-verify_hostname", name, "-verify_return_error", "-CAfile"])
        .arg(roots)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains("Verify return code: 0 (ok)")
}

/// The `comb ca` binary with the Deployment's flags (`--root-secret`, `--publish-root`,
/// `--serving-dns`) against the real API server: the Secret and the ConfigMap appear with
/// the root; stopped and started again on an empty `--dir` (a rescheduled pod), it serves the
/// same root and what it issues verifies (openssl) against the published one; two CAs
/// starting together on a missing Secret end up with one root; a mounted `cacerts`
/// directory (`--cacerts`) whose root-cert.pem holds two roots (a rotation) publishes both.
#[test]
fn comb_ca_binary_keeps_and_publishes_its_root() {
    if !privileged() {
        return;
    }
    let kube = KubeCluster::start(KubeOptions::default()).unwrap_or_else(|e| panic!("{e:#}"));
    kube.apply(OBJECTS).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let token = write(t, "token", &bound_token(&kube, "comb-agent", "agent-n1"));
    let same_pem = |a: &str, b: &str| {
        let norm = |s: &str| s.split_whitespace().collect::<String>();
        norm(a) == norm(b)
    };
    let flags = [
        "--root-secret",
        "comb-system/bin-root",
        "--publish-root",
        "comb-system/bin-root-cert",
        "--serving-dns",
        "comb-ca.comb-system.svc",
        "--serving-dns",
        "comb-ca.comb-system.svc.cluster.local",
    ];
    assert!(object_key(&kube, "secret", "bin-root", "ca-cert.pem").is_none());

    // First start: the root is generated, stored and published.
    let first = CaProcess::start(&kube, &t.join("a"), &flags);
    let root = std::fs::read_to_string(t.join("a/root-cert.pem")).unwrap();
    assert!(
        first.log_text().contains("stored the generated root CA"),
        "{}",
        first.log_text()
    );
    let stored = object_key(&kube, "secret", "bin-root", "ca-cert.pem").expect("the Secret");
    assert!(same_pem(&stored, &root), "the Secret holds the root");
    let published =
        object_key(&kube, "configmap", "bin-root-cert", "root-cert.pem").expect("the ConfigMap");
    assert!(same_pem(&published, &root), "the ConfigMap holds the root");
    let published_file = write(t, "published.pem", &published);
    // Agents dial the Service's names: the serving certificate carries them.
    for name in [
        "comb-ca.comb-system.svc",
        "comb-ca.comb-system.svc.cluster.local",
        "istiod.istio-system.svc",
    ] {
        assert!(
            openssl_name_verifies(&first.addr, &published_file, name),
            "{name}"
        );
    }
    assert!(!openssl_name_verifies(
        &first.addr,
        &published_file,
        "comb-ca.elsewhere.svc"
    ));
    let chain = cert_request(&first.addr, &published_file, &token);
    openssl_verifies(t, &chain, &published_file).unwrap_or_else(|e| panic!("{e}"));
    first.stop();

    // Restarted on an empty directory: the same root, and its certificates chain to the
    // published one.
    let second = CaProcess::start(&kube, &t.join("b"), &flags);
    let root_b = std::fs::read_to_string(t.join("b/root-cert.pem")).unwrap();
    assert!(same_pem(&root_b, &root), "same root after a restart");
    assert!(
        !second.log_text().contains("generated a self-signed root"),
        "read from the Secret, not generated: {}",
        second.log_text()
    );
    let published = object_key(&kube, "configmap", "bin-root-cert", "root-cert.pem").unwrap();
    assert!(same_pem(&published, &root));
    let chain = cert_request(&second.addr, &published_file, &token);
    openssl_verifies(t, &chain, &published_file).unwrap_or_else(|e| panic!("{e}"));
    // …and not to some other root.
    let (other_root, _) = {
        let pki = t.join("other");
        std::fs::create_dir_all(&pki).unwrap();
        openssl_chain(&pki);
        (pki.join("root.pem"), ())
    };
    assert!(openssl_verifies(t, &chain, &other_root).is_err());
    second.stop();

    // Two CAs starting together on a missing Secret: one root between them.
    let race = [
        "--root-secret",
        "comb-system/race-root",
        "--publish-root",
        "comb-system/race-root-cert",
    ];
    let (c, d) = std::thread::scope(|s| {
        let c = s.spawn(|| CaProcess::start(&kube, &t.join("c"), &race));
        let d = s.spawn(|| CaProcess::start(&kube, &t.join("d"), &race));
        (c.join().unwrap(), d.join().unwrap())
    });
    let root_c = std::fs::read_to_string(t.join("c/root-cert.pem")).unwrap();
    let root_d = std::fs::read_to_string(t.join("d/root-cert.pem")).unwrap();
    assert!(same_pem(&root_c, &root_d), "one root for both replicas");
    let stored = object_key(&kube, "secret", "race-root", "ca-cert.pem").unwrap();
    assert!(same_pem(&stored, &root_c));
    assert!(!same_pem(&root_c, &root), "a new Secret, a new root");
    c.stop();
    d.stop();

    // A mounted `cacerts` Secret (--cacerts DIR) during a root rotation: root-cert.pem holds
    // the plug-in's root and the next one; both are published, chains end at the first.
    let pki = t.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    openssl_chain(&pki);
    let cacerts = t.join("cacerts");
    std::fs::create_dir_all(&cacerts).unwrap();
    let plugin_root = std::fs::read_to_string(pki.join("root.pem")).unwrap();
    let next_root = std::fs::read_to_string(&other_root).unwrap();
    for (name, from) in [
        ("ca-cert.pem", "int.pem"),
        ("ca-key.pem", "int.key"),
        ("cert-chain.pem", "int.pem"),
    ] {
        std::fs::copy(pki.join(from), cacerts.join(name)).unwrap();
    }
    write(
        &cacerts,
        "root-cert.pem",
        &format!("{next_root}{plugin_root}"),
    );
    let plugin = CaProcess::start(
        &kube,
        &t.join("e"),
        &[
            "--cacerts",
            &cacerts.display().to_string(),
            "--publish-root",
            "comb-system/bin-root-cert",
        ],
    );
    let published = object_key(&kube, "configmap", "bin-root-cert", "root-cert.pem").unwrap();
    assert!(
        same_pem(&published, &format!("{plugin_root}{next_root}")),
        "both roots published, the chain's first: {published}"
    );
    let bundle = write(t, "bundle.pem", &published);
    let chain = cert_request(&plugin.addr, &bundle, &token);
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert!(same_pem(&chain[2], &plugin_root));
    openssl_verifies(t, &chain, &bundle).unwrap_or_else(|e| panic!("{e}"));
    plugin.stop();
}
