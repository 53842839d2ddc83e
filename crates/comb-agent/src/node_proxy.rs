//! The node L7 proxy's life inside combd (docs/l7.md): started with the datapath, fed a new
//! `ProxyTable` by every reconcile (an atomic swap), its listeners registered in the
//! datapath's `comb_proxy_listeners` map, the node's policy routing installed while it runs.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use comb_datapath::policy::routing as proxy_routing;
use comb_datapath::{Datapath, ListenerKind, ProxyFamily, ProxySplice};
use comb_model::l7::ProxyTable;
use comb_proxy::telemetry::{AccessLogTarget, Telemetry, TelemetryOptions};
use comb_proxy::{Family, HboneOptions, Limits, Proxy, ProxyHandle, ProxyOptions};

use crate::config::{AgentConfig, ProxyConfig};

pub struct NodeProxy {
    handle: ProxyHandle,
    splice: Option<Arc<ProxySplice>>,
    port: u16,
    /// The listeners this proxy put into the datapath's slots, with their socket cookies: a
    /// slot holding another cookie was taken over by a successor (docs/upgrades.md).
    registered: Arc<Mutex<Vec<Registered>>>,
}

#[derive(Clone, Copy, Debug)]
struct Registered {
    kind: comb_proxy::ListenerKind,
    family: Family,
    cookie: u64,
}

/// How long a draining proxy keeps accepting on a listener after its successor took the
/// slot: SYNs the datapath handed over just before the switch wait in its accept queue.
const ACCEPT_GRACE: Duration = Duration::from_secs(1);
/// How long a successor waits for its first table (and workload certificates) before it
/// takes the listeners over anyway (its predecessor serves meanwhile).
const TAKEOVER_WAIT: Duration = Duration::from_secs(20);

fn dp_kind(k: comb_proxy::ListenerKind) -> ListenerKind {
    match k {
        comb_proxy::ListenerKind::HboneOutbound => ListenerKind::HboneOut,
        comb_proxy::ListenerKind::HboneInbound => ListenerKind::HboneIn,
        comb_proxy::ListenerKind::L7 => ListenerKind::L7,
    }
}

/// Put a listener into its datapath slot (replacing a predecessor's) and remember its cookie.
fn register(
    datapath: &Datapath,
    registered: &Mutex<Vec<Registered>>,
    kind: comb_proxy::ListenerKind,
    f: Family,
    fd: BorrowedFd<'_>,
) -> Result<()> {
    let cookie = comb_datapath::socket_cookie(fd)
        .with_context(|| format!("SO_COOKIE of the proxy's {kind:?} {f:?} listener"))?;
    datapath
        .policy()
        .set_listener(dp_kind(kind), family(f), fd)
        .with_context(|| format!("registering the proxy's {kind:?} {f:?} listener"))?;
    registered
        .lock()
        .expect("registered listeners lock poisoned")
        .push(Registered {
            kind,
            family: f,
            cookie,
        });
    Ok(())
}

fn access_log_target(spec: &str) -> AccessLogTarget {
    match spec {
        "stdout" | "-" => AccessLogTarget::Stdout,
        "stderr" => AccessLogTarget::Stderr,
        path => AccessLogTarget::File(path.into()),
    }
}

fn family(f: Family) -> ProxyFamily {
    match f {
        Family::V4 => ProxyFamily::V4,
        Family::V6 => ProxyFamily::V6,
    }
}

impl NodeProxy {
    /// Start the proxy (empty table until the first reconcile), register its listeners with
    /// the datapath and install the policy routing of the agent's network namespace.
    /// `certs`: the workload certificates the certificate reconciler keeps (HBONE's mTLS).
    /// `successor`: a predecessor handed over and still serves; the listeners then take the
    /// datapath's slots over only once the first table (and, for HBONE, the workload
    /// certificates) are here, or after TAKEOVER_WAIT.
    pub fn start(
        cfg: &AgentConfig,
        px: &ProxyConfig,
        datapath: &Arc<Datapath>,
        certs: comb_identity::CertStore,
        successor: bool,
    ) -> Result<Self> {
        let telemetry = Telemetry::new(TelemetryOptions {
            access_log: px.access_log.as_deref().map(access_log_target),
            otlp_endpoint: px.otlp_endpoint.clone(),
            node: cfg.node.clone(),
            service_name: "comb-proxy".into(),
            max_stats_routes: 100,
        });
        telemetry.start_exporter(&tokio::runtime::Handle::current());
        let splice = if px.splice {
            match ProxySplice::open(&cfg.pin_dir) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "proxy splice unavailable; relaying in userspace");
                    None
                }
            }
        } else {
            None
        };
        let mut opts = ProxyOptions::new(telemetry);
        opts.port = px.port;
        opts.workers = px.workers;
        opts.busy_poll = px.busy_poll;
        opts.splice = splice.clone();
        opts.detect_timeout = px.detect_timeout;
        opts.limits = Limits {
            max_header_bytes: px.max_header_bytes,
            max_body_bytes: px.max_body_bytes,
            header_read_timeout: px.header_timeout,
            upstream_connect_timeout: px.connect_timeout,
            downstream_idle_timeout: px.idle_timeout,
            upstream_idle_timeout: px.upstream_idle_timeout,
            tcp_idle_timeout: px.tcp_idle_timeout,
            max_connections: px.max_connections,
            ..Limits::default()
        };
        opts.certs = certs.clone();
        if let Some((outbound_port, inbound_port)) = px.hbone {
            opts.hbone = HboneOptions {
                enabled: true,
                outbound_port,
                inbound_addr: std::net::SocketAddr::from(([0, 0, 0, 0], inbound_port)),
                cluster_name: "Kubernetes".into(),
                ..HboneOptions::default()
            };
        }
        let handle = Proxy::start(opts, Arc::new(ProxyTable::default()))
            .context("starting the node proxy")?;
        // Before the listeners are registered: the programs mark a flow for the proxy only
        // while its listener is in the map, and this program hands its SYN over.
        datapath
            .policy()
            .attach_proxy_lookup()
            .context("attaching the proxy lookup program")?;
        // Queued connections of a closing listener move to its reuseport sibling (the
        // successor's) instead of being reset: this namespace's setting.
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1") {
            tracing::warn!(error = %e, "net.ipv4.tcp_migrate_req=1 not set");
        }
        let registered = Arc::new(Mutex::new(Vec::new()));
        let mut fds: Vec<(comb_proxy::ListenerKind, Family, OwnedFd)> = Vec::new();
        for (f, fd) in handle.listener_fds() {
            fds.push((comb_proxy::ListenerKind::L7, f, fd.try_clone_to_owned()?));
        }
        for (k, f, fd) in handle.hbone_listener_fds() {
            fds.push((k, f, fd.try_clone_to_owned()?));
        }
        if successor {
            // The predecessor serves until this proxy can: a table from the first reconcile
            // and, for HBONE, the workload certificates.
            let needs_certs = fds
                .iter()
                .any(|(k, _, _)| *k != comb_proxy::ListenerKind::L7);
            let (dp, reg, ctx) = (
                datapath.clone(),
                registered.clone(),
                handle.context().clone(),
            );
            std::thread::Builder::new()
                .name("proxy-takeover".into())
                .spawn(move || {
                    wait_until_ready(&ctx, needs_certs.then_some(&certs));
                    for (k, f, fd) in fds {
                        if let Err(e) = register(&dp, &reg, k, f, fd.as_fd()) {
                            tracing::warn!(error = %format!("{e:#}"), "taking a proxy listener over");
                        }
                    }
                    tracing::info!("proxy listeners taken over");
                })
                .context("starting the proxy takeover thread")?;
        } else {
            for (k, f, fd) in fds {
                register(datapath, &registered, k, f, fd.as_fd())?;
            }
        }
        proxy_routing::install().context("installing the proxy's policy routing")?;
        tracing::info!(
            port = px.port,
            splice = splice.is_some(),
            hbone = ?px.hbone,
            "node proxy listening"
        );
        Ok(Self {
            handle,
            splice,
            port: px.port,
            registered,
        })
    }

    pub fn update(&self, table: Arc<ProxyTable>) {
        self.handle.update(table);
    }

    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.handle.telemetry().clone()
    }

    pub fn tunnel_stats(&self) -> comb_api::tunnel::TunnelsReply {
        self.handle.tunnel_stats()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn active_connections(&self) -> usize {
        self.handle.active_connections()
    }

    pub fn splice(&self) -> Option<&Arc<ProxySplice>> {
        self.splice.as_ref()
    }

    fn registered(&self) -> Vec<Registered> {
        self.registered
            .lock()
            .expect("registered listeners lock poisoned")
            .clone()
    }

    /// After a handover (docs/upgrades.md): keep serving while the successor takes each
    /// datapath slot over, close each listener ACCEPT_GRACE after its slot changed hands,
    /// then let every connection finish (HTTP/1 closes at its next response, HTTP/2 gets
    /// GOAWAY, streams and tunnels run to their end) until `timeout`; what is still open
    /// then is cut. Leaves the datapath, the routing and the splice pins to the successor.
    /// Blocks.
    pub fn drain(mut self, datapath: &Datapath, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut replaced: HashMap<(comb_proxy::ListenerKind, Family), Instant> = HashMap::new();
        loop {
            let open = self.handle.open_listeners();
            if open.is_empty() || Instant::now() >= deadline {
                break;
            }
            for r in self.registered() {
                if !open.contains(&(r.kind, r.family)) {
                    continue;
                }
                let now_cookie = datapath
                    .policy()
                    .listener_cookie(dp_kind(r.kind), family(r.family));
                if matches!(now_cookie, Ok(Some(c)) if c != r.cookie) {
                    let since = *replaced.entry((r.kind, r.family)).or_insert_with(|| {
                        tracing::info!(kind = ?r.kind, family = ?r.family, "the successor took a listener over");
                        Instant::now()
                    });
                    if since.elapsed() >= ACCEPT_GRACE {
                        self.handle.close_listener(r.kind, r.family);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let active = self.handle.active_connections();
        tracing::info!(active, "draining: listeners closed, finishing connections");
        let cut = self
            .handle
            .shutdown(deadline.saturating_duration_since(Instant::now()));
        if cut > 0 {
            tracing::warn!(cut, "drain timeout: connections still open were cut");
        } else {
            tracing::info!("drained: every connection finished");
        }
        // The splice's pins belong to the successor now.
        if let Some(s) = self.splice.take()
            && let Ok(s) = Arc::try_unwrap(s)
            && let Err(e) = s.shutdown(true)
        {
            tracing::warn!(error = %format!("{e:#}"), "proxy splice shutdown");
        }
    }

    /// Unregister the listeners (redirected flows then fail closed or keep the kernel path,
    /// by reason), let requests in flight finish, and remove the routing unless the datapath
    /// is kept for a restarting agent.
    pub fn shutdown(self, datapath: Option<&Datapath>, keep_pins: bool) {
        if let Some(dp) = datapath {
            // Only the slots still holding this proxy's listeners.
            for r in self.registered() {
                if let Err(e) =
                    dp.policy()
                        .clear_listener_if(dp_kind(r.kind), family(r.family), r.cookie)
                {
                    tracing::warn!(error = %format!("{e:#}"), kind = ?r.kind, "clearing a proxy listener");
                }
            }
        }
        self.handle.shutdown(Duration::from_secs(2));
        if !keep_pins && let Err(e) = proxy_routing::remove() {
            tracing::warn!(error = %format!("{e:#}"), "removing the proxy's policy routing");
        }
        if let Some(s) = self.splice {
            // The proxy (and with it every clone) is gone by now.
            match Arc::try_unwrap(s) {
                Ok(s) => {
                    if let Err(e) = s.shutdown(keep_pins) {
                        tracing::warn!(error = %format!("{e:#}"), "proxy splice shutdown");
                    }
                }
                Err(_) => {
                    tracing::warn!("proxy splice still referenced at shutdown; its pins stay")
                }
            }
        }
    }
}

/// Until the proxy has a table from the first reconcile and, with `certs`, every local mesh
/// pod of it has its workload certificate; at most TAKEOVER_WAIT.
fn wait_until_ready(ctx: &comb_proxy::ProxyContext, certs: Option<&comb_identity::CertStore>) {
    let t0 = Instant::now();
    while t0.elapsed() < TAKEOVER_WAIT {
        let table = ctx.table();
        let certified = || {
            let Some(certs) = certs else { return true };
            let set = certs.load();
            table
                .mesh_endpoints
                .values()
                .filter(|m| m.mode == comb_model::mesh::DataplaneMode::Mesh)
                .all(|m| set.get(&m.identity).is_some())
        };
        if table.generation > 0 && certified() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(
        "no table or workload certificates after {TAKEOVER_WAIT:?}; taking the proxy listeners over anyway"
    );
}
