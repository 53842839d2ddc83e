//! The state HBONE tunnels share (docs/mtls.md, "HBONE"): options, the mutual-TLS configs
//! built from the node's certificates, the outbound connection pool, the headers we parse
//! and write, and the identity a tunnel's client proved. No connection serving here (that is
//! `crate::hbone`), so the connection pipeline can depend on it.

pub(crate) mod h2_stream;
pub mod headers;
mod peer;
pub mod pool;
pub(crate) mod socket;
pub mod tls;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use comb_identity::CertStore;

pub use peer::TunnelPeer;
pub use pool::{HandshakeKind, Pool, PoolCounters, TunnelInfo};

/// Where HBONE peers listen (ztunnel's port).
pub const HBONE_PORT: u16 = 15008;
/// The outbound transparent listener the datapath steers tunneled flows to (ztunnel's).
pub const OUTBOUND_PORT: u16 = 15001;

/// HTTP/2 settings of HBONE connections (ztunnel's): windows 4 MiB per stream and 16 MiB per
/// connection, 1 MiB frames, a PING every 10 s.
pub const H2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const H2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const H2_MAX_FRAME: u32 = 1024 * 1024;
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(10);
/// A connection whose PING is not answered within this is closed.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Which HBONE listener a socket is (for the datapath's listener sockmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// The node proxy's L7 redirect listener (15006).
    L7,
    /// HBONE outbound: local pods' flows to remote peers (15001).
    HboneOutbound,
    /// HBONE inbound: tunnels from other nodes (15008).
    HboneInbound,
}

#[derive(Clone, Debug)]
pub struct HboneOptions {
    /// Start the outbound and inbound listeners.
    pub enabled: bool,
    /// Outbound listener port on 127.0.0.1/[::1] (transparent like the L7 one). 0 = any.
    pub outbound_port: u16,
    /// Inbound listener: `0.0.0.0:15008` takes tunnels addressed to the node's own address
    /// and, transparent, the ones the datapath assigns for local pod addresses.
    pub inbound_addr: SocketAddr,
    /// The port dialled on peers (15008; tests change it).
    pub peer_port: u16,
    /// Open outbound tunnels from the source pod's address and deliver inbound streams from
    /// the original source's address (IP_TRANSPARENT, deliveries marked
    /// `HBONE_DELIVERY_MARK`): needs CAP_NET_ADMIN and the datapath's routing. Off (tests),
    /// both go from the node's own addresses.
    pub original_source: bool,
    /// Streams one pooled connection carries at once before the pool opens another.
    pub max_streams_per_connection: u32,
    /// Pooled outbound connections at most (new flows beyond are refused).
    pub max_connections: usize,
    /// A pooled connection without streams for this long is closed.
    pub pool_idle_timeout: Duration,
    /// TCP connect + TLS handshake + HTTP/2 preface, either direction.
    pub handshake_timeout: Duration,
    /// How long a flow (outbound: the source pod's certificate; inbound: the destination
    /// pod's) waits for a certificate the node is still obtaining, e.g. a pod's first flow
    /// right after it started, before it is refused. Shorter than the handshake timeout, so
    /// an inbound wait ends before the peer's handshake gives up.
    pub cert_wait: Duration,
    /// `k8s.cluster.name` in `baggage`.
    pub cluster_name: String,
}

impl Default for HboneOptions {
    fn default() -> Self {
        Self {
            enabled: false,
            outbound_port: OUTBOUND_PORT,
            inbound_addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT)),
            peer_port: HBONE_PORT,
            original_source: true,
            max_streams_per_connection: 100,
            max_connections: 1024,
            pool_idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(5),
            cert_wait: Duration::from_secs(3),
            cluster_name: "Kubernetes".into(),
        }
    }
}

/// The inbound side's counts.
#[derive(Debug, Default)]
pub(crate) struct InboundCounters {
    /// Mutual-TLS handshakes completed (client certificate verified).
    pub handshakes: AtomicU64,
    /// Handshakes refused or failed: not TLS, no or a foreign client certificate, no SPIFFE
    /// ID, timeouts, no local identity at the address.
    pub refused: AtomicU64,
    /// CONNECT streams answered 200.
    pub streams: AtomicU64,
    /// CONNECT streams answered 400, 401 or 503.
    pub rejected_streams: AtomicU64,
}

impl InboundCounters {
    fn snapshot(&self) -> comb_api::tunnel::InboundCounters {
        comb_api::tunnel::InboundCounters {
            handshakes: self.handshakes.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            streams: self.streams.load(Ordering::Relaxed),
            rejected_streams: self.rejected_streams.load(Ordering::Relaxed),
        }
    }
}

/// What every HBONE connection of one proxy shares.
pub struct Hbone {
    pub(crate) inbound: InboundCounters,
    pub(crate) opts: HboneOptions,
    pub(crate) tls: Arc<tls::TlsConfigs>,
    pub(crate) pool: Arc<Pool>,
    /// The inbound HTTP/2 server's settings.
    pub(crate) h2: h2::server::Builder,
}

impl Hbone {
    /// Call inside the proxy's runtime (the pool's reaper is spawned on it).
    pub fn new(opts: HboneOptions, certs: CertStore, max_concurrent_streams: u32) -> Arc<Self> {
        let tls = Arc::new(tls::TlsConfigs::new(certs));
        let mut h2 = h2::server::Builder::new();
        h2.max_concurrent_streams(max_concurrent_streams)
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_frame_size(H2_MAX_FRAME)
            .max_header_list_size(64 * 1024);
        Arc::new(Self {
            inbound: InboundCounters::default(),
            pool: Pool::new(tls.clone(), opts.clone()),
            tls,
            opts,
            h2,
        })
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// What `comb tunnel list` shows.
    pub fn stats(&self) -> comb_api::tunnel::TunnelsReply {
        comb_api::tunnel::TunnelsReply {
            enabled: true,
            outbound: self.pool.counters(),
            inbound: self.inbound.snapshot(),
            tunnels: self.pool.tunnels(),
        }
    }

    pub fn options(&self) -> &HboneOptions {
        &self.opts
    }
}
