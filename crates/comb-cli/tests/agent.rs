//! The agent's lifecycle, its handling of bad manifests and the CLI against a running agent.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn attached_programs(cgroup: &std::path::Path) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// For a privileged test (None = skip): a lab with pods t/a and t/b on node1, its agent
/// (started with `agent_args`) ready with both attached.
fn two_pod_lab(prefix: &str, agent_args: &[&str]) -> Option<comb_lab::Lab> {
    if !privileged() {
        return None;
    }
    let lab = lab_up(
        prefix,
        &(pod("t", "a", "node1", &[]) + &pod("t", "b", "node1", &[])),
        agent_args,
    );
    wait_ready(&lab, "node1", 2);
    Some(lab)
}

#[test]
fn cli_without_agent_says_so() {
    let out = comb(&["status", "--socket", "/nonexistent/comb.sock"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no agent answers"), "{err}");
    let out = comb(&["status", "--node", "no-such-node-xyz"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent is running for node"));
}

#[test]
fn agent_stop_leaves_no_attachment_pin_or_process() {
    let Some(lab) = two_pod_lab("ag", &[]) else {
        return;
    };
    let s = status(&lab, "node1");
    let cg = lab.pod("t/a").unwrap().cgroup.clone();
    assert!(
        std::path::Path::new(&s.pin_dir).exists(),
        "pins exist while running"
    );
    assert!(
        attached_programs(&cg).contains("sock_ops"),
        "sockops attached to the pod cgroup"
    );
    lab.stop_agent("node1").unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{}", s.pid)).exists(),
        "combd process is gone"
    );
    assert!(
        !std::path::Path::new(&s.pin_dir).exists(),
        "pin dir {} removed",
        s.pin_dir
    );
    assert_eq!(
        attached_programs(&cg)
            .lines()
            .filter(|l| l.contains("sock_ops"))
            .count(),
        0,
        "no attachment left"
    );
    assert!(!lab.agent_socket("node1").exists(), "admin socket removed");
}

#[test]
fn keep_pins_keeps_splicing_across_a_restart() {
    let Some(lab) = two_pod_lab("ak", &["--keep-pins"]) else {
        return;
    };
    let pin_dir = status(&lab, "node1").pin_dir;
    let _srv = serve(&lab, "t/b", 7500, "echo");
    let to = format!("{}:7500", ip(&lab, "t/b"));
    lab.stop_agent("node1").unwrap();
    assert!(
        std::path::Path::new(&pin_dir).exists(),
        "--keep-pins keeps the pins"
    );
    // No agent runs, yet the kernel keeps splicing: nothing crosses the veth.
    let (rx0, tx0) = veth_bytes(&lab, "t/a");
    let (ok, out) = probe(&lab, "t/a", &["check", "--to", &to, "--sizes", "4194304"]);
    assert!(ok, "{out}");
    let (rx1, tx1) = veth_bytes(&lab, "t/a");
    assert!(
        (rx1 - rx0) + (tx1 - tx0) < 64 * 1024,
        "splice kept working without the agent"
    );
    // A new agent adopts what is pinned and serves it.
    lab.start_agent("node1").unwrap();
    wait_ready(&lab, "node1", 2);
    let before = splice_stats(&lab, "node1").redirected_bytes;
    let (ok, out) = probe(&lab, "t/a", &["check", "--to", &to, "--sizes", "100000"]);
    assert!(ok, "{out}");
    assert!(splice_stats(&lab, "node1").redirected_bytes >= before + 200_000);
    drop(_srv);
    lab.down().unwrap();
    assert!(
        !std::path::Path::new(&pin_dir).exists(),
        "lab down removes kept pins"
    );
}

const BROKEN: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{port: abc}]\n";
const GOOD_SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{port: 80, targetPort: 8080}]\n";

/// `comb VERB -f FILE --manifests DIR`, which must succeed.
fn manifests_cmd(verb: &str, file: &std::path::Path, dir: &std::path::Path) {
    let out = comb(&[
        verb,
        "-f",
        file.to_str().unwrap(),
        "--manifests",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "comb {verb}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_manifests_are_reported_and_the_last_good_state_stays() {
    let Some(lab) = two_pod_lab("ab", &[]) else {
        return;
    };
    let good = status(&lab, "node1");
    let eps = endpoints(&lab, "node1");
    let dir = lab.manifests_dir();

    // A broken file lands in the directory behind the CLI's back.
    std::fs::write(dir.join("zz-broken.yaml"), BROKEN).unwrap();
    wait_for(
        Duration::from_secs(10),
        "the agent to report the error",
        || !status(&lab, "node1").config_errors.is_empty(),
    );
    let s = status(&lab, "node1");
    let err = s.config_errors.join("\n");
    assert!(
        err.contains("zz-broken.yaml")
            && err.contains("document 2")
            && err.contains("spec.ports[0].port"),
        "{err}"
    );
    assert_eq!(s.generation, good.generation, "State kept");
    assert_eq!(endpoints(&lab, "node1"), eps, "endpoints kept");
    let out = comb(&[
        "status",
        "--socket",
        lab.agent_socket("node1").to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("REJECTED"),
        "comb status shows the error"
    );

    // Fixing it clears the error.
    std::fs::remove_file(dir.join("zz-broken.yaml")).unwrap();
    wait_for(Duration::from_secs(10), "the error to clear", || {
        status(&lab, "node1").config_errors.is_empty()
    });

    // `comb apply` refuses invalid input and writes nothing.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("svc.yaml");
    std::fs::write(&bad, BROKEN).unwrap();
    let out = comb(&[
        "apply",
        "-f",
        bad.to_str().unwrap(),
        "--manifests",
        dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.ports[0].port"));
    assert!(!dir.join("svc.yaml").exists(), "nothing written");

    // A valid apply is picked up without restart; delete removes it again.
    std::fs::write(&bad, GOOD_SVC).unwrap();
    manifests_cmd("apply", &bad, &dir);
    wait_for(Duration::from_secs(10), "the new generation", || {
        status(&lab, "node1").generation > good.generation
    });
    manifests_cmd("delete", &bad, &dir);
    assert!(!dir.join("svc.yaml").exists());
}

#[test]
fn cli_reports_endpoints_and_splice_stats() {
    if !privileged() {
        return;
    }
    let lab = lab_up(
        "ac",
        &(pod("t", "a", "node1", &[]) + &pod("t", "b", "node1", &[("comb.dev/splice", "off")])),
        &[],
    );
    wait_ready(&lab, "node1", 1);
    let sock = lab.agent_socket("node1");
    let sock = sock.to_str().unwrap();
    let out = comb(&["endpoint", "list", "--socket", sock, "-o", "json"]);
    assert!(out.status.success());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 2);
    let a = rows.iter().find(|r| r["pod"] == "a").unwrap();
    assert_eq!(a["splice"], true);
    assert_eq!(a["ip"], ip(&lab, "t/a"));
    assert!(a["cgroup"].as_str().unwrap().contains("t_a"));
    let table =
        String::from_utf8_lossy(&comb(&["endpoint", "list", "--socket", sock]).stdout).into_owned();
    assert!(table.starts_with("POD") && table.contains("off"), "{table}");
    let out = comb(&["splice", "stats", "--socket", sock, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["sockets"].is_u64());
    let metrics =
        String::from_utf8_lossy(&comb(&["metrics", "--socket", sock]).stdout).into_owned();
    assert!(
        metrics.contains("comb_splice_redirected_bytes_total"),
        "{metrics}"
    );
    // Prometheus scrapes /metrics over HTTP on the loopback of the agent's (node) namespace.
    let out = lab
        .node_command("node1", "curl", &["-sf", "http://127.0.0.1:9962/metrics"])
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success(), "GET /metrics failed: {out:?}");
    let scraped = String::from_utf8_lossy(&out.stdout);
    assert!(
        scraped.contains("# TYPE comb_state_generation gauge")
            && scraped.contains("comb_local_endpoints 2"),
        "{scraped}"
    );
}

/// Denies every connection into namespace t.
const DENY_INGRESS_T: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-in, namespace: t}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";

fn identities(lab: &comb_lab::Lab) -> Vec<(u64, String)> {
    let v = call(&lab.agent_socket("node1"), comb_api::Query::Identities).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_u64().unwrap(), r["labels"].to_string()))
        .collect()
}

fn connect(lab: &comb_lab::Lab, from: &str, to: &str) -> String {
    let (_, out) = probe(lab, from, &["connect", "--to", to, "--timeout-ms", "400"]);
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

#[test]
fn policy_keeps_enforcing_and_identities_stay_across_a_restart() {
    let Some(lab) = two_pod_lab("ap", &["--keep-pins"]) else {
        return;
    };
    let _srv = serve(&lab, "t/b", 7600, "echo");
    let to = format!("{}:7600", ip(&lab, "t/b"));
    assert_eq!(connect(&lab, "t/a", &to), "connected", "no policy yet");
    write_resources(&lab, DENY_INGRESS_T);
    wait_for(Duration::from_secs(10), "the policy to apply", || {
        let s = status(&lab, "node1");
        s.generation >= 2 && s.applied_generation == s.generation
    });
    assert_eq!(connect(&lab, "t/a", &to), "timeout", "denied");
    let before = identities(&lab);
    assert!(before.iter().any(|(id, _)| *id >= 256), "{before:?}");

    // No agent: the pinned programs and maps keep enforcing.
    lab.stop_agent("node1").unwrap();
    assert_eq!(
        connect(&lab, "t/a", &to),
        "timeout",
        "still denied without an agent"
    );

    // A new agent adopts the pins and keeps every identity number.
    lab.start_agent("node1").unwrap();
    wait_ready(&lab, "node1", 2);
    wait_for(
        Duration::from_secs(10),
        "the restarted agent to reconcile",
        || {
            let s = status(&lab, "node1");
            s.generation >= 1 && s.applied_generation == s.generation
        },
    );
    assert_eq!(
        identities(&lab),
        before,
        "identity numbers survive a restart"
    );
    let ep = call(
        &lab.agent_socket("node1"),
        comb_api::Query::EndpointPolicy { pod: "t/b".into() },
    )
    .unwrap();
    assert_eq!(ep["in_sync"], true, "{ep}");
    assert_eq!(ep["ingress_enforced"], true, "{ep}");
    assert_eq!(
        connect(&lab, "t/a", &to),
        "timeout",
        "denied after the restart"
    );
    drop(_srv);
    lab.down().unwrap();
}

/// `count` ClusterIP Services (198.19.x.y:80) with one ready backend each.
fn many_services_yaml(count: usize) -> String {
    let mut out = String::with_capacity(count * 600);
    for i in 0..count {
        let vip = format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250);
        out.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bulk}}\n\
             spec: {{clusterIP: {vip}, ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: s{i}-1, namespace: bulk, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\n\
             endpoints: [{{addresses: [198.18.1.2], conditions: {{ready: true}}}}]\n---\n"
        ));
    }
    out
}

/// The admin API answers `status` from the snapshot the writer publishes, so it never waits
/// for a reconcile: while 10,000 Services are being written to the socket-LB maps, every
/// status round trip on the admin socket stays under 50 ms.
#[test]
fn status_answers_while_ten_thousand_services_are_applied() {
    use std::io::{BufRead, BufReader, Write};
    use std::time::Instant;

    let Some(lab) = two_pod_lab("st", &[]) else {
        return;
    };
    let before = status(&lab, "node1");
    write_manifest(&lab, "bulk.yaml", &many_services_yaml(10_000));

    let socket = lab.agent_socket("node1");
    let mut conn = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut during: Vec<Duration> = Vec::new();
    let last = loop {
        assert!(
            Instant::now() < deadline,
            "10,000 Services not applied in time"
        );
        let t = Instant::now();
        conn.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let took = t.elapsed();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let s: comb_api::Status = serde_json::from_value(v["data"].clone()).unwrap();
        if s.generation > before.generation && s.applied_generation < s.generation {
            during.push(took);
        }
        if s.applied_generation > before.generation {
            break s;
        }
        assert!(s.datapath_errors.is_empty(), "{:?}", s.datapath_errors);
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(last.lb_services, 10_000, "every Service programmed");
    let g = last
        .generations
        .iter()
        .find(|g| g.generation == last.applied_generation)
        .expect("the applied generation's times");
    let reconcile = g.applied_at.unwrap() - g.replaced_at;
    during.sort();
    let max = *during.last().unwrap_or(&Duration::ZERO);
    eprintln!(
        "status during a 10,000-Service reconcile ({reconcile:.2} s): {} answers, p50 {:?}, max {max:?}",
        during.len(),
        during.get(during.len() / 2).copied().unwrap_or_default(),
    );
    assert!(
        during.len() >= 3,
        "status must be answered while the reconcile runs (it ran {reconcile:.2} s; {} answers)",
        during.len()
    );
    assert!(
        max < Duration::from_millis(50),
        "slowest status answer {max:?}"
    );
}
