//! Commands that ask a running agent: status, endpoint list, splice stats, metrics.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use comb_api::SpliceStats;
use comb_api::{Control, EndpointRow, Query, Status};

use comb_api::table;

use crate::ask::{ask, print_json};
use crate::{Output, Target};

#[derive(Subcommand)]
pub enum EndpointCmd {
    /// Pod, namespace, IP, node, cgroup and whether its local traffic is spliced.
    List,
    /// A local pod's compiled policy as the datapath holds it.
    Policy {
        #[command(subcommand)]
        cmd: crate::policy_cmds::EndpointPolicyCmd,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Subcommand)]
pub enum SpliceCmd {
    /// Sockets in the sockhash and bytes redirected.
    Stats,
    /// Switch the splice for new connections (established ones keep their path).
    Set { state: OnOff },
}

pub fn status(t: &Target, ready: bool) -> Result<ExitCode> {
    let v = ask(t, Query::Status)?;
    let s: Status = serde_json::from_value(v.clone())?;
    if ready {
        if s.generation > 0 && s.applied_generation == s.generation {
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!(
            "not ready: generation {} applied {} ({} configuration problem(s), {} datapath error(s))",
            s.generation,
            s.applied_generation,
            s.config_errors.len(),
            s.datapath_errors.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    if t.output == Output::Json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    println!("node:            {}", s.node);
    println!(
        "agent:           combd {} (pid {}, up {}s)",
        s.version, s.pid, s.uptime_secs
    );
    println!("source:          {}", s.manifests);
    println!("pins:            {}", s.pin_dir);
    println!(
        "generation:      {} (datapath applied {})",
        s.generation, s.applied_generation
    );
    println!("local endpoints: {}", s.local_endpoints);
    println!(
        "splice:          {}",
        if s.splice_enabled { "on" } else { "off" }
    );
    match (&s.lb_cgroup, &s.socket_lb_note) {
        (Some(cg), _) => println!(
            "socket LB:       {} (cgroup {cg}; service frontends in the maps: {})",
            s.socket_lb, s.lb_services
        ),
        (None, Some(why)) => println!("socket LB:       off ({why})"),
        (None, None) => println!("socket LB:       {}", s.socket_lb),
    }
    for f in &s.lb_skipped {
        println!("  not programmed: {f}");
    }
    if s.config_errors.is_empty() {
        println!("config:          ok");
    } else if s.manifests.starts_with("kubernetes") {
        // The Kubernetes source judges object by object: the rest is in force.
        println!(
            "config:          {} problem(s); everything else is in force (generation {}):",
            s.config_errors.len(),
            s.generation
        );
        for e in &s.config_errors {
            println!("  - {e}");
        }
    } else {
        println!(
            "config:          REJECTED, running on the last good State (generation {}):",
            s.generation
        );
        for e in &s.config_errors {
            println!("  - {e}");
        }
    }
    println!(
        "policy:          {} ({} identities, programs on {} pods)",
        if s.policy { "on" } else { "off" },
        s.identities,
        s.policy_endpoints
    );
    for u in &s.policy_unenforced {
        println!("  not enforced: {u}");
    }
    match &s.proxy {
        Some(addr) => println!("L7 proxy:        on ({addr}; see `comb proxy stats`)"),
        None => println!("L7 proxy:        off"),
    }
    println!("certificates:    {}", certificates_line(&s.certificates));
    for e in &s.datapath_errors {
        println!("datapath error:  {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `comb status`'s certificates line.
fn certificates_line(c: &comb_api::CertsSummary) -> String {
    if !c.enabled {
        return "off (no --ca-address: no workload certificates, mesh mTLS off)".into();
    }
    let ca = c.ca.as_deref().unwrap_or("?");
    let mut line = format!("{} valid of {} wanted (CA {ca})", c.valid, c.wanted);
    if let Some(since) = c.failing_since {
        let what = if c.unreachable {
            "CA unreachable"
        } else {
            "CA requests failing"
        };
        line.push_str(&format!(
            "; {what} since {}: {}",
            table::utc(since),
            c.last_error.as_deref().unwrap_or("?")
        ));
        match c.valid_until {
            Some(t) => line.push_str(&format!("; certificates valid until {}", table::utc(t))),
            None => line.push_str("; no valid certificate left"),
        }
    }
    line
}

#[derive(Subcommand)]
pub enum CertCmd {
    /// Workload certificates: identity, serial, validity, state, last error.
    List,
    /// Ask a CA for a certificate as an agent would (a fresh key and CSR); prints the
    /// chain. For checking a CA and its authorization by hand.
    Request(crate::ca_cmds::RequestArgs),
}

pub fn cert(t: &Target, cmd: CertCmd) -> Result<ExitCode> {
    if let CertCmd::Request(a) = cmd {
        return crate::ca_cmds::request(a);
    }
    let v = ask(t, Query::CertList)?;
    if t.output == Output::Json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<comb_api::CertRow> = serde_json::from_value(v)?;
    let time = |t: Option<f64>| t.map(table::utc).unwrap_or_else(|| "-".into());
    let cells: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            vec![
                r.identity,
                r.serial.unwrap_or_else(|| "-".into()),
                time(r.not_before),
                time(r.not_after),
                r.state,
                r.last_error.unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "IDENTITY",
                "SERIAL",
                "NOT BEFORE",
                "NOT AFTER",
                "STATE",
                "LAST ERROR"
            ],
            &cells
        )
    );
    Ok(ExitCode::SUCCESS)
}

pub fn endpoint(t: &Target, cmd: EndpointCmd) -> Result<ExitCode> {
    if let EndpointCmd::Policy { cmd } = cmd {
        return crate::policy_cmds::endpoint_policy(t, cmd);
    }
    let v = ask(t, Query::Endpoints)?;
    if t.output == Output::Json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<EndpointRow> = serde_json::from_value(v)?;
    let cells: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            vec![
                r.pod,
                r.namespace,
                r.ip,
                r.node,
                r.cgroup.unwrap_or_else(|| "-".into()),
                if r.splice { "on" } else { "off" }.into(),
                r.mode,
                r.mtls.unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "POD",
                "NAMESPACE",
                "IP",
                "NODE",
                "CGROUP",
                "SPLICE",
                "MODE",
                "MTLS"
            ],
            &cells
        )
    );
    Ok(ExitCode::SUCCESS)
}

pub fn splice(t: &Target, cmd: SpliceCmd) -> Result<ExitCode> {
    match cmd {
        SpliceCmd::Stats => {
            let v = ask(t, Query::SpliceStats)?;
            if t.output == Output::Json {
                print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let s: SpliceStats = serde_json::from_value(v)?;
            let rows = vec![
                vec!["sockets in sockhash".into(), s.sockets.to_string()],
                vec!["sockets added (total)".into(), s.sockets_added.to_string()],
                vec!["socket add failures".into(), s.add_failures.to_string()],
                vec!["bytes redirected".into(), s.redirected_bytes.to_string()],
                vec!["sends redirected".into(), s.redirected_msgs.to_string()],
                vec![
                    "bytes over TCP (peer not spliced, or backpressure)".into(),
                    s.passed_bytes.to_string(),
                ],
                vec!["sends over TCP".into(), s.passed_msgs.to_string()],
                vec![
                    "sockets moved to TCP: peer queue full".into(),
                    s.queue_fallbacks.to_string(),
                ],
                vec![
                    "sockets moved to TCP: peer stalled".into(),
                    s.stall_fallbacks.to_string(),
                ],
                vec![
                    "most unread bytes at a peer".into(),
                    s.max_unread.to_string(),
                ],
            ];
            print!("{}", table::render(&["SPLICE", "VALUE"], &rows));
        }
        SpliceCmd::Set { state } => {
            let enabled = matches!(state, OnOff::On);
            ask(t, Control::SetSplice { enabled })?;
            println!(
                "splice {} for new connections",
                if enabled { "on" } else { "off" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn metrics(t: &Target) -> Result<ExitCode> {
    let v = ask(t, Query::Metrics)?;
    print!("{}", v.as_str().unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificates_line_says_why() {
        let off = comb_api::CertsSummary::default();
        assert!(certificates_line(&off).starts_with("off (no --ca-address"));
        let mut c = comb_api::CertsSummary {
            enabled: true,
            ca: Some("198.18.254.254:15012".into()),
            wanted: 2,
            valid: 2,
            ..Default::default()
        };
        assert_eq!(
            certificates_line(&c),
            "2 valid of 2 wanted (CA 198.18.254.254:15012)"
        );
        c.failing_since = Some(1_767_225_600.0);
        c.unreachable = true;
        c.last_error = Some("Unavailable: tcp connect error".into());
        c.valid_until = Some(1_767_229_200.0);
        assert_eq!(
            certificates_line(&c),
            "2 valid of 2 wanted (CA 198.18.254.254:15012); CA unreachable since \
             2026-01-01T00:00:00Z: Unavailable: tcp connect error; certificates valid until \
             2026-01-01T01:00:00Z"
        );
        c.valid = 0;
        c.valid_until = None;
        assert!(certificates_line(&c).ends_with("; no valid certificate left"));
    }
}
