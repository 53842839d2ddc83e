/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Comb identity policy: NetworkPolicy-style enforcement on the host side of
 * every local pod's veth, in both directions, without iptables.
 *
 * Programs (tcx links pinned by the agent as <pin_dir>/links/policy-<ifindex>-from
 * and -to, see crates/comb-datapath/src/policy.rs):
 *   comb_policy_from_pod  tcx ingress of the host veth: packets FROM the pod,
 *                         direction COMB_DIR_EGRESS, peer = destination.
 *   comb_policy_to_pod    tcx egress of the host veth: packets TO the pod,
 *                         direction COMB_DIR_INGRESS, peer = source.
 * The local endpoint is skb->ifindex (the host veth), so one program serves
 * every pod and needs no per-pod rebuild.
 *
 * Per packet (bpf/lib/policy.h):
 *   1. comb_policy_endpoints[ifindex]; no entry: TC_ACT_OK, untouched and
 *      uncounted (an interface the agent does not enforce yet).
 *   2. Not IPv4/IPv6 (ARP, ...): pass, COMB_REASON_NOT_IP.
 *   3. Parse (bpf/lib/policy_parse.h): IPv4, or IPv6 skipping up to 8
 *      hop-by-hop/routing/destination-options headers and reading the
 *      fragment header; ports of TCP/UDP/SCTP (0 otherwise). ICMP (ICMPv6
 *      in IPv6) has no ports, but an echo's identifier stands in for them
 *      in conntrack: an echo request (type 8 / 128) has sport = id, dport 0;
 *      an echo reply (0 / 129) sport 0, dport = id, so a reply's reversed
 *      tuple is its request's and each ping (identifier) is a flow of its
 *      own. Other ICMP messages keep ports 0. A truncated or invalid header
 *      (an ICMP header under 8 bytes included) drops with
 *      COMB_REASON_MALFORMED.
 *   4. Fragments: the first one (offset 0, more-fragments) is judged like any
 *      packet and its ports + outcome go to comb_frag {saddr, daddr, id,
 *      proto}; later ones take them from there (allowed: pass,
 *      COMB_REASON_FRAGMENT; denied: drop with the stored reason; unknown:
 *      drop, COMB_REASON_FRAG_UNKNOWN). The key has no direction: for a
 *      pod-to-pod datagram the receiver's verdict on the first fragment
 *      replaces the sender's, which can only turn later fragments into drops
 *      of a datagram the receiver refused anyway.
 *   5. Conntrack (bpf/lib/policy_ct.h): {tuple, dir} live: pass,
 *      CT_ESTABLISHED; {reversed tuple, other dir} live: pass, CT_REPLY, and
 *      the entry gets SEEN_REPLY. Deadlines are bpf_ktime_get_boot_ns()
 *      based and rewritten only when they move by more than 1 s (an eighth
 *      of the lifetime if that is shorter). TCP: the close timeout until a
 *      reply is seen, then the established one; FIN or RST sets CLOSING and
 *      the close timeout; a bare SYN on a CLOSING entry is judged again
 *      (tuple reuse). Other protocols: the "other" timeout,
 *      refreshed. An expired entry is a miss and is overwritten. Timeouts
 *      come from comb_policy_config[0]; a field left 0 takes its default
 *      (21600 s / 10 s / 60 s). Policy changes apply to new flows only.
 *      ICMP errors (ICMPv4 destination unreachable, time exceeded, parameter
 *      problem: types 3, 11, 12; ICMPv6 types 1-4, packet too big included)
 *      skip the lookup above and are RELATED instead: the packet they quote
 *      (its IP header, IPv4 options skipped, and the first 8 bytes after it:
 *      ports, or an echo's identifier mapped as in 3) went the other way
 *      through this hook, so it is looked up as {quoted tuple, other dir}
 *      and {reversed quoted tuple, dir}, and only if it was sent by the
 *      error's destination. A live entry passes the error with
 *      COMB_REASON_CT_RELATED (the entry is not refreshed): port
 *      unreachable reaches a UDP client, PMTU discovery works. Otherwise the
 *      error is judged by policy like a new ICMP packet but never creates
 *      an entry. Behind IPv6 extension headers in the quoted packet the ports
 *      are not read, so such errors are judged by policy.
 *  5b. PeerAuthentication STRICT (bpf/lib/mesh.h), comb_policy_to_pod only,
 *      new flows (conntrack miss) only: TCP or UDP that came from another node
 *      (skb->ingress_ifindex is neither 0, i.e. sent by the node itself, nor a
 *      local endpoint's veth) to an enrolled pod (comb_mesh_ports {ep, 0}
 *      ENROLLED) whose mode for the destination port ({ep, dport}, else
 *      {ep, 0}) is STRICT drops with COMB_REASON_MTLS_REQUIRED, before the
 *      policy lookup, and is never tracked. Established flows and replies are
 *      not affected (a mode change applies to new flows, like a policy change).
 *   6. Policy: peer identity = comb_ipcache LPM lookup of the peer address
 *      (miss: COMB_ID_WORLD); comb_policy {ep, peer, dir, proto, dport} with
 *      prefixlen 96 (dport 0 for protocols other than TCP/UDP/SCTP: ICMP
 *      meets the any-protocol entries whatever its echo identifier), then
 *      {ep, COMB_ID_ANY, ...}; a second miss allows with
 *      COMB_REASON_NO_POLICY. The first hit is the whole answer (userspace
 *      compiles precedence into the entries; none here). ALLOW and NO_POLICY
 *      create a conntrack entry, DENY drops with the entry's reason.
 *      REDIRECT (needs the node L7 proxy) is redirected where it can be (6b);
 *      where it cannot, its value's reason decides: COMB_REASON_L7_VISIBILITY
 *      forwards (and is tracked) with that reason, anything else drops with
 *      COMB_REASON_PROXY_UNAVAILABLE (fail closed; never widened to ALLOW).
 *      At tcx egress (comb_policy_to_pod) it never can. A value whose reason
 *      disagrees with its verdict is sanitised the same way (never forwarded
 *      with a drop reason). Identities and reasons for node traffic
 *      (COMB_ID_HOST, COMB_REASON_HOST) come from userspace entries; the
 *      kernel has no special case.
 *  6b. Redirect to the node proxy (bpf/lib/policy_redirect.h), in
 *      comb_policy_from_pod only (the flow must be marked before the node
 *      routes it; the destination's hook is too late), for new TCP flows
 *      (unfragmented):
 *      a. The flow is a REDIRECT when the pod's own egress verdict is, or
 *         when that verdict forwards and the destination's ipcache value has
 *         an `endpoint` (a local pod with ingress REDIRECT entries) whose
 *         entry {endpoint, this pod's identity, INGRESS, tcp, dport} (then
 *         {.., COMB_ID_ANY, ..}) is a REDIRECT: that value (verdict, reason,
 *         policy) becomes the flow's.
 *      b. A SYN of a REDIRECT flow, while comb_proxy_listeners[
 *         COMB_PROXY_LISTENER_V4 / _V6] of its family holds a listening
 *         socket, gets skb->mark COMB_PROXY_MARK under COMB_PROXY_MARK_MASK
 *         and its conntrack entry (EGRESS) COMB_CT_F_PROXY; counted
 *         COMB_REASON_PROXY_REDIRECT. The node's policy routing (fwmark
 *         0xb00/0xf00 -> table 2005: local 0.0.0.0/0 and ::/0 dev lo,
 *         installed by crates/comb-datapath/src/policy/routing.rs) delivers
 *         it locally instead of forwarding it; the node namespace's sk_lookup
 *         program (bpf/proxy_lookup.c) reads the entry and hands the SYN to
 *         that listener, which accepts a socket whose local address is the
 *         original destination.
 *      c. No listener (empty slot, or not listening) or not a SYN: "cannot
 *         redirect", as in 6.
 *      d. Later packets from the client matching a COMB_CT_F_PROXY entry
 *         get the mark only (the kernel's socket demux finds the proxy's
 *         socket by its 4-tuple); a SYN among them (retransmitted, or
 *         reusing the tuple while the proxy's socket is in TIME_WAIT) goes
 *         through the established/TIME_WAIT lookup, then proxy_lookup.c.
 *      e. The proxy's packets to the client (source = the original
 *         destination) leave through the client's veth and are replies of
 *         that entry (CT_REPLY) in comb_policy_to_pod. The proxy's own
 *         connection to the destination comes from the node (COMB_ID_HOST).
 *  6c. HBONE outbound (bpf/lib/mesh.h), comb_policy_from_pod, a new TCP flow
 *      (unfragmented, dport not 15008) that 6/6b forward unredirected, from an
 *      enrolled pod to an address comb_mesh_addrs calls an HBONE PEER: a SYN,
 *      while comb_proxy_listeners[COMB_HBONE_OUT_LISTENER_V4 / _V6] is
 *      listening, is marked as in 6b; counted COMB_REASON_HBONE_REDIRECT, the
 *      conntrack entry gets COMB_CT_F_PROXY | COMB_CT_F_HBONE, from which
 *      proxy_lookup.c hands it (and a retransmitted SYN) to that listener.
 *      No listener (or not a SYN): forwarded
 *      in plaintext with COMB_REASON_HBONE_UNAVAILABLE, so the destination's
 *      PeerAuthentication decides.
 *  6d. HBONE delivery, comb_policy_to_pod: a new flow sent by the node itself
 *      (ingress_ifindex 0) with COMB_HBONE_DELIVERY_MARK under
 *      COMB_PROXY_MARK_MASK is the node proxy delivering a tunnelled stream
 *      from the remote pod's address. Judged by that address's identity as
 *      always; a REDIRECT verdict forwards (PROXY_REDIRECT: the proxy applied
 *      L7 policy inside the tunnel). Its INGRESS entry gets COMB_CT_F_HBONE,
 *      and the pod's replies (CT_REPLY of such an entry in
 *      comb_policy_from_pod) get COMB_PROXY_MARK: the policy routing
 *      delivers them to the proxy's socket instead of routing them out.
 *   7. Every judged packet is counted in comb_policy_metrics {ep, dir,
 *      reason} (packets, bytes = skb->len, the L2 frame).
 *   8. With COMB_POLICY_CFG_F_EVENTS, a struct comb_flow_event goes to
 *      comb_flow_events for every new-flow decision (allowed or not; not for
 *      conntrack hits) and every dropped packet; src/dst identity are the
 *      endpoint's and the peer's, by direction. verdict is the policy verdict
 *      (DENY for drops without one); whether the packet passed follows from
 *      the reason. Events that do not fit are counted in
 *      comb_policy_events_lost.
 *
 * Passing returns TC_ACT_OK (TCX_PASS), dropping TC_ACT_SHOT (TCX_DROP).
 * Maps are pinned under <pin_dir>/maps/ and adopted by a restarted agent, so
 * enforcement and conntrack survive it. comb_proxy_listeners and the mesh maps
 * are shared with the node uplink program (bpf/uplink.c, HBONE inbound).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "policy.h"

SEC("tcx/ingress")
int comb_policy_from_pod(struct __sk_buff *skb)
{
	return comb_policy_run(skb, COMB_DIR_EGRESS);
}

SEC("tcx/egress")
int comb_policy_to_pod(struct __sk_buff *skb)
{
	return comb_policy_run(skb, COMB_DIR_INGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
