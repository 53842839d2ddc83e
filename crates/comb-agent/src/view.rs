//! The read side of the agent: what the admin API, `/metrics` and the flow monitor hold. The
//! published status (loaded, never waited for), the datapath for reading its maps and
//! counters, the node proxy's telemetry, and the channel to the writer for control requests.
//! Nothing here changes State or the datapath.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use comb_datapath::Datapath;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::api::Control;
use crate::config::AgentConfig;
use crate::flows::FlowMsg;
use crate::node_proxy::NodeProxy;
use crate::status::{Board, Published};
use crate::writer::WriterMsg;

#[derive(Clone)]
pub struct View {
    pub cfg: Arc<AgentConfig>,
    pub started: Instant,
    pub board: Board,
    /// Read only from here: every write goes through the writer.
    pub datapath: Arc<Datapath>,
    /// The node proxy (None with `--proxy off`, or once shut down); its own lock, held only
    /// to read its counters.
    pub proxy: Arc<Mutex<Option<NodeProxy>>>,
    /// Flow events for `comb monitor` subscribers.
    pub flows: broadcast::Sender<FlowMsg>,
    pub writer: mpsc::Sender<WriterMsg>,
    /// What the certificate reconciler published (its own board).
    pub certs: crate::certs::CertBoard,
    /// To the serve loop: a successor asks for a handover; answered with this agent's pid
    /// once the control plane has stopped and the admin socket is released.
    pub handover: mpsc::Sender<oneshot::Sender<u32>>,
}

impl View {
    pub fn published(&self) -> Arc<Published> {
        self.board.load_full()
    }

    /// Stop the control plane for a successor (docs/upgrades.md) and wait until it is done.
    pub async fn handover(&self) -> Result<serde_json::Value, String> {
        let (tx, rx) = oneshot::channel();
        self.handover
            .send(tx)
            .await
            .map_err(|_| "the agent is shutting down".to_string())?;
        let pid = rx
            .await
            .map_err(|_| "the agent is shutting down".to_string())?;
        Ok(serde_json::json!({ "pid": pid }))
    }

    /// Hand a control request to the writer and wait for its answer.
    pub async fn control(&self, c: Control) -> Result<serde_json::Value, String> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(WriterMsg::Control(c, tx))
            .await
            .map_err(|_| "the agent is shutting down".to_string())?;
        rx.await
            .map_err(|_| "the agent is shutting down".to_string())?
    }
}
