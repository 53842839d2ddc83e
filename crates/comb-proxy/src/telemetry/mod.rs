//! Istio-standard telemetry of the node proxy: Prometheus metrics with Istio's names and
//! labels, JSON access log lines, W3C trace context and OTLP span export, and the per
//! route/destination summary behind `comb proxy stats`.
//!
//! INTERFACE (fixed; helpers implement behind it): the HTTP and TCP paths build one
//! [`RequestRecord`] per finished request (or [`TcpRecord`] per finished opaque connection)
//! and call [`Telemetry::record_request`] / [`Telemetry::record_tcp`]; the agent renders
//! [`Telemetry::render_prometheus`] into its /metrics and serves [`Telemetry::stats`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use comb_model::l7::Workload;
use serde::{Deserialize, Serialize};

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
    pub authority: String,
    pub user_agent: Option<String>,
    /// The request's `x-forwarded-for` header as received (access log).
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
    /// AuthorizationPolicy that decided (namespace/name), and whether it denied.
    pub authz_policy: Option<String>,
    pub denied: bool,
    /// An AUDIT policy matched.
    pub audited: Option<String>,
}

/// Envoy's response flag set, rendered `-` when empty and comma-joined otherwise
/// (Envoy's order), e.g. "UF,URX".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(pub u32);

impl ResponseFlags {
    pub const NONE: ResponseFlags = ResponseFlags(0);
    /// UH: no healthy upstream (no destination pod for the original address).
    pub const NO_HEALTHY_UPSTREAM: u32 = 1 << 0;
    /// UF: upstream connection failure.
    pub const UPSTREAM_CONNECTION_FAILURE: u32 = 1 << 1;
    /// UC: upstream connection termination.
    pub const UPSTREAM_CONNECTION_TERMINATION: u32 = 1 << 2;
    /// UT: upstream request timeout.
    pub const UPSTREAM_REQUEST_TIMEOUT: u32 = 1 << 3;
    /// DC: downstream connection termination.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u32 = 1 << 4;
    /// DPE: downstream protocol error (malformed request, 400).
    pub const DOWNSTREAM_PROTOCOL_ERROR: u32 = 1 << 6;
    /// UPE: upstream protocol error.
    pub const UPSTREAM_PROTOCOL_ERROR: u32 = 1 << 7;
    /// URX: upstream retry limit exceeded.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u32 = 1 << 8;
    /// UO: upstream overflow (connection pool full / limits).
    pub const UPSTREAM_OVERFLOW: u32 = 1 << 9;
    /// LR: connection local reset.
    pub const LOCAL_RESET: u32 = 1 << 10;
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
}
