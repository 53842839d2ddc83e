//! The terms the policy compiler, the datapath, the agent and the CLI share, defined once:
//! directions, verdicts and reasons of the identity policy (their numbers are the kernel's,
//! `bpf/include/comb_policy_types.h`, checked by a test in comb-datapath) and IP protocol
//! numbers with their display names.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Protocol;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
            Protocol::Sctp => IPPROTO_SCTP,
        }
    }
}

/// How users read an IP protocol number: `TCP`, `ICMPv6`, ..., or the number.
pub fn protocol_name(p: u8) -> String {
    match p {
        IPPROTO_ICMP => "ICMP".into(),
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_ICMPV6 => "ICMPv6".into(),
        IPPROTO_SCTP => "SCTP".into(),
        n => n.to_string(),
    }
}

/// Whether flows of this protocol have ports.
pub fn has_ports(p: u8) -> bool {
    matches!(p, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
}

/// Seen from the local endpoint (pod). `COMB_DIR_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Direction {
    /// To the pod (tc egress of its host-side veth).
    Ingress = 0,
    /// From the pod (tc ingress of its host-side veth).
    Egress = 1,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn to_raw(self) -> u8 {
        self as u8
    }

    /// None for a number that is no direction.
    pub fn from_raw(d: u8) -> Option<Self> {
        Direction::BOTH.into_iter().find(|x| x.to_raw() == d)
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a policy entry decides for a new flow. `COMB_VERDICT_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Verdict {
    Allow = 1,
    Deny = 2,
    /// Needs the node L7 proxy: TCP flows from a local pod are redirected to its listener
    /// ([`Reason::ProxyRedirect`]). When they cannot be, the entry's reason decides:
    /// [`Reason::L7Visibility`] forwards, anything else drops with
    /// [`Reason::ProxyUnavailable`] (fail closed).
    Redirect = 3,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Allow, Verdict::Deny, Verdict::Redirect];

    pub fn to_raw(self) -> u8 {
        self as u8
    }

    /// None for a number that is no verdict.
    pub fn from_raw(v: u8) -> Option<Self> {
        Verdict::ALL.into_iter().find(|x| x.to_raw() == v)
    }
}

/// `COMB_REASON_*`: why a packet passed (< 128) or was dropped (>= 128). Values the kernel
/// reports may be ones this build does not know: those are read as a [`ReasonCode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum Reason {
    PolicyAllow = 1,
    NoPolicy = 2,
    CtEstablished = 3,
    CtReply = 4,
    Host = 5,
    NotIp = 6,
    Fragment = 7,
    /// An ICMP error about a tracked flow (port unreachable, fragmentation needed, ...).
    CtRelated = 8,
    /// The pod asked for L7 visibility (`comb.dev/l7`): an allowed TCP flow goes through the
    /// node proxy (REDIRECT), and is forwarded as allowed where it cannot be redirected.
    L7Visibility = 9,
    /// Sent to the node proxy.
    ProxyRedirect = 10,
    /// A mesh pod's new TCP flow to an HBONE peer, sent to the node proxy's HBONE outbound
    /// listener (mutual TLS to the peer's node).
    HboneRedirect = 11,
    /// To an HBONE peer, but no HBONE outbound listener (proxy down): forwarded in
    /// plaintext, so the destination's PeerAuthentication decides.
    HboneUnavailable = 12,
    PolicyDenied = 128,
    AuthzDeny = 129,
    AuthzNoAllow = 130,
    /// Judged by the node proxy (REDIRECT entries of L7 rules); the drop reported when the flow
    /// cannot reach it (fail closed). `COMB_REASON_PROXY_UNAVAILABLE`.
    ProxyUnavailable = 131,
    FragUnknown = 132,
    Malformed = 133,
    /// PeerAuthentication STRICT: plaintext TCP/UDP from another node to a mesh pod.
    MtlsRequired = 134,
}

impl Reason {
    /// Every reason this build knows, in numeric order.
    pub const ALL: [Reason; 19] = [
        Reason::PolicyAllow,
        Reason::NoPolicy,
        Reason::CtEstablished,
        Reason::CtReply,
        Reason::Host,
        Reason::NotIp,
        Reason::Fragment,
        Reason::CtRelated,
        Reason::L7Visibility,
        Reason::ProxyRedirect,
        Reason::HboneRedirect,
        Reason::HboneUnavailable,
        Reason::PolicyDenied,
        Reason::AuthzDeny,
        Reason::AuthzNoAllow,
        Reason::ProxyUnavailable,
        Reason::FragUnknown,
        Reason::Malformed,
        Reason::MtlsRequired,
    ];

    pub fn to_raw(self) -> u8 {
        self as u8
    }

    /// None for a number this build does not know (see [`ReasonCode`]).
    pub fn from_raw(r: u8) -> Option<Self> {
        Reason::ALL.into_iter().find(|x| x.to_raw() == r)
    }

    /// The metrics label and the name the CLI shows.
    pub fn name(self) -> &'static str {
        match self {
            Reason::PolicyAllow => "policy-allow",
            Reason::NoPolicy => "no-policy",
            Reason::CtEstablished => "ct-established",
            Reason::CtReply => "ct-reply",
            Reason::Host => "host",
            Reason::NotIp => "not-ip",
            Reason::Fragment => "fragment",
            Reason::CtRelated => "ct-related",
            Reason::L7Visibility => "l7-visibility",
            Reason::ProxyRedirect => "proxy-redirect",
            Reason::HboneRedirect => "hbone-redirect",
            Reason::HboneUnavailable => "hbone-unavailable",
            Reason::PolicyDenied => "policy-denied",
            Reason::AuthzDeny => "authz-deny",
            Reason::AuthzNoAllow => "authz-no-allow",
            Reason::ProxyUnavailable => "proxy-unavailable",
            Reason::FragUnknown => "frag-unknown",
            Reason::Malformed => "malformed",
            Reason::MtlsRequired => "mtls-required",
        }
    }

    pub fn from_name(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Packets with this reason are dropped.
    pub fn is_drop(self) -> bool {
        self.to_raw() >= 128
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A reason as the kernel reports it (map entries, counters, flow events): a [`Reason`], or a
/// number a newer datapath wrote that this build does not know. Kept as the number so it
/// round-trips; shown and serialized as the reason's name, or `reason-<n>` when unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReasonCode(pub u8);

impl ReasonCode {
    /// The reason, when this build knows the number.
    pub fn known(self) -> Option<Reason> {
        Reason::from_raw(self.0)
    }

    /// The metrics label; "unknown" for a number this build does not know.
    pub fn name(self) -> &'static str {
        self.known().map_or("unknown", Reason::name)
    }

    /// Packets with this reason are dropped (by number: unknown ones too).
    pub fn is_drop(self) -> bool {
        self.0 >= 128
    }
}

impl From<Reason> for ReasonCode {
    fn from(r: Reason) -> Self {
        ReasonCode(r.to_raw())
    }
}

impl PartialEq<Reason> for ReasonCode {
    fn eq(&self, other: &Reason) -> bool {
        self.0 == other.to_raw()
    }
}

impl PartialEq<ReasonCode> for Reason {
    fn eq(&self, other: &ReasonCode) -> bool {
        other == self
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.known() {
            Some(r) => f.write_str(r.name()),
            None => write!(f, "reason-{}", self.0),
        }
    }
}

/// Error of parsing a [`ReasonCode`] from text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownReason(pub String);

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown reason {:?}", self.0)
    }
}

impl std::error::Error for UnknownReason {}

impl std::str::FromStr for ReasonCode {
    type Err = UnknownReason;

    /// A name, or `reason-<n>` as Display writes unknown values.
    fn from_str(s: &str) -> Result<Self, UnknownReason> {
        if let Some(r) = Reason::from_name(s) {
            return Ok(r.into());
        }
        match s.strip_prefix("reason-").map(str::parse::<u8>) {
            Some(Ok(n)) => Ok(ReasonCode(n)),
            _ => Err(UnknownReason(s.to_owned())),
        }
    }
}

impl Serialize for ReasonCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReasonCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_and_drops() {
        let names: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(
            names,
            [
                "policy-allow",
                "no-policy",
                "ct-established",
                "ct-reply",
                "host",
                "not-ip",
                "fragment",
                "ct-related",
                "l7-visibility",
                "proxy-redirect",
                "hbone-redirect",
                "hbone-unavailable",
                "policy-denied",
                "authz-deny",
                "authz-no-allow",
                "proxy-unavailable",
                "frag-unknown",
                "malformed",
                "mtls-required"
            ]
        );
        for r in Reason::ALL {
            assert_eq!(Reason::from_name(r.name()), Some(r));
            assert_eq!(Reason::from_raw(r.to_raw()), Some(r));
            assert_eq!(r.is_drop(), r.to_raw() >= 128);
            // The enum's serde names are its display names.
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.name())
            );
            assert_eq!(ReasonCode::from(r).to_string(), r.name());
        }
        assert!(!Reason::CtReply.is_drop());
        assert!(Reason::ProxyUnavailable.is_drop());
        assert_eq!(Reason::ProxyUnavailable.to_raw(), 131);
        assert_eq!(Reason::from_raw(77), None);
    }

    #[test]
    fn unknown_reasons_round_trip() {
        assert_eq!(ReasonCode(77).to_string(), "reason-77");
        assert_eq!(ReasonCode(77).name(), "unknown");
        assert!(ReasonCode(200).is_drop());
        assert_eq!(
            serde_json::to_string(&ReasonCode::from(Reason::NoPolicy)).unwrap(),
            "\"no-policy\""
        );
        for r in [Reason::NoPolicy.into(), ReasonCode(77)] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<ReasonCode>(&json).unwrap(), r);
        }
        assert!("bogus".parse::<ReasonCode>().is_err());
        assert_eq!(ReasonCode(128), Reason::PolicyDenied);
    }

    #[test]
    fn directions_and_verdicts_are_the_kernels_numbers() {
        assert_eq!(Direction::from_raw(0), Some(Direction::Ingress));
        assert_eq!(Direction::from_raw(1), Some(Direction::Egress));
        assert_eq!(Direction::from_raw(2), None);
        for v in Verdict::ALL {
            assert_eq!(Verdict::from_raw(v.to_raw()), Some(v));
        }
        assert_eq!(Verdict::from_raw(0), None);
        assert_eq!(
            serde_json::to_string(&Direction::Egress).unwrap(),
            "\"egress\""
        );
        assert_eq!(
            serde_json::to_string(&Verdict::Redirect).unwrap(),
            "\"redirect\""
        );
    }

    #[test]
    fn protocols() {
        assert_eq!(protocol_name(IPPROTO_ICMPV6), "ICMPv6");
        assert_eq!(protocol_name(IPPROTO_TCP), "TCP");
        assert_eq!(protocol_name(99), "99");
        assert_eq!(Protocol::Sctp.number(), 132);
        assert!(has_ports(IPPROTO_UDP) && !has_ports(IPPROTO_ICMP));
    }
}
