//! OTLP export against a real local HTTP collector (hyper server on loopback).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::mpsc;

use super::tests::{options, request};
use super::*;

struct Received {
    method: String,
    path: String,
    content_type: String,
    body: Value,
}

/// A collector answering `status` to every request; what it received comes out of the channel.
async fn collector(status: u16) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().path().to_string();
                        let content_type = req
                            .headers()
                            .get(http::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let _ = tx.send(Received {
                            method,
                            path,
                            content_type,
                            body,
                        });
                        let resp = hyper::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(b"{}")))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn with_endpoint(endpoint: String) -> Arc<Telemetry> {
    Telemetry::new(TelemetryOptions {
        otlp_endpoint: Some(endpoint),
        ..options()
    })
}

/// Polls `f` until true or 5 s.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    let attrs = span["attributes"].as_array().expect("attributes array");
    let a = attrs.iter().find(|a| a["key"] == key);
    &a.unwrap_or_else(|| panic!("attribute {key} missing in {span}"))["value"]
}

#[test]
fn exports_sampled_spans_as_otlp_json() {
    let rt = runtime();
    let (addr, mut rx) = rt.block_on(collector(200));
    let t = with_endpoint(format!("http://{addr}/"));
    t.start_exporter(rt.handle());

    let parent = trace::incoming(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));
    let root = trace::incoming(None);
    let unsampled = trace::incoming(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    ));
    t.record_request(&RequestRecord {
        trace: Some(parent),
        ..request()
    });
    t.record_request(&RequestRecord {
        trace: Some(root),
        protocol: RequestProtocol::Grpc,
        grpc_status: Some(14),
        response_code: 503,
        destination_service: None,
        ..request()
    });
    t.record_request(&RequestRecord {
        trace: Some(unsampled),
        ..request()
    });
    t.record_request(&request()); // no trace context at all

    let mut spans = Vec::new();
    rt.block_on(async {
        while spans.len() < 2 {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("collector got a request within 5 s")
                .unwrap();
            assert_eq!(got.method, "POST");
            assert_eq!(got.path, "/v1/traces");
            assert_eq!(got.content_type, "application/json");
            let rs = &got.body["resourceSpans"][0];
            let res = rs["resource"]["attributes"].as_array().unwrap();
            assert!(
                res.iter().any(
                    |a| a["key"] == "service.name" && a["value"]["stringValue"] == "comb-proxy"
                )
            );
            assert!(
                res.iter()
                    .any(|a| a["key"] == "node_id" && a["value"]["stringValue"] == "node-a")
            );
            let scope = &rs["scopeSpans"][0];
            assert_eq!(scope["scope"]["name"], "comb-proxy");
            spans.extend(scope["spans"].as_array().unwrap().iter().cloned());
        }
    });
    assert_eq!(
        spans.len(),
        2,
        "unsampled and trace-less requests make no span"
    );

    let s = spans
        .iter()
        .find(|s| s["traceId"] == parent.trace_id_hex())
        .unwrap();
    assert_eq!(s["spanId"], parent.span_id_hex());
    assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(s["name"], "web.shop.svc.cluster.local:8080/*");
    assert_eq!(s["kind"], 2);
    // 2024-05-06T07:08:09.123Z, 3 ms long; nanoseconds as strings.
    assert_eq!(s["startTimeUnixNano"], "1714979289123000000");
    assert_eq!(s["endTimeUnixNano"], "1714979289126000000");
    assert_eq!(attr(s, "http.method")["stringValue"], "GET");
    assert_eq!(
        attr(s, "http.url")["stringValue"],
        "http://web.shop:8080/items/7?color=red"
    );
    assert_eq!(attr(s, "http.status_code")["intValue"], "200");
    assert_eq!(
        attr(s, "upstream_cluster")["stringValue"],
        "inbound|8080||web.shop.svc.cluster.local"
    );
    assert_eq!(attr(s, "response_flags")["stringValue"], "-");
    assert_eq!(attr(s, "node_id")["stringValue"], "node-a");
    assert_eq!(s["status"], serde_json::json!({}));

    let g = spans
        .iter()
        .find(|s| s["traceId"] == root.trace_id_hex())
        .unwrap();
    assert!(
        g.get("parentSpanId").is_none(),
        "a new trace has no parent: {g}"
    );
    // Unknown service: the authority's host names the span.
    assert_eq!(g["name"], "web.shop:8080/*");
    assert_eq!(attr(g, "grpc.status_code")["intValue"], "14");
    assert_eq!(attr(g, "error")["stringValue"], "true");
    assert_eq!(g["status"]["code"], 2);

    eventually("exported counter", || {
        t.stats().telemetry.spans_exported == 2
    });
    let h = t.stats().telemetry;
    assert_eq!((h.spans_dropped, h.span_export_failures), (0, 0));
}

#[test]
fn counts_failed_exports() {
    let rt = runtime();
    let (addr, mut rx) = rt.block_on(collector(500));
    let t = with_endpoint(format!("http://{addr}"));
    t.start_exporter(rt.handle());
    let ctx = trace::incoming(None);
    t.record_request(&RequestRecord {
        trace: Some(ctx),
        ..request()
    });
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
    });
    eventually("a failed export", || {
        t.stats().telemetry.span_export_failures == 1
    });
    assert_eq!(t.stats().telemetry.spans_dropped, 1);
    assert_eq!(t.stats().telemetry.spans_exported, 0);

    // Nothing listening: connection refused is a failure too.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let t = with_endpoint(format!("http://127.0.0.1:{port}"));
    t.start_exporter(rt.handle());
    t.record_request(&RequestRecord {
        trace: Some(ctx),
        ..request()
    });
    eventually("a refused export", || {
        t.stats().telemetry.span_export_failures == 1
    });
    let mut out = String::new();
    t.render_prometheus(&mut out);
    assert!(
        out.contains("\ncomb_proxy_span_export_failures_total 1\n"),
        "{out}"
    );
}

#[test]
fn full_queue_drops_spans_without_blocking() {
    // No exporter task started: the queue fills and further spans are dropped.
    let t = with_endpoint("http://127.0.0.1:9".into());
    let r = RequestRecord {
        trace: Some(trace::incoming(None)),
        ..request()
    };
    for _ in 0..5000 {
        t.record_request(&r);
    }
    assert_eq!(t.stats().telemetry.spans_dropped, 5000 - otlp::QUEUE as u64);
}
