//! The `comb proxy stats` summary: per route (method + path without query) and per
//! destination (service, else workload): requests by status class, denials, bytes and
//! p50/p99 latency from a small log-linear histogram; opaque TCP totals. Distinct rows are
//! capped; the rest land in `other`.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use super::access_log::path_only;
use super::metrics::FxHasher;
use super::{RequestRecord, TcpRecord};

// The summary is a wire type of the admin API; the proxy fills it.
pub use comb_api::proxy::{ProxyStats, RowStats, TcpStats, TelemetryHealth, render_table};

/// Log-linear latency histogram over microseconds: exact below 16 µs, then 8 sub-buckets
/// per power of two up to 2^40 µs.
const SUB_BITS: u32 = 3;
const LINEAR: u64 = 16;
const MAX_EXP: u32 = 40;
const LAT_BUCKETS: usize = LINEAR as usize + ((MAX_EXP - 4) as usize) * (1 << SUB_BITS);

fn lat_index(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let e = 63 - us.leading_zeros();
    if e >= MAX_EXP {
        return LAT_BUCKETS - 1;
    }
    let sub = (us >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    (LINEAR + u64::from(e - 4) * (1 << SUB_BITS) + sub) as usize
}

/// Midpoint of bucket `i`, in microseconds.
fn lat_value(i: usize) -> f64 {
    let i = i as u64;
    if i < LINEAR {
        return i as f64;
    }
    let e = 4 + (i - LINEAR) / (1 << SUB_BITS);
    let sub = (i - LINEAR) % (1 << SUB_BITS);
    let width = 1u64 << (e - u64::from(SUB_BITS));
    let low = ((1 << SUB_BITS) + sub) * width;
    low as f64 + (width - 1) as f64 / 2.0
}

struct Row {
    requests: AtomicU64,
    classes: [AtomicU64; 5],
    denied: AtomicU64,
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
    latency: Box<[AtomicU64]>,
}

impl Default for Row {
    fn default() -> Self {
        Row {
            requests: AtomicU64::new(0),
            classes: Default::default(),
            denied: AtomicU64::new(0),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
            latency: (0..LAT_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Row {
    fn add(&self, r: &RequestRecord) {
        self.requests.fetch_add(1, Relaxed);
        let class = match r.response_code {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            500..=599 => 3,
            _ => 4,
        };
        self.classes[class].fetch_add(1, Relaxed);
        if r.denied {
            self.denied.fetch_add(1, Relaxed);
        }
        self.request_bytes.fetch_add(r.request_bytes, Relaxed);
        self.response_bytes.fetch_add(r.response_bytes, Relaxed);
        let us = u64::try_from(r.duration.as_micros()).unwrap_or(u64::MAX);
        self.latency[lat_index(us)].fetch_add(1, Relaxed);
    }

    fn snapshot(&self, key: String) -> RowStats {
        let counts: Vec<u64> = self.latency.iter().map(|c| c.load(Relaxed)).collect();
        let c = |i: usize| self.classes[i].load(Relaxed);
        RowStats {
            key,
            requests: self.requests.load(Relaxed),
            status_2xx: c(0),
            status_3xx: c(1),
            status_4xx: c(2),
            status_5xx: c(3),
            status_other: c(4),
            denied: self.denied.load(Relaxed),
            p50_ms: quantile(&counts, 0.50) / 1000.0,
            p99_ms: quantile(&counts, 0.99) / 1000.0,
            request_bytes: self.request_bytes.load(Relaxed),
            response_bytes: self.response_bytes.load(Relaxed),
        }
    }
}

/// Value (µs) at quantile `q` (nearest rank).
fn quantile(counts: &[u64], q: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, &n) in counts.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return lat_value(i);
        }
    }
    lat_value(counts.len() - 1)
}

/// Fx-hashed: route keys are short and this runs per request.
type Fx = BuildHasherDefault<FxHasher>;
type RowMap = HashMap<Box<str>, HashMap<Box<str>, Arc<Row>, Fx>, Fx>;

/// Rows by a two-part key, looked up with borrowed parts (no allocation once a row exists).
struct Rows {
    map: RwLock<RowMap>,
    distinct: AtomicUsize,
    cap: usize,
    other: Row,
}

impl Rows {
    fn new(cap: usize) -> Self {
        Rows {
            map: RwLock::default(),
            distinct: AtomicUsize::new(0),
            cap,
            other: Row::default(),
        }
    }

    fn add(&self, a: &str, b: &str, r: &RequestRecord) {
        {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            if let Some(row) = map.get(a).and_then(|m| m.get(b)) {
                row.add(r);
                return;
            }
        }
        if self.distinct.load(Relaxed) >= self.cap {
            self.other.add(r);
            return;
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let inner = map.entry(a.into()).or_default();
        if let Some(row) = inner.get(b) {
            row.add(r);
        } else if self.distinct.load(Relaxed) < self.cap {
            self.distinct.fetch_add(1, Relaxed);
            let row = Arc::new(Row::default());
            row.add(r);
            inner.insert(b.into(), row);
        } else {
            self.other.add(r);
        }
    }

    fn snapshot(&self, key: impl Fn(&str, &str) -> String) -> Vec<RowStats> {
        let rows: Vec<(String, Arc<Row>)> = {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            map.iter()
                .flat_map(|(a, m)| m.iter().map(|(b, row)| (key(a, b), row.clone())))
                .collect()
        };
        let mut out: Vec<RowStats> = rows.into_iter().map(|(k, row)| row.snapshot(k)).collect();
        let other = self.other.snapshot("other".into());
        if other.requests > 0 {
            out.push(other);
        }
        out.sort_by(|x, y| y.requests.cmp(&x.requests).then_with(|| x.key.cmp(&y.key)));
        out
    }
}

#[derive(Default)]
struct Tcp {
    connections: AtomicU64,
    denied: AtomicU64,
    spliced: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
}

pub struct Stats {
    requests: AtomicU64,
    routes: Rows,
    destinations: Rows,
    tcp: Tcp,
}

impl Stats {
    /// `max_rows` caps routes and destinations each.
    pub fn new(max_rows: usize) -> Self {
        Stats {
            requests: AtomicU64::new(0),
            routes: Rows::new(max_rows),
            destinations: Rows::new(max_rows),
            tcp: Tcp::default(),
        }
    }

    pub fn record_request(&self, r: &RequestRecord) {
        self.requests.fetch_add(1, Relaxed);
        self.routes.add(&r.method, path_only(&r.path), r);
        match (&r.destination_service, &r.destination) {
            (Some(s), _) => self.destinations.add("", s, r),
            (None, Some(w)) => self.destinations.add(&w.namespace, &w.workload, r),
            (None, None) => self.destinations.add("", "unknown", r),
        }
    }

    pub fn record_tcp(&self, r: &TcpRecord) {
        let t = &self.tcp;
        t.connections.fetch_add(1, Relaxed);
        if r.denied {
            t.denied.fetch_add(1, Relaxed);
        }
        if r.spliced {
            t.spliced.fetch_add(1, Relaxed);
        }
        // `sent_bytes` is downstream → upstream, i.e. received from the client.
        t.bytes_received.fetch_add(r.sent_bytes, Relaxed);
        t.bytes_sent.fetch_add(r.received_bytes, Relaxed);
    }

    pub fn snapshot(&self, node: &str, telemetry: TelemetryHealth) -> ProxyStats {
        let t = &self.tcp;
        ProxyStats {
            node: node.to_string(),
            requests: self.requests.load(Relaxed),
            routes: self.routes.snapshot(|m, p| format!("{m} {p}")),
            destinations: self.destinations.snapshot(|ns, name| {
                if ns.is_empty() {
                    name.to_string()
                } else {
                    format!("{ns}/{name}")
                }
            }),
            tcp: TcpStats {
                connections: t.connections.load(Relaxed),
                denied: t.denied.load(Relaxed),
                spliced: t.spliced.load(Relaxed),
                bytes_received: t.bytes_received.load(Relaxed),
                bytes_sent: t.bytes_sent.load(Relaxed),
            },
            telemetry,
        }
    }
}
