//! combd's life: load the datapath, then apply manifest snapshots until told to stop.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use comb_datapath::{Datapath, DatapathOptions};
use comb_model::State;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::args::{Args, LogFormat, OnOff, SocketLb};
use crate::identity_store::IdentityStore;
use crate::node_proxy::NodeProxy;
use crate::shared::{Inner, Shared};
use crate::source::{self, SourceUpdate};
use crate::{admin, flows, metrics, reconcile};
use comb_datapath::policy::PolicyConfig;
use comb_model::l7::compile_proxy_table;
use comb_model::policy_compile::{
    KIND_AUTHORIZATION_POLICY, KIND_NETWORK_POLICY, policy_cidrs, policy_id,
};

fn secs(v: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} {v}: must be a positive number of seconds"))
}

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
    comb_host::ensure_bpffs()?;
    let cgroup_root = match &args.cgroup_root {
        Some(p) => p.clone(),
        None => comb_host::cgroup2_mount()?,
    };
    let datapath = Datapath::load(DatapathOptions {
        pin_dir: args.pin_dir(),
        cgroup_root,
    })
    .context("loading the datapath")?;
    let splice_enabled = args.splice == OnOff::On;
    datapath.splice().set_enabled(splice_enabled)?;
    tracing::info!(node = %args.node, pin_dir = %args.pin_dir().display(), "datapath loaded");

    let socket_lb = args.socket_lb_plan();
    match &socket_lb {
        Ok((cg, mode)) => {
            tracing::info!(cgroup = %crate::args::display_cgroup(cg), mode = mode.as_str(), "socket LB enabled")
        }
        Err(why) if args.socket_lb == SocketLb::Off => tracing::info!("socket LB off: {why}"),
        Err(why) => tracing::warn!("socket LB off: {why}"),
    }

    let policy_cfg = PolicyConfig {
        events: false,
        ct_tcp: secs(args.ct_tcp_timeout, "--ct-tcp-timeout")?,
        ct_close: secs(args.ct_close_timeout, "--ct-close-timeout")?,
        ct_other: secs(args.ct_other_timeout, "--ct-other-timeout")?,
    };
    datapath.policy().set_config(&policy_cfg)?;
    let (identity_store, identities) = IdentityStore::open(&args.state_dir())?;
    let proxy = if args.proxy == OnOff::On {
        Some(NodeProxy::start(&args, &datapath)?)
    } else {
        tracing::info!("node proxy off: L7 policy flows fail closed");
        None
    };

    let admin_path = args.admin_socket();
    let shared = Arc::new(Shared {
        args: args.clone(),
        started: Instant::now(),
        socket_lb,
        inner: Mutex::new(Inner {
            state: State::new(),
            datapath: Some(datapath),
            applied_generation: 0,
            splice_enabled,
            config_errors: Vec::new(),
            datapath_errors: Vec::new(),
            lb_skipped: Vec::new(),
            reconciled_once: false,
            config_reloads: 0,
            config_rejects: 0,
            identities,
            identity_store,
            identity_table: Default::default(),
            policy: Default::default(),
        }),
        flows: tokio::sync::broadcast::channel(flows::CHANNEL_EVENTS).0,
        flow_index: Default::default(),
        proxy: Mutex::new(proxy),
    });
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("flow-events".into())
            .spawn(move || flows::pump(shared))
            .context("starting the flow event thread")?;
    }
    let result = serve(&shared).await;
    let _ = std::fs::remove_file(&admin_path);
    let proxy = shared.proxy.lock().expect("proxy lock poisoned").take();
    if let Some(proxy) = proxy {
        // The proxy's own runtime may only be shut down where blocking is allowed.
        let shared = shared.clone();
        let keep_pins = args.keep_pins;
        tokio::task::spawn_blocking(move || {
            let inner = shared.inner.lock().expect("agent lock poisoned");
            proxy.shutdown(inner.datapath.as_ref(), keep_pins);
        })
        .await
        .context("stopping the node proxy")?;
        tracing::info!("node proxy stopped");
    }
    let dp = shared
        .inner
        .lock()
        .expect("agent lock poisoned")
        .datapath
        .take();
    if let Some(dp) = dp {
        dp.shutdown(args.keep_pins)
            .context("shutting the datapath down")?;
        if !args.keep_pins
            && let Some(parent) = args.pin_dir().parent()
        {
            // The shared parent (/sys/fs/bpf/comb) goes too once the last agent left it.
            let _ = std::fs::remove_dir(parent);
        }
        tracing::info!(keep_pins = args.keep_pins, "datapath shut down");
    }
    result
}

async fn serve(shared: &Arc<Shared>) -> Result<()> {
    let args = &shared.args;
    let metrics_listener = metrics::bind(args.metrics_addr).await?;
    let admin_listener = admin::bind(&args.admin_socket())?;
    tokio::spawn(metrics::serve(metrics_listener, shared.clone()));
    tokio::spawn(admin::serve(admin_listener, shared.clone()));

    let (tx, mut rx) = mpsc::channel::<SourceUpdate>(4);
    tokio::spawn(source::watch(
        args.manifests.clone(),
        Duration::from_millis(args.poll_ms),
        tx,
    ));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(Duration::from_secs(2));
    let mut ct_gc = tokio::time::interval(secs(args.ct_gc_interval, "--ct-gc-interval")?);
    tracing::info!(admin = %args.admin_socket().display(), metrics = %args.metrics_addr, "combd ready");
    loop {
        tokio::select! {
            Some(update) = rx.recv() => {
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || apply_update(&shared, update)).await?;
            }
            _ = resync.tick() => {
                // Retry a reconcile that met errors (e.g. a pod cgroup that appeared late).
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || {
                    let mut inner = shared.inner.lock().expect("agent lock poisoned");
                    if !inner.datapath_errors.is_empty() {
                        reconcile_now(&shared, &mut inner);
                    }
                }).await?;
            }
            _ = ct_gc.tick() => {
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || {
                    let inner = shared.inner.lock().expect("agent lock poisoned");
                    if let Some(dp) = inner.datapath.as_ref() {
                        match dp.policy().ct_gc() {
                            Ok(n) if n > 0 => tracing::debug!(removed = n, "conntrack gc"),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %format!("{e:#}"), "conntrack gc"),
                        }
                    }
                }).await?;
            }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(()); }
        }
    }
}

fn apply_update(shared: &Shared, update: SourceUpdate) {
    let mut inner = shared.inner.lock().expect("agent lock poisoned");
    match update {
        Ok(snapshot) => {
            inner.config_errors.clear();
            let changed = inner.state.replace(snapshot);
            if changed {
                inner.config_reloads += 1;
                tracing::info!(generation = inner.state.generation(), "manifests applied");
            }
            if changed || !inner.reconciled_once {
                reconcile_now(shared, &mut inner);
            }
        }
        Err(errors) => {
            inner.config_rejects += 1;
            inner.config_errors = errors.0.iter().map(|e| e.to_string()).collect();
            for e in &inner.config_errors {
                tracing::error!(error = %e, generation = inner.state.generation(), "manifests rejected; keeping the last good State");
            }
        }
    }
}

fn reconcile_now(shared: &Shared, inner: &mut Inner) {
    let node = &shared.args.node;
    let snapshot = inner.state.snapshot();
    let table = inner
        .identities
        .resolve(snapshot, node, &policy_cidrs(snapshot));
    // Numbers are saved before any map holds them, so a crash cannot orphan them.
    let mut store_error = None;
    if let Err(e) = inner.identity_store.save(&inner.identities) {
        store_error = Some(format!("saving identities: {e:#}"));
    }
    let policy = if shared.args.policy == OnOff::On {
        reconcile::policy::desired(&inner.state, node, &table, &ifindex)
    } else {
        Default::default()
    };
    if policy.unenforced != inner.policy.unenforced {
        for s in &policy.unenforced {
            tracing::warn!(pod = %s, "policy not enforced");
        }
    }
    *shared.flow_index.write().expect("flow index lock") = flow_index(inner, &policy);
    if let Some(proxy) = shared.proxy.lock().expect("proxy lock poisoned").as_ref() {
        proxy.update(compile_proxy_table(
            snapshot,
            inner.state.generation(),
            &table,
            node,
        ));
    }
    inner.identity_table = table;
    inner.policy = policy;
    let mut want = reconcile::desired(
        &inner.state,
        &shared.args.node,
        shared.socket_lb.as_ref().ok(),
    );
    want.policy = inner.policy.clone();
    if want.lb_skipped != inner.lb_skipped {
        for s in &want.lb_skipped {
            tracing::warn!(frontend = %s, "service frontend not programmed");
        }
    }
    inner.lb_skipped = want.lb_skipped.clone();
    inner.reconciled_once = true;
    let generation = inner.state.generation();
    let Some(dp) = inner.datapath.as_mut() else {
        return;
    };
    let mut errors = reconcile::apply(dp, &want);
    errors.extend(store_error);
    for e in &errors {
        tracing::warn!(error = %e, generation, "datapath reconcile");
    }
    if errors.is_empty() {
        inner.applied_generation = generation;
    }
    inner.datapath_errors = errors;
}

/// The index of the agent's network namespace's interface `name`.
fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

fn flow_index(inner: &Inner, policy: &reconcile::policy::DesiredPolicy) -> flows::FlowIndex {
    let snap = inner.state.snapshot();
    let mut index = flows::FlowIndex::default();
    for p in snap.pods.values() {
        for ip in &p.ips {
            index.pod_by_ip.insert(*ip, p.key.to_string());
        }
    }
    for (ifindex, ep) in &policy.endpoints {
        index.pod_by_ifindex.insert(*ifindex, ep.pod.to_string());
    }
    for key in snap.network_policies.keys() {
        index.policy_names.insert(
            policy_id(KIND_NETWORK_POLICY, key),
            format!("{KIND_NETWORK_POLICY} {key}"),
        );
    }
    for key in snap.authorization_policies.keys() {
        index.policy_names.insert(
            policy_id(KIND_AUTHORIZATION_POLICY, key),
            format!("{KIND_AUTHORIZATION_POLICY} {key}"),
        );
    }
    index
}
