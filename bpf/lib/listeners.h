/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The node proxy's listeners (comb_proxy_listeners): whether one is there to
 * take a flow, and the mark that makes the node's policy routing deliver a
 * packet locally, where the node namespace's socket lookup (established
 * sockets first, then proxy_lookup.c for a SYN) finds the proxy. Used by the
 * policy programs (L7 redirect, HBONE outbound) and the uplink program (HBONE
 * inbound). */
#ifndef COMB_LISTENERS_H
#define COMB_LISTENERS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_policy_types.h"
#include "mesh_maps.h"
#include "policy_parse.h"

static __always_inline int comb_is_syn(const struct comb_pkt *p)
{
	return p->protocol == COMB_IPPROTO_TCP &&
	       (p->tcp_flags & (COMB_TCP_SYN | COMB_TCP_ACK)) == COMB_TCP_SYN;
}

/* The node's policy routing (fwmark -> local table) delivers the packet
 * locally instead of forwarding it; other mark bits are left alone. */
static __always_inline void comb_proxy_mark(struct __sk_buff *skb)
{
	skb->mark = (skb->mark & ~COMB_PROXY_MARK_MASK) | COMB_PROXY_MARK;
}

/* The slot of a listener kind (COMB_*_LISTENER_V4) for the packet's family. */
static __always_inline __u32 comb_listener_slot(__u32 v4_slot, const struct comb_pkt *p)
{
	return p->v6 ? v4_slot + 1 : v4_slot;
}

/* 0 when `slot` holds a listening socket (the proxy is up and takes that
 * kind of flow), else -1. The SYN itself is handed to it by the sk_lookup
 * program of the node namespace (proxy_lookup.c) after the established and
 * TIME_WAIT lookup: a tuple the proxy closed first reopens as with any server.
 * bpf_sk_assign at tc, which preceded it, bypassed that lookup and stalled
 * such a SYN until the TIME_WAIT expired. */
static __always_inline int comb_listener_ready(__u32 slot)
{
	struct bpf_sock *sk = bpf_map_lookup_elem(&comb_proxy_listeners, &slot);
	int ready;

	if (!sk)
		return -1;
	ready = sk->state == BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return ready ? 0 : -1;
}

#endif /* COMB_LISTENERS_H */
