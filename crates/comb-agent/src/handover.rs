//! Taking over from a running agent (docs/upgrades.md): a combd that starts while another
//! one serves the same admin socket asks it to hand over before it touches anything. The
//! predecessor stops its control plane, releases the admin socket and the metrics address,
//! answers with its pid, and drains its node proxy while this agent's listeners take the
//! datapath's slots one by one.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::api::{Control, Request, Response};

/// How long the predecessor may take to stop its control plane.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Ask the agent on `admin_socket`, if one answers there, to hand over. Some(its pid) once
/// it has released everything; None when no agent runs (no socket, or a stale one).
pub async fn take_over(admin_socket: &Path) -> Result<Option<u32>> {
    let Ok(stream) = UnixStream::connect(admin_socket).await else {
        return Ok(None);
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(&Request::Control(Control::Handover))?;
    line.push(b'\n');
    w.write_all(&line)
        .await
        .context("asking the running agent to hand over")?;
    let mut answer = String::new();
    tokio::time::timeout(ANSWER_TIMEOUT, BufReader::new(r).read_line(&mut answer))
        .await
        .with_context(|| {
            format!(
                "the agent on {} did not hand over within {ANSWER_TIMEOUT:?}",
                admin_socket.display()
            )
        })?
        .context("reading the running agent's answer")?;
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Ok { data }) => Ok(Some(
            data.get("pid")
                .and_then(|p| p.as_u64())
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
        )),
        Ok(Response::Error { message }) => bail!(
            "an agent already serves {} and did not hand over: {message}",
            admin_socket.display()
        ),
        Err(e) => bail!(
            "an agent already serves {} and answered the handover with {answer:?}: {e}",
            admin_socket.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A stand-in running agent: answers one request line with `answer`, returns the request.
    async fn agent_answering(path: &Path, answer: &'static str) -> tokio::task::JoinHandle<String> {
        let l = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await.unwrap();
            w.write_all(answer.as_bytes()).await.unwrap();
            line
        })
    }

    #[tokio::test]
    async fn no_agent_means_no_handover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        assert_eq!(take_over(&path).await.unwrap(), None);
        // A stale socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert_eq!(take_over(&path).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_running_agent_hands_over_with_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let agent = agent_answering(&path, "{\"result\":\"ok\",\"data\":{\"pid\":4242}}\n").await;
        assert_eq!(take_over(&path).await.unwrap(), Some(4242));
        let request: serde_json::Value = serde_json::from_str(&agent.await.unwrap()).unwrap();
        assert_eq!(request, serde_json::json!({"cmd": "handover"}));
    }

    #[tokio::test]
    async fn a_refusal_is_an_error_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let _agent = agent_answering(
            &path,
            "{\"result\":\"error\",\"message\":\"bad request\"}\n",
        )
        .await;
        let e = format!("{:#}", take_over(&path).await.unwrap_err());
        assert!(e.contains("a.sock") && e.contains("bad request"), "{e}");
    }
}
