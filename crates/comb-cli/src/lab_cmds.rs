//! `comb lab`: nodes and pods as network namespaces, veths and cgroups on this machine.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use comb_lab::{AgentOptions, Lab, LabOptions};

use comb_api::table;

#[derive(Subcommand)]
pub enum LabCmd {
    /// Create the nodes and pods described by Pod manifests, and start an agent per node.
    Up {
        /// Pod manifests (multi-document YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Lab name (a-z, 0-9, at most 8 characters).
        #[arg(long, default_value = "lab")]
        name: String,
        /// Do not start combd in the node namespaces.
        #[arg(long)]
        no_agent: bool,
        /// Extra argument for every combd (repeatable), e.g. --agent-arg=--splice=off.
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// Run the lab as a Kubernetes cluster: etcd, kube-apiserver and
        /// kube-controller-manager on loopback, a kubelet stand-in per node making pods
        /// through the CNI chain, agents watching the API (docs/kubernetes.md).
        #[arg(long)]
        kubernetes: bool,
    },
    /// The kubeconfig of a Kubernetes lab (`comb lab up --kubernetes`), for kubectl.
    Kubeconfig {
        #[arg(long)]
        name: Option<String>,
    },
    /// A lab node's kubelet stand-in (started by `comb lab up --kubernetes`).
    #[command(hide = true)]
    Kubelet {
        #[arg(long)]
        name: String,
        #[arg(long)]
        node: String,
    },
    /// Run a command inside a pod (its network namespace and cgroup).
    Exec {
        /// Pod name, or NAMESPACE/NAME.
        pod: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove a lab: processes, agents, namespaces, cgroups, pins.
    Down {
        #[arg(long)]
        name: Option<String>,
        /// Also sweep leftovers of crashed runs (every comb lab on this machine).
        #[arg(long)]
        all: bool,
    },
    /// Restart a node's combd, or replace its binary, without dropping a connection: a new
    /// agent starts beside the running one, which hands over and drains (docs/upgrades.md).
    Upgrade {
        /// Node name.
        node: String,
        /// The new combd binary (default: the lab's).
        #[arg(long)]
        combd: Option<PathBuf>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Labs on this machine and their pods.
    List,
}

fn pick(name: Option<String>) -> Result<Lab> {
    let name = match name {
        Some(n) => n,
        None => match Lab::list()?.as_slice() {
            [one] => one.clone(),
            [] => bail!("no lab is running; create one with `comb lab up FILE`"),
            many => bail!(
                "several labs are running ({}); pick one with --name",
                many.join(", ")
            ),
        },
    };
    Lab::open(&name)
}

pub fn print_pods(lab: &Lab) {
    let rows: Vec<Vec<String>> = lab
        .pods()
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.namespace.clone(),
                p.node.clone(),
                p.ip.to_string(),
                p.netns.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["POD", "NAMESPACE", "NODE", "IP", "NETNS"], &rows)
    );
}

pub fn run(cmd: LabCmd) -> Result<ExitCode> {
    match cmd {
        LabCmd::Up {
            files,
            name,
            no_agent,
            agent_args,
            kubernetes,
        } => {
            let texts = files
                .iter()
                .map(|f| {
                    Ok((
                        f.clone(),
                        std::fs::read_to_string(f)
                            .with_context(|| format!("reading {}", f.display()))?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let agent = if no_agent {
                None
            } else {
                Some(AgentOptions {
                    combd: comb_lab::combd_path()?,
                    extra_args: agent_args,
                })
            };
            comb_lab::install_signal_cleanup();
            let opts = LabOptions { name, agent };
            let lab = if kubernetes {
                Lab::up_kubernetes(opts, &texts)?
            } else {
                Lab::up(opts, &texts)?
            };
            print_pods(&lab);
            match lab.kubeconfig() {
                Ok(kc) => println!(
                    "lab {} is up as a Kubernetes cluster; kubectl --kubeconfig {}",
                    lab.name(),
                    kc.display()
                ),
                Err(_) => println!(
                    "lab {} is up; manifests in {}",
                    lab.name(),
                    lab.manifests_dir().display()
                ),
            }
            if let Some(ca) = &lab.state().ca {
                println!(
                    "CA on {} (namespace {}; root {}, log {})",
                    ca.listen,
                    ca.netns,
                    lab.ca_root_cert().display(),
                    lab.ca_log().display()
                );
            }
            lab.detach();
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Kubeconfig { name } => {
            let lab = pick(name)?;
            println!("{}", lab.kubeconfig()?.display());
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Kubelet { name, node } => {
            // Its log is the lab's logs/kubelet-NODE.log (stderr).
            crate::stderr_log::init();
            comb_lab::kubelet::run(&name, &node)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Upgrade { node, combd, name } => {
            let lab = pick(name)?;
            let pid = lab.upgrade_agent(&node, combd.as_deref())?;
            println!(
                "node {node}: combd {pid} took over; the previous one drains (log {})",
                lab.agent_log(&node).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Exec { pod, name, command } => {
            let lab = pick(name)?;
            let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
            let status = lab
                .command(&pod, &command[0], &args)?
                .status()
                .with_context(|| format!("running {}", command[0]))?;
            Ok(ExitCode::from(
                status.code().unwrap_or(1).clamp(0, 255) as u8
            ))
        }
        LabCmd::Down { name, all } => {
            if all {
                for what in Lab::down_all()? {
                    println!("removed {what}");
                }
            } else {
                let lab = pick(name)?;
                let n = lab.name().to_string();
                lab.down()?;
                println!("lab {n} removed");
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::List => {
            for name in Lab::list()? {
                println!("lab {name}:");
                print_pods(&Lab::open(&name)?);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
