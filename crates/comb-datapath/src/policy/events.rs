//! Flow events of the identity policy: the `comb_flow_events` ring buffer, decoded.
//!
//! [`FlowEventReader`] owns its ring buffer consumer and can be moved to a thread. The ring
//! has one consumer position: run one reader per datapath at a time (two would split the
//! events between them).

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{Context, Result};
use comb_model::terms::{Direction, ReasonCode, Verdict};
use libbpf_rs::MapHandle;
use serde::{Deserialize, Serialize};

use super::abi::FlowEventRaw;
use crate::abi::Pod;
use crate::sys;

/// One decision of the policy datapath: a new flow (allowed or not) or a dropped packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// CLOCK_BOOTTIME, nanoseconds.
    pub time_ns: u64,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Host order; 0 for protocols without ports, except ICMP/ICMPv6 echoes: the identifier
    /// is a request's `sport` and a reply's `dport`.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub direction: Direction,
    /// The policy verdict ([`Verdict::Deny`] for drops without one, e.g. malformed). Whether
    /// the packet passed follows from `reason` ([`FlowEvent::dropped`]).
    pub verdict: Verdict,
    pub reason: ReasonCode,
    /// Host-side veth ifindex of the local endpoint.
    pub endpoint: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub policy: u32,
    /// Packet length (L2 frame).
    pub len: u32,
}

impl FlowEvent {
    pub fn dropped(&self) -> bool {
        self.reason.is_drop()
    }

    /// Decode one ring buffer record; None when it is too short.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let r = FlowEventRaw::from_bytes(b)?;
        Some(Self {
            time_ns: r.time_ns,
            src: r.saddr.ip(),
            dst: r.daddr.ip(),
            sport: u16::from_be(r.sport),
            dport: u16::from_be(r.dport),
            protocol: r.protocol,
            // The BPF side writes only valid values; anything else reads as the safe side.
            direction: Direction::from_raw(r.direction).unwrap_or(Direction::Ingress),
            verdict: Verdict::from_raw(r.verdict).unwrap_or(Verdict::Deny),
            reason: ReasonCode(r.reason),
            endpoint: r.endpoint,
            src_identity: r.src_identity,
            dst_identity: r.dst_identity,
            policy: r.policy,
            len: r.len,
        })
    }
}

/// A consumer of `comb_flow_events`.
pub struct FlowEventReader {
    rb: sys::RingBuffer<FlowEvent>,
    /// Keeps the map fd the ring buffer was built on open.
    _map: MapHandle,
}

impl FlowEventReader {
    pub(crate) fn new(map: MapHandle) -> Result<Self> {
        let rb = sys::RingBuffer::new(map.as_fd(), FlowEvent::decode)
            .context("opening the flow event ring buffer")?;
        Ok(Self { rb, _map: map })
    }

    /// Wait up to `timeout` for events and hand each to `f`, oldest first. Returns how many
    /// were delivered (0 after a timeout or an interrupted wait).
    pub fn poll(&mut self, timeout: Duration, mut f: impl FnMut(FlowEvent)) -> Result<usize> {
        let events = self.rb.poll(timeout).context("polling flow events")?;
        let count = events.len();
        events.into_iter().for_each(&mut f);
        Ok(count)
    }

    /// Records too short to be an event (a layout mismatch; should stay 0).
    pub fn malformed(&self) -> u64 {
        self.rb.malformed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::CombAddr;
    use comb_model::terms::Reason;

    #[test]
    fn decodes_a_record() {
        let raw = FlowEventRaw {
            time_ns: 5,
            saddr: CombAddr::from("198.18.1.2".parse::<IpAddr>().unwrap()),
            daddr: CombAddr::from("198.18.1.3".parse::<IpAddr>().unwrap()),
            sport: 40000u16.to_be(),
            dport: 8080u16.to_be(),
            protocol: 6,
            direction: 1,
            verdict: 2,
            reason: 128,
            endpoint: 12,
            src_identity: 256,
            dst_identity: 257,
            policy: 3,
            len: 74,
            reserved: 0,
        };
        let e = FlowEvent::decode(raw.as_bytes()).unwrap();
        assert_eq!(e.src, "198.18.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(e.dst, "198.18.1.3".parse::<IpAddr>().unwrap());
        assert_eq!((e.sport, e.dport), (40000, 8080));
        assert_eq!(e.direction, Direction::Egress);
        assert_eq!(e.verdict, Verdict::Deny);
        assert_eq!(e.reason, Reason::PolicyDenied);
        assert!(e.dropped());
        assert_eq!((e.src_identity, e.dst_identity, e.policy), (256, 257, 3));
        assert!(FlowEvent::decode(&raw.as_bytes()[..71]).is_none());
    }

    const _: () = {
        const fn send<T: Send>() {}
        send::<FlowEventReader>();
    };
}
