/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* HBONE inbound on the node's uplink (uplink.c): TCP that belongs to the node
 * proxy although it is addressed to a local pod. */
#ifndef COMB_UPLINK_H
#define COMB_UPLINK_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "comb_policy_types.h"
#include "mesh_maps.h"
#include "policy_parse.h"
#include "listeners.h"

/* A socket of the node itself (not a listener) owns this packet's 4-tuple: in
 * practice the proxy's outbound HBONE socket, bound (IP_TRANSPARENT) to the
 * source pod's address. A pod's own connection lives in the pod's namespace
 * and is not found here. */
static __always_inline int comb_uplink_node_socket(struct __sk_buff *skb, const struct comb_pkt *p)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 len;
	int found;

	if (p->v6) {
		__builtin_memcpy(t.ipv6.saddr, p->saddr.a, 16);
		__builtin_memcpy(t.ipv6.daddr, p->daddr.a, 16);
		t.ipv6.sport = p->sport;
		t.ipv6.dport = p->dport;
		len = sizeof(t.ipv6);
	} else {
		t.ipv4.saddr = p->saddr.a[3];
		t.ipv4.daddr = p->daddr.a[3];
		t.ipv4.sport = p->sport;
		t.ipv4.dport = p->dport;
		len = sizeof(t.ipv4);
	}
	sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	found = sk->state != BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return found;
}

/* One packet arriving on an uplink. Never drops, never touches what is not
 * the mesh's: only TCP to a local mesh pod's address (comb_mesh_addrs LOCAL)
 * is looked at.
 *   dport 15008: HBONE to that pod, which the node proxy terminates: marked
 *     (COMB_PROXY_MARK: the policy routing delivers it locally); the node
 *     namespace's sk_lookup program (proxy_lookup.c) hands a SYN to the
 *     HBONE inbound listener of its family. Without a
 *     listener the node answers RST (15008 is the mesh's port on every
 *     enrolled pod, as in Istio ambient).
 *   sport 15008, and a node socket owns the tuple: a reply to the proxy's
 *     outbound HBONE connection (source = the pod's address): marked.
 * Everything else passes untouched: the pods' own traffic, non-mesh pods,
 * the node's own addresses. */
static __always_inline int comb_uplink_run(struct __sk_buff *skb)
{
	struct comb_pkt p = {};
	struct comb_mesh_addr *m;
	int r;

	if (skb->protocol == bpf_htons(ETH_P_IP))
		r = comb_parse_ipv4(skb, &p);
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		r = comb_parse_ipv6(skb, &p);
	else
		return TC_ACT_OK;
	if (r < 0 || p.protocol != COMB_IPPROTO_TCP || p.frag == COMB_FRAG_LATER)
		return TC_ACT_OK;
	m = bpf_map_lookup_elem(&comb_mesh_addrs, &p.daddr);
	if (!m || !(m->flags & COMB_MESH_ADDR_F_LOCAL))
		return TC_ACT_OK;
	if (p.dport == bpf_htons(COMB_HBONE_PORT)) {
		comb_proxy_mark(skb);
	} else if (p.sport == bpf_htons(COMB_HBONE_PORT) && comb_uplink_node_socket(skb, &p)) {
		comb_proxy_mark(skb);
	}
	return TC_ACT_OK;
}

#endif /* COMB_UPLINK_H */
