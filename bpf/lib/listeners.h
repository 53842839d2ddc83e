/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The node proxy's transparent listeners (comb_proxy_listeners): handing a SYN
 * to one with bpf_sk_assign, and the mark that makes the node's policy routing
 * deliver a packet locally. Used by the policy programs (L7 redirect, HBONE
 * outbound) and the uplink program (HBONE inbound). */
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

/* Hand the SYN to the listener in `slot`: 0, or < 0 when the slot holds no
 * listening socket (proxy down) or the kernel refuses (not at ingress, other
 * netns). */
static __always_inline int comb_listener_assign(struct __sk_buff *skb, __u32 slot)
{
	struct bpf_sock *sk = bpf_map_lookup_elem(&comb_proxy_listeners, &slot);
	long r = -1;

	if (!sk)
		return -1;
	if (sk->state == BPF_TCP_LISTEN)
		r = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return r < 0 ? -1 : 0;
}

#endif /* COMB_LISTENERS_H */
