//! Mutual TLS between nodes end to end (privileged: run as root; under CI=true without root
//! they fail): the lab's CA, an agent per node with HBONE, real clients (curl HTTP/1.1 and
//! h2, Python grpcio streaming, a Python WebSocket client, iperf3, `comb probe`) against
//! servers in pods on another node, a capture on the router namespace (everything between
//! nodes crosses it) read with tshark, PeerAuthentication, and an HBONE peer that is not
//! Comb (`mtls_support/hbone_peer.py`: Python's ssl + the h2 state machine) standing in for
//! Istio ambient's ztunnel on both sides.
//!
//! - `hbone_carries_every_protocol_and_the_wire_shows_only_tls`: same bytes through the
//!   tunnel as to a plaintext pod; the capture shows TLS 1.3 on 15008 and never the marker;
//!   1,000 sequential connections cost at most a handful of handshakes; Istio metrics say
//!   `mutual_tls`; with PeerAuthentication DISABLE the marker is on the wire.
//! - `peer_authentication_and_identity`: a truth table of plaintext and HBONE attempts
//!   under PERMISSIVE, STRICT, a port-level exception and a namespace DISABLE; an
//!   AuthorizationPolicy principal matched against the certificate.
//! - `tunnels_survive_certificate_rotation`: 100 long-lived echo streams and steady new
//!   connections while both nodes rotate their certificates three times (20 s lifetime).
//! - `interoperates_with_a_non_comb_hbone_peer`: Comb tunnels to an ambient pod on a node
//!   without Comb (served by the stand-in), the stand-in tunnels into a Comb node, and a
//!   certificate from another CA is refused at the handshake.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use comb_api::tunnel::TunnelsReply;
use comb_lab::Lab;
use common::*;

const L7_SUPPORT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/l7_support");
const SUPPORT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mtls_support");
const PY: &str = "/usr/bin/python3";
const HTTP: u16 = 8080;
const HTTP2: u16 = 8081;
const GRPC: u16 = 50051;
const WS: u16 = 8765;
const TCP: u16 = 9000;
const IPERF: u16 = 5201;

/// Every server a server pod runs: HTTP (h1 + h2c) on two ports, gRPC, WebSocket, TCP echo,
/// iperf3.
fn servers() -> Vec<String> {
    let script = format!(
        "{COMB} probe http-serve --port {HTTP} --threads 2 & \
         {COMB} probe http-serve --port {HTTP2} & \
         {PY} {L7_SUPPORT}/grpc_echo.py serve {GRPC} & \
         {PY} {L7_SUPPORT}/ws_echo.py serve {WS} & \
         {COMB} probe serve --port {TCP} --mode echo & \
         iperf3 -s -p {IPERF} & wait"
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

fn pod_yaml(
    name: &str,
    node: &str,
    sa: &str,
    labels: &str,
    annotations: &[(&str, &str)],
    serve: bool,
) -> String {
    let cmd = if serve {
        servers()
    } else {
        vec!["sleep".into(), "infinity".into()]
    };
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    pod_with(
        "shop",
        name,
        node,
        annotations,
        &cmd,
        &[("http", HTTP), ("http2", HTTP2)],
    )
    .replace(
        "metadata:\n",
        &format!("metadata:\n  labels: {{app: {name}{labels}}}\n"),
    )
    .replace("spec:\n", &format!("spec:\n  serviceAccountName: {sa}\n"))
}

/// (client pod, target address, whether the connection must succeed).
type Attempt<'a> = (&'a str, &'a str, bool);

const OPT_OUT: &str = ", istio.io/dataplane-mode: none";

/// curl in `pod`: (HTTP status or 0, body).
fn curl(lab: &Lab, pod: &str, args: &[&str]) -> (u16, Vec<u8>) {
    let mut full = vec!["-sS", "-m", "5", "-w", "\n@@%{http_code}"];
    full.extend_from_slice(args);
    let (_, out, _) = run(lab, pod, "curl", &full);
    let split = out.windows(3).rposition(|w| w == b"\n@@").unwrap_or(0);
    let code = String::from_utf8_lossy(&out[(split + 3).min(out.len())..])
        .trim()
        .parse()
        .unwrap_or(0);
    (code, out[..split].to_vec())
}

fn tunnels(lab: &Lab, node: &str) -> TunnelsReply {
    serde_json::from_value(call(&lab.agent_socket(node), comb_api::Query::Tunnels).unwrap())
        .unwrap()
}

/// A TCP connect from `pod` to `to` within 1.5 s (a dropped SYN is never answered).
fn connects(lab: &Lab, pod: &str, to: &str) -> bool {
    let (_, out) = probe(lab, pod, &["connect", "--to", to, "--timeout-ms", "1500"]);
    out.starts_with("connected")
}

/// tcpdump on every interface of the router namespace, writing `file`; stopped on drop.
/// Immediate mode (else packets wait in the kernel's ring until a block is full or 1 s old,
/// and the last second's were lost at SIGINT), a 128 MiB ring (a 32 MiB one overflowed once in
/// CI while a build ran beside it: the bulk streams' packets are up to 64 KiB each), and the
/// kernel's drop count checked at the end: a capture that lost packets says so instead of
/// failing a product check.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
    stderr: std::thread::JoinHandle<String>,
}

impl Capture {
    fn start(lab: &Lab, name: &str) -> Capture {
        use std::io::BufRead;
        let file = lab.state_dir().join(name);
        let mut child = lab
            .router_command(
                "tcpdump",
                &[
                    "-i",
                    "any",
                    "--immediate-mode",
                    "-B",
                    "131072",
                    "-U",
                    "-s",
                    "0",
                    "-w",
                    file.to_str().unwrap(),
                ],
            )
            .unwrap()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (make deps)");
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        // Ready once it says it listens (the socket and its ring are active then).
        rx.recv_timeout(Duration::from_secs(20))
            .expect("tcpdump did not start listening within 20 s");
        Capture {
            child,
            file,
            stderr,
        }
    }

    /// Stop and return the capture's bytes; panics if the kernel dropped packets of it.
    fn finish(mut self) -> (Vec<u8>, std::path::PathBuf) {
        std::thread::sleep(Duration::from_millis(300));
        // SIGINT: tcpdump flushes and closes the file and prints its counts.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let file = std::mem::take(&mut self.file);
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        let report = stderr.join().unwrap_or_default();
        let dropped: u64 = report
            .lines()
            .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no drop count in tcpdump's report:\n{report}"));
        assert_eq!(dropped, 0, "the capture itself lost packets:\n{report}");
        (std::fs::read(&file).unwrap(), file)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// tshark over a capture, TLS decoding forced on port 15008: one line per matching packet.
fn tshark(file: &std::path::Path, filter: &str, fields: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-r".to_string(),
        file.display().to_string(),
        "-d".into(),
        "tcp.port==15008,tls".into(),
        "-Y".into(),
        filter.into(),
        "-T".into(),
        "fields".into(),
    ];
    for f in fields {
        args.extend(["-e".into(), f.to_string()]);
    }
    let out = Command::new("tshark")
        .args(&args)
        .output()
        .expect("tshark (make deps)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_mesh_ready(lab: &Lab, nodes: &[(&str, usize)]) {
    for (node, attached) in nodes {
        wait_ready(lab, node, *attached);
        wait_for(Duration::from_secs(20), "workload certificates", || {
            let s = status(lab, node);
            s.certificates.enabled && s.certificates.valid == s.certificates.wanted
        });
    }
}

#[test]
fn hbone_carries_every_protocol_and_the_wire_shows_only_tls() {
    if !privileged() {
        return;
    }
    let pods = pod_yaml("client", "n1", "client", "", &[], false)
        + &pod_yaml("web", "n2", "web", "", &[], true)
        + &pod_yaml("plain", "n2", "plain", OPT_OUT, &[], true);
    let lab = lab_up("mtl", &pods, &[]);
    wait_mesh_ready(&lab, &[("n1", 1), ("n2", 2)]);
    let (web, plain) = (ip(&lab, "shop/web"), ip(&lab, "shop/plain"));
    for port in [HTTP, HTTP2, GRPC, WS, TCP, IPERF] {
        wait_listening(&lab, "shop/web", port);
        wait_listening(&lab, "shop/plain", port);
    }

    let cap = Capture::start(&lab, "hbone.pcap");
    // HTTP/1.1 and h2 (prior knowledge): same answers through the tunnel and direct.
    for (args, what) in [
        (vec![], "HTTP/1.1"),
        (vec!["--http2-prior-knowledge"], "h2"),
    ] {
        let mut a = args.clone();
        let u = format!("http://{web}:{HTTP}/bytes/300000?MARKER-HBONE-1");
        a.push(&u);
        let (code, body) = curl(&lab, "shop/client", &a);
        let mut b = args.clone();
        let u2 = format!("http://{plain}:{HTTP}/bytes/300000?MARKER-PLAIN-1");
        b.push(&u2);
        let (code2, body2) = curl(&lab, "shop/client", &b);
        assert_eq!((code, code2), (200, 200), "{what}");
        assert_eq!(body.len(), 300000, "{what}");
        assert_eq!(
            body, body2,
            "{what}: same bytes through HBONE as in plaintext"
        );
    }
    // gRPC unary + bidirectional streaming with trailers.
    let grpc = format!("{L7_SUPPORT}/grpc_echo.py");
    let a = json_out(
        &lab,
        "shop/client",
        PY,
        &[&grpc, "call", &format!("{web}:{GRPC}"), "40"],
    );
    let b = json_out(
        &lab,
        "shop/client",
        PY,
        &[&grpc, "call", &format!("{plain}:{GRPC}"), "40"],
    );
    assert_eq!(a, b, "gRPC through HBONE and direct");
    assert_eq!(a["stream"]["replies"].as_array().unwrap().len(), 40);
    // WebSocket.
    let ws = format!("{L7_SUPPORT}/ws_echo.py");
    let r = json_out(
        &lab,
        "shop/client",
        PY,
        &[&ws, "call", &format!("ws://{web}:{WS}/chat"), "30", "20000"],
    );
    assert_eq!(r["echoed"], 30, "{r}");
    // Opaque TCP, verified byte for byte.
    let (ok, out) = probe(
        &lab,
        "shop/client",
        &["check", "--to", &format!("{web}:{TCP}"), "--conns", "8"],
    );
    assert!(ok, "opaque TCP through HBONE: {out}");
    let (wire, file) = cap.finish();

    // The proof: TLS 1.3 handshakes on 15008, the HBONE marker never in clear, while the
    // capture does see plaintext payloads (the marker sent to the opted-out pod).
    assert!(
        contains(&wire, "MARKER-PLAIN-1"),
        "the capture sees plaintext payloads"
    );
    assert!(
        !contains(&wire, "MARKER-HBONE-1"),
        "the marker crossed the wire in clear"
    );
    let hellos = tshark(
        &file,
        "tls.handshake.type==2 && tcp.srcport==15008",
        &["tls.handshake.extensions.supported_version"],
    );
    assert!(
        !hellos.is_empty(),
        "no ServerHello from 15008 in the capture; its first packets on 15008:\n{}",
        tshark(
            &file,
            "tcp.port==15008",
            &[
                "frame.number",
                "ip.src",
                "tcp.srcport",
                "ip.dst",
                "tcp.dstport",
                "tcp.flags.str",
                "tcp.len",
                "_ws.col.Info"
            ]
        )
        .iter()
        .take(30)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
    );
    assert!(
        hellos.iter().all(|v| v.contains("0x0304")),
        "TLS 1.3 only: {hellos:?}"
    );
    let clear_http = tshark(
        &file,
        "http.request && tcp.port==15008",
        &["http.request.uri"],
    );
    assert!(
        clear_http.is_empty(),
        "plaintext HTTP on 15008: {clear_http:?}"
    );

    // iperf3 (one stream), outside the capture (its volume would only load the capture):
    // the receiver's count stops at the end of the test while bytes are
    // still in flight, so it is a throughput check; `probe check` above is the exact one.
    let v = json_out(
        &lab,
        "shop/client",
        "iperf3",
        &["-c", &web, "-p", &IPERF.to_string(), "-t", "2", "-J"],
    );
    let sent = v["end"]["sum_sent"]["bytes"].as_u64().unwrap();
    let got = v["end"]["sum_received"]["bytes"].as_u64().unwrap();
    assert!(
        sent > 10_000_000 && got as f64 >= 0.9 * sent as f64,
        "iperf3 through HBONE: sent {sent}, received {got}"
    );

    // Pooling: 1,000 sequential new connections between the same two pods.
    let before = tunnels(&lab, "n1").outbound;
    let (ok, out) = probe(
        &lab,
        "shop/client",
        &["churn", "--to", &format!("{web}:{TCP}"), "--count", "1000"],
    );
    assert!(ok, "churn: {out}");
    let after = tunnels(&lab, "n1");
    let full = after.outbound.full_handshakes - before.full_handshakes;
    let reused = after.outbound.reuses - before.reuses;
    assert!(
        full <= 3,
        "1,000 connections cost {full} full TLS handshakes"
    );
    assert!(reused >= 990, "reuses {reused}");
    let row = after
        .tunnels
        .iter()
        .find(|t| t.peer.to_string() == format!("{web}:15008"))
        .unwrap_or_else(|| panic!("no pooled tunnel to {web}: {:?}", after.tunnels));
    assert_eq!(
        row.local_identity,
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(row.peer_identity, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(row.peer_node.as_deref(), Some("n2"));

    // Istio metrics at the destination: mutual TLS, the certificate's principal.
    let m = metrics_text(&lab, "n2");
    assert!(
        m.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("connection_security_policy=\"mutual_tls\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")),
        "no mutual_tls request series:\n{m}"
    );
    // And at the source, as ztunnel's outbound reports: the churn's 1,000 connections
    // (and the flows before it) counted open and closed on node1's tunnel series.
    let source_series = |m: &str, name: &str| -> u64 {
        m.lines()
            .filter(|l| {
                l.starts_with(&format!("{name}{{reporter=\"source\","))
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
                    && l.contains("destination_principal=\"spiffe://cluster.local/ns/shop/sa/web\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    wait_for(
        Duration::from_secs(10),
        "node1 reports the churn's connections as the source",
        || {
            let m = metrics_text(&lab, "n1");
            source_series(&m, "istio_tcp_connections_opened_total") >= 1000
                && source_series(&m, "istio_tcp_connections_closed_total") >= 1000
        },
    );

    // PeerAuthentication DISABLE for web: plaintext on the wire.
    let g = status(&lab, "n1").generation;
    write_manifest(
        &lab,
        "pa.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: web-off, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: DISABLE}\n",
    );
    wait_for(
        Duration::from_secs(10),
        "the DISABLE policy applied",
        || {
            let s = status(&lab, "n1");
            s.generation > g && s.applied_generation == s.generation
        },
    );
    let cap = Capture::start(&lab, "disable.pcap");
    let (code, _) = curl(
        &lab,
        "shop/client",
        &[&format!("http://{web}:{HTTP}/bytes/10?MARKER-DISABLED-1")],
    );
    assert_eq!(code, 200);
    let (wire, _) = cap.finish();
    assert!(
        contains(&wire, "MARKER-DISABLED-1"),
        "DISABLE: plaintext expected on the wire"
    );
    lab.down().unwrap();
}

#[test]
fn peer_authentication_and_identity() {
    if !privileged() {
        return;
    }
    let pods = pod_yaml("client", "n1", "client", "", &[], false)
        + &pod_yaml("other", "n1", "other", "", &[], false)
        + &pod_yaml("legacy", "n1", "legacy", OPT_OUT, &[], false)
        + &pod_yaml("web", "n2", "web", "", &[], true);
    let lab = lab_up("mpa", &pods, &[]);
    wait_mesh_ready(&lab, &[("n1", 3), ("n2", 1)]);
    let web = ip(&lab, "shop/web");
    wait_listening(&lab, "shop/web", HTTP);
    wait_listening(&lab, "shop/web", HTTP2);
    let (p1, p2) = (format!("{web}:{HTTP}"), format!("{web}:{HTTP2}"));
    let apply = |text: &str| {
        let before: Vec<u64> = ["n1", "n2"]
            .iter()
            .map(|n| status(&lab, n).generation)
            .collect();
        write_manifest(&lab, "pa.yaml", text);
        for (node, g) in ["n1", "n2"].iter().zip(before) {
            wait_for(Duration::from_secs(10), "manifest applied", || {
                let s = status(&lab, node);
                s.generation > g
                    && s.applied_generation == s.generation
                    && s.config_errors.is_empty()
            });
        }
    };
    let pa = |ns: &str, name: &str, body: &str| {
        format!(
            "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}---\n"
        )
    };
    let drops = || {
        policy_packet_counters(&lab, "n2")
            .iter()
            .filter(|(k, _)| k.contains("reason=\"mtls-required\""))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    // (policy, [(client pod, target, expected connect)])
    let table: Vec<(String, Vec<Attempt<'_>>)> = vec![
        (
            String::new(),
            vec![("legacy", &p1, true), ("client", &p1, true)],
        ),
        (
            pa("istio-system", "default", "  mtls: {mode: STRICT}\n"),
            vec![
                ("legacy", &p1, false),
                ("legacy", &p2, false),
                ("client", &p1, true),
                ("client", &p2, true),
            ],
        ),
        (
            pa("istio-system", "default", "  mtls: {mode: STRICT}\n")
                + &pa(
                    "shop",
                    "web-ports",
                    "  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    8081: {mode: PERMISSIVE}\n",
                ),
            vec![
                ("legacy", &p1, false),
                ("legacy", &p2, true),
                ("client", &p1, true),
            ],
        ),
        (
            pa("istio-system", "default", "  mtls: {mode: STRICT}\n")
                + &pa("shop", "ns", "  mtls: {mode: DISABLE}\n"),
            vec![("legacy", &p1, true), ("client", &p1, true)],
        ),
    ];
    for (policy, rows) in &table {
        if !policy.is_empty() {
            apply(policy);
        }
        for (pod, to, want) in rows {
            let before = drops();
            let got = connects(&lab, &format!("shop/{pod}"), to);
            assert_eq!(got, *want, "{pod} -> {to} under:\n{policy}");
            if !want {
                wait_for(
                    Duration::from_secs(5),
                    "an mtls-required drop counted",
                    || drops() > before,
                );
            }
        }
    }

    // Identity from the certificate: only the client's service account may call web.
    apply(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-client, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/shop/sa/client\"]}}]\n",
    );
    let (code, _) = curl(&lab, "shop/client", &[&format!("http://{p1}/")]);
    assert_eq!(code, 200, "the allowed principal");
    let (code, _) = curl(&lab, "shop/other", &[&format!("http://{p1}/")]);
    assert_ne!(
        code, 200,
        "another service account from the same node and range"
    );
    let t = tunnels(&lab, "n2");
    assert!(
        t.inbound.rejected_streams >= 1 || code == 403,
        "refused at the tunnel: {:?}",
        t.inbound
    );
    lab.down().unwrap();
}

#[test]
fn interoperates_with_a_non_comb_hbone_peer() {
    if !privileged() {
        return;
    }
    let pods = pod_yaml("client", "n1", "client", "", &[], false)
        + &pod_yaml("web", "n2", "web", "", &[], true)
        + &pod_yaml(
            "zt",
            "n3",
            "zt",
            "",
            &[("ambient.istio.io/redirection", "enabled")],
            true,
        )
        + "apiVersion: v1\nkind: Node\nmetadata:\n  name: n3\n  annotations:\n    comb.dev/agent: \"false\"\n---\n";
    let lab = lab_up("mzt", &pods, &[]);
    wait_mesh_ready(&lab, &[("n1", 1), ("n2", 1)]);
    let (web, zt) = (ip(&lab, "shop/web"), ip(&lab, "shop/zt"));
    wait_listening(&lab, "shop/web", HTTP);
    wait_listening(&lab, "shop/zt", HTTP);
    let state = lab.state();
    let ca = state.ca.as_ref().unwrap().listen.clone();
    let root = lab.ca_root_cert();
    let dir = lab.state_dir();

    // The stand-in gets zt's certificate from the CA the way ztunnel would: as its node.
    let chain = dir.join("zt-chain.pem");
    let key = dir.join("zt-key.pem");
    // The CA listens in the router namespace: ask from n3's namespace, as n3's node agent.
    let out = lab
        .node_command(
            "n3",
            COMB,
            &[
                "cert",
                "request",
                "--ca",
                &ca,
                "--root",
                root.to_str().unwrap(),
                "--token-file",
                lab.ca_token_file("n3").to_str().unwrap(),
                "--identity",
                "spiffe://cluster.local/ns/shop/sa/zt",
                "--ttl",
                "1h",
                "--key-out",
                key.to_str().unwrap(),
            ],
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cert request: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&chain, &out.stdout).unwrap();
    let peer = format!("{SUPPORT}/hbone_peer.py");
    let tls = |c: &std::path::Path, k: &std::path::Path| {
        vec![
            "--cert".to_string(),
            c.display().to_string(),
            "--key".into(),
            k.display().to_string(),
            "--roots".into(),
            root.display().to_string(),
        ]
    };
    let mut args = vec![
        peer.clone(),
        "server".into(),
        "--listen".into(),
        "0.0.0.0:15008".into(),
    ];
    args.extend(tls(&chain, &key));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = dir.join("zt-peer.log");
    let mut server = lab
        .command("shop/zt", PY, &args)
        .unwrap()
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&lab, "shop/zt", 15008);

    // Comb -> ztunnel stand-in: the client's flow to the ambient pod is tunnelled.
    let (code, body) = curl(
        &lab,
        "shop/client",
        &[&format!("http://{zt}:{HTTP}/bytes/1000")],
    );
    assert_eq!((code, body.len()), (200, 1000), "through the stand-in");
    let seen = std::fs::read_to_string(&log).unwrap();
    assert!(
        seen.contains("\"peer\": [\"spiffe://cluster.local/ns/shop/sa/client\"]")
            && seen.contains(&format!("\"authority\": \"{zt}:{HTTP}\""))
            && seen.contains(&format!(
                "\"source\": \"{ip}\"",
                ip = ip(&lab, "shop/client")
            )),
        "the stand-in saw: {seen}"
    );

    // ztunnel stand-in -> Comb: a CONNECT to web from zt's namespace with zt's certificate.
    let mut c = vec![peer.clone(), "client".into()];
    c.extend(tls(&chain, &key));
    c.extend([
        "--connect".into(),
        format!("{web}:15008"),
        "--authority".into(),
        format!("{web}:{TCP}"),
        "--expect-id".into(),
        "spiffe://cluster.local/ns/shop/sa/web".into(),
        "--send".into(),
        "hello from a ztunnel".into(),
    ]);
    let c: Vec<&str> = c.iter().map(String::as_str).collect();
    let r = json_out(&lab, "shop/zt", PY, &c);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["received"], "hello from a ztunnel", "{r}");
    assert_eq!(r["tls_version"], "TLSv1.3");
    assert_eq!(r["alpn"], "h2");
    assert!(r["cipher"].as_str().unwrap().contains("GCM"), "{r}");
    // A bad authority (not a local pod of that node): 400.
    let mut bad = c.clone();
    let i = bad.iter().position(|a| *a == "--authority").unwrap();
    let other = format!("{zt}:{HTTP}");
    bad[i + 1] = &other;
    let r = json_out(&lab, "shop/zt", PY, &bad);
    assert_eq!(r["status"], 400, "{r}");

    // A certificate from another CA: refused at the handshake, and the proxy keeps serving.
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let sh = format!(
        "cd {d} && openssl req -x509 -nodes -days 1 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -keyout r.key -out r.pem -subj /O=evil && \
         printf 'subjectAltName=critical,URI:spiffe://cluster.local/ns/shop/sa/client\\nextendedKeyUsage=clientAuth,serverAuth\\n' > e.ext && \
         openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -keyout l.key -out l.csr -subj / && \
         openssl x509 -req -in l.csr -CA r.pem -CAkey r.key -days 1 -out l.crt -extfile e.ext",
        d = foreign.display()
    );
    assert!(
        Command::new("sh")
            .args(["-c", &sh])
            .output()
            .unwrap()
            .status
            .success()
    );
    let mut f = vec![
        peer.clone(),
        "client".into(),
        "--cert".into(),
        foreign.join("l.crt").display().to_string(),
        "--key".into(),
        foreign.join("l.key").display().to_string(),
        "--roots".into(),
        root.display().to_string(),
    ];
    f.extend([
        "--connect".into(),
        format!("{web}:15008"),
        "--authority".into(),
        format!("{web}:{TCP}"),
        "--send".into(),
        "x".into(),
    ]);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    let (_, out, _) = run(&lab, "shop/zt", PY, &f);
    let text = String::from_utf8_lossy(&out);
    assert!(
        !text.contains("\"status\": 200"),
        "a foreign certificate got through: {text}"
    );
    let before = tunnels(&lab, "n2").inbound.refused;
    let _ = run(&lab, "shop/zt", PY, &f);
    wait_for(Duration::from_secs(5), "the refusal counted", || {
        tunnels(&lab, "n2").inbound.refused > before
    });
    let r = json_out(&lab, "shop/zt", PY, &c);
    assert_eq!(r["status"], 200, "still serving: {r}");

    let _ = server.kill();
    let _ = server.wait();
    lab.down().unwrap();
}

/// The serial of `identity`'s certificate on `node` (admin API), unless expired.
fn cert_serial(lab: &Lab, node: &str, identity: &str) -> Option<String> {
    let rows: Vec<comb_api::CertRow> =
        serde_json::from_value(call(&lab.agent_socket(node), comb_api::Query::CertList).unwrap())
            .unwrap();
    rows.into_iter()
        .find(|r| r.identity == identity && r.state != "expired")
        .and_then(|r| r.serial)
}

#[test]
fn tunnels_survive_certificate_rotation() {
    if !privileged() {
        return;
    }
    let pods = pod_yaml("client", "n1", "client", "", &[], false)
        + &pod_yaml("web", "n2", "web", "", &[], true);
    // A 20 s lifetime: renewal every ~10 s, so three rotations of each side in 45 s.
    let lab = lab_up("mrot", &pods, &["--cert-ttl", "20s"]);
    wait_mesh_ready(&lab, &[("n1", 1), ("n2", 1)]);
    let web = ip(&lab, "shop/web");
    wait_listening(&lab, "shop/web", TCP);
    let to = format!("{web}:{TCP}");
    let (cid, wid) = (
        "spiffe://cluster.local/ns/shop/sa/client",
        "spiffe://cluster.local/ns/shop/sa/web",
    );
    // Warm the pool first: under a loaded CI machine the very first tunnel's handshake may
    // hit the pool's 5 s handshake timeout, which is not what this test is about.
    wait_for(
        Duration::from_secs(30),
        "a first tunnelled connection",
        || probe(&lab, "shop/client", &["churn", "--to", &to, "--count", "1"]).0,
    );
    // 100 long-lived connections, each streaming and verifying its echo for 48 s.
    let streams = lab
        .command(
            "shop/client",
            COMB,
            &[
                "probe", "stream", "--to", &to, "--conns", "100", "--secs", "48",
            ],
        )
        .unwrap()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = (
        vec![cert_serial(&lab, "n1", cid)],
        vec![cert_serial(&lab, "n2", wid)],
    );
    let (mut churns, start) = (0, std::time::Instant::now());
    // Steady new connections (new streams, and new handshakes once the pool reaps) meanwhile.
    while start.elapsed() < Duration::from_secs(45) {
        let (ok, out) = probe(
            &lab,
            "shop/client",
            &["churn", "--to", &to, "--count", "20"],
        );
        assert!(
            ok,
            "new connections during rotation failed after {:?}: {out}",
            start.elapsed()
        );
        churns += 20;
        for (node, id, list) in [("n1", cid, &mut seen.0), ("n2", wid, &mut seen.1)] {
            let s = cert_serial(&lab, node, id);
            if s.is_some() && list.last() != Some(&s) {
                list.push(s);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = streams.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "long-lived connections broke: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(report["failures"].as_array().unwrap().len(), 0, "{report}");
    assert!(report["bytes"].as_u64().unwrap() > 0, "{report}");
    assert!(
        seen.0.len() >= 4 && seen.1.len() >= 4,
        "expected three rotations on each side: client {:?}, web {:?}",
        seen.0,
        seen.1
    );
    assert!(churns >= 200, "{churns} new connections");
    lab.down().unwrap();
}
