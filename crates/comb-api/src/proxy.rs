//! The node proxy's summary as `comb proxy stats` shows it: per route (method + path
//! without query) and per destination, opaque TCP totals and the telemetry pipeline's
//! health. The proxy fills it; the CLI renders it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// What `comb proxy stats` shows (sent as JSON over the agent's admin socket).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyStats {
    pub node: String,
    pub requests: u64,
    /// Busiest first.
    pub routes: Vec<RowStats>,
    pub destinations: Vec<RowStats>,
    pub tcp: TcpStats,
    pub telemetry: TelemetryHealth,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RowStats {
    /// `GET /path`, a destination service host or `namespace/workload`, or `other`.
    pub key: String,
    pub requests: u64,
    pub status_2xx: u64,
    pub status_3xx: u64,
    pub status_4xx: u64,
    pub status_5xx: u64,
    /// No response (0) or 1xx.
    pub status_other: u64,
    pub denied: u64,
    /// Bucket midpoints, within 6.25% of the true value above 16 µs.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpStats {
    pub connections: u64,
    pub denied: u64,
    pub spliced: u64,
    /// From clients (downstream → upstream).
    pub bytes_received: u64,
    /// To clients.
    pub bytes_sent: u64,
}

/// The telemetry pipeline's own health.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetryHealth {
    pub metric_series: u64,
    pub metric_series_dropped: u64,
    pub access_log_dropped: u64,
    pub spans_exported: u64,
    pub spans_dropped: u64,
    pub span_export_failures: u64,
}

/// The `comb proxy stats` table.
pub fn render_table(s: &ProxyStats) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node {}: {} HTTP requests", s.node, s.requests);
    for (title, rows) in [("ROUTE", &s.routes), ("DESTINATION", &s.destinations)] {
        let width = rows
            .iter()
            .map(|r| r.key.len())
            .max()
            .unwrap_or(0)
            .max(title.len());
        let _ = writeln!(
            out,
            "\n{title:<width$}  {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>10} {:>10}",
            "REQS",
            "2XX",
            "3XX",
            "4XX",
            "5XX",
            "OTHER",
            "DENIED",
            "P50_MS",
            "P99_MS",
            "BYTES_IN",
            "BYTES_OUT"
        );
        for r in rows {
            let _ = writeln!(
                out,
                "{:<width$}  {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9.3} {:>9.3} {:>10} {:>10}",
                r.key,
                r.requests,
                r.status_2xx,
                r.status_3xx,
                r.status_4xx,
                r.status_5xx,
                r.status_other,
                r.denied,
                r.p50_ms,
                r.p99_ms,
                r.request_bytes,
                r.response_bytes
            );
        }
    }
    let t = &s.tcp;
    let _ = writeln!(
        out,
        "\nopaque TCP: {} connections ({} denied, {} spliced), {} bytes in, {} bytes out",
        t.connections, t.denied, t.spliced, t.bytes_received, t.bytes_sent
    );
    let h = &s.telemetry;
    let _ = writeln!(
        out,
        "telemetry: {} metric series ({} dropped), access log dropped {}, spans exported {} dropped {} failed {}",
        h.metric_series,
        h.metric_series_dropped,
        h.access_log_dropped,
        h.spans_exported,
        h.spans_dropped,
        h.span_export_failures
    );
    out
}
