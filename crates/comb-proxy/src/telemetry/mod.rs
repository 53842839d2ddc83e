//! Istio-standard telemetry of the node proxy: Prometheus metrics with Istio's names and
//! labels, JSON access log lines, W3C trace context and OTLP span export, and the per
//! route/destination summary behind `comb proxy stats`.
//!
//! INTERFACE (fixed; helpers implement behind it): the HTTP and TCP paths build one
//! [`RequestRecord`] per finished request (or [`TcpRecord`] per opaque connection, reported
//! at open with [`Telemetry::tcp_opened`] and when it ends) and call
//! [`Telemetry::record_request`] / [`Telemetry::record_tcp`]; the agent renders
//! [`Telemetry::render_prometheus`] into its /metrics and serves [`Telemetry::stats`].

mod access_log;
mod flags;
mod labels;
mod metrics;
mod otlp;
mod stats;
mod timefmt;
pub mod trace;

#[cfg(test)]
mod otlp_tests;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use comb_model::l7::Workload;
use serde::{Deserialize, Serialize};

pub use access_log::AccessLogTarget;
pub use metrics::DEFAULT_MAX_SERIES;
pub use stats::{ProxyStats, RowStats, TcpStats, TelemetryHealth, render_table};

#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    pub access_log: Option<AccessLogTarget>,
    /// OTLP/HTTP collector, e.g. `http://127.0.0.1:4318` (spans go to `{endpoint}/v1/traces`).
    pub otlp_endpoint: Option<String>,
    /// Node name (span attribute `node_id`, stats header).
    pub node: String,
    /// OTLP `service.name`, normally `comb-proxy`.
    pub service_name: String,
    /// Distinct routes (and destinations) kept in [`ProxyStats`]; the rest count as `other`.
    pub max_stats_routes: usize,
}

/// The proxy's telemetry sink: cheap to call from every request task.
pub struct Telemetry {
    opts: TelemetryOptions,
    metrics: metrics::Metrics,
    stats: stats::Stats,
    access_log: Option<access_log::AccessLog>,
    exporter: Option<otlp::Exporter>,
}

impl Telemetry {
    /// Spawns nothing: the access log thread starts with the first line, the OTLP task in
    /// [`Telemetry::start_exporter`].
    pub fn new(opts: TelemetryOptions) -> Arc<Telemetry> {
        Self::with_max_series(opts, DEFAULT_MAX_SERIES)
    }

    /// [`Telemetry::new`] with a different cap on Istio metric series (HTTP + TCP).
    pub fn with_max_series(opts: TelemetryOptions, max_series: usize) -> Arc<Telemetry> {
        Arc::new(Telemetry {
            metrics: metrics::Metrics::new(max_series),
            stats: stats::Stats::new(opts.max_stats_routes),
            access_log: opts.access_log.clone().map(access_log::AccessLog::new),
            exporter: opts
                .otlp_endpoint
                .as_deref()
                .map(|e| otlp::Exporter::new(e, &opts.service_name, &opts.node)),
            opts,
        })
    }

    /// Whether request records go to an access log or spans, which read the records' details
    /// (authority, user agent, `x-forwarded-for`, request id, policy names).
    pub fn wants_details(&self) -> bool {
        self.access_log.is_some() || self.exporter.is_some()
    }

    /// Starts the OTLP batch exporter on `rt`, if an endpoint is set (idempotent).
    pub fn start_exporter(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        if let Some(e) = &self.exporter {
            e.start(rt);
        }
    }

    pub fn record_request(&self, r: &RequestRecord) {
        self.metrics.record_request(r);
        self.stats.record_request(r);
        if let Some(log) = &self.access_log {
            log.http(r);
        }
        if let Some(e) = &self.exporter
            && let Some(span) = otlp::span_of(r, &self.opts.node)
        {
            e.push(span);
        }
    }

    /// An opaque connection opened (`istio_tcp_connections_opened_total`); call it once
    /// the connection is judged, then [`Telemetry::record_tcp`] when it ends.
    pub fn tcp_opened(&self, r: &TcpRecord) {
        self.metrics.record_tcp_open(r);
    }

    pub fn record_tcp(&self, r: &TcpRecord) {
        self.metrics.record_tcp(r);
        // `comb proxy stats` counts what the proxy served; outbound tunnels have their own
        // counters (`comb tunnel list`).
        if r.reporter == Reporter::Destination {
            self.stats.record_tcp(r);
        }
        if let Some(log) = &self.access_log {
            log.tcp(r);
        }
    }

    /// Appends the Istio families and the proxy's telemetry counters.
    pub fn render_prometheus(&self, out: &mut String) {
        let h = self.health();
        self.metrics.render(
            out,
            &[
                (
                    "comb_proxy_access_log_dropped_total",
                    "Access log lines dropped (writer queue full or write error).",
                    h.access_log_dropped,
                ),
                (
                    "comb_proxy_spans_exported_total",
                    "Spans accepted by the OTLP collector.",
                    h.spans_exported,
                ),
                (
                    "comb_proxy_spans_dropped_total",
                    "Spans dropped (export queue full or export failed).",
                    h.spans_dropped,
                ),
                (
                    "comb_proxy_span_export_failures_total",
                    "Failed OTLP export requests.",
                    h.span_export_failures,
                ),
            ],
        );
    }

    pub fn stats(&self) -> ProxyStats {
        self.stats.snapshot(&self.opts.node, self.health())
    }

    /// Waits until every access log line recorded so far is written (tests, shutdown).
    pub fn flush_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.flush();
        }
    }

    fn health(&self) -> TelemetryHealth {
        let spans = self.exporter.as_ref().map(|e| &e.counters);
        let span = |f: fn(&otlp::ExportCounters) -> u64| spans.map_or(0, |c| f(c));
        TelemetryHealth {
            metric_series: self.metrics.budget.used() as u64,
            metric_series_dropped: self.metrics.budget.dropped.load(Relaxed),
            access_log_dropped: self
                .access_log
                .as_ref()
                .map_or(0, |l| l.dropped.load(Relaxed)),
            spans_exported: span(|c| c.exported.load(Relaxed)),
            spans_dropped: span(|c| c.dropped.load(Relaxed)),
            span_export_failures: span(|c| c.failures.load(Relaxed)),
        }
    }
}

/// `request_protocol` label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RequestProtocol {
    Http,
    Grpc,
}

impl RequestProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
        }
    }
}

/// Which end of a connection reports it (Istio's `reporter` label).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The proxy in front of the destination pod: what it served (L7, opaque TCP, HBONE
    /// delivered to a local pod), as a waypoint or ztunnel inbound reports.
    #[default]
    Destination,
    /// The proxy that carried a local pod's connection out through an HBONE tunnel, as
    /// ztunnel's outbound reports.
    Source,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Destination => "destination",
            Reporter::Source => "source",
        }
    }
}

/// W3C trace context of a request as forwarded upstream (the proxy's own span).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    /// The proxy's span (sent upstream as the parent).
    pub span_id: [u8; 8],
    /// The caller's span, when the request carried a valid `traceparent`.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
}

/// One finished HTTP request (any version; gRPC included).
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub start: SystemTime,
    /// Until the last byte of the response went downstream (or the request ended).
    pub duration: Duration,
    pub downstream: SocketAddr,
    /// Original destination (pod address and port).
    pub upstream: SocketAddr,
    pub source: Option<Arc<Workload>>,
    pub destination: Option<Arc<Workload>>,
    /// Istio's `destination_service` (`name.ns.svc.cluster.local`), None = unknown.
    pub destination_service: Option<String>,
    pub protocol: RequestProtocol,
    /// `HTTP/1.1`, `HTTP/2`.
    pub http_version: &'static str,
    pub method: String,
    /// Path and query as received.
    pub path: String,
    // The next four are read only by the access log and spans: the proxy leaves them empty
    // when neither is on ([`Telemetry::wants_details`]), to spare a copy each per request.
    // (`authz_policy` and `audited` too.)
    pub authority: String,
    pub user_agent: Option<String>,
    /// The request's `x-forwarded-for` as forwarded (the peer appended; access log).
    pub x_forwarded_for: Option<String>,
    pub request_id: Option<String>,
    /// 0 when no response was sent (downstream went away first).
    pub response_code: u16,
    /// gRPC status from trailers (or headers of a trailers-only response).
    pub grpc_status: Option<u32>,
    /// Envoy response flags, see [`ResponseFlags`]. An RBAC denial sets none (as in Istio:
    /// 403 with flags `-`; the access log's `response_code_details` says
    /// `rbac_access_denied_matched_policy[...]`).
    pub response_flags: ResponseFlags,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub trace: Option<SpanContext>,
    /// AuthorizationPolicy that decided (namespace/name), and whether it denied. The name is
    /// read only by the access log (like `audited`): left out when it is off.
    pub authz_policy: Option<String>,
    pub denied: bool,
    /// An AUDIT policy matched.
    pub audited: Option<String>,
    /// Arrived through an HBONE tunnel (mutual TLS); `source` then carries the
    /// certificate's principal.
    pub mtls: bool,
}

/// The Envoy response flags the proxy sets, rendered `-` when empty and comma-joined
/// otherwise (Envoy's order), e.g. "UT,UF". (Envoy has more: UH, UO, URX, LR, DPE, ...; add
/// them with the code that sets them.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(pub u32);

impl ResponseFlags {
    pub const NONE: ResponseFlags = ResponseFlags(0);
    /// UF: upstream connection failure.
    pub const UPSTREAM_CONNECTION_FAILURE: u32 = 1 << 1;
    /// UC: upstream connection termination.
    pub const UPSTREAM_CONNECTION_TERMINATION: u32 = 1 << 2;
    /// UT: upstream request timeout.
    pub const UPSTREAM_REQUEST_TIMEOUT: u32 = 1 << 3;
    /// UO: upstream overflow (a connection cap was reached).
    pub const UPSTREAM_OVERFLOW: u32 = 1 << 5;
    /// DC: downstream connection termination.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u32 = 1 << 4;
    /// UPE: upstream protocol error.
    pub const UPSTREAM_PROTOCOL_ERROR: u32 = 1 << 7;
}

/// One finished opaque TCP connection.
#[derive(Clone, Debug)]
pub struct TcpRecord {
    pub start: SystemTime,
    pub duration: Duration,
    pub downstream: SocketAddr,
    pub upstream: SocketAddr,
    pub source: Option<Arc<Workload>>,
    pub destination: Option<Arc<Workload>>,
    pub destination_service: Option<String>,
    /// Bytes downstream → upstream and back (spliced bytes included when known).
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub response_flags: ResponseFlags,
    pub spliced: bool,
    pub authz_policy: Option<String>,
    pub denied: bool,
    /// Arrived or left through an HBONE tunnel (mutual TLS).
    pub mtls: bool,
    /// `Source` for an outbound HBONE flow: `source` is the local pod, `destination` the
    /// remote one, and `destination`'s principal the identity its end had to prove.
    pub reporter: Reporter,
}
