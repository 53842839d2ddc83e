//! combd's life: parse the flags once, load the datapath and the proxy, start the writer,
//! the source and the read-side servers, then run until told to stop and shut down in order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use comb_datapath::{Datapath, DatapathOptions};
use comb_host as host;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::args::{Args, LogFormat};
use crate::config::AgentConfig;
use crate::config::SourceConfig;
use crate::identity_store::IdentityStore;
use crate::node_proxy::NodeProxy;
use crate::source::Source;
use crate::source::cni_spool::SpoolConfig;
use crate::source::kubernetes::KubernetesSource;
use crate::source::manifests::ManifestsSource;
use crate::status::Published;
use crate::view::View;
use crate::writer::{Writer, WriterMsg};
use crate::{admin, flows, metrics};

/// Entry point of the `combd` binary.
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("combd failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COMB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

pub async fn run(args: Args) -> Result<()> {
    let cfg = Arc::new(AgentConfig::from_args(&args)?);
    let source: Box<dyn Source> = match &cfg.source {
        SourceConfig::Manifests(dir) => Box::new(ManifestsSource {
            dir: dir.clone(),
            poll: cfg.poll,
        }),
        SourceConfig::Kubernetes { kubeconfig } => Box::new(KubernetesSource {
            kubeconfig: kubeconfig.clone(),
            spool: SpoolConfig {
                dir: cfg.cni_spool.clone(),
                cgroup_root: match &cfg.cgroup_root {
                    Some(p) => p.clone(),
                    None => host::cgroup2_mount()?,
                },
                kubelet_root: cfg.kubelet_cgroup_root.clone(),
            },
            node: cfg.node.clone(),
        }),
    };
    run_with(cfg, source).await
}

/// Run the agent fed by `source` until SIGTERM/SIGINT.
pub async fn run_with(cfg: Arc<AgentConfig>, source: Box<dyn Source>) -> Result<()> {
    host::ensure_bpffs()?;
    // Before touching anything: a running agent stops its control plane for us.
    let predecessor = crate::handover::take_over(&cfg.admin_socket).await?;
    if let Some(pid) = predecessor {
        tracing::info!(
            pid,
            "the running agent handed over; it drains its proxied connections"
        );
    }
    let cgroup_root = match &cfg.cgroup_root {
        Some(p) => p.clone(),
        None => host::cgroup2_mount()?,
    };
    let datapath = Datapath::load(DatapathOptions {
        pin_dir: cfg.pin_dir.clone(),
        cgroup_root,
    })
    .context("loading the datapath")?;
    datapath.splice().set_enabled(cfg.splice)?;
    datapath
        .splice()
        .set_backpressure(cfg.splice_backpressure)?;
    datapath.policy().set_config(&cfg.policy_datapath)?;
    tracing::info!(node = %cfg.node, pin_dir = %cfg.pin_dir.display(), "datapath loaded");
    match &cfg.socket_lb {
        Ok((cg, mode)) => tracing::info!(
            cgroup = %crate::cgroup_path::display_cgroup(cg),
            mode = AgentConfig::socket_lb_mode_name(*mode),
            "socket LB enabled"
        ),
        Err(why) if cfg.socket_lb_flag_off => tracing::info!("socket LB off: {why}"),
        Err(why) => tracing::warn!("socket LB off: {why}"),
    }
    let datapath = Arc::new(datapath);
    let (identity_store, identities) = IdentityStore::open(&cfg.state_dir)?;
    // Workload certificates: the reconciler writes the store, the proxy reads it.
    let cert_store = comb_identity::store::new_store();
    let cert_board = crate::certs::board(cfg.certs.as_ref());
    let certs_wanted = match &cfg.certs {
        Some(c) => {
            let (tx, rx) = tokio::sync::watch::channel(Default::default());
            tracing::info!(ca = %c.ca_address, ttl_s = c.ttl.as_secs(), trust_domain = %cfg.trust_domain, "workload certificates from the CA");
            tokio::spawn(crate::certs::run(
                c.clone(),
                cert_store.clone(),
                cert_board.clone(),
                rx,
            ));
            Some(tx)
        }
        None => {
            tracing::info!("no --ca-address: no workload certificates (mesh mTLS off)");
            None
        }
    };
    let proxy = match &cfg.proxy {
        Some(px) => Some(NodeProxy::start(
            &cfg,
            px,
            &datapath,
            cert_store.clone(),
            predecessor.is_some(),
        )?),
        None => {
            tracing::info!("node proxy off: L7 policy flows fail closed");
            None
        }
    };
    let proxy = Arc::new(Mutex::new(proxy));

    let board = Arc::new(arc_swap::ArcSwap::from_pointee(Published::default()));
    let (writer_tx, writer_rx) = mpsc::channel::<WriterMsg>(16);
    let (handover_tx, handover_rx) = mpsc::channel(1);
    let writer = Writer::new(
        cfg.clone(),
        datapath.clone(),
        proxy.clone(),
        identities,
        identity_store,
        board.clone(),
        certs_wanted,
    );
    let writer_thread = std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || writer.run(writer_rx))
        .context("starting the writer")?;

    let view = View {
        cfg: cfg.clone(),
        started: Instant::now(),
        board,
        datapath: datapath.clone(),
        proxy: proxy.clone(),
        flows: tokio::sync::broadcast::channel(flows::CHANNEL_EVENTS).0,
        writer: writer_tx.clone(),
        certs: cert_board,
        handover: handover_tx,
    };
    {
        let (dp, flows_tx, w) = (datapath.clone(), view.flows.clone(), writer_tx.clone());
        std::thread::Builder::new()
            .name("flow-events".into())
            .spawn(move || flows::pump(dp, flows_tx, w))
            .context("starting the flow event thread")?;
    }
    let (gc_stop, gc_stopped) = std::sync::mpsc::channel::<()>();
    let gc_thread = {
        let (dp, every) = (datapath.clone(), cfg.ct_gc_interval);
        std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || crate::ct_gc::run(dp, every, gc_stopped))
            .context("starting the conntrack gc thread")?
    };
    let stop = serve(&cfg, view, source, writer_tx.clone(), handover_rx).await;
    drop(gc_stop);
    let _ = std::fs::remove_file(&cfg.admin_socket);

    // Whatever the writer is doing finishes first (messages are handled in order). Admin
    // connections still open hold senders, so the writer is told, not left to notice.
    let _ = writer_tx.send(WriterMsg::Stop).await;
    drop(writer_tx);
    let joined =
        tokio::task::spawn_blocking(move || (writer_thread.join(), gc_thread.join())).await;
    if !matches!(joined, Ok((Ok(()), Ok(())))) {
        tracing::error!("the writer or the conntrack gc ended abnormally");
    }
    let result = match stop {
        Ok(Stop::Handover(answer)) => {
            // The control plane is down and the admin socket and metrics address are free:
            // the successor may go on. The datapath, the routing and the pins are its now.
            let _ = answer.send(std::process::id());
            let proxy = proxy.lock().expect("proxy lock poisoned").take();
            if let Some(proxy) = proxy {
                let (dp, timeout) = (datapath.clone(), cfg.drain_timeout);
                // SIGTERM keeps draining (an orchestrator stopping the old instance after
                // the new one is up); SIGINT cuts what is left and exits now.
                let mut int = signal(SignalKind::interrupt())?;
                tokio::select! {
                    r = tokio::task::spawn_blocking(move || proxy.drain(&dp, timeout)) => {
                        r.context("draining the node proxy")?;
                        tracing::info!("handed over and drained");
                    }
                    _ = int.recv() => tracing::info!("SIGINT while draining: exiting now"),
                }
            }
            return Ok(());
        }
        Ok(Stop::Signal(_)) => Ok(()),
        Err(e) => Err(e),
    };
    let proxy = proxy.lock().expect("proxy lock poisoned").take();
    if let Some(proxy) = proxy {
        // The proxy's own runtime may only be shut down where blocking is allowed.
        let (dp, keep_pins) = (datapath.clone(), cfg.keep_pins);
        tokio::task::spawn_blocking(move || proxy.shutdown(Some(&dp), keep_pins))
            .await
            .context("stopping the node proxy")?;
        tracing::info!("node proxy stopped");
    }
    datapath
        .shutdown(cfg.keep_pins)
        .context("shutting the datapath down")?;
    if !cfg.keep_pins
        && let Some(parent) = cfg.pin_dir.parent()
    {
        // The shared parent (/sys/fs/bpf/comb) goes too once the last agent left it.
        let _ = std::fs::remove_dir(parent);
    }
    tracing::info!(keep_pins = cfg.keep_pins, "datapath shut down");
    result
}

/// Why the serve loop ended.
enum Stop {
    Signal(&'static str),
    /// A successor asked; answer with our pid once the control plane is down.
    Handover(oneshot::Sender<u32>),
}

/// The servers, the source and the resync timer feeding the writer; returns at SIGTERM/SIGINT
/// or when a successor asks for a handover (the admin and metrics listeners closed by then).
async fn serve(
    cfg: &AgentConfig,
    view: View,
    source: Box<dyn Source>,
    writer: mpsc::Sender<WriterMsg>,
    mut handover: mpsc::Receiver<oneshot::Sender<u32>>,
) -> Result<Stop> {
    let metrics_listener = metrics::bind(cfg.metrics_addr).await?;
    let admin_listener = admin::bind(&cfg.admin_socket)?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(metrics::serve(metrics_listener, view.clone()));
    tasks.spawn(admin::serve(admin_listener, view));

    let (tx, mut rx) = mpsc::channel(4);
    tracing::info!(source = %source.describe(), "configuration source");
    tasks.spawn(source.run(tx));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(Duration::from_secs(2));
    tracing::info!(admin = %cfg.admin_socket.display(), metrics = %cfg.metrics_addr, "combd ready");
    let stop = loop {
        let msg = tokio::select! {
            Some(update) = rx.recv() => WriterMsg::Source(Box::new(update)),
            _ = resync.tick() => WriterMsg::Resync,
            _ = term.recv() => break Stop::Signal("SIGTERM"),
            _ = int.recv() => break Stop::Signal("SIGINT"),
            Some(answer) = handover.recv() => break Stop::Handover(answer),
        };
        if writer.send(msg).await.is_err() {
            anyhow::bail!("the writer stopped");
        }
    };
    match &stop {
        Stop::Signal(s) => tracing::info!("{s}: shutting down"),
        Stop::Handover(_) => {
            tracing::info!("a successor asked for a handover: stopping the control plane")
        }
    }
    tasks.shutdown().await;
    Ok(stop)
}
