//! One request to the node's agent, and printing its JSON answer: what every command that
//! talks to an agent shares.

use anyhow::Result;
use comb_api::{Request, client};

use crate::Target;

pub fn ask(t: &Target, req: impl Into<Request>) -> Result<serde_json::Value> {
    let socket = client::resolve(t.node.as_deref(), t.socket.as_deref())?;
    client::call(&socket, req)
}

pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}
