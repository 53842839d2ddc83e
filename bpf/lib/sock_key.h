/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Building struct comb_sock_key from sockops and sk_msg contexts. */
#ifndef COMB_SOCK_KEY_H
#define COMB_SOCK_KEY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "comb_splice_types.h"
#include "addr.h"

/* remote_port in both contexts is the big-endian __be16 shifted into the
 * upper half of the u32 on little-endian kernels (and the lower half on big
 * endian ones); a 32-bit byte swap yields the host-order port in both cases. */
static __always_inline __u16 comb_remote_port(__u32 raw)
{
	return (__u16)bpf_ntohl(raw);
}

/* Shared tail: family follows the addresses, not the socket. */
static __always_inline void comb_sock_key_finish(struct comb_sock_key *k, __u32 local_port,
						 __u32 remote_port_raw)
{
	k->local_port = (__u16)local_port;
	k->remote_port = comb_remote_port(remote_port_raw);
	k->family = comb_addr_is_v4(&k->remote_ip) ? COMB_AF_INET : COMB_AF_INET6;
}

/* Returns 0 on success, -1 for a socket family we don't splice. Context
 * fields must be read with constant offsets, hence one function per context
 * type rather than a generic one. */
static __always_inline int comb_sock_key_from_ops(struct comb_sock_key *k, struct bpf_sock_ops *ctx)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (ctx->family == COMB_AF_INET) {
		comb_addr_set_v4(&k->local_ip, ctx->local_ip4);
		comb_addr_set_v4(&k->remote_ip, ctx->remote_ip4);
	} else if (ctx->family == COMB_AF_INET6) {
		k->local_ip.a[0] = ctx->local_ip6[0];
		k->local_ip.a[1] = ctx->local_ip6[1];
		k->local_ip.a[2] = ctx->local_ip6[2];
		k->local_ip.a[3] = ctx->local_ip6[3];
		k->remote_ip.a[0] = ctx->remote_ip6[0];
		k->remote_ip.a[1] = ctx->remote_ip6[1];
		k->remote_ip.a[2] = ctx->remote_ip6[2];
		k->remote_ip.a[3] = ctx->remote_ip6[3];
	} else {
		return -1;
	}
	comb_sock_key_finish(k, ctx->local_port, ctx->remote_port);
	return 0;
}

/* The key of the peer socket: local and remote swapped. */
static __always_inline int comb_peer_key_from_msg(struct comb_sock_key *k, struct sk_msg_md *ctx)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (ctx->family == COMB_AF_INET) {
		comb_addr_set_v4(&k->local_ip, ctx->remote_ip4);
		comb_addr_set_v4(&k->remote_ip, ctx->local_ip4);
	} else if (ctx->family == COMB_AF_INET6) {
		k->local_ip.a[0] = ctx->remote_ip6[0];
		k->local_ip.a[1] = ctx->remote_ip6[1];
		k->local_ip.a[2] = ctx->remote_ip6[2];
		k->local_ip.a[3] = ctx->remote_ip6[3];
		k->remote_ip.a[0] = ctx->local_ip6[0];
		k->remote_ip.a[1] = ctx->local_ip6[1];
		k->remote_ip.a[2] = ctx->local_ip6[2];
		k->remote_ip.a[3] = ctx->local_ip6[3];
	} else {
		return -1;
	}
	k->local_port = comb_remote_port(ctx->remote_port);
	k->remote_port = (__u16)ctx->local_port;
	k->family = comb_addr_is_v4(&k->remote_ip) ? COMB_AF_INET : COMB_AF_INET6;
	return 0;
}

#endif /* COMB_SOCK_KEY_H */
