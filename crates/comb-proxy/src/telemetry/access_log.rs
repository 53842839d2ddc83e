//! JSON access log, one object per line, with Envoy's default JSON field names (Istio's
//! `accessLogEncoding: JSON`) plus Comb's workload, policy and trace fields. The request path
//! only clones the record into a bounded channel; a writer thread formats and writes, and
//! a full channel drops the line (counted).

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value, json};

use super::timefmt::rfc3339_millis;
use super::{Reporter, RequestProtocol, RequestRecord, ResponseFlags, TcpRecord};

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 8192;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    Stderr,
    File(PathBuf),
}

enum Msg {
    Http(Box<RequestRecord>),
    Tcp(Box<TcpRecord>),
    Flush(SyncSender<()>),
}

pub struct AccessLog {
    target: AccessLogTarget,
    /// Started on first use (`Telemetry::new` spawns nothing).
    tx: OnceLock<SyncSender<Msg>>,
    pub dropped: Arc<AtomicU64>,
}

impl AccessLog {
    pub fn new(target: AccessLogTarget) -> Self {
        AccessLog {
            target,
            tx: OnceLock::new(),
            dropped: Arc::default(),
        }
    }

    pub fn http(&self, r: &RequestRecord) {
        self.send(Msg::Http(Box::new(r.clone())));
    }

    pub fn tcp(&self, r: &TcpRecord) {
        self.send(Msg::Tcp(Box::new(r.clone())));
    }

    /// Waits until every line queued before the call is written and flushed.
    pub fn flush(&self) {
        let (done_tx, done_rx) = sync_channel(1);
        if self.sender().send(Msg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }

    fn send(&self, m: Msg) {
        match self.sender().try_send(m) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    fn sender(&self) -> &SyncSender<Msg> {
        self.tx.get_or_init(|| {
            let (tx, rx) = sync_channel(QUEUE);
            let target = self.target.clone();
            let dropped = self.dropped.clone();
            std::thread::Builder::new()
                .name("comb-access-log".into())
                .spawn(move || writer(target, rx, dropped))
                .expect("spawn access log writer thread");
            tx
        })
    }
}

/// Ends when the `AccessLog` (the only sender) is dropped.
fn writer(target: AccessLogTarget, rx: Receiver<Msg>, dropped: Arc<AtomicU64>) {
    let mut out: Box<dyn Write> = match &target {
        AccessLogTarget::Stdout => Box::new(std::io::stdout()),
        AccessLogTarget::Stderr => Box::new(std::io::stderr()),
        AccessLogTarget::File(p) => match OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                tracing::error!(path = %p.display(), error = %e, "access log: cannot open; lines are dropped");
                Box::new(std::io::sink())
            }
        },
    };
    let mut out = BufWriter::with_capacity(64 * 1024, &mut out);
    let mut failed = false;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        // Write what is queued, then flush once.
        while let Some(m) = next {
            let line = match m {
                Msg::Http(r) => http_entry(&r),
                Msg::Tcp(r) => tcp_entry(&r),
                Msg::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                    next = rx.try_recv().ok();
                    continue;
                }
            };
            let res = serde_json::to_writer(&mut out, &line)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            if let Err(e) = res {
                dropped.fetch_add(1, Relaxed);
                if !failed {
                    tracing::error!(error = %e, "access log: write failed");
                    failed = true;
                }
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_ok() {
            failed = false;
        }
    }
}

/// Istio's `upstream_cluster` for an inbound request.
pub fn upstream_cluster(port: u16, service: Option<&str>) -> String {
    upstream_cluster_of(Reporter::Destination, port, service)
}

/// Envoy's cluster name on the reporting side: `inbound|…` at the destination, `outbound|…`
/// for what left through a tunnel.
fn upstream_cluster_of(reporter: Reporter, port: u16, service: Option<&str>) -> String {
    let dir = match reporter {
        Reporter::Destination => "inbound",
        Reporter::Source => "outbound",
    };
    format!("{dir}|{port}||{}", service.unwrap_or(""))
}

/// Envoy's `response_code_details` for what the record says happened.
pub fn response_code_details(r: &RequestRecord) -> Option<String> {
    if r.denied {
        return Some(rbac_details(r.authz_policy.as_deref()));
    }
    let f = r.response_flags;
    let detail = if f.contains(ResponseFlags::UPSTREAM_CONNECTION_FAILURE) {
        "upstream_reset_before_response_started{connection_failure}"
    } else if f.contains(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT) {
        "upstream_response_timeout"
    } else if f.contains(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION) {
        "upstream_reset_before_response_started{connection_termination}"
    } else if f.contains(ResponseFlags::UPSTREAM_PROTOCOL_ERROR) {
        "upstream_reset_before_response_started{protocol_error}"
    } else if f.contains(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION) {
        "downstream_remote_disconnect"
    } else if r.response_code == 0 {
        return None;
    } else {
        "via_upstream"
    };
    Some(detail.to_string())
}

/// `rbac_access_denied_matched_policy[ns.name]`; `[none]` when no DENY policy matched (an
/// ALLOW policy exists and nothing allowed the request).
fn rbac_details(policy: Option<&str>) -> String {
    let p = policy.map(|p| p.replacen('/', ".", 1));
    format!(
        "rbac_access_denied_matched_policy[{}]",
        p.as_deref().unwrap_or("none")
    )
}

/// The path without its query (span names, stats routes).
pub fn path_only(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

pub fn http_entry(r: &RequestRecord) -> Value {
    let mut m = Map::new();
    m.insert("start_time".into(), rfc3339_millis(r.start).into());
    m.insert("method".into(), r.method.clone().into());
    m.insert("path".into(), r.path.clone().into());
    m.insert("protocol".into(), r.http_version.into());
    m.insert("response_code".into(), r.response_code.into());
    m.insert("response_flags".into(), r.response_flags.render().into());
    m.insert(
        "response_code_details".into(),
        response_code_details(r).into(),
    );
    m.insert("connection_termination_details".into(), Value::Null);
    m.insert("bytes_received".into(), r.request_bytes.into());
    m.insert("bytes_sent".into(), r.response_bytes.into());
    m.insert("duration".into(), duration_ms(r.duration).into());
    m.insert("upstream_service_time".into(), Value::Null);
    m.insert("upstream_host".into(), r.upstream.to_string().into());
    m.insert(
        "upstream_cluster".into(),
        upstream_cluster(r.upstream.port(), r.destination_service.as_deref()).into(),
    );
    m.insert("upstream_local_address".into(), Value::Null);
    m.insert("upstream_transport_failure_reason".into(), Value::Null);
    m.insert(
        "downstream_remote_address".into(),
        r.downstream.to_string().into(),
    );
    // Transparent interception: the accepted socket's local address is the original one.
    m.insert(
        "downstream_local_address".into(),
        r.upstream.to_string().into(),
    );
    m.insert("authority".into(), r.authority.clone().into());
    m.insert("user_agent".into(), r.user_agent.clone().into());
    m.insert("x_forwarded_for".into(), r.x_forwarded_for.clone().into());
    m.insert("request_id".into(), r.request_id.clone().into());
    m.insert("requested_server_name".into(), Value::Null);
    m.insert("route_name".into(), "default".into());
    if let Some(t) = &r.trace {
        m.insert("trace_id".into(), t.trace_id_hex().into());
        m.insert("traceparent".into(), t.traceparent().into());
    }
    if r.protocol == RequestProtocol::Grpc {
        m.insert("grpc_status".into(), r.grpc_status.into());
    }
    common(&mut m, &r.source, &r.destination, &r.authz_policy, r.denied);
    if let Some(a) = &r.audited {
        m.insert("audit".into(), a.clone().into());
    }
    Value::Object(m)
}

/// Envoy's TCP proxy access log: no HTTP fields, `bytes_received` from the client.
pub fn tcp_entry(r: &TcpRecord) -> Value {
    let mut m = Map::new();
    m.insert("start_time".into(), rfc3339_millis(r.start).into());
    for k in [
        "method",
        "path",
        "protocol",
        "authority",
        "user_agent",
        "x_forwarded_for",
        "request_id",
    ] {
        m.insert(k.into(), Value::Null);
    }
    m.insert("response_code".into(), 0.into());
    m.insert("response_flags".into(), r.response_flags.render().into());
    m.insert("response_code_details".into(), Value::Null);
    m.insert(
        "connection_termination_details".into(),
        r.denied
            .then(|| rbac_details(r.authz_policy.as_deref()))
            .into(),
    );
    // `sent_bytes` is downstream → upstream: what the proxy received from the client.
    m.insert("bytes_received".into(), r.sent_bytes.into());
    m.insert("bytes_sent".into(), r.received_bytes.into());
    m.insert("duration".into(), duration_ms(r.duration).into());
    m.insert(
        "upstream_host".into(),
        (!r.denied).then(|| r.upstream.to_string()).into(),
    );
    m.insert(
        "upstream_cluster".into(),
        upstream_cluster_of(
            r.reporter,
            r.upstream.port(),
            r.destination_service.as_deref(),
        )
        .into(),
    );
    m.insert(
        "downstream_remote_address".into(),
        r.downstream.to_string().into(),
    );
    m.insert(
        "downstream_local_address".into(),
        r.upstream.to_string().into(),
    );
    m.insert("spliced".into(), r.spliced.into());
    m.insert("reporter".into(), r.reporter.as_str().into());
    common(&mut m, &r.source, &r.destination, &r.authz_policy, r.denied);
    Value::Object(m)
}

fn common(
    m: &mut Map<String, Value>,
    src: &Option<Arc<comb_model::l7::Workload>>,
    dst: &Option<Arc<comb_model::l7::Workload>>,
    policy: &Option<String>,
    denied: bool,
) {
    if let Some(w) = src {
        m.insert("source_workload".into(), w.workload.clone().into());
        m.insert("source_namespace".into(), w.namespace.clone().into());
        m.insert(
            "source_principal".into(),
            format!("spiffe://{}", w.principal).into(),
        );
    }
    if let Some(w) = dst {
        m.insert("destination_workload".into(), w.workload.clone().into());
        m.insert("destination_namespace".into(), w.namespace.clone().into());
    }
    if let Some(p) = policy {
        m.insert("authz_policy".into(), p.clone().into());
    }
    if denied {
        m.insert("authz_denied".into(), json!(true));
    }
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
