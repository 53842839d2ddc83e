//! The running proxy: its threads (crate::shards), the listeners and their accept loops.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use comb_model::l7::ProxyTable;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::context::ProxyContext;
use crate::listener::{self, Family};
use crate::options::ProxyOptions;
use crate::shards::Shards;
use crate::telemetry::Telemetry;
use crate::tunnel::ListenerKind;

pub struct Proxy;

impl Proxy {
    /// Starts the threads (`workers`, one runtime each) and binds 127.0.0.1:port and, if the
    /// host has IPv6, [::1]:port (the same port; with port 0 IPv6 takes the one IPv4 got).
    pub fn start(opts: ProxyOptions, table: Arc<ProxyTable>) -> Result<ProxyHandle> {
        let shards = Arc::new(Shards::start(opts.workers, opts.busy_poll)?);
        let v4 = listener::bind(Family::V4, opts.port, opts.transparent)
            .with_context(|| format!("proxy listener 127.0.0.1:{}", opts.port))?;
        let port = v4.local_addr()?.port();
        let mut std_listeners = vec![(Family::V4, v4)];
        match listener::bind(Family::V6, port, opts.transparent) {
            Ok(l) => std_listeners.push((Family::V6, l)),
            Err(e) if listener::ipv6_unavailable(&e) => {
                tracing::info!("proxy: no IPv6 listener ({e})");
            }
            Err(e) => return Err(e).with_context(|| format!("proxy listener [::1]:{port}")),
        }
        let mut std_listeners: Vec<_> = std_listeners
            .into_iter()
            .map(|(f, l)| (ListenerKind::L7, f, l))
            .collect();
        if opts.hbone.enabled {
            std_listeners.extend(hbone_listeners(&opts)?);
        }
        // Listeners, accept loops and shared background tasks live on the first thread.
        let _enter = shards.first().enter();
        let ctx = ProxyContext::new(&opts, table);
        let conns = Arc::new(Semaphore::new(opts.limits.max_connections));
        let active = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = watch::channel(false);
        let mut listeners = Vec::new();
        for (kind, family, l) in std_listeners {
            let l = Arc::new(TcpListener::from_std(l)?);
            let (close, closed) = watch::channel(false);
            shards.first().spawn(accept_loop(
                kind,
                l.clone(),
                ctx.clone(),
                shards.clone(),
                conns.clone(),
                active.clone(),
                [stopped.clone(), closed],
            ));
            listeners.push(Listening {
                kind,
                family,
                listener: l,
                close,
            });
        }
        drop(_enter);
        Ok(ProxyHandle {
            shards,
            ctx,
            listeners,
            active,
            stop,
        })
    }
}

/// The HBONE listeners: outbound on loopback (transparent: the datapath assigns flows to
/// it), inbound on `inbound_addr` (transparent so pod addresses' SYNs can be assigned too).
fn hbone_listeners(
    opts: &ProxyOptions,
) -> Result<Vec<(ListenerKind, Family, std::net::TcpListener)>> {
    let h = &opts.hbone;
    let mut out = Vec::new();
    let v4 = listener::bind(Family::V4, h.outbound_port, opts.transparent)
        .with_context(|| format!("hbone outbound listener 127.0.0.1:{}", h.outbound_port))?;
    let port = v4.local_addr()?.port();
    out.push((ListenerKind::HboneOutbound, Family::V4, v4));
    match listener::bind(Family::V6, port, opts.transparent) {
        Ok(l) => out.push((ListenerKind::HboneOutbound, Family::V6, l)),
        Err(e) if listener::ipv6_unavailable(&e) => {}
        Err(e) => return Err(e).with_context(|| format!("hbone outbound listener [::1]:{port}")),
    }
    let family = if h.inbound_addr.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    let inbound = listener::bind_addr(h.inbound_addr, opts.transparent)
        .with_context(|| format!("hbone inbound listener {}", h.inbound_addr))?;
    out.push((ListenerKind::HboneInbound, family, inbound));
    Ok(out)
}

/// One listener and the switch that stops its accept loop alone (an upgrade hands the
/// listeners over one by one).
struct Listening {
    kind: ListenerKind,
    family: Family,
    listener: Arc<TcpListener>,
    close: watch::Sender<bool>,
}

pub struct ProxyHandle {
    shards: Arc<Shards>,
    ctx: Arc<ProxyContext>,
    listeners: Vec<Listening>,
    /// Connections being served.
    active: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
}

impl ProxyHandle {
    /// The L7 redirect listeners, for the datapath's `comb_proxy_listeners` SOCKMAP.
    pub fn listener_fds(&self) -> Vec<(Family, BorrowedFd<'_>)> {
        self.listeners
            .iter()
            .filter(|l| l.kind == ListenerKind::L7)
            .map(|l| (l.family, l.listener.as_fd()))
            .collect()
    }

    /// The HBONE listeners (outbound 15001 on loopback, inbound 15008) with their kind, for
    /// the datapath's listener map; empty with HBONE off.
    pub fn hbone_listener_fds(&self) -> Vec<(ListenerKind, Family, BorrowedFd<'_>)> {
        self.listeners
            .iter()
            .filter(|l| l.kind != ListenerKind::L7)
            .map(|l| (l.kind, l.family, l.listener.as_fd()))
            .collect()
    }

    /// The L7 listeners' addresses.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(ListenerKind::L7)
    }

    /// The addresses of the listeners of one kind.
    pub fn addrs(&self, kind: ListenerKind) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|l| l.kind == kind)
            .filter_map(|l| l.listener.local_addr().ok())
            .collect()
    }

    /// `comb tunnel list`'s answer (`enabled: false` with HBONE off).
    pub fn tunnel_stats(&self) -> comb_api::tunnel::TunnelsReply {
        self.ctx.hbone().map(|h| h.stats()).unwrap_or_default()
    }

    /// HBONE state (tunnel pool and its counters) when HBONE is on.
    pub fn hbone(&self) -> Option<&Arc<crate::tunnel::Hbone>> {
        self.ctx.hbone()
    }

    /// Swaps the table atomically; requests in flight keep the one they started with.
    pub fn update(&self, table: Arc<ProxyTable>) {
        self.ctx.update(table);
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        self.ctx.telemetry()
    }

    pub fn context(&self) -> &Arc<ProxyContext> {
        &self.ctx
    }

    /// Connections being served now: accepted ones, and upgraded tunnels (which outlive the
    /// HTTP connection they were accepted as).
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed) + self.ctx.upgraded_tunnels()
    }

    /// Stop accepting on one listener (its successor took its datapath slot over): its accept
    /// loop ends and the socket closes. Connections already accepted are served on.
    pub fn close_listener(&mut self, kind: ListenerKind, family: Family) {
        self.listeners.retain(|l| {
            let this = l.kind == kind && l.family == family;
            if this {
                l.close.send_replace(true);
            }
            !this
        });
    }

    /// Listeners still accepting.
    pub fn open_listeners(&self) -> Vec<(ListenerKind, Family)> {
        self.listeners.iter().map(|l| (l.kind, l.family)).collect()
    }

    /// Stops accepting, lets HTTP connections finish their requests (up to `grace`), then
    /// drops whatever is left (opaque relays included) with the runtime. Blocks: call it from
    /// a thread where blocking is allowed (not from inside another tokio runtime's tasks).
    /// Returns the connections still open when `grace` ran out (cut).
    pub fn shutdown(mut self, grace: Duration) -> usize {
        self.stop.send_replace(true);
        self.ctx.stop();
        self.listeners.clear();
        let deadline = Instant::now() + grace;
        while self.active_connections() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let cut = self.active_connections();
        self.shards.shutdown();
        cut
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        // The accept loops hold the shards too: stop the threads now, without waiting.
        self.shards.stop();
    }
}

async fn accept_loop(
    kind: ListenerKind,
    listener: Arc<TcpListener>,
    ctx: Arc<ProxyContext>,
    shards: Arc<Shards>,
    conns: Arc<Semaphore>,
    active: Arc<AtomicUsize>,
    [mut stop, mut close]: [watch::Receiver<bool>; 2],
) {
    let own = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
            _ = close.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning on the ready listener.
                tracing::warn!("proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Transparent: the original destination; plain: the listener's own address.
        let dst = match stream.local_addr() {
            // Inbound HBONE is addressed to the listener: its address picks the certificate.
            Ok(a) if kind == ListenerKind::HboneInbound => a,
            Ok(a) if Some(a) != own => a,
            // A client that dialled the proxy port itself: forwarding would loop back here.
            _ => continue,
        };
        // At the connection limit, stop accepting: this one waits for a place, the backlog
        // holds the rest. (Taking the place before `accept` would let every idle accept loop
        // hold one: the cap would shrink by one per listener.)
        let permit = tokio::select! {
            p = conns.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let ctx = ctx.clone();
        let active = active.clone();
        active.fetch_add(1, Ordering::Relaxed);
        shards.dispatch(stream, move |stream| async move {
            match kind {
                ListenerKind::L7 => crate::serve_connection(stream, peer, dst, ctx).await,
                ListenerKind::HboneOutbound => crate::serve_outbound(stream, peer, dst, ctx).await,
                ListenerKind::HboneInbound => crate::serve_inbound(stream, peer, dst, ctx).await,
            }
            active.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}
