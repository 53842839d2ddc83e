//! The HTTP/2 upstream pool: one multiplexed connection per destination address (so
//! `:authority` stays what the client sent while the connection is chosen by address).
//!
//! Bounded and reaped: an entry leaves the map when its connection closes, when it was not
//! used for the idle timeout, or (least recently used first) when a new destination needs
//! room beyond `max_upstream_h2_destinations`. Leaving the map only drops the pool's handle:
//! streams in flight finish, then hyper closes the connection (no handle, no stream).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Failure;
use crate::body::RequestBody;

type Sender = http2::SendRequest<RequestBody>;
type Slots = ArcSwap<HashMap<SocketAddr, Arc<H2Slot>>>;

pub struct H2Pool {
    slots: Arc<Slots>,
    builder: http2::Builder<TokioExecutor>,
    connect_timeout: Duration,
    idle: Duration,
    max: usize,
    epoch: Instant,
}

struct H2Slot {
    /// The connection and its generation (which connection task owns the slot).
    conn: ArcSwapOption<(u64, Sender)>,
    generation: AtomicU64,
    /// Held only while (re)connecting so concurrent requests share one new connection.
    connecting: tokio::sync::Mutex<()>,
    /// Last request start, ms since the pool's epoch.
    last_used: AtomicU64,
}

impl H2Pool {
    pub fn new(
        builder: http2::Builder<TokioExecutor>,
        connect_timeout: Duration,
        idle: Duration,
        max: usize,
    ) -> Self {
        Self {
            slots: Arc::default(),
            builder,
            connect_timeout,
            idle,
            max: max.max(1),
            epoch: Instant::now(),
        }
    }

    /// Destinations with an entry now.
    pub fn destinations(&self) -> usize {
        self.slots.load().len()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn slot(&self, dst: SocketAddr) -> Arc<H2Slot> {
        if let Some(s) = self.slots.load().get(&dst) {
            return s.clone();
        }
        // First request to this destination: copy-on-write insert (rare), making room.
        let mut created: Option<Arc<H2Slot>> = None;
        let max = self.max;
        self.slots.rcu(|m| {
            if m.contains_key(&dst) {
                return Arc::clone(m);
            }
            let mut m = HashMap::clone(m);
            while m.len() >= max {
                let victim = m
                    .iter()
                    .min_by_key(|(_, s)| (live(s).is_some(), s.last_used.load(Ordering::Relaxed)))
                    .map(|(k, _)| *k);
                match victim {
                    Some(k) => m.remove(&k),
                    None => break,
                };
            }
            let slot = created.get_or_insert_with(|| {
                Arc::new(H2Slot {
                    conn: ArcSwapOption::empty(),
                    generation: AtomicU64::new(0),
                    connecting: tokio::sync::Mutex::new(()),
                    last_used: AtomicU64::new(self.now_ms()),
                })
            });
            m.insert(dst, slot.clone());
            Arc::new(m)
        });
        match self.slots.load().get(&dst) {
            Some(s) => s.clone(),
            // Evicted at once by a concurrent insert: serve this request from it anyway.
            None => created.unwrap_or_else(|| detached_slot(self.now_ms())),
        }
    }

    pub async fn sender(&self, dst: SocketAddr) -> Result<Sender, Failure> {
        let slot = self.slot(dst);
        slot.last_used.store(self.now_ms(), Ordering::Relaxed);
        if let Some(s) = live(&slot) {
            return Ok(s);
        }
        let _g = slot.connecting.lock().await;
        if let Some(s) = live(&slot) {
            return Ok(s);
        }
        let connect = async {
            let tcp = TcpStream::connect(dst)
                .await
                .map_err(|e| Failure::classify(&e, true))?;
            let _ = tcp.set_nodelay(true);
            self.builder
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| Failure::classify(&e, true))
        };
        let (sender, conn) = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| Failure::CONNECT_TIMEOUT)??;
        let generation = slot.generation.fetch_add(1, Ordering::AcqRel) + 1;
        slot.conn
            .store(Some(Arc::new((generation, sender.clone()))));
        let watch = Watch {
            slots: self.slots.clone(),
            slot: Arc::downgrade(&slot),
            dst,
            generation,
            idle: self.idle,
            epoch: self.epoch,
        };
        tokio::spawn(watch.run(conn));
        Ok(sender)
    }
}

/// A slot nobody else can see (only when the map's bound is 1 and two inserts race).
fn detached_slot(now: u64) -> Arc<H2Slot> {
    Arc::new(H2Slot {
        conn: ArcSwapOption::empty(),
        generation: AtomicU64::new(0),
        connecting: tokio::sync::Mutex::new(()),
        last_used: AtomicU64::new(now),
    })
}

fn live(slot: &H2Slot) -> Option<Sender> {
    let guard = slot.conn.load();
    let (_, s) = guard.as_deref()?;
    (!s.is_closed()).then(|| s.clone())
}

/// Drives one upstream connection and keeps the map honest about it.
struct Watch {
    slots: Arc<Slots>,
    slot: Weak<H2Slot>,
    dst: SocketAddr,
    generation: u64,
    idle: Duration,
    epoch: Instant,
}

impl Watch {
    async fn run<F>(self, conn: F)
    where
        F: std::future::Future<Output = hyper::Result<()>>,
    {
        let mut conn = pin!(conn);
        let mut done = false;
        while let Some(slot) = self.slot.upgrade() {
            let used = Duration::from_millis(slot.last_used.load(Ordering::Relaxed));
            let since = self.epoch.elapsed().saturating_sub(used);
            if since >= self.idle {
                // Unused for the idle time: leave the pool; in-flight streams finish.
                self.forget(&slot);
                break;
            }
            drop(slot);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(dst = %self.dst, "upstream h2 connection: {e}");
                    }
                    done = true;
                    break;
                }
                _ = tokio::time::sleep(self.idle - since) => {}
            }
        }
        if !done && let Err(e) = conn.await {
            tracing::debug!(dst = %self.dst, "upstream h2 connection: {e}");
        }
        if let Some(slot) = self.slot.upgrade() {
            self.forget(&slot);
        }
    }

    /// Removes the slot from the map if this connection still owns it.
    fn forget(&self, slot: &Arc<H2Slot>) {
        if slot.generation.load(Ordering::Acquire) != self.generation {
            return;
        }
        slot.conn.store(None);
        self.slots.rcu(|m| match m.get(&self.dst) {
            Some(s) if Arc::ptr_eq(s, slot) => {
                let mut m = HashMap::clone(m);
                m.remove(&self.dst);
                Arc::new(m)
            }
            _ => Arc::clone(m),
        });
    }
}
