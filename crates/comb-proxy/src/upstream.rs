//! Pooled upstream connections to original destinations: one HTTP/1.1 pool per proxy
//! thread (our own, over hyper's connection API, keyed by the destination address; the count
//! of open connections capped across threads) and one HTTP/2 pool (one multiplexed
//! connection per destination, bounded and reaped), plus the dedicated upstream of an
//! HBONE-delivered connection.

mod h1_pool;
use h1_pool::H1Pool;
pub(crate) use h1_pool::{Capped, Slot};
mod h2_pool;

use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::RequestBody;
use crate::options::Limits;
use crate::telemetry::ResponseFlags;

/// Why an upstream exchange failed before response headers: the Envoy flag and reset reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    pub flag: u32,
    pub reason: &'static str,
}

impl Failure {
    pub const CONNECT: Failure = Failure {
        flag: ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
        reason: "connection failure",
    };
    pub const CONNECT_TIMEOUT: Failure = Failure {
        flag: ResponseFlags::UPSTREAM_CONNECTION_FAILURE | ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
        reason: "connection timeout",
    };
    pub const TERMINATION: Failure = Failure {
        flag: ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
        reason: "connection termination",
    };
    /// The upstream connection cap was reached (Envoy's circuit breaker).
    pub const OVERFLOW: Failure = Failure {
        flag: ResponseFlags::UPSTREAM_OVERFLOW,
        reason: "overflow",
    };
    pub const PROTOCOL: Failure = Failure {
        flag: ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
        reason: "protocol error",
    };

    /// Classifies an error chain. `connecting`: the error happened while establishing the
    /// connection (so it is UF, never UC).
    pub fn classify(err: &(dyn StdError + 'static), connecting: bool) -> Failure {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return match io.kind() {
                    io::ErrorKind::TimedOut => Failure::CONNECT_TIMEOUT,
                    _ if connecting => Failure::CONNECT,
                    io::ErrorKind::ConnectionRefused => Failure::CONNECT,
                    _ => Failure::TERMINATION,
                };
            }
            if let Some(h) = e.downcast_ref::<hyper::Error>()
                && h.is_parse()
            {
                return Failure::PROTOCOL;
            }
            cur = e.source();
        }
        if connecting {
            Failure::CONNECT
        } else {
            Failure::TERMINATION
        }
    }
}

pub struct Upstreams {
    h1: Arc<H1Pool>,
    h1_open: Arc<AtomicUsize>,
    h2: h2_pool::H2Pool,
}

/// What the shared pools hold now (tests, `comb proxy stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Upstream HTTP/1 connections open (busy or idle).
    pub h1_connections: usize,
    /// Destinations with a pooled HTTP/2 connection.
    pub h2_destinations: usize,
}

impl Upstreams {
    /// `h1_open`: the count of open HTTP/1 upstream connections, capped at
    /// `max_upstream_h1_connections`; shared by the pools of every proxy thread.
    pub fn new(limits: &Limits, h1_open: Arc<AtomicUsize>) -> Self {
        let h1 = Arc::new(H1Pool::new(limits, h1_open.clone()));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(limits.h2_stream_window)
            .initial_connection_window_size(limits.h2_connection_window)
            .max_header_list_size(limits.max_header_bytes as u32)
            .keep_alive_interval(limits.h2_keepalive_interval)
            .keep_alive_while_idle(false);
        Self {
            h1,
            h1_open,
            h2: h2_pool::H2Pool::new(
                h2,
                limits.upstream_connect_timeout,
                limits.upstream_idle_timeout,
                limits.max_upstream_h2_destinations,
            ),
        }
    }

    pub fn counts(&self) -> PoolCounts {
        PoolCounts {
            h1_connections: self.h1_open.load(Ordering::Relaxed),
            h2_destinations: self.h2.destinations(),
        }
    }

    /// HTTP/1.1 exchange with `dst`, on a pooled connection or a new one.
    pub async fn send_h1(
        &self,
        dst: SocketAddr,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, Failure> {
        self.h1.request(dst, req).await
    }

    /// HTTP/2 exchange on the destination's shared connection.
    pub async fn send_h2(
        &self,
        dst: SocketAddr,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, Failure> {
        let mut sender = self.h2.sender(dst).await?;
        sender
            .send_request(req)
            .await
            .map_err(|e| Failure::classify(&e, false))
    }
}

/// The upstream of one HBONE-delivered downstream connection: its own connection to the
/// original destination, opened from the original source's address with the delivery mark
/// (the first one is the connection opened before answering the CONNECT), never shared with
/// another source. HTTP/1 requests take turns on it (the downstream is sequential too);
/// HTTP/2 requests share it. A closed one is replaced on the next request.
pub struct Dedicated {
    dst: SocketAddr,
    src: Option<std::net::IpAddr>,
    mark: Option<u32>,
    connect_timeout: Duration,
    first: std::sync::Mutex<Option<TcpStream>>,
    h1: tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<RequestBody>>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<RequestBody>>>,
    h2_builder: http2::Builder<TokioExecutor>,
}

impl Dedicated {
    pub fn new(
        first: TcpStream,
        dst: SocketAddr,
        src: Option<std::net::IpAddr>,
        mark: Option<u32>,
        limits: &Limits,
    ) -> Self {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(limits.h2_stream_window)
            .initial_connection_window_size(limits.h2_connection_window)
            .max_header_list_size(limits.max_header_bytes as u32);
        Self {
            dst,
            src,
            mark,
            connect_timeout: limits.upstream_connect_timeout,
            first: std::sync::Mutex::new(Some(first)),
            h1: tokio::sync::Mutex::new(None),
            h2: tokio::sync::Mutex::new(None),
            h2_builder: h2,
        }
    }

    async fn socket(&self) -> Result<TcpStream, Failure> {
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(s) = first {
            return Ok(s);
        }
        match tokio::time::timeout(
            self.connect_timeout,
            crate::tunnel::socket::connect_from(self.src, self.dst, self.mark),
        )
        .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(Failure::classify(&e, true)),
            Err(_) => Err(Failure::CONNECT_TIMEOUT),
        }
    }

    pub async fn send_h1(&self, req: Request<RequestBody>) -> Result<Response<Incoming>, Failure> {
        let mut slot = self.h1.lock().await;
        if slot.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = self.socket().await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| Failure::classify(&e, true))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!("tunneled upstream http/1 connection: {e}");
                }
            });
            *slot = Some(sender);
        }
        let sender = slot.as_mut().ok_or(Failure::CONNECT)?;
        sender
            .ready()
            .await
            .map_err(|e| Failure::classify(&e, false))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| Failure::classify(&e, false))
    }

    pub async fn send_h2(&self, req: Request<RequestBody>) -> Result<Response<Incoming>, Failure> {
        let mut sender = {
            let mut slot = self.h2.lock().await;
            if slot.as_ref().is_none_or(|s| s.is_closed()) {
                let tcp = self.socket().await?;
                let (sender, conn) = self
                    .h2_builder
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| Failure::classify(&e, true))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("tunneled upstream h2 connection: {e}");
                    }
                });
                *slot = Some(sender);
            }
            slot.clone().ok_or(Failure::CONNECT)?
        };
        sender
            .send_request(req)
            .await
            .map_err(|e| Failure::classify(&e, false))
    }
}
