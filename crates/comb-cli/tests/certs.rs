//! Workload certificates end to end: the lab's CA (`comb ca`, its own process in the router
//! namespace), agents on two nodes obtaining certificates for their pods' service accounts,
//! the CA's node-scoped authorization, rotation, a CA outage longer than the lifetime, and
//! recovery.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use comb_api::{CertRow, Query, Status};
use common::*;

fn sa_pod(ns: &str, name: &str, node: &str, sa: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: [{{name: c, image: none}}]\n---\n"
    )
}

/// `comb cert list -o json` against the node's agent (the CLI, as a user runs it).
fn cert_list(lab: &comb_lab::Lab, node: &str) -> Vec<CertRow> {
    let sock = lab.agent_socket(node);
    let out = comb(&[
        "cert",
        "list",
        "-o",
        "json",
        "--socket",
        sock.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "comb cert list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn one(rows: &[CertRow], id: &str) -> CertRow {
    rows.iter()
        .find(|r| r.identity == id)
        .unwrap_or_else(|| panic!("{id} not in {rows:?}"))
        .clone()
}

const CLIENT: &str = "spiffe://cluster.local/ns/a/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/b/sa/server";

#[test]
fn certificates_from_the_lab_ca_rotate_and_survive_an_outage() {
    if !privileged() {
        return;
    }
    let ttl = 20.0;
    let pods = sa_pod("a", "client", "n1", "client")
        + &sa_pod("a", "client2", "n1", "client")
        + &sa_pod("b", "server", "n2", "server")
        + &sa_pod("c", "zt", "n3", "zt")
        + "apiVersion: v1\nkind: Node\nmetadata:\n  name: n3\n  annotations:\n    comb.dev/agent: \"false\"\n---\n";
    let lab = lab_up("crt", &pods, &["--cert-ttl", "20s"]);

    // The agent-less node has pods but no combd; the CA runs in the router namespace.
    assert!(!lab.agent_socket("n3").exists());
    assert!(lab.start_agent("n3").is_err());
    let state = lab.state();
    let ca = state.ca.as_ref().unwrap();
    assert_eq!(ca.listen, "198.18.254.254:15012");
    assert_eq!(Some(&ca.netns), state.router_netns.as_ref());

    // Each agent holds exactly its pods' identities.
    let t0 = Instant::now();
    loop {
        let (r1, r2) = (cert_list(&lab, "n1"), cert_list(&lab, "n2"));
        if r1.len() == 1 && r1[0].state == "valid" && r2.len() == 1 && r2[0].state == "valid" {
            break;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            panic!(
                "no certificates: n1 {r1:?} n2 {r2:?}\nCA log:\n{}\nn1 log:\n{}",
                std::fs::read_to_string(lab.ca_log()).unwrap_or_default(),
                std::fs::read_to_string(lab.agent_log("n1")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = one(&cert_list(&lab, "n1"), CLIENT);
    let s = one(&cert_list(&lab, "n2"), SERVER);
    assert_ne!(c.serial, s.serial);
    let life = c.not_after.unwrap() - c.not_before.unwrap();
    assert!(life <= ttl + 31.0 && life >= ttl, "lifetime {life}");
    let st: Status =
        serde_json::from_value(call(&lab.agent_socket("n1"), Query::Status).unwrap()).unwrap();
    assert!(
        st.certificates.enabled && st.certificates.valid == 1,
        "{st:?}"
    );
    let text = comb(&[
        "status",
        "--socket",
        lab.agent_socket("n1").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("certificates:    1 valid of 1 wanted"),
        "{text}"
    );

    // Node n1 asking the CA for n2's identity is refused (and the CA logs it).
    let n1_token = lab.ca_token_file("n1");
    let ask = |identity: &str| {
        lab.node_command(
            "n1",
            COMB,
            &[
                "cert",
                "request",
                "--ca",
                &ca.listen,
                "--root",
                lab.ca_root_cert().to_str().unwrap(),
                "--token-file",
                n1_token.to_str().unwrap(),
                "--identity",
                identity,
            ],
        )
        .unwrap()
        .output()
        .unwrap()
    };
    let out = ask(SERVER);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "n1 got {SERVER}");
    assert!(
        err.contains("PermissionDenied") || err.contains("permission"),
        "{err}"
    );
    let ca_log = std::fs::read_to_string(lab.ca_log()).unwrap();
    assert!(
        ca_log.contains("refused") && ca_log.contains("n1") && ca_log.contains(SERVER),
        "{ca_log}"
    );
    let out = ask(CLIENT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .matches("BEGIN CERTIFICATE")
            .count()
            == 2
    );

    // Rotation at half-life: a new serial, and at no moment without a valid certificate.
    let first = c.serial.clone();
    let t0 = Instant::now();
    let rotated = loop {
        let r = one(&cert_list(&lab, "n1"), CLIENT);
        assert!(
            (r.state == "valid" || r.state == "renewing") && r.not_after.unwrap() > now(),
            "gap during rotation: {r:?}"
        );
        if r.serial != first {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no rotation: {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(rotated.state, "valid");

    // The CA stops for longer than the lifetime: status says why, certificates expire.
    lab.stop_ca().unwrap();
    let deadline = rotated.not_after.unwrap() + 3.0;
    wait_for(Duration::from_secs(40), "n1's certificate expired", || {
        let r = one(&cert_list(&lab, "n1"), CLIENT);
        r.state == "expired" || now() > deadline + 5.0
    });
    let r = one(&cert_list(&lab, "n1"), CLIENT);
    assert_eq!(r.state, "expired", "{r:?}");
    assert!(r.last_error.is_some(), "{r:?}");
    let st: Status =
        serde_json::from_value(call(&lab.agent_socket("n1"), Query::Status).unwrap()).unwrap();
    let cs = &st.certificates;
    assert!(
        cs.failing_since.is_some() && cs.unreachable && cs.valid == 0,
        "{cs:?}"
    );
    let text = comb(&[
        "status",
        "--socket",
        lab.agent_socket("n1").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("CA unreachable since"), "{text}");

    // The CA returns (same root, kept in its directory): the agents recover by themselves.
    let root_before = std::fs::read_to_string(lab.ca_root_cert()).unwrap();
    lab.start_ca().unwrap();
    assert_eq!(
        std::fs::read_to_string(lab.ca_root_cert()).unwrap(),
        root_before
    );
    wait_for(
        Duration::from_secs(15),
        "certificates again after the CA returned",
        || {
            let (r1, r2) = (cert_list(&lab, "n1"), cert_list(&lab, "n2"));
            r1[0].state == "valid" && r2[0].state == "valid"
        },
    );
    let st: Status =
        serde_json::from_value(call(&lab.agent_socket("n1"), Query::Status).unwrap()).unwrap();
    assert!(
        st.certificates.failing_since.is_none(),
        "{:?}",
        st.certificates
    );

    // A pod of a new service account on n2: its identity is added; removing it drops it.
    let extra = sa_pod("b", "extra", "n2", "extra").replace(
        "---\n",
        "status: {phase: Running, podIP: 198.18.2.200}\n---\n",
    );
    write_manifest(&lab, "extra.yaml", &extra);
    wait_for(Duration::from_secs(15), "the new identity on n2", || {
        let r = cert_list(&lab, "n2");
        r.len() == 2 && r.iter().all(|r| r.state == "valid")
    });
    write_manifest(&lab, "extra.yaml", "");
    wait_for(
        Duration::from_secs(15),
        "the identity dropped on n2",
        || cert_list(&lab, "n2").len() == 1,
    );
    lab.down().unwrap();
}

#[test]
fn a_single_node_lab_runs_its_ca_on_the_nodes_loopback() {
    if !privileged() {
        return;
    }
    let lab = lab_up("crs", &sa_pod("a", "client", "n1", "client"), &[]);
    let ca = lab.state().ca.clone().unwrap();
    assert_eq!(ca.listen, "127.0.0.1:15012");
    assert_eq!(ca.netns, lab.node_netns("n1").unwrap());
    wait_for(Duration::from_secs(20), "a certificate on n1", || {
        let r = cert_list(&lab, "n1");
        r.len() == 1 && r[0].state == "valid" && r[0].identity == CLIENT
    });
    let r = one(&cert_list(&lab, "n1"), CLIENT);
    // The default lifetime: 24 h.
    let life = r.not_after.unwrap() - now();
    assert!(life > 86_000.0 && life <= 86_400.0, "{r:?}");
    lab.down().unwrap();
}
