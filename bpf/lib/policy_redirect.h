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
#include "listeners.h"

/* Hand the SYN to the L7 proxy's listener of its family (listeners.h). */
static __always_inline int comb_proxy_assign(struct __sk_buff *skb, const struct comb_pkt *p)
{
	return comb_listener_assign(skb, comb_listener_slot(COMB_PROXY_LISTENER_V4, p));
}

/* A packet of a redirected flow (conntrack entry with COMB_CT_F_PROXY):
 * marked, so it is delivered locally, where the socket demux finds the
 * proxy's socket for the tuple. A SYN (retransmitted, or a request socket
 * that is gone) is assigned to the listener again (HBONE_OUT when the entry
 * has COMB_CT_F_HBONE, else L7); if that fails the mark alone still reaches
 * the request socket when there is one. */
static __always_inline void comb_redirect_established(struct __sk_buff *skb,
						      const struct comb_pkt *p, __u32 ct_flags)
{
	__u32 kind = (ct_flags & COMB_CT_F_HBONE) ? COMB_HBONE_OUT_LISTENER_V4
						  : COMB_PROXY_LISTENER_V4;

	if (comb_is_syn(p))
		comb_listener_assign(skb, comb_listener_slot(kind, p));
	comb_proxy_mark(skb);
}

#endif /* COMB_POLICY_REDIRECT_H */
