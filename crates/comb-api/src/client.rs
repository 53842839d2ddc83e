//! Finding and talking to an agent's admin socket (blocking: the CLI and the testkit ask
//! one question at a time).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Request, Response};
use anyhow::{Context, Result, anyhow, bail};

const RUN_DIR: &str = "/run/comb";

/// Every admin socket we know where to look for: `/run/comb/NODE.sock` for a node agent,
/// `/run/comb/lab/LAB/NODE.sock` for lab agents.
fn candidate_sockets() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut scan = |dir: &Path| {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "sock") {
                    let node = p
                        .file_stem()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    out.push((node, p));
                }
            }
        }
    };
    scan(Path::new(RUN_DIR));
    if let Ok(rd) = std::fs::read_dir(Path::new(RUN_DIR).join("lab")) {
        for e in rd.flatten() {
            scan(&e.path());
        }
    }
    out.sort();
    out
}

pub fn resolve(node: Option<&str>, socket: Option<&Path>) -> Result<PathBuf> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    let all = candidate_sockets();
    let matching: Vec<_> = all
        .iter()
        .filter(|(n, _)| node.is_none_or(|want| want == n))
        .collect();
    match (matching.as_slice(), node) {
        ([(_, p)], _) => Ok(p.clone()),
        ([], Some(n)) => bail!(
            "no agent is running for node {n:?} (no admin socket {RUN_DIR}/{n}.sock or {RUN_DIR}/lab/*/{n}.sock); start one with `combd --node {n} --manifests DIR` or `comb lab up`"
        ),
        ([], None) => bail!(
            "no agent is running (no admin socket under {RUN_DIR}); start one with `combd --node NAME --manifests DIR` or `comb lab up FILE`"
        ),
        (many, _) => bail!(
            "several agents are running ({}); pick one with --node",
            many.iter()
                .map(|(n, p)| format!("{n} at {}", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// One request, one answer (the response's data, or the agent's error).
pub fn call(socket: &Path, req: impl Into<Request>) -> Result<serde_json::Value> {
    let req: Request = req.into();
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "no agent answers on {} (is combd running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(&req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut resp = String::new();
    BufReader::new(stream)
        .read_line(&mut resp)
        .context("reading the agent's answer")?;
    match serde_json::from_str::<Response>(&resp).context("decoding the agent's answer")? {
        Response::Ok { data } => Ok(data),
        Response::Error { message } => Err(anyhow!("agent: {message}")),
    }
}
