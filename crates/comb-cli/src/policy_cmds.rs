//! Identity policy commands: `comb identity list`, `comb endpoint policy get`, `comb monitor`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Subcommand, ValueEnum};
use comb_api::{
    EndpointPolicy, FlowRow, IdentityRow, MonitorLine, Query, Request, Response, VerdictFilter,
};

use crate::ask::{ask, print_json};
use comb_api::{client, table};

use crate::{Output, Target};

#[derive(Subcommand)]
pub enum IdentityCmd {
    /// Identities with their labels, address prefixes and pods.
    List,
}

#[derive(Subcommand)]
pub enum EndpointPolicyCmd {
    /// The policy the kernel holds for a local pod (NAMESPACE/NAME, or NAME in default).
    Get { pod: String },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum VerdictArg {
    Forwarded,
    Dropped,
}

#[derive(Args)]
pub struct MonitorArgs {
    /// Only flows to or from this pod (NAMESPACE/NAME, or NAME in default).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only forwarded or only dropped flows.
    #[arg(long, value_enum)]
    pub verdict: Option<VerdictArg>,
}

pub fn identity(t: &Target, cmd: IdentityCmd) -> Result<ExitCode> {
    let IdentityCmd::List = cmd;
    let v = ask(t, Query::Identities)?;
    if t.output == Output::Json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<IdentityRow> = serde_json::from_value(v)?;
    let cells: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.labels.join(" "),
                if r.prefixes.is_empty() {
                    "-".into()
                } else {
                    r.prefixes.join(",")
                },
            ]
        })
        .collect();
    print!("{}", table::render(&["ID", "LABELS", "PREFIXES"], &cells));
    Ok(ExitCode::SUCCESS)
}

pub fn endpoint_policy(t: &Target, cmd: EndpointPolicyCmd) -> Result<ExitCode> {
    let EndpointPolicyCmd::Get { pod } = cmd;
    let v = ask(t, Query::EndpointPolicy { pod })?;
    if t.output == Output::Json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let p: EndpointPolicy = serde_json::from_value(v)?;
    let enforced = |b: bool| {
        if b {
            "enforced"
        } else {
            "not enforced (allow all)"
        }
    };
    println!("pod:       {} (identity {})", p.pod, p.identity);
    println!("interface: {} (ifindex {})", p.interface, p.ifindex);
    println!("ingress:   {}", enforced(p.ingress_enforced));
    println!("egress:    {}", enforced(p.egress_enforced));
    if p.policies.is_empty() {
        println!("policies:  none select this pod");
    } else {
        println!("policies:  {}", p.policies.join(", "));
    }
    if !p.in_sync {
        println!(
            "WARNING:   the kernel's entries differ from the compiled policy (reconcile pending or failed; see comb status)"
        );
    }
    let cells: Vec<Vec<String>> = p
        .entries
        .into_iter()
        .map(|e| {
            vec![
                e.direction,
                if e.identity == 0 {
                    "*".into()
                } else {
                    e.identity.to_string()
                },
                e.identity_labels.join(" "),
                e.protocol,
                e.ports,
                e.verdict,
                e.reason,
                e.policy.unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if !cells.is_empty() {
        println!();
        print!(
            "{}",
            table::render(
                &[
                    "DIRECTION",
                    "IDENTITY",
                    "LABELS",
                    "PROTO",
                    "PORTS",
                    "VERDICT",
                    "REASON",
                    "POLICY"
                ],
                &cells
            )
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn flow_line(f: &FlowRow) -> String {
    let end = |addr: &str, pod: &Option<String>, id: u32| match pod {
        Some(p) => format!("{p} ({addr}, id {id})"),
        None => format!("{addr} (id {id})"),
    };
    let secs = f.time.rem_euclid(86400.0);
    let (h, m, s) = (
        (secs / 3600.0) as u32,
        ((secs % 3600.0) / 60.0) as u32,
        secs % 60.0,
    );
    format!(
        "{h:02}:{m:02}:{s:06.3} {:<9} {:<7} {} -> {} {} {}{}",
        f.verdict.to_uppercase(),
        f.direction,
        end(&f.src, &f.src_pod, f.src_identity),
        end(&f.dst, &f.dst_pod, f.dst_identity),
        f.protocol,
        f.reason,
        f.policy
            .as_ref()
            .map(|p| format!(" [{p}]"))
            .unwrap_or_default()
    )
}

/// Streams until interrupted (or the agent goes away).
pub fn monitor(t: &Target, a: MonitorArgs) -> Result<ExitCode> {
    let socket = client::resolve(t.node.as_deref(), t.socket.as_deref())?;
    let mut stream = UnixStream::connect(&socket)
        .with_context(|| format!("no agent answers on {}", socket.display()))?;
    let req = Query::Monitor {
        pod: a.pod,
        verdict: a.verdict.map(|v| match v {
            VerdictArg::Forwarded => VerdictFilter::Forwarded,
            VerdictArg::Dropped => VerdictFilter::Dropped,
        }),
    };
    let mut line = serde_json::to_vec(&Request::from(req))?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let stdout = std::io::stdout();
    for l in BufReader::new(stream).lines() {
        let l = l.context("reading from the agent")?;
        let data = match serde_json::from_str::<Response>(&l)? {
            Response::Ok { data } => data,
            Response::Error { message } => return Err(anyhow!("agent: {message}")),
        };
        let mut out = stdout.lock();
        let written = if t.output == Output::Json {
            writeln!(out, "{}", serde_json::to_string(&data)?)
        } else {
            match serde_json::from_value::<MonitorLine>(data)? {
                MonitorLine::Flow(f) => writeln!(out, "{}", flow_line(&f)),
                MonitorLine::Lost { kernel, agent } => writeln!(
                    out,
                    "LOST      {kernel} events (kernel ring buffer full), {agent} (this client too slow)"
                ),
            }
        };
        // A closed pipe (e.g. `| head`) ends the stream quietly.
        if written.and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
