//! The admin API: JSON lines on a unix socket. Queries read the published status and the
//! kernel's maps and never wait for the writer; control requests (the splice switch) are
//! handed to the writer, which carries them out in order with configuration changes.

use std::path::Path;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use comb_datapath::ProxyFamily;

use crate::api::{
    Control, EndpointRow, MonitorLine, ProxyStatsReply, Query, Request, Response, Status,
    VerdictFilter,
};
use crate::config::AgentConfig;
use crate::flows::{self, FlowMsg};
use crate::view::View;

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

pub async fn serve(listener: UnixListener, view: View) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, view.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "admin accept failed"),
        }
    }
}

async fn connection(stream: UnixStream, view: View) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Query(Query::Monitor { pod, verdict })) => {
                monitor(&mut w, &view, pod, verdict).await;
                return;
            }
            Ok(Request::Query(q)) => {
                // Map reads are syscalls: off the async workers.
                let view = view.clone();
                tokio::task::spawn_blocking(move || query(&view, q))
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        message: format!("handler failed: {e}"),
                    })
            }
            Ok(Request::Control(Control::Handover)) => match view.handover().await {
                Ok(data) => Response::Ok { data },
                Err(message) => Response::Error { message },
            },
            Ok(Request::Control(c)) => match view.control(c).await {
                Ok(data) => Response::Ok { data },
                Err(message) => Response::Error { message },
            },
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
    view: &View,
    pod: Option<String>,
    verdict: Option<VerdictFilter>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let pod = pod.map(|p| crate::policy_rows::pod_key(&p).to_string());
    let mut rx = view.flows.subscribe();
    let node = view.cfg.node.clone();
    loop {
        let line = match rx.recv().await {
            Ok(FlowMsg::Event(ev)) => {
                let row = flows::row(&ev, &view.published().desired.flow_index, &node);
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

/// Answers a query from the published status and the kernel's maps.
pub fn query(view: &View, q: Query) -> Response {
    let published = view.published();
    let node = &view.cfg.node;
    let dp = &view.datapath;
    match q {
        Query::Status => ok(status(view)),
        Query::Services => match dp.lb().services() {
            Ok(have) => ok(crate::service_rows::rows(
                &published.desired.frontends,
                &published.desired.services,
                &have,
            )),
            Err(e) => Response::Error {
                message: format!("reading the services map: {e:#}"),
            },
        },
        Query::Endpoints => {
            let attached: std::collections::BTreeMap<String, std::path::PathBuf> =
                dp.splice().attached().into_iter().collect();
            let rows: Vec<EndpointRow> = published
                .state
                .pods
                .values()
                .filter(|p| !p.ips.is_empty())
                .map(|p| {
                    let local = p.node_name.as_deref() == Some(node.as_str());
                    let cgroup = attached
                        .get(&comb_model::pipeline::attach_id(p))
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
                        splice: local && published.splice_enabled && p.splice && cgroup.is_some(),
                        cgroup,
                        local,
                        mode: published.state.dataplane_mode(p).as_str().into(),
                        mtls: published
                            .desired
                            .mesh
                            .endpoints
                            .get(&p.key)
                            .filter(|e| e.mode == comb_model::mesh::DataplaneMode::Mesh)
                            .map(|e| {
                                let mut s = e.mtls.default.as_str().to_string();
                                for (port, m) in &e.mtls.ports {
                                    s.push_str(&format!(" {port}={}", m.as_str()));
                                }
                                s
                            }),
                    }
                })
                .collect();
            ok(rows)
        }
        Query::SpliceStats => match dp.splice().stats() {
            Ok(s) => ok(s),
            Err(e) => Response::Error {
                message: format!("reading splice stats: {e:#}"),
            },
        },
        Query::Metrics => ok(crate::metrics::render(view)),
        Query::ProxyStats => {
            let listener_registered = dp
                .policy()
                .proxy_listener_present(ProxyFamily::V4)
                .unwrap_or(false);
            let guard = view.proxy.lock().expect("proxy lock poisoned");
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
        Query::Tunnels => {
            let guard = view.proxy.lock().expect("proxy lock poisoned");
            match guard.as_ref() {
                Some(p) => {
                    let mut r = p.tunnel_stats();
                    // The proxy knows addresses; the State knows which node a pod is on.
                    for t in &mut r.tunnels {
                        t.peer_node = published
                            .state
                            .pods
                            .values()
                            .find(|pod| pod.ips.contains(&t.peer.ip()))
                            .and_then(|pod| pod.node_name.clone());
                    }
                    ok(r)
                }
                None => Response::Error {
                    message: "the node proxy is off (--proxy off)".into(),
                },
            }
        }
        Query::Identities => ok(crate::policy_rows::identities(
            &published.desired.identities,
        )),
        Query::EndpointPolicy { pod } => {
            let key = crate::policy_rows::pod_key(&pod);
            let interface = published
                .state
                .pods
                .get(&key)
                .and_then(|p| p.interface.clone());
            let desired = &published.desired;
            match crate::policy_rows::endpoint_policy(
                dp,
                &pod,
                &desired.policy,
                &desired.identities,
                &desired.flow_index,
                interface.as_deref(),
            ) {
                Ok(v) => ok(v),
                Err(message) => Response::Error { message },
            }
        }
        Query::CertList => ok(view.certs.load().rows.clone()),
        Query::Monitor { .. } => Response::Error {
            message: "monitor streams; it is served by the connection loop".into(),
        },
    }
}

/// `comb status`: the published status and the configuration, nothing else.
pub fn status(view: &View) -> Status {
    let p = view.published();
    let cfg = &view.cfg;
    let (socket_lb, lb_cgroup) = match &p.socket_lb {
        Some((cg, mode)) => (
            AgentConfig::socket_lb_mode_name(*mode),
            Some(crate::cgroup_path::display_cgroup(cg)),
        ),
        None => ("off", None),
    };
    // Off: say why (the flags, or an attach error the reconciler retries).
    let socket_lb_note = match (&cfg.socket_lb, lb_cgroup.is_some()) {
        (_, true) => None,
        (Err(why), false) => Some(why.clone()),
        (Ok(_), false) => Some("not attached: see the datapath errors".into()),
    };
    Status {
        node: cfg.node.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        uptime_secs: view.started.elapsed().as_secs(),
        manifests: cfg.source.describe(),
        pin_dir: cfg.pin_dir.display().to_string(),
        generation: p.generation,
        applied_generation: p.applied_generation,
        applied_at: p.applied_at(),
        generations: p.generations.clone(),
        splice_enabled: p.splice_enabled,
        socket_lb: socket_lb.into(),
        lb_cgroup,
        socket_lb_note,
        lb_services: p.lb_services,
        lb_skipped: p.desired.lb_skipped.clone(),
        local_endpoints: p.local_endpoints,
        config_errors: p.config_errors.clone(),
        datapath_errors: p.datapath_errors.clone(),
        policy: cfg.policy,
        identities: p.desired.identities.identities.len(),
        policy_endpoints: p.policy_endpoints,
        policy_unenforced: p.desired.policy.unenforced.clone(),
        proxy: cfg
            .proxy
            .as_ref()
            .map(|px| format!("127.0.0.1:{}", px.port)),
        certificates: view.certs.load().summary.clone(),
    }
}
