//! Flow events of the identity policy: the `comb_flow_events` ring buffer, decoded.
//!
//! [`FlowEventReader`] owns its ring buffer consumer and can be moved to a thread. The ring
//! has one consumer position: run one reader per datapath at a time (two would split the
//! events between them).

use std::ffi::c_void;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::time::Duration;

use anyhow::{Context, Result};
use libbpf_rs::{MapHandle, libbpf_sys};
use serde::{Deserialize, Serialize};

use crate::maps::Pod;
use crate::policy::{Direction, Reason, Verdict};
use crate::policy_maps::FlowEventRaw;

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
    pub reason: Reason,
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
            reason: Reason(r.reason),
            endpoint: r.endpoint,
            src_identity: r.src_identity,
            dst_identity: r.dst_identity,
            policy: r.policy,
            len: r.len,
        })
    }
}

/// Decoded events between the libbpf callback and [`FlowEventReader::poll`]'s caller.
#[derive(Default)]
struct Inbox {
    events: Vec<FlowEvent>,
    malformed: u64,
}

/// A consumer of `comb_flow_events`.
pub struct FlowEventReader {
    rb: NonNull<libbpf_sys::ring_buffer>,
    /// The callback's context; boxed so its address is stable.
    inbox: Box<Inbox>,
    /// Keeps the map fd the ring buffer was built on open.
    _map: MapHandle,
}

// SAFETY: the ring buffer manager is a plain heap object with no thread affinity; the reader is
// used from one thread at a time (poll takes &mut self), and the inbox is owned by it.
unsafe impl Send for FlowEventReader {}

unsafe extern "C" fn on_sample(
    ctx: *mut c_void,
    data: *mut c_void,
    size: libbpf_sys::size_t,
) -> i32 {
    // SAFETY: ctx is the Inbox owned by the reader that is polling (see FlowEventReader::new);
    // libbpf hands us `size` readable bytes at `data`.
    let (inbox, bytes) = unsafe {
        (
            &mut *ctx.cast::<Inbox>(),
            std::slice::from_raw_parts(data.cast::<u8>(), size as usize),
        )
    };
    match FlowEvent::decode(bytes) {
        Some(e) => inbox.events.push(e),
        None => inbox.malformed += 1,
    }
    0
}

impl FlowEventReader {
    pub(crate) fn new(map: MapHandle) -> Result<Self> {
        let mut inbox = Box::<Inbox>::default();
        let ctx: *mut Inbox = &mut *inbox;
        // SAFETY: valid ringbuf map fd; the callback context outlives the ring buffer (both are
        // owned by the reader, and Drop frees the ring buffer first).
        let rb = unsafe {
            libbpf_sys::ring_buffer__new(
                map.as_fd().as_raw_fd(),
                Some(on_sample),
                ctx.cast(),
                std::ptr::null(),
            )
        };
        let rb = NonNull::new(rb)
            .ok_or_else(std::io::Error::last_os_error)
            .context("opening the flow event ring buffer")?;
        Ok(Self {
            rb,
            inbox,
            _map: map,
        })
    }

    /// Wait up to `timeout` for events and hand each to `f`, oldest first. Returns how many
    /// were delivered (0 after a timeout or an interrupted wait).
    pub fn poll(&mut self, timeout: Duration, mut f: impl FnMut(FlowEvent)) -> Result<usize> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: rb is live; the callback writes into self.inbox, which we hold exclusively.
        let n = unsafe { libbpf_sys::ring_buffer__poll(self.rb.as_ptr(), ms) };
        if n < 0 && n != -libc::EINTR {
            return Err(std::io::Error::from_raw_os_error(-n)).context("polling flow events");
        }
        let events = std::mem::take(&mut self.inbox.events);
        let count = events.len();
        events.into_iter().for_each(&mut f);
        Ok(count)
    }

    /// Records too short to be an event (a layout mismatch; should stay 0).
    pub fn malformed(&self) -> u64 {
        self.inbox.malformed
    }
}

impl Drop for FlowEventReader {
    fn drop(&mut self) {
        // SAFETY: created by ring_buffer__new, freed once.
        unsafe { libbpf_sys::ring_buffer__free(self.rb.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::CombAddr;

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
        assert_eq!(e.reason, Reason::POLICY_DENIED);
        assert!(e.dropped());
        assert_eq!((e.src_identity, e.dst_identity, e.policy), (256, 257, 3));
        assert!(FlowEvent::decode(&raw.as_bytes()[..71]).is_none());
    }

    const _: () = {
        const fn send<T: Send>() {}
        send::<FlowEventReader>();
    };
}
