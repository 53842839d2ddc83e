//! Privileged tests of the identity policy datapath (`bpf/policy.c`).
//!
//! Most run the two tc programs on crafted frames with BPF_PROG_TEST_RUN, with the context's
//! ifindex naming a veth in a throwaway network namespace that the test thread enters (the
//! kernel resolves it there). The last ones attach the programs with tcx to the host-side
//! veths of two "pods" (namespaces) behind a "node" namespace and send real TCP between them.
//! Nothing is attached outside those namespaces. Needs root; without it fails under CI=true
//! and is skipped with a notice otherwise.

#[allow(dead_code)] // shared with the cgroup-based tests
mod common;
mod policy_support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use comb_datapath::policy::abi::{ID_ANY, ID_HOST, ID_WORLD};
use comb_datapath::{Datapath, DatapathOptions, FlowEvent, PolicyConfig, PolicyKey, PolicyValue};
use comb_model::terms::{Direction, Reason, ReasonCode, Verdict};
use policy_support::packets::*;
use policy_support::{DROP, Fixture, InNetns, Netns, PASS, ifindex, two_pod_node};

use Direction::{Egress, Ingress};

fn privileged() -> bool {
    common::privileged("policy")
}

const EP: &str = "198.18.1.2";
const EP_ID: u32 = 256;
const PEER_A: &str = "198.18.1.3";
const ID_A: u32 = 300;
const PEER_B: &str = "198.18.1.4";
const ID_B: u32 = 301;
/// In 198.18.1.0/24 (identity ID_NET) but without a /32 of its own.
const PEER_C: &str = "198.18.1.5";
const ID_NET: u32 = 299;
const OUTSIDE: &str = "203.0.113.9";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The endpoint on v0 with the usual ipcache.
fn setup(fx: &Fixture) {
    let dp = fx.dp();
    dp.policy()
        .set_endpoint(fx.ifindex, EP_ID, &[ip(EP)])
        .unwrap();
    dp.policy()
        .upsert_ipcache(format!("{PEER_A}/32").parse().unwrap(), ID_A)
        .unwrap();
    dp.policy()
        .upsert_ipcache(format!("{PEER_B}/32").parse().unwrap(), ID_B)
        .unwrap();
    dp.policy()
        .upsert_ipcache("198.18.1.0/24".parse().unwrap(), ID_NET)
        .unwrap();
}

fn allow(fx: &Fixture, key: PolicyKey, policy: u32) {
    fx.dp()
        .policy()
        .upsert_entry(&key, &PolicyValue::allow(policy))
        .unwrap();
}

fn deny(fx: &Fixture, key: PolicyKey, reason: Reason, policy: u32) {
    fx.dp()
        .policy()
        .upsert_entry(&key, &PolicyValue::deny(reason, policy))
        .unwrap();
}

/// Ingress deny of everything not allowed otherwise: {ep, ANY, ingress, any protocol}.
fn deny_other_ingress(fx: &Fixture, policy: u32) {
    deny(
        fx,
        PolicyKey::any(fx.ifindex, ID_ANY, Ingress),
        Reason::PolicyDenied,
        policy,
    );
}

fn ports(fx: &Fixture, identity: u32, dir: Direction, proto: u8, port: u16, bits: u8) -> PolicyKey {
    PolicyKey {
        endpoint: fx.ifindex,
        identity,
        direction: dir,
        protocol: proto,
        port,
        port_prefix: bits,
    }
}

#[test]
fn identity_rules_allow_and_deny() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    let i = fx.ifindex;
    let mut want = BTreeMap::new();
    for (k, v) in [
        (
            PolicyKey::port(i, ID_A, Ingress, TCP, Some(8080)),
            PolicyValue::allow(1),
        ),
        // 4992..=5007: the 16-port block around 5000.
        (
            ports(&fx, ID_B, Ingress, UDP, 5000, 12),
            PolicyValue::allow(2),
        ),
        (
            PolicyKey::any(i, ID_ANY, Ingress),
            PolicyValue::deny(Reason::PolicyDenied, 3),
        ),
        (
            PolicyKey::any(i, ID_NET, Egress),
            PolicyValue::deny(Reason::AuthzDeny, 4),
        ),
    ] {
        fx.dp().policy().upsert_entry(&k, &v).unwrap();
        want.insert(k.canonical().unwrap(), v);
    }
    assert_eq!(fx.dp().policy().entries().unwrap(), want);

    // Ingress: identity + exact port.
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 40000, EP, 8080, SYN)), PASS);
    assert_eq!(fx.run(Ingress, &tcp4(PEER_B, 40000, EP, 8080, SYN)), DROP);
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 40001, EP, 8081, SYN)), DROP);
    assert_eq!(fx.run(Ingress, &udp4(PEER_A, 40002, EP, 8080)), DROP);
    // Port range via the prefix.
    assert_eq!(fx.run(Ingress, &udp4(PEER_B, 5353, EP, 4995)), PASS);
    assert_eq!(fx.run(Ingress, &udp4(PEER_B, 5353, EP, 5007)), PASS);
    assert_eq!(fx.run(Ingress, &udp4(PEER_B, 5353, EP, 5008)), DROP);
    assert_eq!(fx.run(Ingress, &udp4(PEER_B, 5353, EP, 4991)), DROP);
    // Outside the ipcache: WORLD, which only the ANY entry covers.
    assert_eq!(fx.run(Ingress, &tcp4(OUTSIDE, 40000, EP, 8080, SYN)), DROP);
    // Egress: an any-protocol entry of the /24's identity; /32s of it are other identities.
    assert_eq!(fx.run(Egress, &tcp4(EP, 40000, PEER_C, 443, SYN)), DROP);
    assert_eq!(fx.run(Egress, &udp4(EP, 40000, PEER_C, 53)), DROP);
    assert_eq!(fx.run(Egress, &icmp4(EP, PEER_C)), DROP);
    assert_eq!(fx.run(Egress, &tcp4(EP, 40000, PEER_A, 443, SYN)), PASS);

    assert_eq!(fx.count(Ingress, Reason::PolicyAllow), 3);
    assert_eq!(fx.count(Ingress, Reason::PolicyDenied), 6);
    assert_eq!(fx.count(Egress, Reason::AuthzDeny), 3);
    assert_eq!(fx.count(Egress, Reason::NoPolicy), 1);
    let m = fx.metric(Ingress, Reason::PolicyAllow).unwrap();
    let sizes = [
        tcp4(PEER_A, 40000, EP, 8080, SYN).len(),
        udp4(PEER_B, 5353, EP, 4995).len(),
        udp4(PEER_B, 5353, EP, 5007).len(),
    ];
    assert_eq!(
        m.bytes,
        sizes.iter().sum::<usize>() as u64,
        "bytes = frame lengths"
    );

    // Allowed flows are tracked with the deciding policy; denied ones are not.
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(ct.len(), 4, "{ct:#?}");
    let tcp = ct
        .iter()
        .find(|e| e.dst.port() == 8080)
        .expect("the allowed TCP flow");
    assert_eq!(tcp.src, format!("{PEER_A}:40000").parse().unwrap());
    assert_eq!(
        (
            tcp.protocol,
            tcp.direction,
            tcp.reason,
            tcp.policy,
            tcp.endpoint
        ),
        (TCP, Ingress, Reason::PolicyAllow.into(), 1, fx.ifindex)
    );
    assert!(!tcp.seen_reply && !tcp.closing);
    // A TCP flow without a reply lives for the close timeout.
    assert!(tcp.remaining <= Duration::from_secs(10) && !tcp.expired());
    let out = ct.iter().find(|e| e.direction == Egress).unwrap();
    assert_eq!(out.reason, Reason::NoPolicy);

    // Removing an entry takes effect for new flows.
    fx.dp()
        .policy()
        .remove_entry(&PolicyKey::any(i, ID_NET, Egress))
        .unwrap();
    fx.dp()
        .policy()
        .remove_entry(&PolicyKey::any(i, ID_NET, Egress))
        .expect("removing a missing entry is fine");
    assert_eq!(fx.run(Egress, &udp4(EP, 40000, PEER_C, 53)), PASS);
    assert_eq!(fx.dp().policy().entries().unwrap().len(), 3);
    fx.finish();
}

#[test]
fn no_entries_allow_and_untracked_interfaces_pass_uncounted() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    assert_eq!(
        fx.dp().policy().endpoints().unwrap(),
        BTreeMap::from([(
            fx.ifindex,
            comb_datapath::PolicyEndpoint {
                identity: EP_ID,
                addrs: vec![ip(EP)]
            }
        )])
    );
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 40000, EP, 22, SYN)), PASS);
    assert_eq!(fx.count(Ingress, Reason::NoPolicy), 1);
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].reason, Reason::NoPolicy);

    // v1 has no endpoint entry: untouched, not counted, not tracked.
    assert_eq!(
        fx.run_on(fx.other, Ingress, &tcp4(PEER_A, 1, EP, 2, SYN)),
        PASS
    );
    assert_eq!(fx.run_on(fx.other, Egress, &ipv4_options_cut()), PASS);
    let metrics = fx.dp().policy().metrics().unwrap();
    assert!(
        metrics.iter().all(|m| m.endpoint == fx.ifindex),
        "{metrics:?}"
    );
    assert_eq!(fx.dp().policy().ct_entries().unwrap().len(), 1);

    // A policy added later applies to new flows; the established one keeps going.
    deny_other_ingress(&fx, 1);
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 40000, EP, 22, ACK)), PASS);
    assert_eq!(fx.count(Ingress, Reason::CtEstablished), 1);
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 40001, EP, 22, SYN)), DROP);

    // Without its endpoint entry the interface is not enforced, and its counters are gone.
    fx.dp().policy().remove_endpoint(fx.ifindex).unwrap();
    fx.dp().policy().remove_endpoint(fx.ifindex).unwrap();
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 40001, EP, 22, SYN)), PASS);
    assert!(fx.dp().policy().metrics().unwrap().is_empty());
    assert!(fx.dp().policy().endpoints().unwrap().is_empty());
    fx.finish();
}

#[test]
fn replies_pass_via_conntrack_but_reverse_new_flows_are_judged() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    allow(
        &fx,
        PolicyKey::port(fx.ifindex, ID_A, Egress, TCP, Some(80)),
        5,
    );
    deny_other_ingress(&fx, 6);

    assert_eq!(fx.run(Egress, &tcp4(EP, 40000, PEER_A, 80, SYN)), PASS);
    assert_eq!(
        fx.run(Ingress, &tcp4(PEER_A, 80, EP, 40000, SYN | ACK)),
        PASS
    );
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(ct.len(), 1, "replies create no entry of their own");
    assert!(ct[0].seen_reply && !ct[0].closing);
    assert_eq!(ct[0].policy, 5);
    // With a reply seen, TCP gets the established lifetime.
    assert!(ct[0].remaining > Duration::from_secs(3600));
    assert_eq!(fx.run(Egress, &tcp4(EP, 40000, PEER_A, 80, ACK)), PASS);
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 80, EP, 40000, ACK)), PASS);

    // The same peer opening a connection of its own is a new flow, and denied.
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 5555, EP, 22, SYN)), DROP);
    // So is a "reply" to a flow that never was.
    assert_eq!(
        fx.run(Ingress, &tcp4(PEER_A, 80, EP, 40001, SYN | ACK)),
        DROP
    );

    // FIN: closing, back to the close lifetime.
    assert_eq!(
        fx.run(Egress, &tcp4(EP, 40000, PEER_A, 80, FIN | ACK)),
        PASS
    );
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert!(ct[0].closing);
    assert!(ct[0].remaining <= Duration::from_secs(10));
    // A reused tuple (bare SYN on a closing entry) is judged again: still allowed here.
    assert_eq!(fx.run(Egress, &tcp4(EP, 40000, PEER_A, 80, SYN)), PASS);
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert!(!ct[0].closing && !ct[0].seen_reply);

    assert_eq!(fx.count(Egress, Reason::PolicyAllow), 2);
    assert_eq!(fx.count(Egress, Reason::CtEstablished), 2);
    assert_eq!(fx.count(Ingress, Reason::CtReply), 2);
    assert_eq!(fx.count(Ingress, Reason::PolicyDenied), 2);
    // RST closes as well.
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 80, EP, 40000, RST)), PASS);
    assert!(fx.dp().policy().ct_entries().unwrap()[0].closing);
    fx.finish();
}

/// Every conntrack lifetime set to `d`, flow events off.
fn ct_lifetimes(d: Duration) -> PolicyConfig {
    PolicyConfig {
        events: false,
        ct_tcp: d,
        ct_close: d,
        ct_other: d,
    }
}

/// The sweep reads the table in batches: one larger than several batches loses no entry,
/// and removes exactly the expired ones.
#[test]
fn conntrack_gc_sweeps_a_table_larger_than_a_batch() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    deny_other_ingress(&fx, 1);
    let short = ct_lifetimes(Duration::from_millis(200));
    fx.dp().policy().set_config(&short).unwrap();
    for port in 10_000..11_500 {
        assert_eq!(fx.run(Egress, &udp4(EP, port, PEER_A, 53)), PASS);
    }
    std::thread::sleep(Duration::from_millis(300));
    fx.dp()
        .policy()
        .set_config(&PolicyConfig::default())
        .unwrap();
    for port in 20_000..20_700 {
        assert_eq!(fx.run(Egress, &udp4(EP, port, PEER_A, 53)), PASS);
    }
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(ct.len(), 2_200);
    assert_eq!(ct.iter().filter(|e| e.expired()).count(), 1_500);
    assert_eq!(fx.dp().policy().ct_gc().unwrap(), 1_500);
    let left = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(left.len(), 700);
    assert!(left.iter().all(|e| !e.expired() && e.src.port() >= 20_000));
    fx.finish();
}

#[test]
fn conntrack_expires_and_gc_removes_it() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    deny_other_ingress(&fx, 1);
    let cfg = ct_lifetimes(Duration::from_millis(300));
    assert_eq!(fx.dp().policy().config().unwrap(), PolicyConfig::default());
    fx.dp().policy().set_config(&cfg).unwrap();
    assert_eq!(fx.dp().policy().config().unwrap(), cfg);

    assert_eq!(fx.run(Egress, &udp4(EP, 5000, PEER_A, 53)), PASS);
    assert_eq!(fx.run(Ingress, &udp4(PEER_A, 53, EP, 5000)), PASS);
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(ct.len(), 1);
    assert!(ct[0].remaining <= Duration::from_millis(300));
    assert_eq!(fx.dp().policy().ct_gc().unwrap(), 0, "nothing expired yet");

    std::thread::sleep(Duration::from_millis(400));
    assert!(fx.dp().policy().ct_entries().unwrap()[0].expired());
    // Expired = unknown: the reply is judged as a new flow, and denied.
    assert_eq!(fx.run(Ingress, &udp4(PEER_A, 53, EP, 5000)), DROP);
    assert_eq!(fx.dp().policy().ct_gc().unwrap(), 1);
    assert!(fx.dp().policy().ct_entries().unwrap().is_empty());

    // A new packet of the flow starts it over.
    assert_eq!(fx.run(Egress, &udp4(EP, 5000, PEER_A, 53)), PASS);
    assert_eq!(fx.run(Ingress, &udp4(PEER_A, 53, EP, 5000)), PASS);
    assert_eq!(fx.count(Ingress, Reason::CtReply), 2);
    assert_eq!(fx.count(Egress, Reason::NoPolicy), 2);
    fx.finish();
}

#[test]
fn later_fragments_follow_the_first() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    allow(
        &fx,
        PolicyKey::port(fx.ifindex, ID_A, Ingress, UDP, Some(5000)),
        1,
    );
    deny_other_ingress(&fx, 2);

    let first = udp4_first_fragment(PEER_A, 7000, EP, 5000, 0x1234);
    assert_eq!(fx.run(Ingress, &first), PASS);
    assert_eq!(
        fx.run(Ingress, &udp4_later_fragment(PEER_A, EP, 0x1234, 40, true)),
        PASS
    );
    assert_eq!(
        fx.run(
            Ingress,
            &udp4_later_fragment(PEER_A, EP, 0x1234, 104, false)
        ),
        PASS
    );
    // The first fragment of a denied datagram drops, and so do the rest of it.
    let first = udp4_first_fragment(PEER_A, 7000, EP, 6000, 0x2222);
    assert_eq!(fx.run(Ingress, &first), DROP);
    assert_eq!(
        fx.run(Ingress, &udp4_later_fragment(PEER_A, EP, 0x2222, 40, false)),
        DROP
    );
    // A later fragment whose first one was never seen.
    assert_eq!(
        fx.run(Ingress, &udp4_later_fragment(PEER_A, EP, 0x9999, 40, false)),
        DROP
    );
    // Same id, other source: another datagram.
    assert_eq!(
        fx.run(Ingress, &udp4_later_fragment(PEER_B, EP, 0x1234, 40, false)),
        DROP
    );
    assert_eq!(fx.count(Ingress, Reason::PolicyAllow), 1);
    assert_eq!(fx.count(Ingress, Reason::Fragment), 2);
    assert_eq!(fx.count(Ingress, Reason::PolicyDenied), 2);
    assert_eq!(fx.count(Ingress, Reason::FragUnknown), 2);
    fx.finish();
}

#[test]
fn ipv6_extension_headers_and_fragments() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    let (ep6, a6, b6) = ("fd00::2", "fd00::3", "fd00::4");
    fx.dp()
        .policy()
        .set_endpoint(fx.ifindex, EP_ID, &[ip(ep6), ip(EP)])
        .unwrap();
    assert_eq!(
        fx.dp().policy().endpoints().unwrap()[&fx.ifindex].addrs,
        vec![ip(EP), ip(ep6)]
    );
    assert!(
        fx.dp()
            .policy()
            .set_endpoint(fx.ifindex, EP_ID, &[ip(ep6), ip("fd00::9")])
            .is_err(),
        "two addresses of a family"
    );
    fx.dp()
        .policy()
        .upsert_ipcache(format!("{a6}/128").parse().unwrap(), ID_A)
        .unwrap();
    allow(
        &fx,
        PolicyKey::port(fx.ifindex, ID_A, Ingress, TCP, Some(443)),
        1,
    );
    deny_other_ingress(&fx, 2);

    let syn = tcp_hdr(40000, 443, SYN);
    let exts = [(0u8, v6_opts()), (60u8, v6_opts())];
    assert_eq!(fx.run(Ingress, &ipv6(a6, ep6, &exts, TCP, &syn)), PASS);
    assert_eq!(fx.run(Ingress, &ipv6(b6, ep6, &exts, TCP, &syn)), DROP);
    assert_eq!(
        fx.run(
            Egress,
            &ipv6(ep6, a6, &[], TCP, &tcp_hdr(443, 40000, SYN | ACK))
        ),
        PASS,
        "reply"
    );
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].src, format!("[{a6}]:40000").parse().unwrap());
    assert!(ct[0].seen_reply);

    // Fragments: the first carries the TCP header, later ones follow it.
    let first = ipv6(
        a6,
        ep6,
        &[(44, v6_frag(0, true, 77))],
        TCP,
        &tcp_hdr(40001, 443, SYN),
    );
    assert_eq!(fx.run(Ingress, &first), PASS);
    let later = ipv6(a6, ep6, &[(44, v6_frag(24, false, 77))], TCP, &[0u8; 16]);
    assert_eq!(fx.run(Ingress, &later), PASS);
    let stray = ipv6(a6, ep6, &[(44, v6_frag(24, false, 78))], TCP, &[0u8; 16]);
    assert_eq!(fx.run(Ingress, &stray), DROP);

    // An extension header that runs past the packet, and a chain longer than we follow.
    let mut cut = ipv6(a6, ep6, &[(0, v6_opts())], TCP, &syn);
    cut.truncate(14 + 40 + 1);
    assert_eq!(fx.run(Ingress, &cut), DROP);
    let long: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (60u8, v6_opts())).collect();
    assert_eq!(fx.run(Ingress, &ipv6(a6, ep6, &long, TCP, &syn)), DROP);

    assert_eq!(fx.count(Ingress, Reason::PolicyAllow), 2);
    assert_eq!(fx.count(Ingress, Reason::Fragment), 1);
    assert_eq!(fx.count(Ingress, Reason::FragUnknown), 1);
    assert_eq!(fx.count(Ingress, Reason::Malformed), 2);
    assert_eq!(fx.count(Egress, Reason::CtReply), 1);
    fx.finish();
}

fn sa(s: String) -> std::net::SocketAddr {
    s.parse().unwrap()
}

#[test]
fn icmp_echo_identifier_makes_each_ping_a_flow() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    let i = fx.ifindex;
    allow(&fx, PolicyKey::any(i, ID_A, Egress), 1);
    deny(
        &fx,
        PolicyKey::any(i, ID_ANY, Egress),
        Reason::PolicyDenied,
        2,
    );
    allow(&fx, PolicyKey::any(i, ID_B, Ingress), 3);
    deny_other_ingress(&fx, 4);

    // An allowed ping: the request creates the entry (identifier = source port), the reply
    // passes as its reply.
    assert_eq!(fx.run(Egress, &icmp4_echo(EP, PEER_A, false, 0x1111)), PASS);
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(ct.len(), 1, "{ct:#?}");
    assert_eq!(
        (ct[0].src, ct[0].dst, ct[0].protocol, ct[0].direction),
        (
            sa(format!("{EP}:{}", 0x1111)),
            sa(format!("{PEER_A}:0")),
            ICMP,
            Egress
        )
    );
    assert_eq!(
        (ct[0].reason, ct[0].policy),
        (Reason::PolicyAllow.into(), 1)
    );
    assert_eq!(fx.run(Ingress, &icmp4_echo(PEER_A, EP, true, 0x1111)), PASS);
    assert!(fx.dp().policy().ct_entries().unwrap()[0].seen_reply);
    // A reply to another ping is no reply; a request the other way with the same identifier
    // is a new flow, not a reply: both judged by policy (ingress from A is denied).
    assert_eq!(fx.run(Ingress, &icmp4_echo(PEER_A, EP, true, 0x2222)), DROP);
    assert_eq!(
        fx.run(Ingress, &icmp4_echo(PEER_A, EP, false, 0x1111)),
        DROP
    );

    // The policy turns to deny: the running ping goes on, a new one (identifier) is denied.
    deny(
        &fx,
        PolicyKey::any(i, ID_A, Egress),
        Reason::PolicyDenied,
        5,
    );
    assert_eq!(fx.run(Egress, &icmp4_echo(EP, PEER_A, false, 0x1111)), PASS);
    assert_eq!(fx.run(Egress, &icmp4_echo(EP, PEER_A, false, 0x3333)), DROP);

    // B may ping the endpoint, and gets its replies although egress to B is denied; the
    // endpoint's own ping to B (even with B's identifier) is a new flow, and denied.
    assert_eq!(
        fx.run(Ingress, &icmp4_echo(PEER_B, EP, false, 0x5555)),
        PASS
    );
    assert_eq!(fx.run(Egress, &icmp4_echo(EP, PEER_B, true, 0x5555)), PASS);
    assert_eq!(fx.run(Egress, &icmp4_echo(EP, PEER_B, false, 0x5555)), DROP);

    // The identifier is no policy port: an ICMP entry for "port" 0x6666 (which no userspace
    // writes) catches neither a reply nor a request with that identifier; the any-protocol
    // entry decides.
    deny(
        &fx,
        ports(&fx, ID_NET, Egress, ICMP, 0x6666, 16),
        Reason::AuthzDeny,
        6,
    );
    allow(&fx, PolicyKey::any(i, ID_NET, Egress), 7);
    assert_eq!(fx.run(Egress, &icmp4_echo(EP, PEER_C, true, 0x6666)), PASS);
    assert_eq!(fx.run(Egress, &icmp4_echo(EP, PEER_C, false, 0x6666)), PASS);

    // An ICMP header shorter than 8 bytes.
    let mut cut = icmp4_echo(EP, PEER_A, false, 0x7777);
    cut.truncate(14 + 20 + 6);
    assert_eq!(fx.run(Egress, &cut), DROP);

    assert_eq!(fx.count(Egress, Reason::PolicyAllow), 3);
    assert_eq!(fx.count(Egress, Reason::CtEstablished), 1);
    assert_eq!(fx.count(Egress, Reason::CtReply), 1);
    assert_eq!(fx.count(Egress, Reason::PolicyDenied), 2);
    assert_eq!(fx.count(Egress, Reason::AuthzDeny), 0);
    assert_eq!(fx.count(Egress, Reason::Malformed), 1);
    assert_eq!(fx.count(Ingress, Reason::PolicyAllow), 1);
    assert_eq!(fx.count(Ingress, Reason::CtReply), 1);
    assert_eq!(fx.count(Ingress, Reason::PolicyDenied), 2);
    let ct = fx.dp().policy().ct_entries().unwrap();
    let flows: Vec<_> = ct.iter().map(|e| (e.src, e.dst, e.direction)).collect();
    assert_eq!(ct.len(), 4, "{ct:#?}");
    for want in [
        (
            sa(format!("{PEER_B}:{}", 0x5555)),
            sa(format!("{EP}:0")),
            Ingress,
        ),
        (
            sa(format!("{EP}:0")),
            sa(format!("{PEER_C}:{}", 0x6666)),
            Egress,
        ),
        (
            sa(format!("{EP}:{}", 0x6666)),
            sa(format!("{PEER_C}:0")),
            Egress,
        ),
    ] {
        assert!(flows.contains(&want), "{want:?} in {ct:#?}");
    }
    fx.finish();
}

#[test]
fn icmp_errors_of_tracked_flows_pass_as_related() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    let i = fx.ifindex;
    allow(&fx, PolicyKey::port(i, ID_A, Egress, UDP, Some(53)), 1);
    allow(&fx, PolicyKey::port(i, ID_A, Egress, TCP, Some(443)), 2);
    deny(
        &fx,
        PolicyKey::any(i, ID_ANY, Egress),
        Reason::PolicyDenied,
        3,
    );
    allow(&fx, PolicyKey::any(i, ID_B, Ingress), 4);
    deny_other_ingress(&fx, 5);

    // An allowed UDP flow out; A answers with a port unreachable quoting it.
    let dns = udp4(EP, 5000, PEER_A, 53);
    assert_eq!(fx.run(Egress, &dns), PASS);
    assert_eq!(fx.run(Ingress, &icmp4_error(PEER_A, EP, 3, 3, &dns)), PASS);
    // TCP: fragmentation needed from a router (the world: denied as a peer), quoting a
    // header with IP options; time exceeded without options.
    let syn = tcp4(EP, 40000, PEER_A, 443, SYN);
    assert_eq!(fx.run(Egress, &syn), PASS);
    let frag_needed = icmp4_error(OUTSIDE, EP, 3, 4, &ipv4_with_options(&syn, 3));
    assert_eq!(fx.run(Ingress, &frag_needed), PASS);
    assert_eq!(
        fx.run(Ingress, &icmp4_error(OUTSIDE, EP, 11, 0, &syn)),
        PASS
    );
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(ct.len(), 2, "{ct:#?}");
    assert!(
        ct.iter().all(|e| !e.seen_reply),
        "an error is no reply: {ct:#?}"
    );

    // Errors quoting no flow are judged like any new ICMP packet, and never tracked: denied
    // from A and from the world, allowed from B.
    let other_port = udp4(EP, 5001, PEER_A, 53);
    assert_eq!(
        fx.run(Ingress, &icmp4_error(PEER_A, EP, 3, 3, &other_port)),
        DROP
    );
    let other_dst = tcp4(EP, 40000, PEER_A, 444, SYN);
    assert_eq!(
        fx.run(Ingress, &icmp4_error(OUTSIDE, EP, 3, 4, &other_dst)),
        DROP
    );
    let to_b = udp4(EP, 5001, PEER_B, 53);
    assert_eq!(fx.run(Ingress, &icmp4_error(PEER_B, EP, 3, 3, &to_b)), PASS);
    // A tracked packet quoted to someone who did not send it, or with its roles swapped.
    assert_eq!(
        fx.run(Ingress, &icmp4_error(PEER_A, PEER_C, 3, 3, &dns)),
        DROP
    );
    let swapped = udp4(PEER_A, 53, EP, 5000);
    assert_eq!(
        fx.run(Ingress, &icmp4_error(PEER_A, EP, 3, 3, &swapped)),
        DROP
    );
    // A quoted header cut short.
    let mut cut = icmp4_error(PEER_A, EP, 3, 3, &dns);
    cut.truncate(14 + 20 + 8 + 12);
    assert_eq!(fx.run(Ingress, &cut), DROP);
    assert_eq!(
        fx.dp().policy().ct_entries().unwrap().len(),
        2,
        "errors create no entries"
    );

    // The endpoint as the server: its port unreachable for B's datagram goes out although
    // egress to B is denied.
    let query = udp4(PEER_B, 7000, EP, 5353);
    assert_eq!(fx.run(Ingress, &query), PASS);
    assert_eq!(fx.run(Egress, &icmp4_error(EP, PEER_B, 3, 3, &query)), PASS);
    // An error about a reply: a router drops the endpoint's answer to B's ping. One about
    // another ping (identifier) is not related.
    assert_eq!(fx.run(Ingress, &icmp4_echo(PEER_B, EP, false, 0x99)), PASS);
    let reply = icmp4_echo(EP, PEER_B, true, 0x99);
    assert_eq!(fx.run(Egress, &reply), PASS);
    assert_eq!(
        fx.run(Ingress, &icmp4_error(OUTSIDE, EP, 11, 0, &reply)),
        PASS
    );
    let other_reply = icmp4_echo(EP, PEER_B, true, 0x98);
    assert_eq!(
        fx.run(Ingress, &icmp4_error(OUTSIDE, EP, 11, 0, &other_reply)),
        DROP
    );

    assert_eq!(fx.count(Ingress, Reason::CtRelated), 4);
    assert_eq!(fx.count(Egress, Reason::CtRelated), 1);
    assert_eq!(fx.count(Ingress, Reason::PolicyDenied), 6);
    assert_eq!(fx.count(Ingress, Reason::PolicyAllow), 3);
    assert_eq!(fx.count(Egress, Reason::PolicyAllow), 2);
    assert_eq!(fx.count(Egress, Reason::CtReply), 1);
    assert_eq!(fx.count(Egress, Reason::PolicyDenied), 0);
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(ct.len(), 4, "{ct:#?}");
    assert!(
        ct.iter()
            .all(|e| e.protocol != ICMP || e.src.port() == 0x99)
    );
    fx.finish();
}

#[test]
fn icmpv6_echo_identifiers_and_errors() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    let (ep6, a6, router6) = ("fd00::2", "fd00::3", "fd00:99::1");
    let i = fx.ifindex;
    fx.dp().policy().set_endpoint(i, EP_ID, &[ip(ep6)]).unwrap();
    fx.dp()
        .policy()
        .upsert_ipcache(format!("{a6}/128").parse().unwrap(), ID_A)
        .unwrap();
    allow(&fx, PolicyKey::any(i, ID_A, Egress), 1);
    deny(
        &fx,
        PolicyKey::any(i, ID_ANY, Egress),
        Reason::PolicyDenied,
        2,
    );
    deny_other_ingress(&fx, 3);

    let ping = icmp6_echo(ep6, a6, false, 0x10);
    assert_eq!(fx.run(Egress, &ping), PASS);
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert_eq!(ct.len(), 1, "{ct:#?}");
    assert_eq!(
        (ct[0].src, ct[0].dst, ct[0].protocol),
        (sa(format!("[{ep6}]:16")), sa(format!("[{a6}]:0")), ICMPV6)
    );
    assert_eq!(fx.run(Ingress, &icmp6_echo(a6, ep6, true, 0x10)), PASS);
    assert_eq!(fx.run(Ingress, &icmp6_echo(a6, ep6, true, 0x11)), DROP);
    assert_eq!(fx.run(Ingress, &icmp6_echo(a6, ep6, false, 0x10)), DROP);
    let dns = ipv6(ep6, a6, &[], UDP, &udp_hdr(5000, 53, b"q"));
    assert_eq!(fx.run(Egress, &dns), PASS);

    deny(
        &fx,
        PolicyKey::any(i, ID_A, Egress),
        Reason::PolicyDenied,
        4,
    );
    assert_eq!(fx.run(Egress, &icmp6_echo(ep6, a6, false, 0x12)), DROP);
    assert_eq!(fx.run(Egress, &ping), PASS, "established");

    // Errors: packet too big from a router, port unreachable from A, time exceeded about
    // the ping; about the denied ping, unrelated.
    assert_eq!(
        fx.run(Ingress, &icmp6_error(router6, ep6, 2, 0, &dns)),
        PASS
    );
    assert_eq!(fx.run(Ingress, &icmp6_error(a6, ep6, 1, 4, &dns)), PASS);
    assert_eq!(
        fx.run(Ingress, &icmp6_error(router6, ep6, 3, 0, &ping)),
        PASS
    );
    let denied = icmp6_echo(ep6, a6, false, 0x12);
    assert_eq!(
        fx.run(Ingress, &icmp6_error(router6, ep6, 3, 0, &denied)),
        DROP
    );
    // A quoted packet behind an extension header: its ports are not read, so the error is
    // judged by policy (denied here).
    let fragmented = ipv6(
        ep6,
        a6,
        &[(44, v6_frag(0, true, 9))],
        UDP,
        &udp_hdr(5000, 53, b"q"),
    );
    assert_eq!(
        fx.run(Ingress, &icmp6_error(router6, ep6, 2, 0, &fragmented)),
        DROP
    );

    assert_eq!(fx.count(Egress, Reason::PolicyAllow), 2);
    assert_eq!(fx.count(Egress, Reason::PolicyDenied), 1);
    assert_eq!(fx.count(Egress, Reason::CtEstablished), 1);
    assert_eq!(fx.count(Ingress, Reason::CtReply), 1);
    assert_eq!(fx.count(Ingress, Reason::CtRelated), 3);
    assert_eq!(fx.count(Ingress, Reason::PolicyDenied), 4);
    assert_eq!(fx.dp().policy().ct_entries().unwrap().len(), 2);
    fx.finish();
}

#[test]
fn non_ip_malformed_and_redirect() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    assert_eq!(fx.run(Egress, &arp()), PASS);
    assert_eq!(fx.count(Egress, Reason::NotIp), 1);

    // IPv4 header cut short (BPF_PROG_TEST_RUN refuses frames without 20 bytes of IPv4
    // header; tcp_between_pods_is_enforced sends a 10-byte one for real); header length
    // below 20; TCP header cut short; not version 4.
    let full = tcp4(PEER_A, 1, EP, 2, SYN);
    assert_eq!(fx.run(Ingress, &ipv4_options_cut()), DROP);
    let mut short_ihl = full.clone();
    short_ihl[14] = 0x44;
    assert_eq!(fx.run(Ingress, &short_ihl), DROP);
    let mut cut_tcp = full.clone();
    cut_tcp.truncate(14 + 20 + 8);
    assert_eq!(fx.run(Ingress, &cut_tcp), DROP);
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;
    assert_eq!(fx.run(Ingress, &bad_version), DROP);
    assert_eq!(fx.count(Ingress, Reason::Malformed), 4);

    // REDIRECT at tcx egress (to the pod) can never redirect: not visibility-only, so the
    // flow fails closed.
    let k = PolicyKey::port(fx.ifindex, ID_A, Ingress, TCP, Some(8080));
    let redirect = PolicyValue {
        verdict: Verdict::Redirect,
        reason: Reason::PolicyAllow.into(),
        proxy_port: 15001,
        policy: 4,
    };
    fx.dp().policy().upsert_entry(&k, &redirect).unwrap();
    assert_eq!(fx.dp().policy().entries().unwrap()[&k], redirect);
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 1, EP, 8080, SYN)), DROP);
    assert_eq!(fx.count(Ingress, Reason::ProxyUnavailable), 1);
    assert!(
        fx.dp().policy().ct_entries().unwrap().is_empty(),
        "nothing tracked"
    );

    // A value whose reason disagrees with its verdict never forwards with a drop reason.
    let odd_allow = PolicyValue {
        verdict: Verdict::Allow,
        reason: Reason::AuthzDeny.into(),
        proxy_port: 0,
        policy: 5,
    };
    fx.dp()
        .policy()
        .upsert_entry(&PolicyKey::any(fx.ifindex, ID_B, Ingress), &odd_allow)
        .unwrap();
    assert_eq!(fx.run(Ingress, &tcp4(PEER_B, 1, EP, 80, SYN)), PASS);
    assert_eq!(fx.count(Ingress, Reason::PolicyAllow), 1);
    deny(
        &fx,
        PolicyKey::any(fx.ifindex, ID_WORLD, Ingress),
        Reason::Host,
        6,
    );
    assert_eq!(fx.run(Ingress, &tcp4(OUTSIDE, 1, EP, 80, SYN)), DROP);
    assert_eq!(fx.count(Ingress, Reason::PolicyDenied), 1);
    // Host traffic is whatever userspace says for the host identity.
    fx.dp()
        .policy()
        .upsert_ipcache("198.18.1.1/32".parse().unwrap(), ID_HOST)
        .unwrap();
    let host_allow = PolicyValue {
        verdict: Verdict::Allow,
        reason: Reason::Host.into(),
        proxy_port: 0,
        policy: 0,
    };
    fx.dp()
        .policy()
        .upsert_entry(&PolicyKey::any(fx.ifindex, ID_HOST, Ingress), &host_allow)
        .unwrap();
    assert_eq!(fx.run(Ingress, &tcp4("198.18.1.1", 1, EP, 80, SYN)), PASS);
    assert_eq!(fx.count(Ingress, Reason::Host), 1);
    fx.finish();
}

fn redirect_value(reason: impl Into<ReasonCode>, policy: u32) -> PolicyValue {
    PolicyValue {
        verdict: Verdict::Redirect,
        reason: reason.into(),
        proxy_port: 0,
        policy,
    }
}

/// REDIRECT that cannot be redirected (no listener in comb_proxy_listeners): the value's
/// reason decides, at the source's hook (its own egress entry, or the destination endpoint's
/// ingress entry found through the ipcache `endpoint`) and at the destination's.
/// tcp_is_redirected_to_the_node_proxy (redirect_privileged.rs) redirects for real.
#[test]
fn redirect_without_a_proxy_follows_its_reason() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    let (ep, dst) = (fx.ifindex, fx.other);
    // PEER_B is a local endpoint (on v1) with ingress REDIRECT entries.
    fx.dp()
        .policy()
        .set_endpoint(dst, ID_B, &[ip(PEER_B)])
        .unwrap();
    fx.dp()
        .policy()
        .upsert_ipcache_entry(
            format!("{PEER_B}/32").parse().unwrap(),
            comb_datapath::IpcacheEntry {
                identity: ID_B,
                endpoint: dst,
            },
        )
        .unwrap();
    for (k, v) in [
        (
            PolicyKey::port(dst, EP_ID, Ingress, TCP, Some(8080)),
            redirect_value(Reason::ProxyUnavailable, 1),
        ),
        (
            PolicyKey::port(dst, EP_ID, Ingress, TCP, Some(8081)),
            redirect_value(Reason::L7Visibility, 2),
        ),
        (
            PolicyKey::port(dst, ID_ANY, Ingress, TCP, Some(8082)),
            redirect_value(Reason::ProxyUnavailable, 3),
        ),
        (
            PolicyKey::port(dst, EP_ID, Ingress, TCP, Some(8083)),
            PolicyValue::allow(4),
        ),
        (
            PolicyKey::port(dst, ID_ANY, Ingress, TCP, Some(8084)),
            redirect_value(Reason::ProxyUnavailable, 5),
        ),
        (
            PolicyKey::port(dst, ID_ANY, Ingress, UDP, Some(8080)),
            redirect_value(Reason::ProxyUnavailable, 6),
        ),
        // The source's own egress: deny wins over the destination's REDIRECT, and its own
        // REDIRECTs follow their reason.
        (
            PolicyKey::port(ep, ID_B, Egress, TCP, Some(8084)),
            PolicyValue::deny(Reason::AuthzDeny, 7),
        ),
        (
            PolicyKey::port(ep, ID_A, Egress, TCP, Some(9000)),
            redirect_value(Reason::L7Visibility, 8),
        ),
        (
            PolicyKey::port(ep, ID_A, Egress, UDP, Some(53)),
            redirect_value(Reason::ProxyUnavailable, 9),
        ),
        // Ingress at the source: tcx egress never redirects.
        (
            PolicyKey::port(ep, ID_A, Ingress, TCP, Some(7000)),
            redirect_value(Reason::L7Visibility, 10),
        ),
        (
            PolicyKey::port(ep, ID_A, Ingress, TCP, Some(7001)),
            redirect_value(ReasonCode(200), 11),
        ),
    ] {
        fx.dp().policy().upsert_entry(&k, &v).unwrap();
    }
    assert!(
        !fx.dp()
            .policy()
            .proxy_listener_present(comb_datapath::ProxyFamily::V4)
            .unwrap()
    );

    let out = |port: u16| fx.run(Egress, &tcp4(EP, 40000 + port, PEER_B, port, SYN));
    // The destination's REDIRECTs that cannot be carried out leave the flow to the
    // destination's own hook: the source forwards it under its own egress verdict.
    assert_eq!(out(8080), PASS);
    assert_eq!(out(8081), PASS);
    assert_eq!(out(8082), PASS, "the destination's ANY entry");
    assert_eq!(out(8083), PASS);
    assert_eq!(out(8084), DROP, "the source's own deny wins");
    assert_eq!(fx.count(Egress, Reason::ProxyUnavailable), 0);
    assert_eq!(fx.count(Egress, Reason::L7Visibility), 0);
    assert_eq!(fx.count(Egress, Reason::AuthzDeny), 1);
    assert_eq!(fx.run(Egress, &udp4(EP, 5353, PEER_B, 8080)), PASS);
    assert_eq!(fx.count(Egress, Reason::NoPolicy), 5);
    // The source's own REDIRECTs: visibility forwards, UDP cannot be redirected.
    assert_eq!(fx.run(Egress, &tcp4(EP, 41000, PEER_A, 9000, SYN)), PASS);
    assert_eq!(fx.count(Egress, Reason::L7Visibility), 1);
    assert_eq!(fx.run(Egress, &udp4(EP, 5353, PEER_A, 53)), DROP);
    assert_eq!(fx.count(Egress, Reason::ProxyUnavailable), 1);
    // At tcx egress: visibility forwards, any other reason drops as proxy-unavailable.
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 42000, EP, 7000, SYN)), PASS);
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 42001, EP, 7001, SYN)), DROP);
    assert_eq!(fx.count(Ingress, Reason::L7Visibility), 1);
    assert_eq!(fx.count(Ingress, Reason::ProxyUnavailable), 1);

    // Forwarded flows are tracked as usual, none as redirected.
    let ct = fx.dp().policy().ct_entries().unwrap();
    assert!(ct.iter().all(|e| !e.proxy), "{ct:#?}");
    let mut vis: Vec<u16> = ct
        .iter()
        .filter(|e| e.reason == Reason::L7Visibility)
        .map(|e| e.dst.port())
        .collect();
    vis.sort();
    assert_eq!(vis, [7000, 9000], "{ct:#?}");
    // Later packets of a visibility flow are established, not judged again.
    assert_eq!(
        fx.run(Egress, &tcp4(EP, 40000 + 8081, PEER_B, 8081, ACK)),
        PASS
    );
    assert_eq!(fx.count(Egress, Reason::CtEstablished), 1);
    fx.finish();
}

/// Events from a reader moved to another thread: until `n` arrived, the ring ran dry after
/// some arrived, or 5 s passed.
fn collect_events(reader: comb_datapath::FlowEventReader, n: usize) -> Vec<FlowEvent> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = reader;
        let mut got = Vec::new();
        let t = Instant::now();
        while got.len() < n && t.elapsed() < Duration::from_secs(5) {
            let k = reader
                .poll(Duration::from_millis(200), |e| got.push(e))
                .expect("poll");
            if k == 0 && !got.is_empty() {
                break;
            }
        }
        tx.send(got).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("reader thread")
}

#[test]
fn flow_events_carry_decisions_and_identities() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    allow(
        &fx,
        PolicyKey::port(fx.ifindex, ID_A, Ingress, TCP, Some(8080)),
        7,
    );
    deny_other_ingress(&fx, 9);
    let syn = tcp4(PEER_A, 40000, EP, 8080, SYN);

    // Events off (the default): nothing.
    assert_eq!(fx.run(Ingress, &tcp4(PEER_B, 1, EP, 1, SYN)), DROP);
    fx.dp()
        .policy()
        .set_config(&PolicyConfig {
            events: true,
            ..PolicyConfig::default()
        })
        .unwrap();
    let reader = fx.dp().policy().flow_events().unwrap();

    assert_eq!(fx.run(Ingress, &syn), PASS); // new flow: event
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 40000, EP, 8080, ACK)), PASS); // CT: none
    assert_eq!(
        fx.run(Egress, &tcp4(EP, 8080, PEER_A, 40000, SYN | ACK)),
        PASS
    ); // reply: none
    assert_eq!(fx.run(Ingress, &tcp4(PEER_B, 40001, EP, 8080, SYN)), DROP); // denied: event
    assert_eq!(fx.run(Egress, &udp4(EP, 5353, PEER_C, 53)), PASS); // no policy: event
    assert_eq!(fx.run(Egress, &arp()), PASS); // not IP: none
    assert_eq!(fx.run(Egress, &ipv4_options_cut()), DROP); // malformed: event
    let events = collect_events(reader, 4);
    assert_eq!(events.len(), 4, "{events:#?}");

    let e = &events[0];
    assert_eq!(
        (e.src, e.sport, e.dst, e.dport),
        (ip(PEER_A), 40000, ip(EP), 8080)
    );
    assert_eq!(
        (e.protocol, e.direction, e.verdict),
        (TCP, Ingress, Verdict::Allow)
    );
    assert_eq!(
        (e.reason, e.policy, e.endpoint),
        (Reason::PolicyAllow.into(), 7, fx.ifindex)
    );
    assert_eq!((e.src_identity, e.dst_identity), (ID_A, EP_ID));
    assert_eq!(e.len as usize, syn.len());
    assert!(!e.dropped());

    let e = &events[1];
    assert_eq!(
        (e.src, e.sport, e.dst, e.dport),
        (ip(PEER_B), 40001, ip(EP), 8080)
    );
    assert_eq!(
        (e.verdict, e.reason, e.policy),
        (Verdict::Deny, Reason::PolicyDenied.into(), 9)
    );
    assert_eq!((e.src_identity, e.dst_identity), (ID_B, EP_ID));
    assert!(e.dropped());

    let e = &events[2];
    assert_eq!(
        (e.src, e.dst, e.dport, e.protocol),
        (ip(EP), ip(PEER_C), 53, UDP)
    );
    assert_eq!(
        (e.direction, e.verdict, e.reason),
        (Egress, Verdict::Allow, Reason::NoPolicy.into())
    );
    assert_eq!((e.src_identity, e.dst_identity), (EP_ID, ID_NET));

    let e = &events[3];
    assert_eq!(
        (e.direction, e.reason, e.verdict),
        (Egress, Reason::Malformed.into(), Verdict::Deny)
    );
    assert_eq!(
        (e.src, e.dst),
        (ip(PEER_A), ip(EP)),
        "addresses as far as parsed"
    );
    assert!(e.dropped());

    assert!(events.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
    assert_eq!(fx.dp().policy().events_lost().unwrap(), 0);
    fx.finish();
}

#[test]
fn events_that_do_not_fit_are_counted_lost() {
    if !privileged() {
        return;
    }
    let fx = Fixture::new();
    setup(&fx);
    deny_other_ingress(&fx, 1);
    fx.dp()
        .policy()
        .set_config(&PolicyConfig {
            events: true,
            ..PolicyConfig::default()
        })
        .unwrap();
    // 4 MiB of ring at 80 bytes per record holds ~52k events: overflow it without a reader.
    const N: u32 = 60_000;
    let pkt = tcp4(PEER_B, 1, EP, 1, SYN);
    let r = fx
        .dp()
        .policy()
        .test_run(Ingress, fx.ifindex, &pkt, N)
        .unwrap();
    assert_eq!(r, DROP);
    assert_eq!(fx.count(Ingress, Reason::PolicyDenied), u64::from(N));
    let lost = fx.dp().policy().events_lost().unwrap();
    assert!(lost > 0, "a full ring must count lost events");

    let mut reader = fx.dp().policy().flow_events().unwrap();
    let mut delivered = 0u64;
    while reader
        .poll(Duration::from_millis(200), |e| {
            assert_eq!(e.reason, Reason::PolicyDenied);
            delivered += 1;
        })
        .unwrap()
        > 0
    {}
    assert_eq!(delivered + lost, u64::from(N));
    assert_eq!(reader.malformed(), 0);
    fx.finish();
}

fn link_pins(pins: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pins.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("policy-"))
        .collect();
    v.sort();
    v
}

#[test]
fn restart_adopts_links_and_maps_and_drops_defunct_links() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    setup(&fx);
    fx.ns
        .ip(&["link", "add", "v2", "type", "veth", "peer", "name", "v3"]);
    let (a, b) = (fx.ifindex, ifindex("v2"));
    allow(&fx, PolicyKey::port(a, ID_A, Ingress, TCP, Some(80)), 1);
    fx.dp_mut().policy().attach(a).unwrap();
    fx.dp_mut().policy().attach(b).unwrap();
    fx.dp_mut()
        .policy()
        .attach(a)
        .expect("attach is idempotent");
    assert_eq!(fx.dp().policy().attachments(), vec![a, b]);
    let mut want = vec![
        format!("policy-{a}-from"),
        format!("policy-{a}-to"),
        format!("policy-{b}-from"),
        format!("policy-{b}-to"),
    ];
    want.sort();
    assert_eq!(link_pins(&fx.pins.0), want);
    assert!(
        fx.dp_mut().policy().attach(999_999).is_err(),
        "no such interface"
    );
    assert_eq!(fx.dp().policy().attachments(), vec![a, b]);
    assert_eq!(
        link_pins(&fx.pins.0),
        want,
        "a failed attach leaves nothing"
    );
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 1, EP, 80, SYN)), PASS);

    // The agent goes away without cleaning up; meanwhile pod b's veth disappears.
    drop(fx.dp.take());
    fx.ns.ip(&["link", "del", "v2"]);
    let dp = Datapath::load(DatapathOptions {
        pin_dir: fx.pins.0.clone(),
        cgroup_root: comb_host::cgroup2_mount().unwrap(),
    })
    .expect("reload");
    fx.dp = Some(dp);
    assert_eq!(
        fx.dp().policy().attachments(),
        vec![a],
        "defunct links dropped"
    );
    assert_eq!(
        link_pins(&fx.pins.0),
        vec![format!("policy-{a}-from"), format!("policy-{a}-to")]
    );
    // Maps were adopted: entries, endpoint, conntrack and counters are still there.
    assert_eq!(fx.dp().policy().entries().unwrap().len(), 1);
    assert_eq!(fx.dp().policy().endpoints().unwrap().len(), 1);
    assert_eq!(fx.dp().policy().ct_entries().unwrap().len(), 1);
    assert_eq!(fx.count(Ingress, Reason::PolicyAllow), 1);
    assert_eq!(fx.run(Ingress, &tcp4(PEER_A, 1, EP, 80, ACK)), PASS);
    assert_eq!(fx.count(Ingress, Reason::CtEstablished), 1);

    // Detach, re-attach; an interface deleted under an attached link detaches cleanly.
    fx.dp_mut().policy().detach(a).unwrap();
    fx.dp_mut()
        .policy()
        .detach(a)
        .expect("detach is idempotent");
    assert!(fx.dp().policy().attachments().is_empty());
    assert!(link_pins(&fx.pins.0).is_empty());
    fx.dp_mut().policy().attach(a).unwrap();
    fx.ns.ip(&["link", "del", "v0"]);
    assert_eq!(fx.dp().policy().attachments(), vec![a]);
    fx.dp_mut()
        .policy()
        .detach(a)
        .expect("detaching from a deleted interface");
    assert!(link_pins(&fx.pins.0).is_empty());
    fx.finish();
}

// ---- real traffic ------------------------------------------------------------------------

/// A node namespace with two pods (namespaces) on veths, routed like the lab: pod `eth0` with a
/// /32 and a default route via the gateway address carried by every host veth.
struct Lab {
    pods: Vec<(Netns, &'static str, String)>,
    node: Netns,
}

const GW: &str = "198.18.1.1";

impl Lab {
    fn new() -> Self {
        let (node, pods) = two_pod_node("comb-poln", "comb-polp", GW, [EP, PEER_A]);
        let pods = pods
            .into_iter()
            .zip([EP, PEER_A])
            .map(|((pod, host_if), addr)| (pod, addr, host_if))
            .collect();
        Self { pods, node }
    }
}

const SERVER: &str = r#"
import socket, sys, threading
def serve(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    while True:
        c, _ = s.accept()
        c.sendall(b"hello %d\n" % port)
        c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"#;

const CLIENT: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    c.settimeout(float(sys.argv[3]))
    print(c.makefile().readline().strip())
except TimeoutError:
    print("timeout")
except Exception as e:
    print("error", type(e).__name__)
"#;

/// A 10-byte "IPv4 header" sent raw (AF_PACKET) out of the pod's eth0.
const RAW_SEND: &str = r#"
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
s.send(b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x09" + b"\x08\x00" + b"\x45" + b"\x00" * 9)
print("sent")
"#;

fn connect(pod: &Netns, dst: &str, port: u16, timeout_s: f32) -> String {
    pod.exec(&[
        "/usr/bin/python3",
        "-c",
        CLIENT,
        dst,
        &port.to_string(),
        &timeout_s.to_string(),
    ])
    .trim()
    .to_string()
}

fn bpftool_json(args: &[&str], path: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .arg(path)
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool json")
}

fn bpftool_id(args: &[&str], path: &std::path::Path) -> u64 {
    bpftool_json(args, path)["id"].as_u64().expect("an id")
}

/// The python server in a pod, killed on drop.
struct Server(std::process::Child);

impl Server {
    fn start(pod: &Netns, ports: &[u16]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &pod.0, "/usr/bin/python3", "-c", SERVER]);
        cmd.args(ports.iter().map(|p| p.to_string()));
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting the server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let s = Self(child);
        assert_eq!(line.trim(), "ready");
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tcp_between_pods_is_enforced() {
    if !privileged() {
        return;
    }
    comb_host::ensure_bpffs().unwrap();
    let pins = common::PinGuard::fresh();
    let lab = Lab::new();
    let (client, server) = (&lab.pods[0], &lab.pods[1]);
    let _srv = Server::start(&server.0, &[8080, 9090]);
    // Plain routing works before anything is attached.
    assert_eq!(connect(&client.0, server.1, 9090, 5.0), "hello 9090");

    let inside = InNetns::enter(&lab.node);
    let (ci, si) = (ifindex(&client.2), ifindex(&server.2));
    let dp = Datapath::load(DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: comb_host::cgroup2_mount().unwrap(),
    })
    .expect("loading the datapath");
    let (cid, sid) = (EP_ID, ID_A);
    dp.policy().set_endpoint(ci, cid, &[ip(client.1)]).unwrap();
    dp.policy().set_endpoint(si, sid, &[ip(server.1)]).unwrap();
    dp.policy()
        .upsert_ipcache(format!("{}/32", client.1).parse().unwrap(), cid)
        .unwrap();
    dp.policy()
        .upsert_ipcache(format!("{}/32", server.1).parse().unwrap(), sid)
        .unwrap();
    dp.policy()
        .upsert_ipcache(format!("{GW}/32").parse().unwrap(), ID_HOST)
        .unwrap();
    // The server admits the client on 8080 only; the client may not reach 7070 anywhere.
    dp.policy()
        .upsert_entry(
            &PolicyKey::port(si, cid, Ingress, TCP, Some(8080)),
            &PolicyValue::allow(1),
        )
        .unwrap();
    dp.policy()
        .upsert_entry(
            &PolicyKey::any(si, ID_ANY, Ingress),
            &PolicyValue::deny(Reason::PolicyDenied, 2),
        )
        .unwrap();
    dp.policy()
        .upsert_entry(
            &PolicyKey::port(ci, ID_ANY, Egress, TCP, Some(7070)),
            &PolicyValue::deny(Reason::AuthzDeny, 3),
        )
        .unwrap();
    dp.policy()
        .set_config(&PolicyConfig {
            events: true,
            ..PolicyConfig::default()
        })
        .unwrap();
    let reader = dp.policy().flow_events().unwrap();
    dp.policy().attach(ci).unwrap();
    dp.policy().attach(si).unwrap();
    assert_eq!(dp.policy().attachments(), {
        let mut v = vec![ci, si];
        v.sort();
        v
    });

    assert_eq!(connect(&client.0, server.1, 8080, 5.0), "hello 8080");
    assert_eq!(connect(&client.0, server.1, 9090, 1.0), "timeout");
    assert_eq!(connect(&client.0, server.1, 7070, 1.0), "timeout");
    // The same again: still allowed (a new flow) after the first one closed.
    assert_eq!(connect(&client.0, server.1, 8080, 5.0), "hello 8080");
    // A truncated IPv4 header from the pod.
    assert_eq!(
        client.0.exec(&["/usr/bin/python3", "-c", RAW_SEND]).trim(),
        "sent"
    );

    let metrics = dp.policy().metrics().unwrap();
    let count = |ep: u32, dir: Direction, r: Reason| {
        metrics
            .iter()
            .find(|m| m.endpoint == ep && m.direction == dir && m.reason == r)
            .map_or(0, |m| m.packets)
    };
    assert_eq!(count(si, Ingress, Reason::PolicyAllow), 2, "{metrics:#?}");
    assert!(
        count(si, Ingress, Reason::CtEstablished) >= 4,
        "{metrics:#?}"
    );
    assert!(count(si, Egress, Reason::CtReply) >= 4, "{metrics:#?}");
    // SYN + retransmits.
    assert!(
        count(si, Ingress, Reason::PolicyDenied) >= 1,
        "{metrics:#?}"
    );
    assert!(count(ci, Egress, Reason::AuthzDeny) >= 1, "{metrics:#?}");
    // The client has no rule for 8080/9090: not enforced there.
    assert!(count(ci, Egress, Reason::NoPolicy) >= 3, "{metrics:#?}");
    assert!(count(ci, Ingress, Reason::CtReply) >= 4, "{metrics:#?}");
    assert_eq!(count(ci, Egress, Reason::Malformed), 1, "{metrics:#?}");
    let ct = dp.policy().ct_entries().unwrap();
    assert!(ct.iter().any(|e| e.endpoint == si
        && e.direction == Ingress
        && e.dst.port() == 8080
        && e.seen_reply
        && e.closing));

    let events = collect_events(reader, 1000);
    let denied = events
        .iter()
        .find(|e| e.dport == 9090 && e.endpoint == si)
        .expect("an event for the denied connection");
    assert_eq!((denied.src, denied.dst), (ip(client.1), ip(server.1)));
    assert_eq!((denied.direction, denied.endpoint), (Ingress, si));
    assert_eq!((denied.src_identity, denied.dst_identity), (cid, sid));
    assert_eq!(
        (denied.reason, denied.policy),
        (Reason::PolicyDenied.into(), 2)
    );
    let allowed = events
        .iter()
        .find(|e| e.dport == 8080 && e.endpoint == si)
        .expect("an event for the allowed connection");
    assert_eq!(
        (allowed.reason, allowed.src_identity),
        (Reason::PolicyAllow.into(), cid)
    );
    assert!(
        events
            .iter()
            .any(|e| e.dport == 7070 && e.endpoint == ci && e.reason == Reason::AuthzDeny)
    );

    // The agent goes away (pins kept): the pinned links keep enforcing.
    let old_prog = bpftool_id(
        &["prog", "show", "pinned"],
        &pins.0.join("progs/comb_policy_to_pod"),
    );
    drop(dp);
    assert_eq!(connect(&client.0, server.1, 9090, 1.0), "timeout");
    assert_eq!(connect(&client.0, server.1, 8080, 5.0), "hello 8080");
    // A new agent adopts maps and links and switches the links to its programs.
    let dp = Datapath::load(DatapathOptions {
        pin_dir: pins.0.clone(),
        cgroup_root: comb_host::cgroup2_mount().unwrap(),
    })
    .expect("reloading the datapath");
    assert_eq!(dp.policy().attachments().len(), 2);
    let new_prog = bpftool_id(
        &["prog", "show", "pinned"],
        &pins.0.join("progs/comb_policy_to_pod"),
    );
    assert_ne!(old_prog, new_prog, "a new program was loaded");
    let link = pins.0.join(format!("links/policy-{si}-to"));
    assert_eq!(
        bpftool_json(&["link", "show", "pinned"], &link)["prog_id"].as_u64(),
        Some(new_prog)
    );
    assert_eq!(connect(&client.0, server.1, 9090, 1.0), "timeout");
    assert_eq!(connect(&client.0, server.1, 8080, 5.0), "hello 8080");

    // Everything goes away at shutdown; traffic flows unenforced again.
    dp.shutdown(false).unwrap();
    assert!(!pins.0.exists());
    drop(inside);
    assert_eq!(connect(&client.0, server.1, 9090, 5.0), "hello 9090");
}
