//! `comb proxy stats`: what the node L7 proxy handled, per route and destination.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use comb_api::{ProxyStatsReply, Query};

use crate::ask::{ask, print_json};
use crate::{Output, Target};

#[derive(Subcommand)]
pub enum ProxyCmd {
    /// Requests per route and destination (status classes, denials, latency, bytes), opaque
    /// TCP connections, and the proxy's listener/routing/splice state.
    Stats,
}

pub fn proxy(t: &Target, cmd: ProxyCmd) -> Result<ExitCode> {
    match cmd {
        ProxyCmd::Stats => {
            let v = ask(t, Query::ProxyStats)?;
            if t.output == Output::Json {
                print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let r: ProxyStatsReply = serde_json::from_value(v)?;
            let yes = |b: bool| if b { "yes" } else { "NO" };
            println!(
                "proxy 127.0.0.1:{}: listener registered {}, routing {}, {} active connections",
                r.port,
                yes(r.listener_registered),
                yes(r.routing_installed),
                r.active_connections
            );
            if let (Some(s), Some(b)) = (r.spliced_sockets, r.spliced_bytes) {
                println!("kernel splice: {s} sockets now, {b} bytes moved");
            }
            print!("{}", comb_api::proxy::render_table(&r.stats));
        }
    }
    Ok(ExitCode::SUCCESS)
}
