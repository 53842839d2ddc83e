//! Privileged lab tests: real namespaces, veths and cgroups. Each test uses its own lab name so
//! they run in parallel; none calls `down_all` (it would remove the others' labs).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use comb_lab::{AgentOptions, Lab, LabOptions};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::Deserialize;

/// Not root: fail under CI (the tests must run there), otherwise skip with a notice.
fn privileged() -> bool {
    comb_host::privileged_test("comb-lab (network namespaces, cgroups)")
}

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A TCP server answering every connection with its pod name.
const SERVER: &str = "import os,socket\n\
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
s.bind(('0.0.0.0', 8080)); s.listen(16)\n\
while True:\n    c,_=s.accept(); c.sendall(os.environ['POD_NAME'].encode()); c.close()\n";

fn pod(name: &str, node: &str, server: bool) -> String {
    let container = if server {
        format!(
            "  - name: c\n    command: [{py}, -c]\n    args: [{SERVER:?}]\n",
            py = python()
        )
    } else {
        "  - name: c\n".to_string()
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {name}}}\n\
         spec:\n  nodeName: {node}\n  containers:\n{container}---\n"
    )
}

fn manifests(pods: &[(&str, &str, bool)]) -> Vec<(PathBuf, String)> {
    let text: String = pods.iter().map(|(n, node, s)| pod(n, node, *s)).collect();
    vec![(PathBuf::from("test.yaml"), text)]
}

/// Remove what a crashed earlier run of the same test left (names are per test).
fn fresh(name: &str) {
    comb_lab::teardown(name).unwrap();
}

fn leftovers(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let prefix = format!("comb-{name}-");
    if let Ok(d) = std::fs::read_dir("/run/netns") {
        out.extend(
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix)),
        );
    }
    let cg = comb_host::cgroup2_mount()
        .unwrap()
        .join(format!("comb-lab-{name}"));
    if cg.exists() {
        out.push(cg.display().to_string());
    }
    if comb_lab::state_dir(name).exists() {
        out.push(comb_lab::state_dir(name).display().to_string());
    }
    out
}

/// Connect from `from` to ip:8080 until the server answers (it may still be starting).
fn tcp(lab: &Lab, from: &str, ip: Ipv4Addr) -> String {
    let script = format!(
        "import socket; s=socket.create_connection(('{ip}', 8080), timeout=2); print(s.recv(100).decode())"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = lab
            .command(from, python(), &["-c", &script])
            .unwrap()
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "tcp {from} -> {ip}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ping(lab: &Lab, from: &str, ip: Ipv4Addr) {
    if !Path::new("/usr/bin/ping").exists() && !Path::new("/bin/ping").exists() {
        return; // TCP covers reachability; ping (iputils) is optional
    }
    let out = lab
        .command(from, "ping", &["-c1", "-W2", &ip.to_string()])
        .unwrap()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ping {from} -> {ip}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn docs<T: for<'de> Deserialize<'de>>(path: &Path) -> Vec<T> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(T::deserialize)
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn two_nodes_two_pods_each() {
    if !privileged() {
        return;
    }
    let name = "t2n";
    fresh(name);
    let opts = LabOptions {
        name: name.into(),
        agent: None,
    };
    let m = manifests(&[
        ("a1", "n1", true),
        ("b1", "n2", true),
        ("a2", "n1", false),
        ("b2", "n2", false),
    ]);
    let lab = Lab::up(opts, &m).unwrap();

    let ip = |p: &str| lab.pod(p).unwrap().ip;
    assert_eq!(ip("a1"), Ipv4Addr::new(198, 18, 1, 2));
    assert_eq!(ip("a2"), Ipv4Addr::new(198, 18, 1, 3));
    assert_eq!(ip("default/b1"), Ipv4Addr::new(198, 18, 2, 2));
    assert_eq!(ip("b2"), Ipv4Addr::new(198, 18, 2, 3));

    // Within a node, across nodes, both directions.
    ping(&lab, "a2", ip("a1"));
    ping(&lab, "a2", ip("b2"));
    ping(&lab, "b2", ip("a1"));
    assert_eq!(tcp(&lab, "a2", ip("a1")), "a1");
    assert_eq!(tcp(&lab, "b2", ip("a1")), "a1");
    assert_eq!(tcp(&lab, "a2", ip("b1")), "b1");
    assert_eq!(tcp(&lab, "b2", ip("b1")), "b1");

    // The container command runs in the pod's cgroup; so do `command`s.
    let a1 = lab.pod("a1").unwrap();
    let pid = a1.pid.expect("a1 has a process");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cg.contains("0::/comb-lab-t2n/n1/default_a1"), "{cg}");
    let out = lab
        .command("b2", "cat", &["/proc/self/cgroup"])
        .unwrap()
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("0::/comb-lab-t2n/n2/default_b2"));
    assert_eq!(
        a1.cgroup,
        comb_host::cgroup2_mount()
            .unwrap()
            .join("comb-lab-t2n/n1/default_a1")
    );
    assert!(lab.pod("b2").unwrap().pid.is_none());

    // Node commands run in the node namespace: it routes to the router.
    let out = lab
        .node_command("n1", "ip", &["route", "show", "default"])
        .unwrap()
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("198.18.254.254"),
        "{out:?}"
    );

    // Manifests for the agents.
    let pods: Vec<Pod> = docs(&lab.manifests_dir().join("pods.yaml"));
    assert_eq!(pods.len(), 4);
    let b1 = pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("b1"))
        .unwrap();
    let status = b1.status.as_ref().unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("198.18.2.2"));
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(b1.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(
        b1.metadata.annotations.as_ref().unwrap()["comb.dev/cgroup"],
        "comb-lab-t2n/n2/default_b1"
    );
    assert_eq!(b1.metadata.labels.as_ref().unwrap()["app"], "b1");
    let nodes: Vec<Node> = docs(&lab.manifests_dir().join("nodes.yaml"));
    let cidrs: Vec<_> = nodes
        .iter()
        .map(|n| n.spec.as_ref().unwrap().pod_cidr.clone().unwrap())
        .collect();
    assert_eq!(cidrs, ["198.18.1.0/24", "198.18.2.0/24"]);

    // Another process's view, from state.json.
    let other = Lab::open(name).unwrap();
    assert_eq!(other.pods(), lab.pods());
    assert_eq!(other.node_netns("n2").unwrap(), "comb-t2n-n2");
    drop(other); // detached handle: must not tear down
    assert!(Path::new("/run/netns/comb-t2n-n2").exists());
    assert!(Lab::list().unwrap().contains(&name.to_string()));

    // A process put into a lab namespace by hand, outside the lab's cgroups, is killed too.
    let mut stray = std::process::Command::new("ip")
        .args(["netns", "exec", "comb-t2n-n1", "sleep", "60"])
        .spawn()
        .unwrap();
    // `ip` execs sleep only after joining the namespace.
    let comm = format!("/proc/{}/comm", stray.id());
    while std::fs::read_to_string(&comm).unwrap().trim() != "sleep" {
        std::thread::sleep(Duration::from_millis(5));
    }

    lab.down().unwrap();
    assert_eq!(leftovers(name), Vec::<String>::new());
    assert!(!stray.wait().unwrap().success());
    // Idempotent.
    comb_lab::teardown(name).unwrap();
}

#[test]
fn drop_after_panic_cleans_up() {
    if !privileged() {
        return;
    }
    let name = "tpanic";
    fresh(name);
    let r = std::panic::catch_unwind(|| {
        let opts = LabOptions {
            name: name.into(),
            agent: None,
        };
        let _lab = Lab::up(opts, &manifests(&[("a", "n1", true), ("b", "n1", false)])).unwrap();
        assert!(Path::new("/run/netns/comb-tpanic-n1").exists());
        panic!("test panic");
    });
    assert!(r.is_err());
    assert_eq!(leftovers(name), Vec::<String>::new());
}

#[test]
fn up_refuses_bad_input_without_leftovers() {
    if !privileged() {
        return;
    }
    let name = "tbad";
    fresh(name);
    let no_node = vec![(
        PathBuf::from("x.yaml"),
        "kind: Pod\nmetadata: {name: web}\nspec: {containers: []}\n".into(),
    )];
    let err = Lab::up(
        LabOptions {
            name: name.into(),
            agent: None,
        },
        &no_node,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("default/web"), "{err:#}");
    // A command that can't start fails `up` and removes what was built.
    let bad_cmd = pod("a", "n1", false).replace(
        "  - name: c\n",
        "  - name: c\n    command: [/nonexistent]\n",
    );
    let err = Lab::up(
        LabOptions {
            name: name.into(),
            agent: None,
        },
        &[(PathBuf::from("x.yaml"), bad_cmd)],
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("default/a"), "{err:#}");
    assert_eq!(leftovers(name), Vec::<String>::new());
}

/// A stand-in for combd: binds the admin socket, reports its network namespace, exits on
/// SIGTERM after saying so.
const FAKE_COMBD: &str = r#"
import os, signal, socket, sys
args = sys.argv[1:]
sock = args[args.index("--admin-socket") + 1]
print("netns", os.stat("/proc/self/ns/net").st_ino, "args", " ".join(args), flush=True)
if "--fail" in args:
    print("failing on purpose", flush=True); sys.exit(3)
def term(*_):
    print("terminated", flush=True); os.unlink(sock); sys.exit(0)
signal.signal(signal.SIGTERM, term)
s = socket.socket(socket.AF_UNIX); s.bind(sock); s.listen(1)
while True: signal.pause()
"#;

/// Stands in for `comb ca`: logs where it runs and with what, writes the root into `--dir`
/// (what the lab waits for), runs until SIGTERM.
const FAKE_COMB: &str = r#"
import os, signal, sys
args = sys.argv[1:]
print("netns", os.stat("/proc/self/ns/net").st_ino, "args", " ".join(args), flush=True)
d = args[args.index("--dir") + 1]
open(os.path.join(d, "root-cert.pem"), "w").write("fake root\n")
def term(*_):
    print("terminated", flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, term)
while True: signal.pause()
"#;

/// A fake combd and, beside it, a fake `comb` (the lab's CA).
fn fake_combd(dir: &Path) -> PathBuf {
    let path = dir.join("fake-combd");
    std::fs::write(&path, format!("#!{}\n{FAKE_COMBD}", python())).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let comb = dir.join("comb");
    std::fs::write(&comb, format!("#!{}\n{FAKE_COMB}", python())).unwrap();
    std::fs::set_permissions(&comb, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

#[test]
fn agents_start_and_stop() {
    if !privileged() {
        return;
    }
    let name = "tagent";
    fresh(name);
    let tmp = tempfile::tempdir().unwrap();
    let combd = fake_combd(tmp.path());
    let agent = AgentOptions {
        combd: combd.clone(),
        extra_args: vec!["--splice".into(), "on".into()],
    };
    let opts = LabOptions {
        name: name.into(),
        agent: Some(agent),
    };
    let lab = Lab::up(opts, &manifests(&[("a", "n1", false), ("b", "n2", false)])).unwrap();
    for node in ["n1", "n2"] {
        assert!(lab.agent_socket(node).exists());
        let log = std::fs::read_to_string(lab.agent_log(node)).unwrap();
        let ino = std::fs::metadata(format!("/run/netns/comb-{name}-{node}")).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&ino);
        assert!(
            log.contains(&format!("netns {ino} ")),
            "agent runs in the node netns: {log}"
        );
        assert!(
            log.contains(&format!(
                "--node {node} --manifests /run/comb/lab/{name}/manifests"
            )),
            "{log}"
        );
        assert!(
            log.contains(&format!(
                "--pin-dir /sys/fs/bpf/comb/{name}-{node} --state-dir /run/comb/lab/{name}/{node}-agent \
                 --ca-address 198.18.254.254:15012 --ca-root-cert /run/comb/lab/{name}/ca/root-cert.pem \
                 --ca-token-file /run/comb/lab/{name}/ca/{node}.token --splice on"
            )),
            "{log}"
        );
        let token = std::fs::read_to_string(lab.ca_token_file(node)).unwrap();
        let tokens = std::fs::read_to_string(lab.ca_dir().join("tokens")).unwrap();
        assert!(tokens.contains(&format!("{token} {node}\n")), "{tokens}");
        assert!(
            log.contains(&format!("--lb-cgroup /comb-lab-{name}/{node} ")),
            "{log}"
        );
    }
    // The CA runs in the router namespace, with the lab's manifests and tokens.
    let ca_log = std::fs::read_to_string(lab.ca_log()).unwrap();
    let ino = std::fs::metadata(format!("/run/netns/comb-{name}-router")).unwrap();
    let ino = std::os::unix::fs::MetadataExt::ino(&ino);
    assert!(ca_log.contains(&format!("netns {ino} ")), "{ca_log}");
    assert!(
        ca_log.contains(&format!(
            "ca --listen 198.18.254.254:15012 --dir /run/comb/lab/{name}/ca --tokens /run/comb/lab/{name}/ca/tokens --manifests /run/comb/lab/{name}/manifests"
        )),
        "{ca_log}"
    );
    lab.stop_ca().unwrap();
    assert!(
        std::fs::read_to_string(lab.ca_log())
            .unwrap()
            .contains("terminated")
    );
    lab.start_ca().unwrap();
    lab.stop_agent("n1").unwrap();
    assert!(!lab.agent_socket("n1").exists());
    assert!(
        std::fs::read_to_string(lab.agent_log("n1"))
            .unwrap()
            .contains("terminated")
    );
    lab.start_agent("n1").unwrap();
    assert!(lab.agent_socket("n1").exists());
    lab.down().unwrap();
    assert_eq!(leftovers(name), Vec::<String>::new());

    // An agent that dies at start makes `up` fail with its log, and leaves nothing behind.
    let agent = AgentOptions {
        combd,
        extra_args: vec!["--fail".into()],
    };
    let opts = LabOptions {
        name: name.into(),
        agent: Some(agent),
    };
    let err = Lab::up(opts, &manifests(&[("a", "n1", false)])).unwrap_err();
    assert!(format!("{err:#}").contains("failing on purpose"), "{err:#}");
    assert_eq!(leftovers(name), Vec::<String>::new());
}

/// Runs only as the child of `signal_tears_down`: builds a lab and waits to be signalled.
#[test]
fn signal_child() {
    if std::env::var("COMB_LAB_SIGNAL_CHILD").is_err() {
        return;
    }
    comb_lab::install_signal_cleanup();
    fresh("tsig");
    let opts = LabOptions {
        name: "tsig".into(),
        agent: None,
    };
    let _lab = Lab::up(opts, &manifests(&[("a", "n1", true), ("b", "n2", false)])).unwrap();
    println!("READY");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn signal_tears_down() {
    use std::io::BufRead;
    if !privileged() {
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "signal_child", "--nocapture", "--test-threads=1"])
        .env("COMB_LAB_SIGNAL_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = stdout
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("READY"));
    assert!(ready, "child did not build its lab");
    assert!(Path::new("/run/netns/comb-tsig-router").exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(leftovers("tsig"), Vec::<String>::new());
}
