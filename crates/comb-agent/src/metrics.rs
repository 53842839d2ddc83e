//! Prometheus `/metrics`: the agent's own health (from the published status, never waiting
//! for the writer) and the datapath's and the proxy's counters.

use std::fmt::Write;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::status::Published;
use crate::view::View;

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics address {addr}"))
}

pub async fn serve(listener: TcpListener, view: View) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let view = view.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let view = view.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        let body = tokio::task::spawn_blocking(move || render(&view))
                            .await
                            .unwrap_or_default();
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(body)))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from("not found\n")))
                    };
                    Ok::<_, std::convert::Infallible>(resp.expect("valid response"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn metric(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    labels: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{labels} {value}"
    );
}

/// The exposition text; also served through the admin API (`comb metrics`).
pub fn render(view: &View) -> String {
    let p = view.published();
    let dp = &view.datapath;
    let node = &view.cfg.node;
    let mut o = String::new();
    metric(
        &mut o,
        "comb_agent_info",
        "gauge",
        "Agent build and node.",
        &format!(
            "{{node=\"{node}\",version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        ),
        1,
    );
    metric(
        &mut o,
        "comb_state_generation",
        "gauge",
        "Generation of the State in force.",
        "",
        p.generation,
    );
    metric(
        &mut o,
        "comb_datapath_applied_generation",
        "gauge",
        "Generation the datapath last applied completely.",
        "",
        p.applied_generation,
    );
    metric(
        &mut o,
        "comb_config_reloads_total",
        "counter",
        "Manifest changes applied.",
        "",
        p.config_reloads,
    );
    metric(
        &mut o,
        "comb_config_rejected_total",
        "counter",
        "Manifest changes rejected; the last good State stayed.",
        "",
        p.config_rejects,
    );
    metric(
        &mut o,
        "comb_config_errors",
        "gauge",
        "Errors in the newest manifests.",
        "",
        p.config_errors.len(),
    );
    metric(
        &mut o,
        "comb_datapath_errors",
        "gauge",
        "Errors of the last datapath reconcile.",
        "",
        p.datapath_errors.len(),
    );
    metric(
        &mut o,
        "comb_local_endpoints",
        "gauge",
        "Pods of this node with an address.",
        "",
        p.local_endpoints,
    );
    metric(
        &mut o,
        "comb_splice_enabled",
        "gauge",
        "Whether local pod-to-pod splice is on.",
        "",
        u8::from(p.splice_enabled),
    );
    lb_metrics(&mut o, &p, view);
    policy_metrics(&mut o, &p, view);
    if let Ok(s) = dp.splice().stats() {
        metric(
            &mut o,
            "comb_splice_sockets",
            "gauge",
            "Sockets in the splice sockhash.",
            "",
            s.sockets,
        );
        metric(
            &mut o,
            "comb_splice_redirected_bytes_total",
            "counter",
            "Bytes sent socket to socket.",
            "",
            s.redirected_bytes,
        );
        metric(
            &mut o,
            "comb_splice_redirected_messages_total",
            "counter",
            "Sends redirected socket to socket.",
            "",
            s.redirected_msgs,
        );
        metric(
            &mut o,
            "comb_splice_passed_bytes_total",
            "counter",
            "Bytes of spliceable sockets sent over TCP (peer not in the map).",
            "",
            s.passed_bytes,
        );
        metric(
            &mut o,
            "comb_splice_passed_messages_total",
            "counter",
            "Sends of spliceable sockets over TCP.",
            "",
            s.passed_msgs,
        );
        metric(
            &mut o,
            "comb_splice_sockets_added_total",
            "counter",
            "Sockets added to the sockhash.",
            "",
            s.sockets_added,
        );
        metric(
            &mut o,
            "comb_splice_add_failures_total",
            "counter",
            "Sockets that could not be added to the sockhash.",
            "",
            s.add_failures,
        );
    }
    proxy_metrics(view, &mut o);
    o
}

/// The node proxy's Istio-standard metrics and its own gauges/counters.
fn proxy_metrics(view: &View, o: &mut String) {
    let (telemetry, active, splice) = {
        let guard = view.proxy.lock().expect("proxy lock poisoned");
        let Some(p) = guard.as_ref() else { return };
        (
            p.telemetry(),
            p.active_connections(),
            p.splice().and_then(|s| s.stats().ok()),
        )
    };
    metric(
        o,
        "comb_proxy_active_connections",
        "gauge",
        "Downstream connections the node proxy serves now.",
        "",
        active,
    );
    if let Some(s) = splice {
        metric(
            o,
            "comb_proxy_spliced_sockets",
            "gauge",
            "Proxy sockets handed to the kernel (two per spliced connection).",
            "",
            s.sockets,
        );
        metric(
            o,
            "comb_proxy_spliced_bytes_total",
            "counter",
            "Bytes the kernel moved between spliced proxy sockets.",
            "",
            s.redirected_bytes,
        );
    }
    telemetry.render_prometheus(o);
}

/// Socket-LB gauges and the datapath's `comb_lb_*` counters.
/// A metric family with several samples: HELP and TYPE once.
fn family(o: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(o, "{name}{labels} {v}");
    }
}

fn policy_metrics(o: &mut String, p: &Published, view: &View) {
    metric(
        o,
        "comb_identities",
        "gauge",
        "Security identities known to this node (reserved, workloads, CIDRs).",
        "",
        p.desired.identities.identities.len(),
    );
    metric(
        o,
        "comb_ipcache_entries",
        "gauge",
        "Prefixes in the ipcache.",
        "",
        p.desired.policy.ipcache.len(),
    );
    metric(
        o,
        "comb_policy_entries",
        "gauge",
        "Entries in the policy table (all local endpoints).",
        "",
        p.desired.policy.entries.len(),
    );
    metric(
        o,
        "comb_policy_unenforced_pods",
        "gauge",
        "Local pods whose traffic policy cannot judge (see comb status).",
        "",
        p.desired.policy.unenforced.len(),
    );
    let dp = &view.datapath;
    if let Ok(lost) = dp.policy().events_lost() {
        metric(
            o,
            "comb_flow_events_lost_total",
            "counter",
            "Flow events the ring buffer had no room for.",
            "",
            lost,
        );
    }
    let Ok(rows) = dp.policy().metrics() else {
        return;
    };
    let (mut packets, mut bytes) = (Vec::new(), Vec::new());
    for m in rows {
        // Counters of an endpoint that is gone stay in the map until it is reused; they
        // no longer name a pod.
        let Some(ep) = p.desired.policy.endpoints.get(&m.endpoint) else {
            continue;
        };
        let labels = format!(
            "{{namespace=\"{}\",pod=\"{}\",direction=\"{}\",verdict=\"{}\",reason=\"{}\"}}",
            ep.pod.namespace,
            ep.pod.name,
            m.direction.name(),
            if m.reason.is_drop() {
                "dropped"
            } else {
                "forwarded"
            },
            m.reason
        );
        packets.push((labels.clone(), m.packets));
        bytes.push((labels, m.bytes));
    }
    family(
        o,
        "comb_policy_packets_total",
        "counter",
        "Packets judged by the identity policy programs, by pod, direction, verdict and reason.",
        &packets,
    );
    family(
        o,
        "comb_policy_bytes_total",
        "counter",
        "Bytes (L2 frames) judged by the identity policy programs.",
        &bytes,
    );
}

fn lb_metrics(o: &mut String, p: &Published, view: &View) {
    let dp = &view.datapath;
    metric(
        o,
        "comb_socket_lb_attached",
        "gauge",
        "Whether the socket-LB programs are attached.",
        "",
        u8::from(p.socket_lb.is_some()),
    );
    metric(
        o,
        "comb_lb_frontends_skipped",
        "gauge",
        "Service frontends that cannot be programmed (e.g. SCTP).",
        "",
        p.desired.lb_skipped.len(),
    );
    metric(
        o,
        "comb_lb_services",
        "gauge",
        "Service frontends (VIP:port/protocol) in the socket-LB maps.",
        "",
        p.lb_services,
    );
    let Ok(s) = dp.lb().stats() else {
        return;
    };
    for (name, help, value) in [
        (
            "comb_lb_connects_translated_total",
            "connect() calls to a VIP rewritten to a backend.",
            s.connects_translated,
        ),
        (
            "comb_lb_sendmsgs_translated_total",
            "Unconnected UDP sends to a VIP rewritten to a backend.",
            s.sendmsgs_translated,
        ),
        (
            "comb_lb_replies_reversed_total",
            "UDP replies whose source was rewritten back to the VIP.",
            s.replies_reversed,
        ),
        (
            "comb_lb_refused_no_backend_total",
            "Connects and sends to a VIP refused because it has no backend.",
            s.refused_no_backend,
        ),
        (
            "comb_lb_affinity_hits_total",
            "Backend choices made by ClientIP session affinity.",
            s.affinity_hits,
        ),
        (
            "comb_lb_version_retries_total",
            "Lookups that met a backend set retired by an update and read the Service again.",
            s.version_retries,
        ),
        (
            "comb_lb_revnat_failures_total",
            "UDP reverse-translation entries that could not be written.",
            s.revnat_failures,
        ),
    ] {
        metric(o, name, "counter", help, "", value);
    }
}
