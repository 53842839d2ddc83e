/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Transparent redirect of pod TCP flows to the node L7 proxy (policy.c,
 * step 6b): bpf_sk_assign of the SYN to the proxy's listener and
 * COMB_PROXY_MARK on every packet from the client, at tcx ingress of the
 * source pod's host veth (bpf_sk_assign works on the ingress path only). */
#ifndef COMB_POLICY_REDIRECT_H
#define COMB_POLICY_REDIRECT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_policy_types.h"
#include "policy_maps.h"
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

/* Hand the SYN to the proxy's listener of its family: 0, or < 0 when there
 * is no listening socket in comb_proxy_listeners (proxy down) or the kernel
 * refuses (not at ingress, other netns). */
static __always_inline int comb_proxy_assign(struct __sk_buff *skb, const struct comb_pkt *p)
{
	__u32 key = p->v6 ? COMB_PROXY_LISTENER_V6 : COMB_PROXY_LISTENER_V4;
	struct bpf_sock *sk = bpf_map_lookup_elem(&comb_proxy_listeners, &key);
	long r = -1;

	if (!sk)
		return -1;
	if (sk->state == BPF_TCP_LISTEN)
		r = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return r < 0 ? -1 : 0;
}

/* A packet of a redirected flow (conntrack entry with COMB_CT_F_PROXY):
 * marked, so it is delivered locally, where the socket demux finds the
 * proxy's socket for the tuple. A SYN (retransmitted, or a request socket
 * that is gone) is assigned to the listener again; if that fails the mark
 * alone still reaches the request socket when there is one. */
static __always_inline void comb_redirect_established(struct __sk_buff *skb,
						      const struct comb_pkt *p)
{
	if (comb_is_syn(p))
		comb_proxy_assign(skb, p);
	comb_proxy_mark(skb);
}

#endif /* COMB_POLICY_REDIRECT_H */
