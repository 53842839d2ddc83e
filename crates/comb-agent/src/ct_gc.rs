//! Conntrack garbage collection: a thread that removes expired entries from the policy
//! programs' conntrack map every `--ct-gc-interval`. Kernel-side housekeeping like LRU
//! eviction, not configuration: it deletes only entries the BPF programs created and whose
//! lifetime ran out, never an entry the reconciler owns, so it runs beside the writer rather
//! than in its queue (a sweep reads the table in batches: about 6 ms of a core per 50,000
//! entries on the development VM, docs/benchmarks.md).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use comb_datapath::Datapath;

/// Runs until `stop` is dropped (or sends).
pub fn run(datapath: Arc<Datapath>, every: Duration, stop: Receiver<()>) {
    loop {
        match stop.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        match datapath.policy().ct_gc() {
            Ok(n) if n > 0 => tracing::debug!(removed = n, "conntrack gc"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "conntrack gc"),
        }
    }
}
