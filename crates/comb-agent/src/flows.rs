//! Flow events: a thread drains the kernel's ring buffer into a broadcast channel that
//! `comb monitor` clients subscribe to. The kernel emits events only while someone listens
//! (the pump flips the datapath flag), so an idle node pays nothing for them.
//!
//! Under a flood nothing blocks the agent: the ring buffer drops what does not fit (the
//! kernel counts it), the broadcast channel drops what a slow client did not read (the client
//! is told how many), and enrichment uses a snapshot index, not the agent's lock.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use comb_datapath::{Datapath, FlowEvent};
use comb_host::boot_time_ns;
use comb_model::pipeline::FlowIndex;
use comb_model::terms::{has_ports, protocol_name};
use tokio::sync::{broadcast, mpsc};

use crate::api::{FlowRow, VerdictFilter};
use crate::writer::WriterMsg;

/// What the pump broadcasts.
#[derive(Clone, Debug)]
pub enum FlowMsg {
    Event(FlowEvent),
    /// Events the kernel could not queue since the previous notice.
    KernelLost(u64),
}

/// Broadcast capacity: a client more than this many events behind loses the oldest.
pub const CHANNEL_EVENTS: usize = 16384;

pub fn row(ev: &FlowEvent, index: &FlowIndex, node: &str) -> FlowRow {
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let age = boot_time_ns().saturating_sub(ev.time_ns) as f64 / 1e9;
    let addr = |ip: IpAddr, port: u16| {
        if has_ports(ev.protocol) {
            SocketAddr::new(ip, port).to_string()
        } else {
            ip.to_string()
        }
    };
    FlowRow {
        time: now_unix - age,
        node: node.to_owned(),
        direction: ev.direction.name().to_owned(),
        verdict: if ev.dropped() { "dropped" } else { "forwarded" }.to_owned(),
        reason: ev.reason.to_string(),
        protocol: protocol_name(ev.protocol),
        src: addr(ev.src, ev.sport),
        dst: addr(ev.dst, ev.dport),
        src_pod: index.pod_by_ip.get(&ev.src).cloned(),
        dst_pod: index.pod_by_ip.get(&ev.dst).cloned(),
        src_identity: ev.src_identity,
        dst_identity: ev.dst_identity,
        policy: (ev.policy != 0).then(|| {
            index
                .policy_names
                .get(&ev.policy)
                .cloned()
                .unwrap_or_else(|| format!("policy #{}", ev.policy))
        }),
        bytes: ev.len,
    }
}

/// Whether a row passes `comb monitor`'s filters; `pod` is `namespace/name`.
pub fn wanted(row: &FlowRow, pod: Option<&str>, verdict: Option<VerdictFilter>) -> bool {
    let pod_ok =
        pod.is_none_or(|p| row.src_pod.as_deref() == Some(p) || row.dst_pod.as_deref() == Some(p));
    let verdict_ok = match verdict {
        None => true,
        Some(VerdictFilter::Dropped) => row.verdict == "dropped",
        Some(VerdictFilter::Forwarded) => row.verdict == "forwarded",
    };
    pod_ok && verdict_ok
}

/// The pump: runs on its own thread until the writer is gone. It reads the ring buffer and
/// asks the writer to switch events on while someone listens and off when nobody does.
pub fn pump(
    datapath: Arc<Datapath>,
    flows: broadcast::Sender<FlowMsg>,
    writer: mpsc::Sender<WriterMsg>,
) {
    let mut reader = match datapath.policy().flow_events() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "flow events unavailable");
            return;
        }
    };
    let mut enabled = false;
    let mut lost_seen: Option<u64> = None;
    let mut last_check = Instant::now() - Duration::from_secs(1);
    loop {
        if let Err(e) = reader.poll(Duration::from_millis(100), |ev| {
            let _ = flows.send(FlowMsg::Event(ev));
        }) {
            tracing::warn!(error = %format!("{e:#}"), "polling flow events");
            std::thread::sleep(Duration::from_millis(100));
        }
        if last_check.elapsed() < Duration::from_millis(200) {
            continue;
        }
        last_check = Instant::now();
        if writer.is_closed() {
            return; // shutting down
        }
        let want = flows.receiver_count() > 0;
        if want != enabled && writer.blocking_send(WriterMsg::FlowEvents(want)).is_ok() {
            enabled = want;
        }
        if let Ok(lost) = datapath.policy().events_lost() {
            if let Some(prev) = lost_seen
                && lost > prev
            {
                let _ = flows.send(FlowMsg::KernelLost(lost - prev));
            }
            lost_seen = Some(lost);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comb_model::terms::{Direction, Reason, Verdict};

    fn event() -> FlowEvent {
        FlowEvent {
            time_ns: boot_time_ns(),
            src: "198.18.1.2".parse().unwrap(),
            dst: "198.18.1.3".parse().unwrap(),
            sport: 40000,
            dport: 80,
            protocol: 6,
            direction: Direction::Ingress,
            verdict: Verdict::Deny,
            reason: Reason::PolicyDenied.into(),
            endpoint: 7,
            src_identity: 300,
            dst_identity: 301,
            policy: 42,
            len: 60,
        }
    }

    #[test]
    fn rows_are_named_and_filtered() {
        let mut index = FlowIndex::default();
        index
            .pod_by_ip
            .insert("198.18.1.3".parse().unwrap(), "shop/server".into());
        index
            .policy_names
            .insert(42, "NetworkPolicy shop/deny".into());
        let r = row(&event(), &index, "n1");
        assert_eq!(r.src, "198.18.1.2:40000");
        assert_eq!(r.dst_pod.as_deref(), Some("shop/server"));
        assert_eq!(r.src_pod, None);
        assert_eq!(r.verdict, "dropped");
        assert_eq!(r.reason, "policy-denied");
        assert_eq!(r.policy.as_deref(), Some("NetworkPolicy shop/deny"));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((r.time - now).abs() < 5.0);
        assert!(wanted(
            &r,
            Some("shop/server"),
            Some(VerdictFilter::Dropped)
        ));
        assert!(!wanted(&r, Some("shop/client"), None));
        assert!(!wanted(&r, None, Some(VerdictFilter::Forwarded)));
    }
}
