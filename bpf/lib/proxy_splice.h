/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Proxy splice maps and verdict logic; the entry point is in proxy_splice.c. */
#ifndef COMB_PROXY_SPLICE_H
#define COMB_PROXY_SPLICE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_proxy_splice_types.h"

/* Both sockets of every spliced pair, keyed by socket cookie; the verdict
 * program is attached here. Inserting a socket activates the verdict on it. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, COMB_PX_MAX_SOCKS);
	__type(key, __u64);
	__type(value, __u64);
} comb_px_socks SEC(".maps");

/* The same sockets, without programs: the redirect target. Userspace puts
 * both sockets of a pair here before either goes into comb_px_socks, so a
 * redirect never fails because the peer is only half inserted (a failed
 * redirect passes the skb to userspace, which would reorder the stream). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, COMB_PX_MAX_SOCKS);
	__type(key, __u64);
	__type(value, __u64);
} comb_px_redir SEC(".maps");

/* Socket cookie -> its peer and counters. Userspace adds both entries before
 * the sockets and removes them when the pair is done; a socket closing does
 * not remove them (hence the agent's cleanup at unpair and at load). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, COMB_PX_MAX_SOCKS);
	__type(key, __u64);
	__type(value, struct comb_px_peer);
} comb_px_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct comb_px_stats);
} comb_px_stats SEC(".maps");

#define COMB_PX_STAT(field) (__builtin_offsetof(struct comb_px_stats, field) / sizeof(__u64))

static __always_inline void comb_px_stat_add(__u32 idx, __u64 v)
{
	__u32 zero = 0;
	__u64 *s = bpf_map_lookup_elem(&comb_px_stats, &zero);

	if (s && idx < sizeof(struct comb_px_stats) / sizeof(__u64))
		__sync_fetch_and_add(&s[idx], v);
}

/* SK_PASS (or SK_DROP for an empty skb): with a redirect set that means "to the peer's egress",
 * without one "to this socket's own receive queue" (userspace reads it). */
static __always_inline int comb_px_verdict_skb(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u64 len = skb->len;
	struct comb_px_peer *p;
	__u64 peer;

	/* A pure FIN (no payload) is dropped: nothing is lost, tcp_fin() has
	 * already marked the socket (userspace reads EOF). Redirected or passed
	 * (when the psock queue is busy it waits there behind the peer's bytes)
	 * the psock worker handles an empty skb as a broken pipe: sk_err = EPIPE
	 * and transmission stops (measured on 6.18). */
	if (len == 0)
		return SK_DROP;
	p = bpf_map_lookup_elem(&comb_px_peers, &cookie);
	if (!p) {
		comb_px_stat_add(COMB_PX_STAT(unpaired_skbs), 1);
		comb_px_stat_add(COMB_PX_STAT(unpaired_bytes), len);
		return SK_PASS;
	}
	peer = p->peer;
	if (bpf_sk_redirect_hash(skb, &comb_px_redir, &peer, 0) != SK_PASS) {
		__sync_fetch_and_add(&p->failures, 1);
		comb_px_stat_add(COMB_PX_STAT(redirect_failures), 1);
		return SK_PASS;
	}
	__sync_fetch_and_add(&p->bytes, len);
	__sync_fetch_and_add(&p->skbs, 1);
	comb_px_stat_add(COMB_PX_STAT(redirected_skbs), 1);
	comb_px_stat_add(COMB_PX_STAT(redirected_bytes), len);
	return SK_PASS;
}

#endif /* COMB_PROXY_SPLICE_H */
