//! `comb tunnel list`: the node proxy's HBONE tunnels.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use comb_api::Query;
use comb_api::tunnel::TunnelsReply;

use crate::ask::{ask, print_json};
use crate::{Output, Target};

#[derive(Subcommand)]
pub enum TunnelCmd {
    /// Pooled HBONE connections (peer, identities, streams, bytes, age, handshake) and the
    /// handshake/resumption/reuse counts of new flows.
    List,
}

pub fn tunnel(t: &Target, cmd: TunnelCmd) -> Result<ExitCode> {
    match cmd {
        TunnelCmd::List => {
            let v = ask(t, Query::Tunnels)?;
            if t.output == Output::Json {
                print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let r: TunnelsReply = serde_json::from_value(v)?;
            print!("{}", comb_api::tunnel::render_table(&r));
        }
    }
    Ok(ExitCode::SUCCESS)
}
