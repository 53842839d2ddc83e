//! The node L7 proxy's life inside combd (docs/l7.md): started with the datapath, fed a new
//! `ProxyTable` by every reconcile (an atomic swap), its listeners registered in the
//! datapath's `comb_proxy_listeners` map, the node's policy routing installed while it runs.

use std::sync::Arc;
use std::time::Duration;

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
    pub fn start(
        cfg: &AgentConfig,
        px: &ProxyConfig,
        datapath: &Datapath,
        certs: comb_identity::CertStore,
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
        opts.certs = certs;
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
        for (f, fd) in handle.listener_fds() {
            datapath
                .policy()
                .set_proxy_listener(family(f), fd)
                .with_context(|| format!("registering the proxy's {f:?} listener"))?;
        }
        for (kind, f, fd) in handle.hbone_listener_fds() {
            let kind = match kind {
                comb_proxy::ListenerKind::HboneOutbound => ListenerKind::HboneOut,
                comb_proxy::ListenerKind::HboneInbound => ListenerKind::HboneIn,
                comb_proxy::ListenerKind::L7 => ListenerKind::L7,
            };
            datapath
                .policy()
                .set_listener(kind, family(f), fd)
                .with_context(|| format!("registering the proxy's {kind:?} {f:?} listener"))?;
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

    /// Unregister the listeners (redirected flows then fail closed or keep the kernel path,
    /// by reason), let requests in flight finish, and remove the routing unless the datapath
    /// is kept for a restarting agent.
    pub fn shutdown(self, datapath: Option<&Datapath>, keep_pins: bool) {
        if let Some(dp) = datapath {
            // Every kind the proxy may have registered (L7, HBONE outbound and inbound).
            for kind in ListenerKind::ALL {
                for f in ProxyFamily::BOTH {
                    if let Err(e) = dp.policy().clear_listener(kind, f) {
                        tracing::warn!(error = %format!("{e:#}"), kind = kind.as_str(), "clearing a proxy listener");
                    }
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
