//! The lab every bench scenario runs in: its nodes, their agents, the scenario's pods.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use comb_api::{Query, Status};
use comb_lab::{AgentOptions, Lab, LabOptions};

use comb_api::client;

/// Bring up a lab named `<prefix><random>` whose agent gets `agent_args`, with the manifest
/// `pods` as `file`, and wait until its agent applied it and attached to `attached` pods.
pub fn up(
    prefix: &str,
    agent_args: &[&str],
    file: &str,
    pods: String,
    attached: usize,
) -> Result<Lab> {
    up_nodes(prefix, agent_args, file, pods, &[("node1", attached)])
}

/// [`up`] for several nodes: wait until each `(node, attached)` agent is ready.
pub fn up_nodes(
    prefix: &str,
    agent_args: &[&str],
    file: &str,
    pods: String,
    attached: &[(&str, usize)],
) -> Result<Lab> {
    let name = format!("{prefix}{:04x}", rand::random::<u16>());
    let combd = comb_lab::combd_path()?;
    let lab = Lab::up(
        LabOptions {
            name,
            agent: Some(AgentOptions {
                combd,
                extra_args: agent_args.iter().map(|a| a.to_string()).collect(),
            }),
        },
        &[(PathBuf::from(file), pods)],
    )?;
    for (node, n) in attached {
        wait_attached(&lab.agent_socket(node), *n)?;
    }
    Ok(lab)
}

/// Wait until the agent applied State and attached to `pods` pod cgroups.
fn wait_attached(socket: &std::path::Path, pods: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(v) = client::call(socket, Query::Status) {
            let s: Status = serde_json::from_value(v)?;
            let rows: Vec<comb_api::EndpointRow> =
                serde_json::from_value(client::call(socket, Query::Endpoints)?)?;
            let attached = rows
                .iter()
                .filter(|r| r.local && r.cgroup.is_some())
                .count();
            if s.generation > 0 && s.applied_generation == s.generation && attached >= pods {
                return Ok(());
            }
            last = format!(
                "generation {} applied {} attached {attached}; errors {:?} {:?}",
                s.generation, s.applied_generation, s.config_errors, s.datapath_errors
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("agent at {} not ready after 15 s: {last}", socket.display())
}
