//! Tests across the telemetry modules: records in; Prometheus text, access log lines, OTLP
//! requests (to a real local HTTP server) and stats out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use comb_model::ObjKey;
use comb_model::l7::Workload;
use serde_json::Value;

use super::*;

pub(super) fn workload(ns: &str, name: &str, rev: &str) -> Arc<Workload> {
    Arc::new(Workload {
        pod: ObjKey::new(ns, format!("{name}-7d4b9c-x2x")),
        workload: name.into(),
        namespace: ns.into(),
        service_account: name.into(),
        principal: format!("cluster.local/ns/{ns}/sa/{name}"),
        canonical_service: name.into(),
        canonical_revision: rev.into(),
        identity: 4242,
    })
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// 2024-05-06T07:08:09.123Z.
fn start() -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_714_979_289_123)
}

pub(super) fn request() -> RequestRecord {
    RequestRecord {
        start: start(),
        duration: Duration::from_millis(3),
        downstream: addr("10.0.1.5:41000"),
        upstream: addr("10.0.1.9:8080"),
        source: Some(workload("shop", "frontend", "v1")),
        destination: Some(workload("shop", "web", "v2")),
        destination_service: Some("web.shop.svc.cluster.local".into()),
        protocol: RequestProtocol::Http,
        http_version: "HTTP/1.1",
        method: "GET".into(),
        path: "/items/7?color=red".into(),
        authority: "web.shop:8080".into(),
        user_agent: Some("curl/8.0".into()),
        x_forwarded_for: Some("192.0.2.1".into()),
        request_id: Some("req-1".into()),
        response_code: 200,
        grpc_status: None,
        response_flags: ResponseFlags::NONE,
        request_bytes: 0,
        response_bytes: 120,
        trace: None,
        authz_policy: Some("shop/allow-frontend".into()),
        denied: false,
        audited: None,
        mtls: false,
    }
}

fn grpc_denied() -> RequestRecord {
    RequestRecord {
        duration: Duration::from_micros(200),
        source: None,
        destination_service: None,
        protocol: RequestProtocol::Grpc,
        http_version: "HTTP/2",
        method: "POST".into(),
        path: "/shop.Cart/Add".into(),
        user_agent: Some("grpc-go/1.60".into()),
        x_forwarded_for: None,
        request_id: None,
        grpc_status: Some(7),
        request_bytes: 5,
        response_bytes: 0,
        authz_policy: Some("shop/deny-cart".into()),
        denied: true,
        audited: Some("shop/audit-all".into()),
        ..request()
    }
}

fn tcp() -> TcpRecord {
    TcpRecord {
        start: start(),
        duration: Duration::from_millis(1500),
        downstream: addr("10.0.1.5:41001"),
        upstream: addr("10.0.1.9:5432"),
        source: Some(workload("shop", "frontend", "v1")),
        destination: Some(workload("shop", "web", "v2")),
        destination_service: Some("web.shop.svc.cluster.local".into()),
        sent_bytes: 100,
        received_bytes: 2000,
        response_flags: ResponseFlags::NONE,
        spliced: true,
        authz_policy: None,
        denied: false,
        mtls: false,
        reporter: Reporter::Destination,
    }
}

pub(super) fn options() -> TelemetryOptions {
    TelemetryOptions {
        access_log: None,
        otlp_endpoint: None,
        node: "node-a".into(),
        service_name: "comb-proxy".into(),
        max_stats_routes: 100,
    }
}

const WEB: &str = r#"destination_workload="web",destination_workload_namespace="shop",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_app="web",destination_version="v2""#;
const WEB_SVC: &str = r#"destination_service="web.shop.svc.cluster.local",destination_service_name="web",destination_service_namespace="shop",destination_canonical_service="web",destination_canonical_revision="v2""#;
const NO_SVC: &str = r#"destination_service="unknown",destination_service_name="unknown",destination_service_namespace="unknown",destination_canonical_service="web",destination_canonical_revision="v2""#;
const FRONTEND: &str = r#"source_workload="frontend",source_workload_namespace="shop",source_principal="spiffe://cluster.local/ns/shop/sa/frontend",source_app="frontend",source_version="v1",source_canonical_service="frontend",source_canonical_revision="v1""#;
const NOBODY: &str = r#"source_workload="unknown",source_workload_namespace="unknown",source_principal="unknown",source_app="unknown",source_version="unknown",source_canonical_service="unknown",source_canonical_revision="unknown""#;

const LE: [&str; 20] = [
    "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000",
    "30000", "60000", "300000", "600000", "1800000", "3600000", "+Inf",
];

/// One histogram series: cumulative counts per `le` (the last is +Inf = count), sum.
fn hist(name: &str, labels: &str, cumulative: [u64; 20], sum: &str) -> String {
    let mut s = String::new();
    for (le, n) in LE.iter().zip(cumulative) {
        s += &format!("{name}_bucket{{{labels},le=\"{le}\"}} {n}\n");
    }
    s += &format!(
        "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {}\n",
        cumulative[19]
    );
    s
}

#[test]
fn prometheus_text_exact() {
    let t = Telemetry::new(options());
    // Series A: two requests (3 ms, 40.5 ms); series B: one denied gRPC request; one TCP
    // connection.
    t.record_request(&request());
    t.record_request(&RequestRecord {
        duration: Duration::from_micros(40_500),
        request_bytes: 20,
        response_bytes: 1500,
        ..request()
    });
    t.record_request(&grpc_denied());
    t.tcp_opened(&tcp());
    t.record_tcp(&tcp());
    let mut out = String::new();
    t.render_prometheus(&mut out);

    let a = format!(
        r#"reporter="destination",{FRONTEND},{WEB},{WEB_SVC},request_protocol="http",response_code="200",grpc_response_status="",response_flags="-",connection_security_policy="none""#
    );
    let b = format!(
        r#"reporter="destination",{NOBODY},{WEB},{NO_SVC},request_protocol="grpc",response_code="200",grpc_response_status="7",response_flags="-",connection_security_policy="none""#
    );
    let c = format!(
        r#"reporter="destination",{FRONTEND},{WEB},{WEB_SVC},request_protocol="tcp",response_flags="-",connection_security_policy="none""#
    );
    let mut want = String::new();
    want += "# HELP istio_requests_total Requests handled by the proxy.\n# TYPE istio_requests_total counter\n";
    want += &format!("istio_requests_total{{{a}}} 2\nistio_requests_total{{{b}}} 1\n");
    let d = "istio_request_duration_milliseconds";
    want += &format!("# HELP {d} Request duration in milliseconds.\n# TYPE {d} histogram\n");
    want += &hist(
        d,
        &a,
        [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2],
        "43.5",
    );
    want += &hist(d, &b, [1; 20], "0.2");
    let q = "istio_request_bytes";
    want += &format!("# HELP {q} Request body size in bytes.\n# TYPE {q} histogram\n");
    want += &hist(
        q,
        &a,
        [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2],
        "20",
    );
    want += &hist(
        q,
        &b,
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        "5",
    );
    let r = "istio_response_bytes";
    want += &format!("# HELP {r} Response body size in bytes.\n# TYPE {r} histogram\n");
    want += &hist(
        r,
        &a,
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2],
        "1620",
    );
    want += &hist(r, &b, [1; 20], "0");
    for (name, help, v) in [
        (
            "istio_tcp_connections_opened_total",
            "Opaque TCP connections opened.",
            1,
        ),
        (
            "istio_tcp_connections_closed_total",
            "Opaque TCP connections closed.",
            1,
        ),
        (
            "istio_tcp_sent_bytes_total",
            "Bytes sent to the client (response direction) on opaque TCP connections.",
            2000,
        ),
        (
            "istio_tcp_received_bytes_total",
            "Bytes received from the client (request direction) on opaque TCP connections.",
            100,
        ),
    ] {
        want += &format!("# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{c}}} {v}\n");
    }
    for (name, help) in [
        (
            "comb_proxy_metrics_series_dropped_total",
            "Records not counted in the istio_* metrics because the series cap was reached.",
        ),
        (
            "comb_proxy_access_log_dropped_total",
            "Access log lines dropped (writer queue full or write error).",
        ),
        (
            "comb_proxy_spans_exported_total",
            "Spans accepted by the OTLP collector.",
        ),
        (
            "comb_proxy_spans_dropped_total",
            "Spans dropped (export queue full or export failed).",
        ),
        (
            "comb_proxy_span_export_failures_total",
            "Failed OTLP export requests.",
        ),
    ] {
        want += &format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} 0\n");
    }
    if out != want {
        for (i, (g, w)) in out.lines().zip(want.lines()).enumerate() {
            assert_eq!(g, w, "first difference at line {i}");
        }
        assert_eq!(out.lines().count(), want.lines().count(), "line counts");
    }
    assert_eq!(out, want);
}

#[test]
fn label_values_are_escaped() {
    let t = Telemetry::new(options());
    let mut w = (*workload("shop", "web", "v2")).clone();
    w.workload = "we\"b\\x\ny".into();
    t.record_request(&RequestRecord {
        destination: Some(Arc::new(w)),
        ..request()
    });
    let mut out = String::new();
    t.render_prometheus(&mut out);
    assert!(
        out.contains(r#"destination_workload="we\"b\\x\ny","#),
        "escaped label missing:\n{out}"
    );
    // Every sample stays on one line.
    assert!(
        out.lines()
            .all(|l| l.starts_with('#') || l.ends_with(|c: char| c.is_ascii_digit()))
    );
}

#[test]
fn series_cap_drops_and_counts() {
    let t = Telemetry::with_max_series(options(), 2);
    for code in [200, 404, 503, 200, 503] {
        t.record_request(&RequestRecord {
            response_code: code,
            ..request()
        });
    }
    t.record_tcp(&tcp());
    let mut out = String::new();
    t.render_prometheus(&mut out);
    let count = |needle: &str| out.lines().filter(|l| l.starts_with(needle)).count();
    assert_eq!(count("istio_requests_total{"), 2);
    assert!(out.contains(r#"response_code="200""#) && out.contains(r#"response_code="404""#));
    assert!(!out.contains(r#"response_code="503""#));
    assert_eq!(count("istio_tcp_connections_opened_total{"), 0);
    // Two 503s and the TCP connection found no room.
    assert!(
        out.contains("\ncomb_proxy_metrics_series_dropped_total 3\n"),
        "{out}"
    );
    let s = t.stats();
    assert_eq!(
        (s.telemetry.metric_series, s.telemetry.metric_series_dropped),
        (2, 3)
    );
    // The 200 series still counts both of its requests.
    assert!(out.lines().any(|l| l.starts_with("istio_requests_total{")
        && l.contains(r#""200""#)
        && l.ends_with(" 2")));
}

fn log_lines(records: impl FnOnce(&Telemetry)) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let t = Telemetry::new(TelemetryOptions {
        access_log: Some(AccessLogTarget::File(path.clone())),
        ..options()
    });
    records(&t);
    t.flush_access_log();
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn access_log_allowed_request() {
    let trace = trace::incoming(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));
    let lines = log_lines(|t| {
        t.record_request(&RequestRecord {
            trace: Some(trace),
            ..request()
        })
    });
    assert_eq!(lines.len(), 1);
    let l = &lines[0];
    let s = |k: &str| {
        l[k].as_str()
            .unwrap_or_else(|| panic!("{k} not a string in {l}"))
    };
    assert_eq!(s("start_time"), "2024-05-06T07:08:09.123Z");
    assert_eq!(s("method"), "GET");
    assert_eq!(s("path"), "/items/7?color=red");
    assert_eq!(s("protocol"), "HTTP/1.1");
    assert_eq!(l["response_code"], 200);
    assert_eq!(s("response_flags"), "-");
    assert_eq!(s("response_code_details"), "via_upstream");
    assert_eq!(
        (l["bytes_received"].as_u64(), l["bytes_sent"].as_u64()),
        (Some(0), Some(120))
    );
    assert_eq!(l["duration"], 3);
    assert_eq!(s("upstream_host"), "10.0.1.9:8080");
    assert_eq!(
        s("upstream_cluster"),
        "inbound|8080||web.shop.svc.cluster.local"
    );
    assert_eq!(s("downstream_remote_address"), "10.0.1.5:41000");
    assert_eq!(s("downstream_local_address"), "10.0.1.9:8080");
    assert_eq!(s("authority"), "web.shop:8080");
    assert_eq!(s("user_agent"), "curl/8.0");
    assert_eq!(s("x_forwarded_for"), "192.0.2.1");
    assert_eq!(s("request_id"), "req-1");
    assert_eq!(s("trace_id"), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(s("traceparent"), trace.traceparent());
    assert_eq!(s("source_workload"), "frontend");
    assert_eq!(
        s("source_principal"),
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );
    assert_eq!(s("destination_workload"), "web");
    assert_eq!(s("authz_policy"), "shop/allow-frontend");
    assert!(
        l.get("audit").is_none()
            && l.get("grpc_status").is_none()
            && l.get("authz_denied").is_none()
    );
}

#[test]
fn access_log_denied_grpc_request() {
    let lines = log_lines(|t| t.record_request(&grpc_denied()));
    let l = &lines[0];
    assert_eq!(l["protocol"], "HTTP/2");
    assert_eq!(l["method"], "POST");
    assert_eq!(l["grpc_status"], 7);
    assert_eq!(
        l["response_code_details"],
        "rbac_access_denied_matched_policy[shop.deny-cart]"
    );
    assert_eq!(l["authz_policy"], "shop/deny-cart");
    assert_eq!(l["authz_denied"], true);
    assert_eq!(l["audit"], "shop/audit-all");
    assert_eq!(l["upstream_cluster"], "inbound|8080||");
    assert!(l["x_forwarded_for"].is_null() && l["request_id"].is_null());
    assert!(
        l.get("source_workload").is_none(),
        "no source identity: {l}"
    );
    assert!(l.get("trace_id").is_none());
}

#[test]
fn access_log_flags_and_no_policy_denial() {
    let lines = log_lines(|t| {
        t.record_request(&RequestRecord {
            response_code: 503,
            response_flags: ResponseFlags(ResponseFlags::UPSTREAM_CONNECTION_FAILURE),
            ..request()
        });
        t.record_request(&RequestRecord {
            response_code: 403,
            denied: true,
            authz_policy: None,
            ..request()
        });
        t.record_request(&RequestRecord {
            response_code: 0,
            response_flags: ResponseFlags(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION),
            ..request()
        });
    });
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["response_flags"], "UF");
    assert_eq!(
        lines[0]["response_code_details"],
        "upstream_reset_before_response_started{connection_failure}"
    );
    assert_eq!(
        lines[1]["response_code_details"],
        "rbac_access_denied_matched_policy[none]"
    );
    assert_eq!(lines[2]["response_flags"], "DC");
    assert_eq!(
        lines[2]["response_code_details"],
        "downstream_remote_disconnect"
    );
}

#[test]
fn access_log_tcp_connection() {
    let lines = log_lines(|t| {
        t.record_tcp(&tcp());
        t.record_tcp(&TcpRecord {
            denied: true,
            spliced: false,
            authz_policy: Some("shop/deny-db".into()),
            sent_bytes: 0,
            received_bytes: 0,
            ..tcp()
        });
    });
    let (ok, denied) = (&lines[0], &lines[1]);
    assert!(ok["method"].is_null() && ok["path"].is_null() && ok["protocol"].is_null());
    assert_eq!(ok["response_code"], 0);
    assert_eq!(
        (ok["bytes_received"].as_u64(), ok["bytes_sent"].as_u64()),
        (Some(100), Some(2000))
    );
    assert_eq!(ok["duration"], 1500);
    assert_eq!(ok["spliced"], true);
    assert_eq!(ok["reporter"], "destination");
    assert_eq!(ok["upstream_host"], "10.0.1.9:5432");
    assert_eq!(
        ok["upstream_cluster"],
        "inbound|5432||web.shop.svc.cluster.local"
    );
    assert!(ok["connection_termination_details"].is_null());
    assert_eq!(
        denied["connection_termination_details"],
        "rbac_access_denied_matched_policy[shop.deny-db]"
    );
    assert!(denied["upstream_host"].is_null());
    assert_eq!(denied["authz_denied"], true);
}

#[test]
fn access_log_full_queue_drops_and_counts() {
    // The writer may fall behind 50k back-to-back lines: nothing blocks, drops are counted.
    let t = Telemetry::new(TelemetryOptions {
        access_log: Some(AccessLogTarget::File("/dev/null".into())),
        ..options()
    });
    let r = request();
    let n = 50_000;
    for _ in 0..n {
        t.record_request(&r);
    }
    t.flush_access_log();
    let dropped = t.stats().telemetry.access_log_dropped;
    assert!(dropped < n, "some lines were written");
    let mut out = String::new();
    t.render_prometheus(&mut out);
    assert!(out.contains(&format!(
        "\ncomb_proxy_access_log_dropped_total {dropped}\n"
    )));
}

#[test]
fn stats_aggregation() {
    let t = Telemetry::new(TelemetryOptions {
        max_stats_routes: 2,
        ..options()
    });
    // 100 requests to GET /items/7 (1..=100 ms), 3 to GET /cart (query ignored), 2 to
    // routes beyond the cap.
    for ms in 1..=100 {
        t.record_request(&RequestRecord {
            duration: Duration::from_millis(ms),
            request_bytes: 1,
            response_bytes: 10,
            ..request()
        });
    }
    for (i, code) in [302, 404, 503].into_iter().enumerate() {
        t.record_request(&RequestRecord {
            path: format!("/cart?i={i}"),
            response_code: code,
            ..request()
        });
    }
    t.record_request(&RequestRecord {
        path: "/a".into(),
        ..grpc_denied()
    });
    t.record_request(&RequestRecord {
        path: "/b".into(),
        response_code: 0,
        ..request()
    });
    t.record_tcp(&tcp());
    t.record_tcp(&TcpRecord {
        denied: true,
        spliced: false,
        ..tcp()
    });

    let s = t.stats();
    assert_eq!(s.node, "node-a");
    assert_eq!(s.requests, 105);
    let keys: Vec<&str> = s.routes.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["GET /items/7", "GET /cart", "other"]);
    let items = &s.routes[0];
    assert_eq!(
        (
            items.requests,
            items.status_2xx,
            items.request_bytes,
            items.response_bytes
        ),
        (100, 100, 100, 1000)
    );
    // Nearest-rank p50 = 50 ms, p99 = 99 ms; the histogram keeps them within 6.25%.
    assert!(
        (items.p50_ms - 50.0).abs() <= 50.0 * 0.0625,
        "p50 {}",
        items.p50_ms
    );
    assert!(
        (items.p99_ms - 99.0).abs() <= 99.0 * 0.0625,
        "p99 {}",
        items.p99_ms
    );
    let cart = &s.routes[1];
    assert_eq!(
        (cart.status_3xx, cart.status_4xx, cart.status_5xx),
        (1, 1, 1)
    );
    let other = &s.routes[2];
    assert_eq!(
        (
            other.requests,
            other.denied,
            other.status_2xx,
            other.status_other
        ),
        (2, 1, 1, 1)
    );

    let dkeys: Vec<(&str, u64)> = s
        .destinations
        .iter()
        .map(|r| (r.key.as_str(), r.requests))
        .collect();
    assert_eq!(
        dkeys,
        [("web.shop.svc.cluster.local", 104), ("shop/web", 1)]
    );
    assert_eq!(
        s.tcp,
        TcpStats {
            connections: 2,
            denied: 1,
            spliced: 1,
            bytes_received: 200,
            bytes_sent: 4000
        }
    );

    // The agent ships it as JSON.
    let back: ProxyStats = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
    let table = render_table(&s);
    assert!(table.contains("GET /items/7"), "{table}");
    assert!(
        table.contains("opaque TCP: 2 connections (1 denied, 1 spliced)"),
        "{table}"
    );
    println!("{table}");
}

/// Several threads on the hot path lose no counts; prints the per-record cost, bare and
/// with the access log (to /dev/null) and span building on.
#[test]
fn concurrent_records_and_cost() {
    concurrent_run("metrics + stats", options(), None);
    concurrent_run(
        "metrics + stats + access log + span",
        TelemetryOptions {
            access_log: Some(AccessLogTarget::File("/dev/null".into())),
            // No exporter task: spans are built and queued (then dropped when full).
            otlp_endpoint: Some("http://127.0.0.1:9".into()),
            ..options()
        },
        Some(trace::incoming(None)),
    );
}

fn concurrent_run(what: &str, opts: TelemetryOptions, trace: Option<SpanContext>) {
    let t = Telemetry::new(opts);
    let threads: u64 = std::env::var("TEL_THREADS").map_or(2, |v| v.parse().unwrap());
    // Fewer in debug builds (the timing only means something in release).
    let per: u64 = if cfg!(debug_assertions) {
        20_000
    } else {
        200_000
    };
    let began = Instant::now();
    std::thread::scope(|sc| {
        for i in 0..threads {
            let t = &t;
            sc.spawn(move || {
                // A few distinct series and routes, as real traffic has.
                let recs: Vec<RequestRecord> = (0..8)
                    .map(|k| RequestRecord {
                        path: format!("/r{k}?q={i}"),
                        response_code: if k % 4 == 0 { 503 } else { 200 },
                        trace,
                        ..request()
                    })
                    .collect();
                for n in 0..per {
                    t.record_request(&recs[(n % 8) as usize]);
                }
            });
        }
    });
    let elapsed = began.elapsed();
    let total = threads * per;
    println!(
        "record_request ({what}): {total} records on {threads} threads in {:?} = {:.0} ns/record/thread",
        elapsed,
        elapsed.as_nanos() as f64 * threads as f64 / total as f64
    );
    let mut out = String::new();
    t.render_prometheus(&mut out);
    let sum: u64 = out
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(sum, total);
    assert_eq!(t.stats().requests, total);
    assert_eq!(
        t.stats().routes.iter().map(|r| r.requests).sum::<u64>(),
        total
    );
}

#[test]
fn tunneled_traffic_is_mutual_tls() {
    let t = Telemetry::new(options());
    t.record_request(&RequestRecord {
        mtls: true,
        ..request()
    });
    t.record_tcp(&TcpRecord {
        mtls: true,
        ..tcp()
    });
    let mut out = String::new();
    t.render_prometheus(&mut out);
    let mtls = out
        .lines()
        .filter(|l| l.contains("connection_security_policy=\"mutual_tls\""))
        .count();
    assert!(mtls >= 2, "{out}");
    assert!(
        !out.contains("connection_security_policy=\"none\""),
        "{out}"
    );
}

#[test]
fn tcp_connection_counted_open_at_open() {
    let t = Telemetry::new(options());
    let count = |t: &Telemetry, name: &str| -> u64 {
        let mut out = String::new();
        t.render_prometheus(&mut out);
        out.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    // Opened while still open: the closed counter waits for the end.
    t.tcp_opened(&tcp());
    assert_eq!(count(&t, "istio_tcp_connections_opened_total"), 1);
    assert_eq!(count(&t, "istio_tcp_connections_closed_total"), 0);
    t.record_tcp(&tcp());
    assert_eq!(count(&t, "istio_tcp_connections_opened_total"), 1);
    assert_eq!(count(&t, "istio_tcp_connections_closed_total"), 1);
    assert_eq!(count(&t, "istio_tcp_received_bytes_total"), 100);
}

#[test]
fn outbound_tunnel_is_reported_by_the_source_and_kept_apart() {
    let t = Telemetry::new(options());
    let out_rec = TcpRecord {
        mtls: true,
        reporter: Reporter::Source,
        ..tcp()
    };
    t.tcp_opened(&out_rec);
    t.record_tcp(&out_rec);
    t.record_tcp(&TcpRecord {
        mtls: true,
        ..tcp()
    });
    let mut out = String::new();
    t.render_prometheus(&mut out);
    let series = |name: &str, reporter: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.starts_with(&format!("{name}{{reporter=\"{reporter}\",")))
            .map(str::to_owned)
            .collect()
    };
    let opened = series("istio_tcp_connections_opened_total", "source");
    assert_eq!(opened.len(), 1, "{out}");
    assert!(opened[0].ends_with(" 1"), "{out}");
    for want in [
        r#"source_workload="frontend""#,
        r#"destination_workload="web""#,
        r#"destination_principal="spiffe://cluster.local/ns/shop/sa/web""#,
        r#"connection_security_policy="mutual_tls""#,
    ] {
        assert!(opened[0].contains(want), "{want} in {}", opened[0]);
    }
    // Istio's byte direction is the client's at either end: received = from it.
    let received = series("istio_tcp_received_bytes_total", "source");
    assert!(
        received.len() == 1 && received[0].ends_with(" 100"),
        "{out}"
    );
    let sent = series("istio_tcp_sent_bytes_total", "source");
    assert!(sent.len() == 1 && sent[0].ends_with(" 2000"), "{out}");
    // The destination's record is its own series; the proxy's stats count only it.
    assert_eq!(
        series("istio_tcp_connections_closed_total", "destination").len(),
        1,
        "{out}"
    );
    assert_eq!(t.stats().tcp.connections, 1);
}

#[test]
fn access_log_outbound_tunnel_says_source_and_outbound_cluster() {
    let lines = log_lines(|t| {
        t.record_tcp(&TcpRecord {
            mtls: true,
            reporter: Reporter::Source,
            destination_service: None,
            response_flags: ResponseFlags(ResponseFlags::UPSTREAM_CONNECTION_FAILURE),
            ..tcp()
        });
    });
    let l = &lines[0];
    assert_eq!(l["reporter"], "source");
    assert_eq!(l["upstream_cluster"], "outbound|5432||");
    assert_eq!(l["response_flags"], "UF");
    assert_eq!(l["source_workload"], "frontend");
    assert_eq!(l["destination_workload"], "web");
}
