/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Comb proxy lookup: the sk_lookup program of the node's network namespace
 * (one link, pinned as <pin_dir>/links/proxy-lookup,
 * crates/comb-datapath/src/policy/lookup.rs). It hands the SYNs the policy
 * and uplink programs marked for the node proxy to the proxy's listeners.
 *
 * The kernel runs it for a TCP segment delivered locally that no established
 * or TIME_WAIT socket took: a new connection, or a SYN that reopens a tuple
 * in TIME_WAIT (the proxy closed a redirected connection first and the
 * client reuses its port). Handing the SYN over at this depth, not with
 * bpf_sk_assign at tc, keeps that TIME_WAIT recycling the kernel does for
 * any server; the earlier tc assignment skipped it and stalled such a SYN.
 *
 *   - A tuple whose conntrack entry (comb_ct, EGRESS, original direction
 *     client -> destination) has COMB_CT_F_PROXY: the HBONE outbound
 *     listener with COMB_CT_F_HBONE, else the L7 listener.
 *   - dport 15008 to a local mesh pod (comb_mesh_addrs LOCAL): the HBONE
 *     inbound listener.
 *   - Anything else: the kernel's own lookup (SK_PASS, nothing selected).
 * The slot of the packet's family in comb_proxy_listeners; an empty slot
 * leaves the kernel's lookup alone (no listener there: RST, as without
 * Comb). Never drops.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "addr.h"
#include "comb_policy_types.h"
#include "ct_map.h"
#include "mesh_maps.h"

/* Context loads as written: clang otherwise sinks loads used under one branch
 * into a load through a computed context pointer, which the verifier refuses. */
#define COMB_CTX_READ(f) (*(volatile __typeof__(f) *)&(f))

/* The tuple of the segment as a conntrack key of the client's flow. */
static __always_inline void comb_lookup_ct_key(const struct bpf_sk_lookup *ctx,
					       struct comb_ct_key *k)
{
	__u32 r4 = COMB_CTX_READ(ctx->remote_ip4), l4 = COMB_CTX_READ(ctx->local_ip4);
	__u32 r6[4], l6[4];
	int i;

	r6[0] = COMB_CTX_READ(ctx->remote_ip6[0]);
	r6[1] = COMB_CTX_READ(ctx->remote_ip6[1]);
	r6[2] = COMB_CTX_READ(ctx->remote_ip6[2]);
	r6[3] = COMB_CTX_READ(ctx->remote_ip6[3]);
	l6[0] = COMB_CTX_READ(ctx->local_ip6[0]);
	l6[1] = COMB_CTX_READ(ctx->local_ip6[1]);
	l6[2] = COMB_CTX_READ(ctx->local_ip6[2]);
	l6[3] = COMB_CTX_READ(ctx->local_ip6[3]);
	if (ctx->family == COMB_AF_INET) {
		comb_addr_set_v4(&k->saddr, r4);
		comb_addr_set_v4(&k->daddr, l4);
	} else {
		for (i = 0; i < 4; i++) {
			k->saddr.a[i] = r6[i];
			k->daddr.a[i] = l6[i];
		}
	}
	k->sport = ctx->remote_port;           /* network order */
	k->dport = bpf_htons(ctx->local_port); /* host order in the context */
	k->protocol = IPPROTO_TCP;
	k->direction = COMB_DIR_EGRESS;
}

/* The listener kind (COMB_*_LISTENER_V4) for the segment, or -1. */
static __always_inline int comb_lookup_kind(const struct bpf_sk_lookup *ctx)
{
	struct comb_ct_key k = {};
	struct comb_ct_value *ct;
	struct comb_mesh_addr *m;

	comb_lookup_ct_key(ctx, &k);
	ct = bpf_map_lookup_elem(&comb_ct, &k);
	if (ct && (ct->flags & COMB_CT_F_PROXY))
		return (ct->flags & COMB_CT_F_HBONE) ? COMB_HBONE_OUT_LISTENER_V4
						     : COMB_PROXY_LISTENER_V4;
	if (ctx->local_port != COMB_HBONE_PORT)
		return -1;
	m = bpf_map_lookup_elem(&comb_mesh_addrs, &k.daddr);
	if (m && (m->flags & COMB_MESH_ADDR_F_LOCAL))
		return COMB_HBONE_IN_LISTENER_V4;
	return -1;
}

SEC("sk_lookup")
int comb_proxy_lookup(struct bpf_sk_lookup *ctx)
{
	struct bpf_sock *sk;
	int kind;
	__u32 slot;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	kind = comb_lookup_kind(ctx);
	if (kind < 0)
		return SK_PASS;
	slot = (__u32)kind + (ctx->family == COMB_AF_INET6 ? 1 : 0);
	sk = bpf_map_lookup_elem(&comb_proxy_listeners, &slot);
	if (!sk)
		return SK_PASS;
	/* Exactly this socket: the proxy's listeners share their ports with
	 * SO_REUSEPORT while an upgrade hands them over, and the slot, not the
	 * reuseport group, says which process takes new flows. Fails (not
	 * listening: the proxy is going away) -> the kernel's own lookup, as if
	 * the slot were empty. */
	bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_NO_REUSEPORT);
	bpf_sk_release(sk);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
