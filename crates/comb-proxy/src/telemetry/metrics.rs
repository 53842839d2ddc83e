//! Istio-standard Prometheus metrics: series stored in sharded maps keyed by the hash of the
//! borrowed label key (no allocation or string formatting for an existing series; atomics
//! inside), a global series cap, and the text exposition rendering in a stable order.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use super::labels::{HttpKey, HttpKeyRef, SeriesKey, TcpKey, TcpKeyRef};
use super::{RequestRecord, TcpRecord};

/// Envoy's default histogram buckets, which Istio's sidecars use for the duration (ms) and,
/// unchanged, for the request/response size (bytes) histograms (a real Istio scrape shows
/// `istio_response_bytes_bucket{...,le="0.5"}`).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Default cap on HTTP + TCP series together.
pub const DEFAULT_MAX_SERIES: usize = 10_000;

const SHARDS: usize = 16;

/// FxHash (rustc's): fast for short keys, good enough spread for 16 shards and a map.
#[derive(Default)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        for &b in chunks.remainder() {
            self.add(b as u64);
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }

    fn write_u16(&mut self, i: u16) {
        self.add(i as u64);
    }

    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// The map's keys are already hashes.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, _: &[u8]) {
        unreachable!("IdHasher only hashes u64 keys")
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub fn fx_hash<T: Hash>(v: &T) -> u64 {
    let mut h = FxHasher::default();
    v.hash(&mut h);
    // Mix the high bits down: the shard index uses the low ones.
    let x = h.finish();
    x ^ (x >> 29) ^ (x >> 47)
}

pub struct Series<K, V> {
    pub key: K,
    /// Rendered once, at creation.
    pub labels: String,
    pub value: V,
}

/// Series by key hash (collisions share the Vec).
type ShardMap<K, V> = HashMap<u64, Vec<Arc<Series<K, V>>>, BuildHasherDefault<IdHasher>>;
type Shard<K, V> = RwLock<ShardMap<K, V>>;

/// One metric family (or several sharing a key): series by label key.
pub struct Family<K: SeriesKey, V> {
    shards: Vec<Shard<K, V>>,
}

impl<K: SeriesKey, V: Default> Family<K, V> {
    pub fn new() -> Self {
        Family {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }

    /// Runs `f` on the series for `key`, creating it if `budget` allows; false = dropped.
    pub fn with(&self, key: K::Ref<'_>, budget: &Budget, f: impl FnOnce(&V)) -> bool {
        let hash = fx_hash(&key);
        let shard = &self.shards[(hash as usize) % SHARDS];
        {
            let map = shard.read().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = find::<K, V>(&map, hash, key) {
                f(&s.value);
                return true;
            }
        }
        let mut map = shard.write().unwrap_or_else(|e| e.into_inner());
        // Another thread may have created it meanwhile.
        if let Some(s) = find::<K, V>(&map, hash, key) {
            f(&s.value);
            return true;
        }
        if !budget.take() {
            return false;
        }
        let series = Arc::new(Series {
            key: K::own(key),
            labels: K::render(key),
            value: V::default(),
        });
        f(&series.value);
        map.entry(hash).or_default().push(series);
        true
    }

    /// Every series, sorted by label text (deterministic output).
    pub fn snapshot(&self) -> Vec<Arc<Series<K, V>>> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let map = shard.read().unwrap_or_else(|e| e.into_inner());
            all.extend(map.values().flatten().cloned());
        }
        all.sort_by(|a, b| a.labels.cmp(&b.labels));
        all
    }
}

impl<K: SeriesKey, V: Default> Default for Family<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

fn find<'m, K: SeriesKey, V>(
    map: &'m ShardMap<K, V>,
    hash: u64,
    key: K::Ref<'_>,
) -> Option<&'m Arc<Series<K, V>>> {
    map.get(&hash)?.iter().find(|s| s.key.matches(key))
}

/// The series cap shared by all families; refusals counted.
pub struct Budget {
    max: usize,
    used: AtomicUsize,
    pub dropped: AtomicU64,
}

impl Budget {
    pub fn new(max: usize) -> Self {
        Budget {
            max,
            used: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    fn take(&self) -> bool {
        let ok = self
            .used
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
            .is_ok();
        if !ok {
            self.dropped.fetch_add(1, Relaxed);
        }
        ok
    }

    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }
}

/// A Prometheus histogram over [`BUCKETS`]; the sum is kept in integer units of
/// `1/SCALE` of the rendered unit.
#[derive(Default)]
pub struct Histogram<const SCALE: u64> {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum: AtomicU64,
}

impl<const SCALE: u64> Histogram<SCALE> {
    /// `units` = value × SCALE.
    pub fn observe(&self, units: u64) {
        let v = units as f64 / SCALE as f64;
        if let Some(i) = BUCKETS.iter().position(|&le| v <= le) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(units, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (le, b) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += b.load(Relaxed);
            line(
                out,
                name,
                "_bucket",
                labels,
                Some(&le.to_string()),
                cumulative,
            );
        }
        let count = self.count.load(Relaxed);
        line(out, name, "_bucket", labels, Some("+Inf"), count);
        let sum = self.sum.load(Relaxed) as f64 / SCALE as f64;
        push_sample(out, name, "_sum", labels, None, &sum.to_string());
        line(out, name, "_count", labels, None, count);
    }
}

#[derive(Default)]
pub struct HttpValues {
    pub requests: AtomicU64,
    /// Milliseconds, kept in microseconds.
    pub duration: Histogram<1000>,
    pub request_bytes: Histogram<1>,
    pub response_bytes: Histogram<1>,
}

#[derive(Default)]
pub struct TcpValues {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

pub struct Metrics {
    pub budget: Budget,
    http: Family<HttpKey, HttpValues>,
    tcp: Family<TcpKey, TcpValues>,
}

impl Metrics {
    pub fn new(max_series: usize) -> Self {
        Metrics {
            budget: Budget::new(max_series),
            http: Family::new(),
            tcp: Family::new(),
        }
    }

    pub fn record_request(&self, r: &RequestRecord) {
        let micros = u64::try_from(r.duration.as_micros()).unwrap_or(u64::MAX);
        self.http.with(HttpKeyRef::of(r), &self.budget, |v| {
            v.requests.fetch_add(1, Relaxed);
            v.duration.observe(micros);
            v.request_bytes.observe(r.request_bytes);
            v.response_bytes.observe(r.response_bytes);
        });
    }

    /// A connection was accepted and judged (Istio counts it at open, flags still `-`).
    pub fn record_tcp_open(&self, r: &TcpRecord) {
        self.tcp.with(TcpKeyRef::of(r), &self.budget, |v| {
            v.opened.fetch_add(1, Relaxed);
        });
    }

    /// The connection ended: closed and its bytes (its final flags label the series).
    pub fn record_tcp(&self, r: &TcpRecord) {
        self.tcp.with(TcpKeyRef::of(r), &self.budget, |v| {
            v.closed.fetch_add(1, Relaxed);
            // Istio's direction is the client's: `sent` = back to it, `received` = from it;
            // the record's `sent_bytes` is downstream → upstream.
            v.sent.fetch_add(r.received_bytes, Relaxed);
            v.received.fetch_add(r.sent_bytes, Relaxed);
        });
    }

    /// The Istio families, then the proxy's own telemetry counters (`extra`: name, help,
    /// value, all counters).
    pub fn render(&self, out: &mut String, extra: &[(&str, &str, u64)]) {
        let http = self.http.snapshot();
        let tcp = self.tcp.snapshot();

        header(
            out,
            "istio_requests_total",
            "counter",
            "Requests handled by the proxy.",
        );
        for s in &http {
            line(
                out,
                "istio_requests_total",
                "",
                &s.labels,
                None,
                s.value.requests.load(Relaxed),
            );
        }
        type H<'a> = (&'a str, &'a str, fn(&HttpValues) -> &dyn Render);
        let hists: [H<'_>; 3] = [
            (
                "istio_request_duration_milliseconds",
                "Request duration in milliseconds.",
                |v| &v.duration,
            ),
            ("istio_request_bytes", "Request body size in bytes.", |v| {
                &v.request_bytes
            }),
            (
                "istio_response_bytes",
                "Response body size in bytes.",
                |v| &v.response_bytes,
            ),
        ];
        for (name, help, get) in hists {
            header(out, name, "histogram", help);
            for s in &http {
                get(&s.value).render_to(out, name, &s.labels);
            }
        }

        type C<'a> = (&'a str, &'a str, fn(&TcpValues) -> u64);
        let counters: [C<'_>; 4] = [
            (
                "istio_tcp_connections_opened_total",
                "Opaque TCP connections opened.",
                |v| v.opened.load(Relaxed),
            ),
            (
                "istio_tcp_connections_closed_total",
                "Opaque TCP connections closed.",
                |v| v.closed.load(Relaxed),
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent to the client (response direction) on opaque TCP connections.",
                |v| v.sent.load(Relaxed),
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the client (request direction) on opaque TCP connections.",
                |v| v.received.load(Relaxed),
            ),
        ];
        for (name, help, get) in counters {
            header(out, name, "counter", help);
            for s in &tcp {
                line(out, name, "", &s.labels, None, get(&s.value));
            }
        }

        header(
            out,
            "comb_proxy_metrics_series_dropped_total",
            "counter",
            "Records not counted in the istio_* metrics because the series cap was reached.",
        );
        line(
            out,
            "comb_proxy_metrics_series_dropped_total",
            "",
            "",
            None,
            self.budget.dropped.load(Relaxed),
        );
        for (name, help, value) in extra {
            header(out, name, "counter", help);
            line(out, name, "", "", None, *value);
        }
    }
}

/// Lets the three histograms (different scales) share one rendering loop.
trait Render {
    fn render_to(&self, out: &mut String, name: &str, labels: &str);
}

impl<const S: u64> Render for Histogram<S> {
    fn render_to(&self, out: &mut String, name: &str, labels: &str) {
        self.render(out, name, labels);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    out.push_str(help);
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind);
    out.push('\n');
}

fn line(out: &mut String, name: &str, suffix: &str, labels: &str, le: Option<&str>, v: u64) {
    push_sample(out, name, suffix, labels, le, &v.to_string());
}

fn push_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &str,
    le: Option<&str>,
    v: &str,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        out.push_str(labels);
        if let Some(le) = le {
            if !labels.is_empty() {
                out.push(',');
            }
            out.push_str("le=\"");
            out.push_str(le);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(v);
    out.push('\n');
}
