//! What every connection of one proxy shares: the current table (swapped atomically), the
//! limits, the upstream pools, telemetry and the prepared server builders.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use comb_model::l7::ProxyTable;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;

use crate::options::{Limits, ProxyOptions};
use crate::telemetry::Telemetry;
use crate::tunnel::Hbone;
use crate::upstream::Upstreams;

/// hyper refuses a read buffer under 8 KiB.
const MIN_BUF: usize = 8192;
/// hyper's HTTP/1 header count limit when none is set.
const HYPER_MAX_HEADERS: usize = 100;

pub struct ProxyContext {
    table: ArcSwap<ProxyTable>,
    pub(crate) limits: Limits,
    pub(crate) detect_timeout: Duration,
    pub(crate) splice: Option<Arc<comb_datapath::ProxySplice>>,
    pub(crate) telemetry: Arc<Telemetry>,
    /// One set of upstream pools per proxy thread (crate::shards): a request uses its own
    /// thread's, so its upstream connection's task runs where it does.
    upstreams: Vec<Upstreams>,
    pub(crate) h1: http1::Builder,
    pub(crate) h2: http2::Builder<TokioExecutor>,
    /// HBONE tunnels (None: off).
    pub(crate) hbone: Option<Arc<Hbone>>,
    /// Set once on shutdown: HTTP connections finish their requests and close.
    stop: watch::Sender<bool>,
    /// Upgraded (WebSocket) tunnels running: they outlive the HTTP connection they came
    /// from, which the accept loop counts.
    upgraded: Arc<AtomicUsize>,
}

/// One running upgraded tunnel; uncounted when dropped.
pub(crate) struct UpgradedRunning(Arc<AtomicUsize>);

impl Drop for UpgradedRunning {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ProxyContext {
    /// Everything but the listeners (tests drive [`crate::serve_connection`] with it). With
    /// HBONE on, call it inside a tokio runtime (the tunnel pool's reaper runs there).
    pub fn new(opts: &ProxyOptions, table: Arc<ProxyTable>) -> Arc<Self> {
        let l = &opts.limits;
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .keep_alive(true)
            // Ours counts from a head's first byte (crate::conn_clock); hyper's would also
            // close connections that are only idle between requests.
            .header_read_timeout(None)
            .max_header_size(l.max_header_bytes)
            // The read buffer bounds a connection's memory; headers must fit in it.
            .max_buf_size((l.max_header_bytes + 1024).max(MIN_BUF));
        // hyper's own limit is 100 headers, parsed into arrays on the stack; any explicit
        // limit, even 100, makes it build and move those arrays element by element for
        // every request head.
        if l.max_headers != HYPER_MAX_HEADERS {
            h1.max_headers(l.max_headers);
        }
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(l.max_concurrent_streams)
            .max_header_list_size(l.max_header_bytes as u32)
            .initial_stream_window_size(l.h2_stream_window)
            .initial_connection_window_size(l.h2_connection_window)
            .max_send_buf_size(l.h2_stream_window as usize)
            .keep_alive_interval(l.h2_keepalive_interval)
            .keep_alive_timeout(Duration::from_secs(20));
        Arc::new(Self {
            table: ArcSwap::new(table),
            limits: l.clone(),
            detect_timeout: opts.detect_timeout,
            splice: opts.splice.clone(),
            telemetry: opts.telemetry.clone(),
            upstreams: {
                // The HTTP/1 cap is one count over every thread's pool.
                let h1_open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                (0..opts.workers.max(1))
                    .map(|_| Upstreams::new(l, h1_open.clone()))
                    .collect()
            },
            h1,
            h2,
            hbone: opts.hbone.enabled.then(|| {
                Hbone::new(
                    opts.hbone.clone(),
                    opts.certs.clone(),
                    l.max_concurrent_streams,
                )
            }),
            stop: watch::Sender::new(false),
            upgraded: Arc::default(),
        })
    }

    /// The table new requests and connections see; one taken keeps being used by its request.
    pub fn table(&self) -> Arc<ProxyTable> {
        self.table.load_full()
    }

    pub fn update(&self, table: Arc<ProxyTable>) {
        self.table.store(table);
    }

    /// Asks every HTTP connection to finish its requests in flight and close.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Whether [`Self::stop`] was called (HTTP/1 responses then close their connection).
    pub(crate) fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Counts an upgraded tunnel until the returned value is dropped.
    pub(crate) fn upgraded_running(&self) -> UpgradedRunning {
        self.upgraded.fetch_add(1, Ordering::Relaxed);
        UpgradedRunning(self.upgraded.clone())
    }

    /// Upgraded (WebSocket) tunnels running now.
    pub fn upgraded_tunnels(&self) -> usize {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// The calling thread's upstream pools.
    pub(crate) fn upstreams(&self) -> &Upstreams {
        let i = crate::shards::current();
        &self.upstreams[i.min(self.upstreams.len() - 1)]
    }

    /// What the upstream pools of every thread hold now.
    pub fn upstream_counts(&self) -> crate::upstream::PoolCounts {
        let mut sum = crate::upstream::PoolCounts::default();
        for u in &self.upstreams {
            let c = u.counts();
            // The HTTP/1 count is shared: the same figure in every pool.
            sum.h1_connections = c.h1_connections;
            sum.h2_destinations += c.h2_destinations;
        }
        sum
    }

    /// HBONE state (pool, TLS configs) when HBONE is on.
    pub fn hbone(&self) -> Option<&Arc<Hbone>> {
        self.hbone.as_ref()
    }
}
