//! Pooled outbound HBONE connections. A connection is keyed by what it proves and where it
//! goes — (source identity, destination identity, source IP, destination address), ztunnel's
//! `WorkloadKey` — so a new flow between already-authenticated peers costs no handshake:
//! it takes a stream on a live connection (a reuse); a new connection resumes a TLS session
//! when one is cached for that source identity and destination (a resumption), else does a
//! full handshake. Connections without streams are closed after the idle timeout; the pool
//! holds at most `max_connections`.
//!
//! Each proxy thread (shard, `crate::shards`) takes streams only on connections it opened:
//! a connection's task runs on the thread that opened it, and a stream on another thread's
//! connection would wake that thread for every frame in both directions. So a key has up to
//! one connection per shard in use; the second costs a resumption, not a full handshake.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
pub use comb_api::tunnel::{HandshakeKind, PoolCounters, TunnelRow as TunnelInfo};
use comb_identity::SpiffeId;
use tokio_rustls::TlsConnector;

use super::tls::{self, TlsConfigs};
use super::{HboneOptions, socket};

/// ztunnel's pool key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    pub src_id: SpiffeId,
    pub dst_id: SpiffeId,
    pub src: IpAddr,
    /// The peer's HBONE address (`ip:15008`).
    pub dst: SocketAddr,
}

pub(crate) struct Conn {
    key: WorkloadKey,
    /// The proxy thread whose runtime drives this connection.
    shard: usize,
    pub(crate) sender: h2::client::SendRequest<Bytes>,
    /// Set when the connection's task ended (closed by either side, keep-alive failed).
    closed: Arc<AtomicBool>,
    local: SocketAddr,
    created: Instant,
    handshake: HandshakeKind,
    active: AtomicU32,
    total: AtomicU64,
    pub(crate) sent: Arc<AtomicU64>,
    pub(crate) received: Arc<AtomicU64>,
    /// When the last stream ended (idle reaping).
    idle_since: Mutex<Instant>,
    /// A stream could not be opened on it (GOAWAY from a draining peer, a dead connection
    /// h2 has not noticed yet): no new stream is put on it.
    retired: AtomicBool,
}

impl Conn {
    /// Take no new streams on this connection (its streams in flight go on).
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn usable(&self) -> bool {
        !self.retired.load(Ordering::Relaxed) && !self.is_closed()
    }
}

/// A stream's claim on a connection; ends the stream's count when dropped.
pub(crate) struct Stream {
    pub(crate) conn: Arc<Conn>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.conn.active.fetch_sub(1, Ordering::Relaxed);
        *self
            .conn
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool full ({0} connections)")]
    Full(usize),
    #[error("connect {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("tls config: {0}")]
    Config(#[from] tls::ConfigError),
    #[error("tls handshake with {0}: {1}")]
    Tls(SocketAddr, std::io::Error),
    #[error("{0} did not negotiate h2")]
    NoH2(SocketAddr),
    #[error("http/2 handshake with {0}: {1}")]
    H2(SocketAddr, h2::Error),
    #[error("handshake with {0} timed out")]
    Timeout(SocketAddr),
}

/// Held while a connection for one key on one shard is being opened.
type Gate = Arc<tokio::sync::Mutex<()>>;

pub struct Pool {
    conns: Mutex<HashMap<WorkloadKey, Vec<Arc<Conn>>>>,
    /// One connection attempt at a time per key and shard: concurrent first flows share it.
    connecting: Mutex<HashMap<(WorkloadKey, usize), Gate>>,
    tls: Arc<TlsConfigs>,
    opts: HboneOptions,
    h2: h2::client::Builder,
    full: AtomicU64,
    resumed: AtomicU64,
    reused: AtomicU64,
    failures: AtomicU64,
}

impl Pool {
    /// Starts the idle reaper on the current tokio runtime when there is one.
    pub fn new(tls: Arc<TlsConfigs>, opts: HboneOptions) -> Arc<Self> {
        let mut h2 = h2::client::Builder::new();
        h2.initial_window_size(super::H2_STREAM_WINDOW)
            .initial_connection_window_size(super::H2_CONNECTION_WINDOW)
            .max_frame_size(super::H2_MAX_FRAME)
            .enable_push(false);
        let pool = Arc::new(Self {
            conns: Mutex::default(),
            connecting: Mutex::default(),
            tls,
            opts,
            h2,
            full: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            crate::reaper::spawn(
                Arc::downgrade(&pool),
                pool.opts.pool_idle_timeout,
                Self::reap,
            );
        }
        pool
    }

    pub fn counters(&self) -> PoolCounters {
        PoolCounters {
            full_handshakes: self.full.load(Ordering::Relaxed),
            resumptions: self.resumed.load(Ordering::Relaxed),
            reuses: self.reused.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    pub fn tunnels(&self) -> Vec<TunnelInfo> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<TunnelInfo> = conns
            .values()
            .flatten()
            .filter(|c| !c.is_closed())
            .map(|c| TunnelInfo {
                local: c.local,
                peer: c.key.dst,
                peer_node: None,
                local_identity: c.key.src_id.to_string(),
                peer_identity: c.key.dst_id.to_string(),
                streams_active: c.active.load(Ordering::Relaxed),
                streams_total: c.total.load(Ordering::Relaxed),
                bytes_sent: c.sent.load(Ordering::Relaxed),
                bytes_received: c.received.load(Ordering::Relaxed),
                age_secs: c.created.elapsed().as_secs(),
                handshake: c.handshake,
            })
            .collect();
        out.sort_by(|a, b| (a.peer, &a.local_identity).cmp(&(b.peer, &b.local_identity)));
        out
    }

    /// Open connections (all keys).
    pub fn len(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A stream slot on a live connection for `key`, opening one when none has room.
    /// `opened_since`: only connections opened at or after that instant qualify (a retry
    /// after a CONNECT failed on an older one, which may share its fate: a peer that drains
    /// sends GOAWAY on all of them).
    pub(crate) async fn stream(
        &self,
        key: &WorkloadKey,
        opened_since: Option<Instant>,
    ) -> Result<Stream, PoolError> {
        if let Some(s) = self.take_live(key, opened_since) {
            self.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(s);
        }
        // A pod's first flow may come before its certificate: wait for it here (a missing
        // one fails in `connect` after the wait).
        self.tls
            .store()
            .wait_for(&key.src_id, self.opts.cert_wait)
            .await;
        let gate = {
            let mut c = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
            c.entry((key.clone(), crate::shards::current()))
                .or_default()
                .clone()
        };
        let _g = gate.lock().await;
        if let Some(s) = self.take_live(key, opened_since) {
            self.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(s);
        }
        if self.len() >= self.opts.max_connections {
            self.reap(Instant::now());
            if self.len() >= self.opts.max_connections {
                self.failures.fetch_add(1, Ordering::Relaxed);
                return Err(PoolError::Full(self.opts.max_connections));
            }
        }
        let conn = match tokio::time::timeout(self.opts.handshake_timeout, self.connect(key)).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                return Err(PoolError::Timeout(key.dst));
            }
        };
        let conn = Arc::new(conn);
        let s = claim(&conn);
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.entry(key.clone()).or_default().push(conn);
        Ok(s)
    }

    fn take_live(&self, key: &WorkloadKey, opened_since: Option<Instant>) -> Option<Stream> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.is_closed());
        let max = self.opts.max_streams_per_connection;
        let shard = crate::shards::current();
        list.iter()
            .filter(|c| c.shard == shard)
            .filter(|c| opened_since.is_none_or(|t| c.created >= t))
            .filter(|c| c.usable() && c.active.load(Ordering::Relaxed) < max)
            .min_by_key(|c| c.active.load(Ordering::Relaxed))
            .map(claim)
    }

    async fn connect(&self, key: &WorkloadKey) -> Result<Conn, PoolError> {
        let cfg = self.tls.client(&key.src_id, &key.dst_id)?;
        let src = self.opts.original_source.then_some(key.src);
        let tcp = socket::connect_from(src, key.dst, None)
            .await
            .map_err(|e| PoolError::Connect(key.dst, e))?;
        let local = tcp
            .local_addr()
            .map_err(|e| PoolError::Connect(key.dst, e))?;
        let tls = TlsConnector::from(cfg)
            .connect(tls::server_name(key.dst.ip()), tcp)
            .await
            .map_err(|e| PoolError::Tls(key.dst, e))?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(PoolError::NoH2(key.dst));
        }
        let handshake = match session.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => {
                self.resumed.fetch_add(1, Ordering::Relaxed);
                HandshakeKind::Resumed
            }
            _ => {
                self.full.fetch_add(1, Ordering::Relaxed);
                HandshakeKind::Full
            }
        };
        let (sender, mut conn) = self
            .h2
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| PoolError::H2(key.dst, e))?;
        let dst = key.dst;
        let closed = Arc::new(AtomicBool::new(false));
        let pings = conn.ping_pong();
        let ended = closed.clone();
        // The connection's task, on this shard's runtime; dropping `conn` closes the socket.
        tokio::spawn(async move {
            let alive = async {
                match pings {
                    Some(p) => {
                        super::h2_stream::keep_alive(
                            p,
                            super::H2_PING_INTERVAL,
                            super::H2_PING_TIMEOUT,
                        )
                        .await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%dst, "hbone connection: {e}");
                },
                _ = alive => tracing::debug!(%dst, "hbone connection: keep-alive failed, closing"),
            }
            ended.store(true, Ordering::Relaxed);
        });
        Ok(Conn {
            key: key.clone(),
            shard: crate::shards::current(),
            sender,
            closed,
            local,
            created: Instant::now(),
            handshake,
            active: AtomicU32::new(0),
            total: AtomicU64::new(0),
            sent: Arc::new(AtomicU64::new(0)),
            received: Arc::new(AtomicU64::new(0)),
            idle_since: Mutex::new(Instant::now()),
            retired: AtomicBool::new(false),
        })
    }

    /// Drops closed connections and the ones idle longer than the timeout (dropping the last
    /// sender ends the HTTP/2 connection with GOAWAY).
    fn reap(&self, now: Instant) {
        let idle = self.opts.pool_idle_timeout;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|_, list| {
            list.retain(|c| {
                let since = *c.idle_since.lock().unwrap_or_else(|e| e.into_inner());
                let busy = c.active.load(Ordering::Relaxed) > 0;
                !c.is_closed() && (busy || (c.usable() && now.duration_since(since) < idle))
            });
            !list.is_empty()
        });
        let mut gates = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
        gates.retain(|(k, _), g| conns.contains_key(k) || Arc::strong_count(g) > 1);
    }
}

fn claim(c: &Arc<Conn>) -> Stream {
    c.active.fetch_add(1, Ordering::Relaxed);
    c.total.fetch_add(1, Ordering::Relaxed);
    Stream { conn: c.clone() }
}
