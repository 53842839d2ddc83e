//! `comb-cni`: see the library. The runtime runs it with the CNI environment and the network
//! configuration on stdin; the result or the spec's error object goes to stdout.
#![forbid(unsafe_code)]

use std::io::Read as _;
use std::process::ExitCode;

use comb_cni::{CniError, Output, code};

fn main() -> ExitCode {
    let result = comb_cni::Env::read(|k| std::env::var(k).ok()).and_then(|env| {
        let mut stdin = Vec::new();
        if env.command != "VERSION" {
            std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
                CniError::new(code::IO_FAILURE, format!("reading the configuration: {e}"))
            })?;
        }
        comb_cni::run(&env, &stdin)
    });
    match result {
        Ok(Output::Result(v) | Output::Versions(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(Output::Nothing) => ExitCode::SUCCESS,
        Err(e) => {
            println!(
                "{}",
                serde_json::to_string(&e).expect("an error serializes")
            );
            ExitCode::FAILURE
        }
    }
}
