//! The admin API: JSON lines on a unix socket, read-only except for the splice switch.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use comb_datapath::{ProxyFamily, SocketLbMode};
use comb_model::lb::compile_frontends;

use crate::api::{
    EndpointRow, MonitorLine, ProxyStatsReply, Request, Response, Status, VerdictFilter,
};
use crate::flows::{self, FlowMsg};
use crate::shared::Shared;

pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a killed agent would make bind fail; nobody listens on it.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).with_context(|| format!("binding admin socket {}", path.display()))
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, shared.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "admin accept failed"),
        }
    }
}

async fn connection(stream: UnixStream, shared: Arc<Shared>) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Monitor { pod, verdict }) => {
                monitor(&mut w, &shared, pod, verdict).await;
                return;
            }
            Ok(req) => {
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || handle(&shared, req))
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        message: format!("handler failed: {e}"),
                    })
            }
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out = serde_json::to_vec(&response).expect("response serializes");
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Streams flow events to one client until it goes away.
async fn monitor(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    shared: &Arc<Shared>,
    pod: Option<String>,
    verdict: Option<VerdictFilter>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let pod = pod.map(|p| crate::policy_rows::pod_key(&p).to_string());
    let mut rx = shared.flows.subscribe();
    let node = shared.args.node.clone();
    loop {
        let line = match rx.recv().await {
            Ok(FlowMsg::Event(ev)) => {
                let row = {
                    let index = shared.flow_index.read().expect("flow index lock");
                    flows::row(&ev, &index, &node)
                };
                if !flows::wanted(&row, pod.as_deref(), verdict) {
                    continue;
                }
                MonitorLine::Flow(row)
            }
            Ok(FlowMsg::KernelLost(n)) => MonitorLine::Lost {
                kernel: n,
                agent: 0,
            },
            Err(RecvError::Lagged(n)) => MonitorLine::Lost {
                kernel: 0,
                agent: n,
            },
            Err(RecvError::Closed) => return,
        };
        let mut out = serde_json::to_vec(&ok(line)).expect("serializable");
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            return; // client gone: dropping rx unsubscribes
        }
    }
}

fn ok(v: impl serde::Serialize) -> Response {
    Response::Ok {
        data: serde_json::to_value(v).expect("serializable"),
    }
}

pub fn handle(shared: &Shared, req: Request) -> Response {
    let mut inner = shared.inner.lock().expect("agent lock poisoned");
    let node = &shared.args.node;
    match req {
        Request::Status => {
            let (socket_lb, lb_services) = match inner.datapath.as_ref() {
                Some(dp) => (
                    dp.lb().attachment(),
                    dp.lb().services().map(|s| s.len()).unwrap_or(0),
                ),
                None => (None, 0),
            };
            let (socket_lb, lb_cgroup) = match socket_lb {
                Some((cg, mode)) => (
                    match mode {
                        SocketLbMode::All => "on",
                        SocketLbMode::HostOnly => "host-only",
                    },
                    Some(crate::args::display_cgroup(&cg)),
                ),
                None => ("off", None),
            };
            // Off: say why (the flags, or an attach error the reconciler retries).
            let socket_lb_note = match (&shared.socket_lb, lb_cgroup.is_some()) {
                (_, true) => None,
                (Err(why), false) => Some(why.clone()),
                (Ok(_), false) => Some("not attached: see the datapath errors".into()),
            };
            ok(Status {
                node: node.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                uptime_secs: shared.started.elapsed().as_secs(),
                manifests: shared.args.manifests.display().to_string(),
                pin_dir: shared.args.pin_dir().display().to_string(),
                generation: inner.state.generation(),
                applied_generation: inner.applied_generation,
                splice_enabled: inner.splice_enabled,
                socket_lb: socket_lb.into(),
                lb_cgroup,
                socket_lb_note,
                lb_services,
                lb_skipped: inner.lb_skipped.clone(),
                local_endpoints: inner.state.local_pods(node).count(),
                config_errors: inner.config_errors.clone(),
                datapath_errors: inner.datapath_errors.clone(),
                policy: shared.args.policy == crate::args::OnOff::On,
                identities: inner.identity_table.identities.len(),
                policy_endpoints: inner
                    .datapath
                    .as_ref()
                    .map_or(0, |d| d.policy().attachments().len()),
                policy_unenforced: inner.policy.unenforced.clone(),
                proxy: shared
                    .proxy
                    .lock()
                    .expect("proxy lock poisoned")
                    .as_ref()
                    .map(|p| format!("127.0.0.1:{}", p.port())),
            })
        }
        Request::Services => {
            let frontends = compile_frontends(inner.state.snapshot(), node);
            let have = match inner.datapath.as_ref().map(|d| d.lb().services()) {
                Some(Ok(v)) => v,
                Some(Err(e)) => {
                    return Response::Error {
                        message: format!("reading the services map: {e:#}"),
                    };
                }
                None => Vec::new(),
            };
            ok(crate::service_rows::rows(&frontends, &have))
        }
        Request::Endpoints => {
            let attached: std::collections::BTreeMap<String, std::path::PathBuf> = inner
                .datapath
                .as_ref()
                .map(|d| d.splice().attached().into_iter().collect())
                .unwrap_or_default();
            let rows: Vec<EndpointRow> = inner
                .state
                .snapshot()
                .pods
                .values()
                .filter(|p| !p.ips.is_empty())
                .map(|p| {
                    let local = p.node_name.as_deref() == Some(node.as_str());
                    let cgroup = attached
                        .get(&crate::reconcile::attach_id(p))
                        .map(|c| c.display().to_string());
                    EndpointRow {
                        pod: p.key.name.clone(),
                        namespace: p.key.namespace.clone(),
                        ip: p
                            .ips
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        node: p.node_name.clone().unwrap_or_default(),
                        splice: local && inner.splice_enabled && p.splice && cgroup.is_some(),
                        cgroup,
                        local,
                    }
                })
                .collect();
            ok(rows)
        }
        Request::SpliceStats => match inner.datapath.as_ref().map(|d| d.splice().stats()) {
            Some(Ok(s)) => ok(s),
            Some(Err(e)) => Response::Error {
                message: format!("reading splice stats: {e:#}"),
            },
            None => Response::Error {
                message: "datapath is shut down".into(),
            },
        },
        Request::SetSplice { enabled } => match inner
            .datapath
            .as_ref()
            .map(|d| d.splice().set_enabled(enabled))
        {
            Some(Ok(())) => {
                inner.splice_enabled = enabled;
                tracing::info!(enabled, "splice switched");
                ok(enabled)
            }
            Some(Err(e)) => Response::Error {
                message: format!("switching splice: {e:#}"),
            },
            None => Response::Error {
                message: "datapath is shut down".into(),
            },
        },
        Request::Metrics => {
            drop(inner);
            ok(crate::metrics::render(shared))
        }
        Request::ProxyStats => {
            let listener_registered = inner.datapath.as_ref().is_some_and(|d| {
                d.policy()
                    .proxy_listener_present(ProxyFamily::V4)
                    .unwrap_or(false)
            });
            drop(inner);
            let guard = shared.proxy.lock().expect("proxy lock poisoned");
            let Some(p) = guard.as_ref() else {
                return Response::Error {
                    message: "the node proxy is off (--proxy off)".into(),
                };
            };
            let splice = p.splice().and_then(|s| s.stats().ok());
            ok(ProxyStatsReply {
                port: p.port(),
                listener_registered,
                routing_installed: comb_datapath::policy::routing::installed().unwrap_or(false),
                active_connections: p.active_connections(),
                spliced_sockets: splice.as_ref().map(|s| s.sockets),
                spliced_bytes: splice.as_ref().map(|s| s.redirected_bytes),
                stats: p.telemetry().stats(),
            })
        }
        Request::Identities => ok(crate::policy_rows::identities(&inner.identity_table)),
        Request::EndpointPolicy { pod } => {
            let Some(dp) = inner.datapath.as_ref() else {
                return Response::Error {
                    message: "datapath is shut down".into(),
                };
            };
            let key = crate::policy_rows::pod_key(&pod);
            let interface = inner
                .state
                .snapshot()
                .pods
                .get(&key)
                .and_then(|p| p.interface.clone());
            let index = shared.flow_index.read().expect("flow index lock");
            match crate::policy_rows::endpoint_policy(
                dp,
                &pod,
                &inner.policy,
                &inner.identity_table,
                &index,
                interface.as_deref(),
            ) {
                Ok(v) => ok(v),
                Err(message) => Response::Error { message },
            }
        }
        Request::Monitor { .. } => Response::Error {
            message: "monitor streams; it is served by the connection loop".into(),
        },
    }
}
