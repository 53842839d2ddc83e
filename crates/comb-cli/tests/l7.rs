//! The node L7 proxy in the lab, end to end (privileged: run as root; under CI=true without
//! root they fail): real agents, the eBPF redirect (`bpf_sk_assign`), and real clients —
//! curl (HTTP/1.1, HTTP/2 prior knowledge), Python grpcio (unary, bidirectional streaming),
//! a Python WebSocket client, `comb probe check` (opaque TCP) — against servers in pods.
//!
//! Every lab has two server pods running the same servers: `shop/web`, whose traffic the
//! proxy handles (an AuthorizationPolicy with L7 fields, plus `comb.dev/l7: "true"` so even
//! opaque TCP is redirected), and `shop/plain`, reached directly. The same requests to both
//! must give the same bytes.
//!
//! - `protocols_through_the_redirect`: HTTP/1.1 (keep-alive, chunked both ways,
//!   `Expect: 100-continue`), HTTP/2, gRPC unary/streaming with trailers, WebSocket, opaque
//!   TCP, pod-to-Service, and proof that the bytes went through the proxy (and that
//!   `plain`'s did not), with the defaults: the proxy's hops spliced socket to socket
//!   (`--proxy-local-splice on`), relays in userspace; `..._with_proxy_splice` the same with
//!   `--proxy-splice on` (WebSocket and opaque relays handed to the kernel after the
//!   decision). `telemetry_and_robustness` runs with `--proxy-local-splice off`, so the
//!   proxy's hops over TCP are covered too.
//! - `authorization_conformance`: a table of AuthorizationPolicies, requests and expected
//!   statuses (DENY before ALLOW, AUDIT, not forms, header/namespace/principal conditions,
//!   hosts, path forms, gRPC denial with status 7, HTTP/2).
//! - `telemetry_and_robustness`: exact `istio_requests_total` counts and labels after a known
//!   set of requests, the JSON access log, `traceparent` propagation and OTLP export to a
//!   collector, `comb proxy stats`; malformed requests (400), a fuzzed stream of broken
//!   requests, a slowloris client, an upstream that refuses (503, UF) — and the proxy keeps
//!   serving throughout.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use comb_lab::Lab;
use common::*;

const SUPPORT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/l7_support");
const PY: &str = "/usr/bin/python3";
/// ClusterIP of Service shop/web-svc (80 → 8080 on shop/web).
const VIP: &str = "198.19.0.20";
const HTTP: u16 = 8080;
const GRPC: u16 = 50051;
const WS: u16 = 8765;
const TCP: u16 = 9000;

fn support(script: &str) -> String {
    format!("{SUPPORT}/{script}")
}

/// The servers every server pod runs: HTTP (h1 + h2c), gRPC, WebSocket, TCP echo.
fn servers_command() -> Vec<String> {
    let script = format!(
        "{COMB} probe http-serve --port {HTTP} --threads 2 & \
         {PY} {grpc} serve {GRPC} & \
         {PY} {ws} serve {WS} & \
         {COMB} probe serve --port {TCP} --mode echo & wait",
        grpc = support("grpc_echo.py"),
        ws = support("ws_echo.py"),
    );
    vec!["/bin/sh".into(), "-c".into(), script]
}

fn pod_yaml(ns: &str, name: &str, sa: &str, annotations: &[(&str, &str)], servers: bool) -> String {
    let cmd = if servers {
        servers_command()
    } else {
        vec!["sleep".into(), "infinity".into()]
    };
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    pod_with(ns, name, "n1", annotations, &cmd, &[("http", HTTP)])
        .replace(
            "metadata:\n",
            &format!("metadata:\n  labels: {{app: {name}}}\n"),
        )
        .replace("spec:\n", &format!("spec:\n  serviceAccountName: {sa}\n"))
}

const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
apiVersion: v1\nkind: Namespace\nmetadata: {name: dev}\n---\n";

/// The lab of every test: shop/client, dev/client, shop/web (proxied), shop/plain (direct),
/// Service shop/web-svc in front of web. `extra_pods` are appended.
fn lab(prefix: &str, agent_args: &[&str], extra_pods: &str) -> Lab {
    let mut pods = String::new();
    pods += &pod_yaml("shop", "client", "client", &[], false);
    pods += &pod_yaml("dev", "client", "client", &[], false);
    pods += &pod_yaml("shop", "web", "web", &[("comb.dev/l7", "true")], true);
    pods += &pod_yaml("shop", "plain", "plain", &[], true);
    pods += extra_pods;
    let web_ip = lab_ip(1, 2);
    let resources = format!(
        "{NAMESPACES}{}{}",
        service_yaml(
            "shop",
            "web-svc",
            VIP,
            &[],
            &[("http", 80, "8080", "TCP")],
            ""
        ),
        slice_yaml(
            "shop",
            "web-svc",
            &[("http", HTTP, "TCP")],
            &[(web_ip, Cond::Ready)]
        ),
    );
    let lab = lab_up_with(prefix, &pods, &resources, agent_args);
    let n = lab.pods().len();
    wait_ready(&lab, "n1", n);
    for pod in ["shop/web", "shop/plain"] {
        for port in [HTTP, GRPC, WS, TCP] {
            wait_listening(&lab, pod, port);
        }
    }
    lab
}

/// curl in a pod: the body, and `-w` output after a separator line.
fn curl(lab: &Lab, pod: &str, args: &[&str]) -> (Vec<u8>, String) {
    let mut full = vec![
        "-sS",
        "-m",
        "20",
        "-w",
        "\n@@%{http_code} %{http_version} %{num_connects}",
    ];
    full.extend_from_slice(args);
    let (_ok, out, err) = run(lab, pod, "curl", &full);
    let split = out
        .windows(3)
        .rposition(|w| w == b"\n@@")
        .unwrap_or_else(|| panic!("curl {args:?}: no -w output; stderr {err}"));
    (
        out[..split].to_vec(),
        String::from_utf8_lossy(&out[split + 3..]).into_owned(),
    )
}

fn status_of(lab: &Lab, pod: &str, args: &[&str]) -> u16 {
    let (_, w) = curl(lab, pod, args);
    w.split(' ').next().unwrap().parse().unwrap()
}

fn url(lab: &Lab, pod: &str, path: &str) -> String {
    format!("http://{}:{HTTP}{path}", ip(lab, pod))
}

fn proxy_stats(lab: &Lab) -> serde_json::Value {
    call(&lab.agent_socket("n1"), comb_api::Query::ProxyStats).unwrap()
}

/// Requests the proxy recorded for destination workload `dest`.
fn proxied_requests(lab: &Lab, dest: &str) -> u64 {
    let stats = proxy_stats(lab);
    stats["stats"]["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["key"].as_str().unwrap_or_default().contains(dest))
        .map(|r| r["requests"].as_u64().unwrap())
        .sum()
}

fn write_file(lab: &Lab, name: &str, bytes: &[u8]) -> String {
    let path = lab.state_dir().join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

/// Redirect only flows the proxy must see: ALLOW GET/POST (L7) on web plus port 9000 (L4).
const BASE_POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-l7, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET, POST, PUT]}}]
  - to: [{operation: {ports: [\"9000\"]}}]
";

fn apply_policies(lab: &Lab, text: &str) {
    let before = status(lab, "n1").generation;
    write_manifest(lab, "policies.yaml", text);
    wait_for(Duration::from_secs(20), "policies applied", || {
        let s = status(lab, "n1");
        assert!(
            s.config_errors.is_empty(),
            "policies rejected: {:?}",
            s.config_errors
        );
        s.generation > before && s.applied_generation == s.generation
    });
}

/// The defaults: relays in userspace, and the client-to-proxy and proxy-to-server hops
/// spliced socket to socket (`--proxy-local-splice on`: the proxy's sockets join the splice).
#[test]
fn protocols_through_the_redirect() {
    if !privileged() {
        return;
    }
    let lab = lab("l7d", &[], "");
    let before = splice_counters(&lab);
    check_protocols(&lab, false);
    let after = splice_counters(&lab);
    assert!(
        after.redirected_bytes > before.redirected_bytes,
        "the client-to-proxy hops were spliced: {before:?} -> {after:?}"
    );
}

/// With `--proxy-splice on`: opaque relays and upgraded connections are handed to the
/// kernel's sk_skb splice after the decision (the pod-to-proxy splice is then off).
#[test]
fn protocols_through_the_redirect_with_proxy_splice() {
    if !privileged() {
        return;
    }
    let lab = lab("l7p", &["--proxy-splice", "on"], "");
    check_protocols(&lab, true);
}

fn splice_counters(lab: &Lab) -> comb_api::SpliceStats {
    serde_json::from_value(call(&lab.agent_socket("n1"), comb_api::Query::SpliceStats).unwrap())
        .unwrap()
}

/// `kernel_relay`: the agent runs `--proxy-splice on` (relays handed to the kernel).
fn check_protocols(lab: &Lab, kernel_relay: bool) {
    apply_policies(lab, BASE_POLICY);

    // HTTP/1.1: a large body, keep-alive over three requests, chunked response.
    let (web, w) = curl(
        lab,
        "shop/client",
        &[&url(lab, "shop/web", "/bytes/300000")],
    );
    let (plain, _) = curl(
        lab,
        "shop/client",
        &[&url(lab, "shop/plain", "/bytes/300000")],
    );
    assert!(w.starts_with("200 1.1"), "{w}");
    assert_eq!(web.len(), 300_000);
    assert_eq!(web, plain, "the same bytes with and without the proxy");
    let before = proxied_requests(lab, "web");
    let (_, w) = curl(
        lab,
        "shop/client",
        &[
            &url(lab, "shop/web", "/bytes/10"),
            &url(lab, "shop/web", "/bytes/20"),
            &url(lab, "shop/web", "/bytes/30"),
        ],
    );
    assert!(
        w.ends_with(" 0"),
        "keep-alive: later requests reuse the connection ({w})"
    );
    let (web, _) = curl(lab, "shop/client", &[&url(lab, "shop/web", "/chunked/500")]);
    let (plain, _) = curl(
        lab,
        "shop/client",
        &[&url(lab, "shop/plain", "/chunked/500")],
    );
    assert_eq!(web.len(), 8000);
    assert_eq!(web, plain);
    wait_for(Duration::from_secs(5), "4 requests recorded", || {
        proxied_requests(lab, "web") >= before + 4
    });

    // Request bodies: chunked upload and Expect: 100-continue (2 MiB), echoed back.
    let body: Vec<u8> = (0..2 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let file = write_file(lab, "body.bin", &body);
    let data = format!("@{file}");
    for extra in [
        ["-H", "Transfer-Encoding: chunked"],
        ["-H", "Expect: 100-continue"],
    ] {
        let mut args = vec!["-X", "POST", "--data-binary", &data];
        args.extend_from_slice(&extra);
        let u = url(lab, "shop/web", "/echo");
        args.push(&u);
        let (echo, w) = curl(lab, "shop/client", &args);
        assert!(w.starts_with("200"), "{extra:?}: {w}");
        assert!(
            echo == body,
            "{extra:?}: echoed body differs ({} bytes)",
            echo.len()
        );
    }

    // HTTP/2 with prior knowledge: the backend sees HTTP/2 too; bodies identical.
    let (web, w) = curl(
        lab,
        "shop/client",
        &[
            "--http2-prior-knowledge",
            &url(lab, "shop/web", "/chunked/100"),
        ],
    );
    let (plain, _) = curl(
        lab,
        "shop/client",
        &[
            "--http2-prior-knowledge",
            &url(lab, "shop/plain", "/chunked/100"),
        ],
    );
    assert!(w.starts_with("200 2"), "{w}");
    assert_eq!(web, plain);
    let (seen, _) = curl(
        lab,
        "shop/client",
        &["--http2-prior-knowledge", &url(lab, "shop/web", "/who")],
    );
    let seen: serde_json::Value = serde_json::from_slice(&seen).unwrap();
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["pod"], "web");
    assert!(
        seen["headers"]["traceparent"].as_str().is_some(),
        "the proxy adds a traceparent: {seen}"
    );
    assert_eq!(
        seen["peer"].as_str().unwrap().split(':').next().unwrap(),
        "198.18.1.1",
        "the proxy connects upstream from the node: {seen}"
    );
    let (seen, _) = curl(lab, "shop/client", &[&url(lab, "shop/plain", "/who")]);
    let seen: serde_json::Value = serde_json::from_slice(&seen).unwrap();
    assert!(
        seen["headers"]["traceparent"].is_null(),
        "plain is not proxied: {seen}"
    );

    // gRPC: unary with trailers, an error status, bidirectional streaming.
    let grpc = support("grpc_echo.py");
    let web_g = format!("{}:{GRPC}", ip(lab, "shop/web"));
    let plain_g = format!("{}:{GRPC}", ip(lab, "shop/plain"));
    let a = json_out(lab, "shop/client", PY, &[&grpc, "call", &web_g, "50"]);
    let b = json_out(lab, "shop/client", PY, &[&grpc, "call", &plain_g, "50"]);
    assert_eq!(a, b, "gRPC outcomes through the proxy and direct");
    assert_eq!(
        a["unary"]["trailers"]["x-echo-trailer"], "unary-done",
        "{a}"
    );
    assert_eq!(a["fail"]["code"], "NOT_FOUND");
    assert_eq!(a["stream"]["replies"].as_array().unwrap().len(), 50);
    assert_eq!(a["stream"]["trailers"]["x-echo-trailer"], "stream-done");

    // WebSocket: upgraded, then spliced in the kernel.
    let ws = support("ws_echo.py");
    let spliced_before = metric(lab, "n1", "comb_proxy_spliced_bytes_total");
    for (pod, tag) in [("shop/web", "web"), ("shop/plain", "plain")] {
        let u = format!("ws://{}:{WS}/chat", ip(lab, pod));
        let r = json_out(lab, "shop/client", PY, &[&ws, "call", &u, "40", "20000"]);
        assert_eq!(r["echoed"], 40, "{tag}: {r}");
        assert_eq!(r["binary"], true, "{tag}: {r}");
    }
    // Bytes that arrive while the two sockets are being paired are relayed in userspace
    // (docs/l7.md, "Decide once, then splice"); under load that can be a frame or two.
    let spliced = metric(lab, "n1", "comb_proxy_spliced_bytes_total") - spliced_before;
    if kernel_relay {
        assert!(
            spliced >= 0.9 * 2.0 * 40.0 * 20000.0,
            "WebSocket frames moved by the kernel splice: {spliced}"
        );
    } else {
        assert_eq!(spliced, 0.0, "no kernel relay without --proxy-splice");
    }

    // Opaque TCP (not HTTP): relayed, spliced, verified byte for byte. A connection whose
    // client has sent everything and half-closed before the proxy could hand it to the kernel
    // stays in userspace: with `check` that is any of them on a busy machine, so `check`
    // proves the bytes and the long-lived `stream` connections below prove the splice.
    let before = proxy_stats(lab);
    let tcp_before = before["stats"]["tcp"]["connections"].as_u64().unwrap_or(0);
    let spliced_before = before["stats"]["tcp"]["spliced"].as_u64().unwrap_or(0);
    let bytes_before = metric(lab, "n1", "comb_proxy_spliced_bytes_total");
    for pod in ["shop/web", "shop/plain"] {
        let to = format!("{}:{TCP}", ip(lab, pod));
        let (ok, out) = probe(
            lab,
            "shop/client",
            &[
                "check",
                "--to",
                &to,
                "--conns",
                "20",
                "--sizes",
                "1,1000,65536,1048576",
            ],
        );
        assert!(ok, "{pod}: {out}");
    }
    // Each stream connection writes 4 KiB and waits for its echo before the next: the proxy's
    // hand-over never meets the client's EOF, so every one of them is spliced.
    let (ok, out) = probe(
        lab,
        "shop/client",
        &[
            "stream",
            "--to",
            &format!("{}:{TCP}", ip(lab, "shop/web")),
            "--conns",
            "4",
            "--secs",
            "1",
        ],
    );
    assert!(ok, "stream: {out}");
    wait_for(
        Duration::from_secs(5),
        "24 opaque connections recorded",
        || {
            let s = proxy_stats(lab);
            s["stats"]["tcp"]["connections"].as_u64().unwrap_or(0) >= tcp_before + 24
        },
    );
    let s = proxy_stats(lab);
    assert_eq!(
        s["stats"]["tcp"]["connections"].as_u64().unwrap(),
        tcp_before + 24,
        "only web's connections are proxied: {s}"
    );
    let moved = metric(lab, "n1", "comb_proxy_spliced_bytes_total") - bytes_before;
    if kernel_relay {
        assert!(
            s["stats"]["tcp"]["spliced"].as_u64().unwrap_or(0) >= spliced_before + 4,
            "the 4 long-lived opaque connections were spliced: {s}"
        );
        // The streams' chunks after the first went through the kernel.
        assert!(moved > 0.0, "bytes moved by the kernel: {moved}");
    } else {
        assert_eq!(
            s["stats"]["tcp"]["spliced"].as_u64().unwrap_or(0),
            spliced_before,
            "{s}"
        );
        assert_eq!(moved, 0.0, "no kernel relay without --proxy-splice");
    }

    // Pod to Service: the VIP is translated at connect, the flow then redirected.
    let (body, w) = curl(lab, "shop/client", &[&format!("http://{VIP}/who")]);
    assert!(w.starts_with("200"), "{w}");
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["pod"], "web");
    assert!(
        seen["headers"]["traceparent"].is_string(),
        "via the proxy: {seen}"
    );
    let text = metrics_text(lab, "n1");
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("destination_service=\"web-svc.shop.svc.cluster.local\"")
            && l.contains("destination_service_name=\"web-svc\"")),
        "destination_service of the Service in front of web:\n{text}"
    );
}

/// One request of the conformance table.
struct Req {
    from: &'static str,
    method: &'static str,
    path: &'static str,
    headers: &'static [&'static str],
    h2: bool,
    want: u16,
}

const fn get(from: &'static str, path: &'static str, want: u16) -> Req {
    Req {
        from,
        method: "GET",
        path,
        headers: &[],
        h2: false,
        want,
    }
}

struct Case {
    name: &'static str,
    requests: Vec<Req>,
}

fn ap(name: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: {action}\n  rules:\n{rules}---\n"
    )
}

#[test]
fn authorization_conformance() {
    if !privileged() {
        return;
    }
    let lab = lab("l7a", &[], "");
    let c = "shop/client";
    let d = "dev/client";
    let r = |from, method, path, headers, h2, want| Req {
        from,
        method,
        path,
        headers,
        h2,
        want,
    };
    let cases: Vec<(Case, String)> = vec![
        (
            Case {
                name: "no policy: visibility only, everything allowed",
                requests: vec![get(c, "/x", 200), r(c, "DELETE", "/x", &[], false, 200)],
            },
            String::new(),
        ),
        (
            Case {
                name: "ALLOW GET /api/*",
                requests: vec![
                    get(c, "/api/items", 200),
                    get(c, "/api", 403),
                    get(c, "/other", 403),
                    r(c, "POST", "/api/items", &[], false, 403),
                    r(c, "GET", "/api/items", &[], true, 200),
                    r(c, "GET", "/other", &[], true, 403),
                ],
            },
            ap(
                "allow-api",
                "ALLOW",
                "  - to: [{operation: {methods: [GET], paths: [\"/api/*\"]}}]\n",
            ),
        ),
        (
            Case {
                name: "DENY before ALLOW",
                requests: vec![get(c, "/x", 200), get(c, "/admin/users", 403)],
            },
            ap(
                "allow-all",
                "ALLOW",
                "  - to: [{operation: {paths: [\"*\"]}}]\n",
            ) + &ap(
                "deny-admin",
                "DENY",
                "  - to: [{operation: {paths: [\"/admin/*\"]}}]\n",
            ),
        ),
        (
            Case {
                name: "AUDIT changes nothing",
                requests: vec![get(c, "/audited", 200), get(c, "/x", 200)],
            },
            ap(
                "audit",
                "AUDIT",
                "  - to: [{operation: {paths: [\"/audited\"]}}]\n",
            ),
        ),
        (
            Case {
                name: "notPaths, notMethods, suffix paths",
                requests: vec![
                    get(c, "/img/a.png", 200),
                    get(c, "/img/a.jpg", 403),
                    get(c, "/secret.png", 403),
                    r(c, "DELETE", "/img/a.png", &[], false, 403),
                ],
            },
            ap(
                "allow-png",
                "ALLOW",
                "  - to: [{operation: {paths: [\"*.png\"], notPaths: [\"/secret.png\"], notMethods: [DELETE]}}]\n",
            ),
        ),
        (
            Case {
                name: "DENY with notPaths",
                requests: vec![get(c, "/public/x", 200), get(c, "/private", 403)],
            },
            ap(
                "deny-nonpublic",
                "DENY",
                "  - to: [{operation: {notPaths: [\"/public/*\"]}}]\n",
            ),
        ),
        (
            Case {
                name: "header condition",
                requests: vec![
                    r(c, "GET", "/x", &["x-user: alice"], false, 200),
                    r(c, "GET", "/x", &["X-User: alice"], true, 200),
                    r(c, "GET", "/x", &["x-user: bob"], false, 403),
                    get(c, "/x", 403),
                ],
            },
            ap(
                "allow-alice",
                "ALLOW",
                "  - when: [{key: \"request.headers[x-user]\", values: [alice]}]\n",
            ),
        ),
        (
            Case {
                name: "source namespace and principal",
                requests: vec![
                    get(d, "/ns", 200),
                    get(c, "/ns", 403),
                    get(c, "/p", 200),
                    get(d, "/p", 403),
                ],
            },
            ap(
                "from-dev",
                "ALLOW",
                "  - from: [{source: {namespaces: [dev]}}]\n    to: [{operation: {paths: [/ns]}}]\n  - to: [{operation: {paths: [/p]}}]\n    when: [{key: source.principal, values: [\"cluster.local/ns/shop/sa/client\"]}]\n",
            ),
        ),
        (
            Case {
                name: "hosts",
                requests: vec![
                    r(
                        c,
                        "GET",
                        "/x",
                        &["Host: web.shop.svc.cluster.local"],
                        false,
                        200,
                    ),
                    r(c, "GET", "/x", &["Host: api.example.com:8080"], false, 200),
                    r(c, "GET", "/x", &["Host: evil.com"], false, 403),
                ],
            },
            ap(
                "hosts",
                "ALLOW",
                "  - to: [{operation: {hosts: [\"web.shop.svc.cluster.local\", \"*.example.com\"]}}]\n",
            ),
        ),
    ];
    let mut failures = Vec::new();
    for (case, policies) in &cases {
        // The lab starts without policies: the first case needs no change (an empty file
        // would not make a new generation to wait for).
        if !policies.is_empty() {
            apply_policies(&lab, &format!("{policies}# {}\n", case.name));
        }
        for q in &case.requests {
            let u = url(&lab, "shop/web", q.path);
            let mut args = vec!["-X", q.method, "-o", "/dev/null"];
            if q.h2 {
                args.push("--http2-prior-knowledge");
            }
            for h in q.headers {
                args.extend(["-H", h]);
            }
            args.push(&u);
            let (body, w) = curl(&lab, q.from, &args);
            let got: u16 = w.split(' ').next().unwrap().parse().unwrap();
            if got != q.want {
                failures.push(format!(
                    "{}: {} {} {} {:?} h2={} → {got} (want {}) {}",
                    case.name,
                    q.from,
                    q.method,
                    q.path,
                    q.headers,
                    q.h2,
                    q.want,
                    String::from_utf8_lossy(&body)
                ));
            }
        }
    }
    // The 403 body, exactly.
    apply_policies(
        &lab,
        &ap(
            "deny-all-admin",
            "DENY",
            "  - to: [{operation: {paths: [\"/admin\"]}}]\n",
        ),
    );
    let (body, w) = curl(&lab, c, &[&url(&lab, "shop/web", "/admin")]);
    assert!(w.starts_with("403"), "{w}");
    assert_eq!(String::from_utf8_lossy(&body), "RBAC: access denied");

    // gRPC: a denied method ends with status 7 PERMISSION_DENIED, the others work.
    apply_policies(
        &lab,
        &ap(
            "deny-unary",
            "DENY",
            "  - to: [{operation: {paths: [\"/comb.test.Echo/Unary\"]}}]\n",
        ),
    );
    let web_g = format!("{}:{GRPC}", ip(&lab, "shop/web"));
    let g = json_out(
        &lab,
        c,
        PY,
        &[&support("grpc_echo.py"), "call", &web_g, "3"],
    );
    assert_eq!(g["unary"]["code"], "PERMISSION_DENIED", "{g}");
    assert_eq!(g["unary"]["details"], "RBAC: access denied", "{g}");
    assert_eq!(g["stream"]["code"], "OK", "{g}");
    assert!(
        failures.is_empty(),
        "conformance failures:\n{}",
        failures.join("\n")
    );
}

/// `istio_requests_total` samples by response code for source workload `src`.
fn requests_by_code(text: &str, src: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in text.lines() {
        if !l.starts_with("istio_requests_total{")
            || !l.contains(&format!("source_workload=\"{src}\""))
        {
            continue;
        }
        let (series, v) = l.rsplit_once(' ').unwrap();
        let code = series.split("response_code=\"").nth(1).unwrap();
        let code = &code[..code.find('"').unwrap()];
        let grpc = series.split("grpc_response_status=\"").nth(1).unwrap();
        let grpc = &grpc[..grpc.find('"').unwrap()];
        let proto = series.split("request_protocol=\"").nth(1).unwrap();
        let proto = &proto[..proto.find('"').unwrap()];
        *out.entry(format!("{proto} {code} {grpc}").trim().to_string())
            .or_default() += v.parse::<f64>().unwrap();
    }
    out
}

#[test]
fn telemetry_and_robustness() {
    if !privileged() {
        return;
    }
    let extra = pod_yaml("shop", "mclient", "mclient", &[], false)
        + &pod_yaml(
            "shop",
            "closed",
            "closed",
            &[("comb.dev/l7", "true")],
            false,
        );
    let log_path = PathBuf::from(format!("/tmp/comb-l7-access-{}.log", unique("")));
    let log_arg = log_path.display().to_string();
    let lab = lab(
        "l7t",
        &[
            "--proxy-local-splice",
            "off",
            "--access-log",
            &log_arg,
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
            "--proxy-header-timeout-ms",
            "2000",
        ],
        &extra,
    );
    struct RmLog(PathBuf);
    impl Drop for RmLog {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = RmLog(log_path.clone());
    let spans_file = lab.state_dir().join("spans.jsonl");
    let mut collector = lab
        .node_command(
            "n1",
            PY,
            &[
                &support("rawhttp.py"),
                "collect",
                "4318",
                &spans_file.display().to_string(),
            ],
        )
        .unwrap()
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _k = Kill(&mut collector);
    apply_policies(
        &lab,
        &ap(
            "allow-not-forbidden",
            "ALLOW",
            "  - to: [{operation: {notPaths: [/forbidden]}}]\n",
        ),
    );

    // A known set of requests from a client nobody else uses.
    let m = "shop/mclient";
    for _ in 0..7 {
        assert_eq!(
            status_of(&lab, m, &[&url(&lab, "shop/web", "/bytes/10")]),
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(
            status_of(&lab, m, &[&url(&lab, "shop/web", "/status/404")]),
            404
        );
    }
    for _ in 0..2 {
        assert_eq!(
            status_of(&lab, m, &[&url(&lab, "shop/web", "/forbidden")]),
            403
        );
    }
    let web_g = format!("{}:{GRPC}", ip(&lab, "shop/web"));
    json_out(
        &lab,
        m,
        PY,
        &[&support("grpc_echo.py"), "call", &web_g, "2"],
    );
    let want: BTreeMap<String, f64> = [
        ("http 200", 7.0),
        ("http 404", 3.0),
        ("http 403", 2.0),
        ("grpc 200 0", 2.0),
        ("grpc 200 5", 1.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    wait_for(Duration::from_secs(5), "the requests' metrics", || {
        requests_by_code(&metrics_text(&lab, "n1"), "mclient") == want
    });
    let text = metrics_text(&lab, "n1");
    let series = text
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("source_workload=\"mclient\"")
                && l.contains("response_code=\"200\"")
                && l.contains("request_protocol=\"http\"")
        })
        .unwrap();
    for label in [
        "reporter=\"destination\"",
        "source_workload_namespace=\"shop\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/mclient\"",
        "destination_workload=\"web\"",
        "destination_workload_namespace=\"shop\"",
        "destination_service=\"web-svc.shop.svc.cluster.local\"",
        "response_flags=\"-\"",
        "grpc_response_status=\"\"",
    ] {
        assert!(series.contains(label), "{label} missing in {series}");
    }
    let count_200 = text
        .lines()
        .filter(|l| {
            l.starts_with("istio_request_duration_milliseconds_count{")
                && l.contains("source_workload=\"mclient\"")
                && l.contains("response_code=\"200\"")
                && l.contains("request_protocol=\"http\"")
        })
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum::<f64>();
    assert_eq!(count_200, 7.0, "duration histogram count");

    // Access log: one JSON line per request; the denied ones say why.
    wait_for(Duration::from_secs(5), "access log lines", || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"/forbidden\""))
            .count()
            == 2
    });
    let log = std::fs::read_to_string(&log_path).unwrap();
    let denied: serde_json::Value =
        serde_json::from_str(log.lines().find(|l| l.contains("\"/forbidden\"")).unwrap()).unwrap();
    assert_eq!(denied["response_code"], 403, "{denied}");
    assert!(
        denied["response_code_details"]
            .as_str()
            .unwrap()
            .starts_with("rbac_access_denied"),
        "{denied}"
    );

    // traceparent: the caller's trace continues upstream with the proxy's span.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let (body, _) = curl(
        &lab,
        m,
        &[
            "-H",
            &format!("traceparent: {parent}"),
            &url(&lab, "shop/web", "/who"),
        ],
    );
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let tp = seen["headers"]["traceparent"].as_str().unwrap();
    assert!(tp.starts_with(&format!("00-{trace}-")), "{tp}");
    assert_ne!(tp, parent, "the proxy's own span id");
    wait_for(
        Duration::from_secs(15),
        "the span at the OTLP collector",
        || {
            std::fs::read_to_string(&spans_file)
                .unwrap_or_default()
                .contains(trace)
        },
    );
    let spans = std::fs::read_to_string(&spans_file).unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(spans.lines().find(|l| l.contains(trace)).unwrap()).unwrap();
    assert_eq!(doc["path"], "/v1/traces");
    assert!(doc["body"]["resourceSpans"].is_array(), "{doc}");

    // `comb proxy stats` renders.
    let out = comb(&[
        "--socket",
        &lab.agent_socket("n1").display().to_string(),
        "proxy",
        "stats",
    ]);
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stats.contains("/forbidden"),
        "{stats}"
    );

    // Robustness. Malformed requests: 400, connection closed.
    let raw = support("rawhttp.py");
    let web_ip = ip(&lab, "shop/web");
    let port = HTTP.to_string();
    for bad in [
        "GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "GET /\u{1} HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let hex: String = bad.bytes().map(|b| format!("{b:02x}")).collect();
        let r = json_out(&lab, m, PY, &[&raw, "send", &web_ip, &port, &hex]);
        assert!(
            r["status"].as_str().unwrap().starts_with("HTTP/1.1 400"),
            "{bad:?}: {r}"
        );
    }
    // A fuzzed stream of broken requests; the proxy answers or closes, and keeps serving.
    let r = json_out(&lab, m, PY, &[&raw, "fuzz", &web_ip, &port, "300", "7"]);
    assert_eq!(r["sent"], 300, "{r}");
    assert_eq!(
        r["errors"],
        serde_json::json!({}),
        "every fuzzed connection accepted: {r}"
    );
    // Slowloris: trickling clients are cut after the header timeout (2 s) while others are
    // served at once.
    let slow = lab
        .command(m, PY, &[&raw, "slowloris", &web_ip, &port, "30", "6"])
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    assert_eq!(
        status_of(&lab, m, &[&url(&lab, "shop/web", "/bytes/10")]),
        200
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "served during slowloris"
    );
    let out = slow.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["closed_by_server"], 30, "slowloris connections cut: {r}");
    assert!(r["longest_s"].as_f64().unwrap() < 4.5, "{r}");
    // An upstream that refuses: 503 with response flag UF, and Envoy's body.
    let closed = url(&lab, "shop/closed", "/x");
    let (body, w) = curl(&lab, m, &[&closed]);
    assert!(w.starts_with("503"), "{w}");
    assert!(
        String::from_utf8_lossy(&body).starts_with("upstream connect error"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    wait_for(Duration::from_secs(5), "a UF series", || {
        metrics_text(&lab, "n1").lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_workload=\"closed\"")
                && l.contains("response_code=\"503\"")
                && l.contains("response_flags=\"UF\"")
        })
    });
    // Still alive and serving after all of it.
    assert_eq!(
        status_of(&lab, m, &[&url(&lab, "shop/web", "/bytes/10")]),
        200
    );
    assert!(status(&lab, "n1").proxy.is_some());
}
