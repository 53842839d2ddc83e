//! What the proxy is configured with: listener, workers and the per-connection limits.

use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::Telemetry;
use crate::tunnel::HboneOptions;

/// The port the datapath steers redirected flows to (docs/l7.md).
pub const DEFAULT_PORT: u16 = 15006;

/// Bounds that keep one client from taking more than its share (memory, time, sockets).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Request line + headers of one HTTP/1 request, and the HTTP/2 header list size (431
    /// beyond). Default 64 KiB (Envoy's 60 KiB, rounded).
    pub max_header_bytes: usize,
    /// Header count of one request (431 beyond). Default 100 (Envoy's).
    pub max_headers: usize,
    /// Request body size (413 beyond; a Content-Length over it is refused before forwarding,
    /// a chunked body over it is cut). Default 1 GiB: gRPC streams are long, the point is a
    /// bound, not a policy.
    pub max_body_bytes: u64,
    /// Time a client has to send a complete request head once it started one (slowloris):
    /// the connection is closed after it. Default 10 s.
    pub header_read_timeout: Duration,
    /// A downstream HTTP connection with no request in flight for this long is closed:
    /// HTTP/1 at once (it is between requests), HTTP/2 with GOAWAY. Default 1 h (Envoy's
    /// connection manager `idle_timeout`, which Istio keeps).
    pub downstream_idle_timeout: Duration,
    /// A pooled upstream connection unused for this long is closed and leaves its pool.
    /// Default 1 h (Envoy's cluster `idle_timeout`; Istio's DestinationRule default).
    pub upstream_idle_timeout: Duration,
    /// An opaque TCP relay (and an upgraded HTTP/1 connection) with no byte in either
    /// direction for this long is closed. Default 1 h (Istio's TCP `idle_timeout`).
    pub tcp_idle_timeout: Duration,
    /// HTTP/2 connections (downstream and upstream) are pinged at this interval, and closed
    /// when a ping goes unanswered for 20 s. Default 300 s.
    pub h2_keepalive_interval: Duration,
    /// Connecting to the original destination. Default 5 s (UF/UT beyond).
    pub upstream_connect_timeout: Duration,
    /// Accepted connections served at once; further ones wait in the listen backlog (4096),
    /// and the kernel drops SYNs beyond that (clients retry). Default 16384.
    pub max_connections: usize,
    /// HTTP/2 streams one downstream connection may have open. Default 256.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control windows (stream, connection): the most a peer can make us buffer.
    /// Defaults 256 KiB and 1 MiB.
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
    /// Idle upstream HTTP/1 connections kept per destination. Default 64.
    pub pool_max_idle_per_host: usize,
    /// Upstream HTTP/1 connections open at once (busy or idle, all destinations); a request
    /// that needs one more gets 503 with flag `UO` (Envoy's circuit breaker). Default 16384.
    pub max_upstream_h1_connections: usize,
    /// Destinations with a pooled upstream HTTP/2 connection; beyond it the least recently
    /// used one leaves the pool (its streams finish first). Default 4096.
    pub max_upstream_h2_destinations: usize,
}

const HOUR: Duration = Duration::from_secs(3600);

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: 1 << 30,
            header_read_timeout: Duration::from_secs(10),
            downstream_idle_timeout: HOUR,
            upstream_idle_timeout: HOUR,
            tcp_idle_timeout: HOUR,
            h2_keepalive_interval: Duration::from_secs(300),
            upstream_connect_timeout: Duration::from_secs(5),
            max_connections: 16384,
            max_concurrent_streams: 256,
            h2_stream_window: 256 * 1024,
            h2_connection_window: 1024 * 1024,
            pool_max_idle_per_host: 64,
            max_upstream_h1_connections: 16384,
            max_upstream_h2_destinations: 4096,
        }
    }
}

/// How to run the proxy ([`crate::Proxy::start`]).
#[derive(Clone)]
pub struct ProxyOptions {
    /// Listening port on 127.0.0.1 and [::1]. 0 = any (tests).
    pub port: u16,
    /// Worker threads of the proxy's own tokio runtime.
    pub workers: usize,
    /// The longest a thread keeps polling for events after a wake-up (crate::busy_poll);
    /// zero (the default) = never.
    pub busy_poll: Duration,
    /// Set IP_TRANSPARENT on the listeners so `bpf_sk_assign`ed flows are accepted with their
    /// original destination as local address (needs CAP_NET_ADMIN).
    pub transparent: bool,
    pub limits: Limits,
    /// How long to wait for the client's first bytes before treating the connection as
    /// opaque TCP (server-first protocols). Default 500 ms.
    pub detect_timeout: Duration,
    /// Kernel splicing of opaque and upgraded connections; None = relay in userspace.
    pub splice: Option<Arc<comb_datapath::ProxySplice>>,
    pub telemetry: Arc<Telemetry>,
    /// HBONE tunnels between nodes (off by default).
    pub hbone: HboneOptions,
    /// The node's workload certificates and trust roots (filled by the agent's certificate
    /// reconciler; read at every HBONE handshake). Default: empty.
    pub certs: comb_identity::CertStore,
}

impl ProxyOptions {
    /// Defaults: port 15006, 2 workers, transparent, default limits, 500 ms detection.
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        Self {
            port: DEFAULT_PORT,
            workers: 2,
            busy_poll: Duration::ZERO,
            transparent: true,
            limits: Limits::default(),
            detect_timeout: Duration::from_millis(500),
            splice: None,
            telemetry,
            hbone: HboneOptions::default(),
            certs: comb_identity::store::new_store(),
        }
    }
}
