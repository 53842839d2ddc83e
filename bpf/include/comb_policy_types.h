/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Types of the identity policy datapath (bpf/policy.c), shared with
 * userspace. Every struct has a #[repr(C)] twin in
 * crates/comb-datapath/src/policy/abi.rs, checked against the object's BTF
 * by a unit test: change both together. Maps are pinned and adopted across
 * agent restarts, so layouts are part of the on-node ABI.
 *
 * Addresses use struct comb_addr (comb_addr.h): 16 bytes, network order,
 * IPv4 v4-mapped (::ffff:a.b.c.d).
 */
#ifndef COMB_POLICY_TYPES_H
#define COMB_POLICY_TYPES_H

#include <linux/types.h>

#include "comb_addr.h"

/* Reserved security identities (the same numbers Cilium uses). Identities
 * of pods start at COMB_ID_FIRST_POD; identities of CIDRs named by policies
 * (ipBlock) at COMB_ID_FIRST_CIDR. 0 never names a peer: in a policy key it
 * means "any identity". */
#define COMB_ID_ANY 0
#define COMB_ID_HOST 1
#define COMB_ID_WORLD 2
#define COMB_ID_UNMANAGED 3
#define COMB_ID_REMOTE_NODE 6
#define COMB_ID_FIRST_POD 256
#define COMB_ID_FIRST_CIDR (1U << 24)

/* Direction, from the local endpoint's point of view. */
#define COMB_DIR_INGRESS 0 /* to the pod: tc egress of the host-side veth */
#define COMB_DIR_EGRESS 1  /* from the pod: tc ingress of the host-side veth */

/* comb_ipcache: LPM_TRIE, address prefix -> identity.
 * prefixlen counts bits of addr (IPv4: 96 + the v4 prefix length). */
struct comb_ipcache_key {
	__u32 prefixlen;
	struct comb_addr addr;
};

struct comb_ipcache_value {
	__u32 identity;
	/* Host-side veth ifindex of the local pod with this address when it has
	 * ingress REDIRECT entries (the source's hook consults them to redirect
	 * to the node proxy), 0 otherwise. */
	__u32 endpoint;
};

/* comb_policy_endpoints: HASH, host-side veth ifindex -> the local endpoint.
 * A packet on an interface without an entry passes untouched. */
struct comb_policy_endpoint {
	__u32 identity;
	__u32 flags; /* reserved, 0 */
	struct comb_addr addrs[2]; /* the pod's addresses (v4, v6; zero = none) */
};

/* comb_policy: LPM_TRIE, one table for all endpoints on the node.
 * Fields after prefixlen are compared as bytes, in order; endpoint, identity
 * and direction are always matched whole (prefixlen >= 72), protocol whole
 * or not at all (72 = any protocol, 80 = this protocol, any port), the port
 * (network order) by its leading bits (80 + k: a block of 2^(16-k) ports).
 *
 * Lookup for a new flow: {ep, peer identity, dir, proto, port} first; on a
 * miss {ep, COMB_ID_ANY, dir, proto, port}; on a second miss the endpoint is
 * not enforced in that direction and the flow is allowed. Userspace
 * (comb-model policy compiler) makes each identity's entries complete, so the
 * first hit is the whole answer: no precedence logic in the kernel. */
struct comb_policy_key {
	__u32 prefixlen;
	__u32 endpoint;  /* host-side veth ifindex */
	__u32 identity;  /* peer identity; COMB_ID_ANY = every other identity */
	__u8 direction;  /* COMB_DIR_* */
	__u8 protocol;   /* IPPROTO_*; 0 with prefixlen 72 */
	__be16 port;     /* destination port, network order */
};
#define COMB_POLICY_PREFIX_ANY_PROTO 72
#define COMB_POLICY_PREFIX_PROTO 80
#define COMB_POLICY_PREFIX_FULL 96

/* Verdicts. */
#define COMB_VERDICT_ALLOW 1
#define COMB_VERDICT_DENY 2
/* The flow needs the node L7 proxy (TCP only). The value's reason says what
 * happens when it cannot be redirected (no listener, not TCP, at the
 * destination's hook): COMB_REASON_L7_VISIBILITY forwards, anything else
 * drops with COMB_REASON_PROXY_UNAVAILABLE (fail closed, never widened). */
#define COMB_VERDICT_REDIRECT 3

/* Reasons, for counters and flow events. < 128: forwarded; >= 128: dropped. */
#define COMB_REASON_POLICY_ALLOW 1   /* a rule allows the new flow */
#define COMB_REASON_NO_POLICY 2      /* no policy selects the endpoint here */
#define COMB_REASON_CT_ESTABLISHED 3 /* conntrack: a known flow */
#define COMB_REASON_CT_REPLY 4       /* conntrack: reply of a known flow */
#define COMB_REASON_HOST 5           /* from the node itself (health checks) */
#define COMB_REASON_NOT_IP 6         /* ARP and the like: no policy applies */
#define COMB_REASON_FRAGMENT 7       /* later fragment of an allowed datagram */
#define COMB_REASON_CT_RELATED 8     /* conntrack: ICMP error about a known flow */
#define COMB_REASON_L7_VISIBILITY 9  /* visibility REDIRECT, not redirected */
#define COMB_REASON_PROXY_REDIRECT 10 /* sent to the node proxy */
#define COMB_REASON_HBONE_REDIRECT 11 /* sent to the HBONE outbound listener */
#define COMB_REASON_HBONE_UNAVAILABLE 12 /* HBONE peer, no listener: plaintext */
#define COMB_REASON_POLICY_DENIED 128 /* NetworkPolicy selects, nothing allows */
#define COMB_REASON_AUTHZ_DENY 129    /* an AuthorizationPolicy DENY rule matched */
#define COMB_REASON_AUTHZ_NO_ALLOW 130 /* ALLOW policies exist, none matched */
#define COMB_REASON_PROXY_UNAVAILABLE 131 /* L7 needed, cannot redirect */
#define COMB_REASON_FRAG_UNKNOWN 132 /* later fragment, first one not seen */
#define COMB_REASON_MALFORMED 133    /* truncated or invalid IP header */
#define COMB_REASON_MTLS_REQUIRED 134 /* STRICT: plaintext from another node */

struct comb_policy_value {
	__u8 verdict;     /* COMB_VERDICT_* */
	__u8 reason;      /* COMB_REASON_* reported with it */
	__u16 proxy_port; /* unused: the listener comes from comb_proxy_listeners */
	__u32 policy;     /* userspace index of the deciding policy, 0 = none */
};

/* comb_ct: LRU_HASH. One entry per flow and direction it was judged in:
 * a local pod-to-pod flow has two (the client's egress, the server's
 * ingress). The tuple is the flow's original direction; a packet matches
 * {its tuple, dir} (established) or {its reversed tuple, the other dir}
 * (reply). Ports are network order; 0 for protocols without ports. ICMP and
 * ICMPv6 echoes use the echo identifier: a request has sport = id, dport = 0,
 * a reply sport = 0, dport = id (so a reply's reversed tuple is its
 * request's); other ICMP messages 0 and 0. ICMP errors create no entry. */
struct comb_ct_key {
	struct comb_addr saddr;
	struct comb_addr daddr;
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 direction;
	__u8 pad[2];
};

#define COMB_CT_F_SEEN_REPLY (1U << 0)
#define COMB_CT_F_CLOSING (1U << 1) /* FIN or RST seen: close timeout */
#define COMB_CT_F_PROXY (1U << 2)   /* redirected to the node proxy (EGRESS) */
/* The HBONE path. With COMB_CT_F_PROXY (EGRESS): redirected to the HBONE
 * outbound listener (a retransmitted SYN is assigned to it again). Alone
 * (INGRESS): a stream the node proxy delivered from an HBONE tunnel (its
 * socket had COMB_HBONE_DELIVERY_MARK); the pod's replies get
 * COMB_PROXY_MARK, so they reach the proxy's delivery socket. */
#define COMB_CT_F_HBONE (1U << 3)
struct comb_ct_value {
	__u64 expires_ns; /* bpf_ktime_get_boot_ns() deadline */
	__u64 created_ns;
	__u32 flags;
	__u32 endpoint; /* ifindex of the judging endpoint */
	__u32 policy;   /* deciding policy, as in comb_policy_value */
	__u8 reason;    /* reason of the verdict that created the entry */
	__u8 pad[3];
};

/* comb_policy_config: ARRAY with one entry at index 0. */
#define COMB_POLICY_CFG_F_EVENTS (1U << 0) /* emit flow events */
struct comb_policy_config {
	__u32 flags;
	__u32 reserved;
	__u64 ct_tcp_ns;   /* established TCP lifetime */
	__u64 ct_close_ns; /* TCP after FIN/RST, and SYN not answered */
	__u64 ct_other_ns; /* UDP, ICMP, ... */
};

/* comb_policy_metrics: PERCPU_HASH {ep, dir, reason} -> packets, bytes.
 * The verdict follows from the reason (< 128 forwarded). */
struct comb_policy_metric_key {
	__u32 endpoint;
	__u8 direction;
	__u8 reason;
	__u8 pad[2];
};
struct comb_policy_metric_value {
	__u64 packets;
	__u64 bytes;
};

/* comb_flow_events: RINGBUF. One event per new flow judged (allowed or
 * dropped) and per dropped packet, when COMB_POLICY_CFG_F_EVENTS is set.
 * Events that do not fit are counted in comb_policy_events_lost. */
struct comb_flow_event {
	__u64 time_ns; /* bpf_ktime_get_boot_ns() */
	struct comb_addr saddr;
	struct comb_addr daddr;
	__be16 sport;
	__be16 dport;
	__u8 protocol;
	__u8 direction;
	__u8 verdict;
	__u8 reason;
	__u32 endpoint;     /* host-side veth ifindex */
	__u32 src_identity;
	__u32 dst_identity;
	__u32 policy;
	__u32 len;          /* packet length */
	__u32 reserved;
};

/* comb_frag: LRU_HASH, IPv4/IPv6 fragment id -> ports of its first
 * fragment, so later fragments of an allowed datagram follow it. */
struct comb_frag_key {
	struct comb_addr saddr;
	struct comb_addr daddr;
	__u32 id;
	__u8 protocol;
	__u8 pad[3];
};
struct comb_frag_value {
	__be16 sport;
	__be16 dport;
	__u8 verdict; /* COMB_VERDICT_ALLOW or DENY, as for the first fragment */
	__u8 reason;
	__u8 pad[2];
};

/* comb_proxy_listeners: SOCKMAP of the node proxy's transparent listeners, by
 * kind and family. A redirected SYN is bpf_sk_assign'ed to one; every packet
 * of a redirected flow from the client gets COMB_PROXY_MARK (under the
 * mask), which the node's policy routing (fwmark 0xb00/0xf00 -> table 2005,
 * local default route) delivers locally.
 *   L7 (0, 1):        flows with a REDIRECT verdict (docs/l7.md)
 *   HBONE_OUT (2, 3): new TCP flows of mesh pods to HBONE peers
 *   HBONE_IN (4, 5):  SYNs to <local mesh pod>:15008 arriving on the uplink
 * An empty slot means "cannot redirect" for that kind. */
#define COMB_PROXY_LISTENER_V4 0
#define COMB_PROXY_LISTENER_V6 1
#define COMB_HBONE_OUT_LISTENER_V4 2
#define COMB_HBONE_OUT_LISTENER_V6 3
#define COMB_HBONE_IN_LISTENER_V4 4
#define COMB_HBONE_IN_LISTENER_V6 5
#define COMB_PROXY_LISTENERS 8 /* slots 6, 7 reserved */
#define COMB_PROXY_MARK 0x0B00
#define COMB_PROXY_MARK_MASK 0x0F00
/* SO_MARK of the proxy's sockets that deliver HBONE streams to local pods
 * (source = the remote pod's address, IP_TRANSPARENT), under
 * COMB_PROXY_MARK_MASK: accepted by PeerAuthentication STRICT, and the flow's
 * conntrack entry gets COMB_CT_F_HBONE. Only trusted on locally sent packets
 * (skb->ingress_ifindex == 0). */
#define COMB_HBONE_DELIVERY_MARK 0x0C00
#define COMB_HBONE_PORT 15008

/* comb_mesh_addrs: HASH, address -> what the mesh makes of it. Written only
 * for addresses that matter: remote pods reached through HBONE (PEER) and
 * local mesh pods (LOCAL, with their host veth in `endpoint`). A miss is
 * "plain": no steering, no HBONE inbound. */
#define COMB_MESH_ADDR_F_PEER (1U << 0)  /* remote pod: steer to HBONE_OUT */
#define COMB_MESH_ADDR_F_LOCAL (1U << 1) /* local mesh pod: HBONE inbound */
struct comb_mesh_addr {
	__u32 flags;
	__u32 endpoint; /* host veth ifindex for LOCAL, else 0 */
};

/* comb_mesh_ports: HASH {endpoint, port} -> flags. Port 0 is the endpoint's
 * own entry: ENROLLED (dataplane mode "mesh") and STRICT (its default
 * PeerAuthentication mode); no entry = not in the mesh (no steering, no
 * STRICT). Other ports hold the pod's portLevelMtls answers, absolute (STRICT
 * or 0 = plaintext accepted), consulted only while port 0 says ENROLLED. */
#define COMB_MESH_F_ENROLLED (1U << 0)
#define COMB_MESH_F_STRICT (1U << 1)
struct comb_mesh_port_key {
	__u32 endpoint; /* host veth ifindex */
	__be16 port;    /* destination (container) port, network order; 0 = the pod */
	__u8 pad[2];
};
struct comb_mesh_port {
	__u32 flags;
};

#define COMB_MAX_IPCACHE 65536
#define COMB_MAX_POLICY 262144
#define COMB_MAX_CT 262144
#define COMB_MAX_FRAGS 8192
#define COMB_MAX_POLICY_METRICS 16384
#define COMB_FLOW_RINGBUF_BYTES (1U << 22)
#define COMB_MAX_MESH_ADDRS 65536
#define COMB_MAX_MESH_PORTS 65536

#endif /* COMB_POLICY_TYPES_H */
