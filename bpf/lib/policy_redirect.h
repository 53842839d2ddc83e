/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Transparent redirect of pod TCP flows to the node L7 proxy (policy.c,
 * step 6b): COMB_PROXY_MARK on every packet from the client, at tcx ingress
 * of the source pod's host veth, and a conntrack entry with COMB_CT_F_PROXY,
 * from which the node namespace's sk_lookup program (proxy_lookup.c) hands
 * the SYN to the proxy's listener. */
#ifndef COMB_POLICY_REDIRECT_H
#define COMB_POLICY_REDIRECT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_policy_types.h"
#include "policy_maps.h"
#include "policy_parse.h"
#include "listeners.h"

/* 0 when the L7 proxy's listener of the packet's family is up (listeners.h). */
static __always_inline int comb_proxy_ready(const struct comb_pkt *p)
{
	return comb_listener_ready(comb_listener_slot(COMB_PROXY_LISTENER_V4, p));
}

/* A packet of a redirected flow (conntrack entry with COMB_CT_F_PROXY):
 * marked, so it is delivered locally, where the socket lookup finds the
 * proxy's socket for the tuple, or for a SYN (retransmitted, or reusing the
 * tuple of a closed flow) proxy_lookup.c finds the listener the entry names
 * (HBONE_OUT with COMB_CT_F_HBONE, else L7). */
static __always_inline void comb_redirect_established(struct __sk_buff *skb)
{
	comb_proxy_mark(skb);
}

#endif /* COMB_POLICY_REDIRECT_H */
