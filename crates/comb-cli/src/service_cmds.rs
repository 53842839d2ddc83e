//! `comb service list`: each Service frontend with its algorithm and backends.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use comb_api::{BackendRow, Query, ServiceRow};
use comb_model::lb::{BackendState, LbAlgorithm};

use crate::ask::{ask, print_json};
use comb_api::table;

use crate::{Output, Target};

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Service, frontend (VIP:port/protocol), algorithm and backends with state and weight.
    List,
}

pub fn run(t: &Target, cmd: ServiceCmd) -> Result<ExitCode> {
    let ServiceCmd::List = cmd;
    let v = ask(t, Query::Services)?;
    if t.output == Output::Json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<ServiceRow> = serde_json::from_value(v)?;
    print!("{}", render(&rows));
    Ok(ExitCode::SUCCESS)
}

fn render(rows: &[ServiceRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.service.clone(),
                r.frontend(),
                algorithm(r),
                backends(&r.backends),
            ]
        })
        .collect();
    table::render(&["SERVICE", "FRONTEND", "ALGORITHM", "BACKENDS"], &cells)
}

/// `maglev`, `random, affinity 10800s`; `(not programmed)` when the datapath does not hold
/// the frontend as listed (socket LB off, SCTP, VIP taken, or a pending retry).
fn algorithm(r: &ServiceRow) -> String {
    let mut s = match r.algorithm {
        LbAlgorithm::Random => "random".to_string(),
        LbAlgorithm::Maglev => "maglev".to_string(),
    };
    if let Some(t) = r.affinity_timeout_secs {
        s.push_str(&format!(", affinity {t}s"));
    }
    if !r.programmed {
        s.push_str(" (not programmed)");
    }
    s
}

/// `198.18.1.2:8080 (ready, w1), 198.18.1.3:8080 (terminating, w0)`; `-` for none.
fn backends(b: &[BackendRow]) -> String {
    if b.is_empty() {
        return "-".into();
    }
    b.iter()
        .map(|b| {
            let state = match b.state {
                BackendState::Ready => "ready",
                BackendState::Terminating => "terminating",
                BackendState::NotReady => "not-ready",
            };
            format!(
                "{} ({state}, w{})",
                std::net::SocketAddr::new(b.ip, b.port),
                b.weight
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_model::Protocol;

    fn backend(ip: &str, state: BackendState, weight: u32) -> BackendRow {
        BackendRow {
            ip: ip.parse().unwrap(),
            port: 8080,
            state,
            node: None,
            weight,
        }
    }

    #[test]
    fn table_lists_backends_with_state_and_weight() {
        let rows = [
            ServiceRow {
                service: "apps/web".into(),
                port_name: None,
                vip: "10.96.0.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                algorithm: LbAlgorithm::Maglev,
                affinity_timeout_secs: None,
                backends: vec![
                    backend("198.18.1.2", BackendState::Ready, 1),
                    backend("198.18.1.3", BackendState::Terminating, 0),
                ],
                programmed: true,
            },
            ServiceRow {
                service: "apps/dns".into(),
                port_name: Some("dns".into()),
                vip: "10.96.0.53".parse().unwrap(),
                port: 53,
                protocol: Protocol::Udp,
                algorithm: LbAlgorithm::Random,
                affinity_timeout_secs: Some(60),
                backends: vec![],
                programmed: false,
            },
        ];
        assert_eq!(
            render(&rows),
            "SERVICE   FRONTEND           ALGORITHM                              BACKENDS\n\
             apps/web  10.96.0.10:80/TCP  maglev                                 198.18.1.2:8080 (ready, w1), 198.18.1.3:8080 (terminating, w0)\n\
             apps/dns  10.96.0.53:53/UDP  random, affinity 60s (not programmed)  -\n"
        );
    }
}
