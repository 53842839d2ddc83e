//! Spans of sampled requests, exported in batches over OTLP/HTTP with the JSON encoding
//! (`POST {endpoint}/v1/traces`). The request path only pushes into a bounded queue (full =
//! dropped, counted); one task on the proxy's runtime batches and posts.
//!
//! Span name: Istio's inbound operation name, `<destination service>:<port>/*` (the
//! authority's host when the service is unknown): low cardinality, and what Istio users see
//! in Jaeger/Zipkin for the same hop.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::access_log::{path_only, upstream_cluster};
use super::timefmt::unix_nanos;
use super::trace::to_hex;
use super::{RequestProtocol, RequestRecord};

/// Spans waiting for export before new ones are dropped.
pub(super) const QUEUE: usize = 4096;
/// Largest batch per POST.
const MAX_BATCH: usize = 512;
/// How long a span may wait for companions before its batch is posted.
const BATCH_DELAY: Duration = Duration::from_millis(500);
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one export-failure log line per this many seconds.
const LOG_EVERY_SECS: u64 = 30;

/// OTLP `SPAN_KIND_SERVER`.
const KIND_SERVER: u8 = 2;
/// OTLP `STATUS_CODE_ERROR`.
const STATUS_ERROR: u8 = 2;

#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct SpanData {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub start_unix_nano: u128,
    pub end_unix_nano: u128,
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub error: bool,
}

/// The proxy's span for a finished request; None when it carries no sampled trace.
pub fn span_of(r: &RequestRecord, node: &str) -> Option<SpanData> {
    let t = r.trace.filter(|t| t.sampled)?;
    let port = r.upstream.port();
    let host = match &r.destination_service {
        Some(s) => s.as_str(),
        None => authority_host(&r.authority).unwrap_or(""),
    };
    let name = if host.is_empty() {
        format!("{}:{port}/*", r.upstream.ip())
    } else {
        format!("{host}:{port}/*")
    };
    let start = unix_nanos(r.start);
    let error = r.response_code == 0 || r.response_code >= 500;
    let s = |v: &str| AttrValue::Str(v.to_string());
    let mut attributes = vec![
        ("http.method", s(&r.method)),
        (
            "http.url",
            AttrValue::Str(format!("http://{}{}", r.authority, r.path)),
        ),
        (
            "http.status_code",
            AttrValue::Int(i64::from(r.response_code)),
        ),
        ("http.protocol", s(r.http_version)),
        (
            "upstream_cluster",
            AttrValue::Str(upstream_cluster(port, r.destination_service.as_deref())),
        ),
        ("response_flags", AttrValue::Str(r.response_flags.render())),
        ("node_id", s(node)),
        ("component", s("proxy")),
        (
            "peer.address",
            AttrValue::Str(r.downstream.ip().to_string()),
        ),
        (
            "request_size",
            AttrValue::Int(r.request_bytes.min(i64::MAX as u64) as i64),
        ),
        (
            "response_size",
            AttrValue::Int(r.response_bytes.min(i64::MAX as u64) as i64),
        ),
    ];
    if let Some(ua) = &r.user_agent {
        attributes.push(("user_agent", s(ua)));
    }
    if let Some(id) = &r.request_id {
        attributes.push(("guid:x-request-id", s(id)));
    }
    if r.protocol == RequestProtocol::Grpc {
        if let Some(g) = r.grpc_status {
            attributes.push(("grpc.status_code", AttrValue::Int(i64::from(g))));
        }
        attributes.push(("grpc.path", s(path_only(&r.path))));
    }
    if let Some(w) = &r.destination {
        attributes.push(("istio.canonical_service", s(&w.canonical_service)));
        attributes.push(("istio.namespace", s(&w.namespace)));
    }
    if error {
        attributes.push(("error", s("true")));
    }
    Some(SpanData {
        trace_id: t.trace_id,
        span_id: t.span_id,
        parent_span_id: t.parent_span_id,
        name,
        start_unix_nano: start,
        end_unix_nano: start + r.duration.as_nanos(),
        attributes,
        error,
    })
}

fn authority_host(a: &str) -> Option<&str> {
    if a.is_empty() {
        return None;
    }
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h);
    }
    Some(a.rsplit_once(':').map_or(a, |(h, _)| h))
}

/// The OTLP/JSON `ExportTraceServiceRequest` for one batch.
pub fn encode(service_name: &str, node: &str, spans: &[SpanData]) -> Value {
    let attr = |k: &str, v: &AttrValue| match v {
        AttrValue::Str(s) => json!({"key": k, "value": {"stringValue": s}}),
        // OTLP/JSON: 64-bit integers are strings.
        AttrValue::Int(i) => json!({"key": k, "value": {"intValue": i.to_string()}}),
    };
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut v = json!({
                "traceId": to_hex(&s.trace_id),
                "spanId": to_hex(&s.span_id),
                "name": s.name,
                "kind": KIND_SERVER,
                "startTimeUnixNano": s.start_unix_nano.to_string(),
                "endTimeUnixNano": s.end_unix_nano.to_string(),
                "attributes": s.attributes.iter().map(|(k, v)| attr(k, v)).collect::<Vec<_>>(),
                "status": if s.error { json!({"code": STATUS_ERROR}) } else { json!({}) },
            });
            if let Some(p) = s.parent_span_id {
                v["parentSpanId"] = to_hex(&p).into();
            }
            v
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                attr("service.name", &AttrValue::Str(service_name.into())),
                attr("host.name", &AttrValue::Str(node.into())),
                attr("node_id", &AttrValue::Str(node.into())),
            ]},
            "scopeSpans": [{
                "scope": {"name": "comb-proxy", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    })
}

#[derive(Default)]
pub struct ExportCounters {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
    pub failures: AtomicU64,
}

pub struct Exporter {
    url: String,
    service_name: String,
    node: String,
    tx: mpsc::Sender<SpanData>,
    rx: Mutex<Option<mpsc::Receiver<SpanData>>>,
    pub counters: Arc<ExportCounters>,
}

impl Exporter {
    /// `endpoint` like `http://127.0.0.1:4318`.
    pub fn new(endpoint: &str, service_name: &str, node: &str) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Exporter {
            url: format!("{}/v1/traces", endpoint.trim_end_matches('/')),
            service_name: service_name.into(),
            node: node.into(),
            tx,
            rx: Mutex::new(Some(rx)),
            counters: Arc::default(),
        }
    }

    pub fn push(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.counters.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Spawns the batching task (once). It ends after the last batch once the exporter is
    /// dropped.
    pub fn start(&self, rt: &tokio::runtime::Handle) {
        let Some(rx) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let uri: hyper::Uri = match self.url.parse() {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(url = %self.url, error = %e, "OTLP: bad endpoint; spans are dropped");
                return;
            }
        };
        if uri.scheme_str() != Some("http") {
            tracing::error!(url = %self.url, "OTLP: only http:// endpoints are supported; spans are dropped");
            return;
        }
        let task = Task {
            uri,
            service_name: self.service_name.clone(),
            node: self.node.clone(),
            counters: self.counters.clone(),
            last_log: AtomicU64::new(0),
        };
        rt.spawn(task.run(rx));
    }
}

struct Task {
    uri: hyper::Uri,
    service_name: String,
    node: String,
    counters: Arc<ExportCounters>,
    last_log: AtomicU64,
}

impl Task {
    async fn run(self, mut rx: mpsc::Receiver<SpanData>) {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let Some(first) = rx.recv().await else { break };
            batch.push(first);
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            let mut closed = false;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.post(&client, &batch).await;
            batch.clear();
            if closed {
                break;
            }
        }
    }

    async fn post(&self, client: &Client<HttpConnector, Full<Bytes>>, batch: &[SpanData]) {
        let body = encode(&self.service_name, &self.node, batch).to_string();
        let req = hyper::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static request parts are valid");
        let res = tokio::time::timeout(POST_TIMEOUT, async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            // Read the body so the pooled connection can be reused.
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("HTTP {status}"))
            }
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        match res {
            Ok(()) => {
                self.counters
                    .exported
                    .fetch_add(batch.len() as u64, Relaxed);
            }
            Err(e) => {
                self.counters.failures.fetch_add(1, Relaxed);
                self.counters.dropped.fetch_add(batch.len() as u64, Relaxed);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let last = self.last_log.load(Relaxed);
                if now >= last + LOG_EVERY_SECS
                    && self
                        .last_log
                        .compare_exchange(last, now, Relaxed, Relaxed)
                        .is_ok()
                {
                    tracing::warn!(url = %self.uri, spans = batch.len(), error = %e, "OTLP export failed");
                }
            }
        }
    }
}
