/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Local splice logic; entry points are in splice.c. */
#ifndef COMB_SPLICE_H
#define COMB_SPLICE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_splice_types.h"
#include "splice_maps.h"
#include "sock_key.h"
#include "splice_queue.h"

/* Counter indices into struct comb_splice_stats, as u64 offsets. */
#define COMB_STAT(field) (__builtin_offsetof(struct comb_splice_stats, field) / sizeof(__u64))

static __always_inline void comb_stat_add(__u32 idx, __u64 v)
{
	__u32 zero = 0;
	__u64 *s = bpf_map_lookup_elem(&comb_splice_stats, &zero);

	/* Atomic even though per-CPU: two programs can interleave on one CPU. */
	if (s && idx < sizeof(struct comb_splice_stats) / sizeof(__u64))
		__sync_fetch_and_add(&s[idx], v);
}

static __always_inline int comb_splice_enabled(void)
{
	__u32 zero = 0;
	struct comb_config *cfg = bpf_map_lookup_elem(&comb_config, &zero);

	return cfg && (cfg->flags & COMB_CFG_F_SPLICE);
}

static __always_inline int comb_endpoint_splices(const struct comb_addr *a)
{
	struct comb_endpoint_info *ep = bpf_map_lookup_elem(&comb_endpoints, a);

	return ep && (ep->flags & COMB_EP_F_SPLICE);
}

/* The key with local and remote swapped: the other end's key. */
static __always_inline void comb_sock_key_swap(struct comb_sock_key *peer,
					       const struct comb_sock_key *k)
{
	peer->local_ip = k->remote_ip;
	peer->remote_ip = k->local_ip;
	peer->local_port = k->remote_port;
	peer->remote_port = k->local_port;
	peer->family = k->family;
}

/* sockops runs only in local pods' cgroups (and the node proxy's), so the
 * local side is local; the connection is local<->local when the remote
 * address is a local endpoint too. A socket whose remote is not one joins when
 * its other end joined that way first: a pod's end of a connection the node
 * proxy opened to it (from the node's address, or for HBONE delivery from the
 * original remote source). The active end is established first, so its key is
 * there by the time the passive end's callback runs. `passive`: an accepted
 * socket. */
static __always_inline void comb_sockops_established(struct bpf_sock_ops *skops, int passive)
{
	struct comb_sock_key key, peer;
	__u8 one = 1;
	int by_endpoint;

	if (!comb_splice_enabled())
		return;
	if (comb_sock_key_from_ops(&key, skops) < 0)
		return;
	by_endpoint = comb_endpoint_splices(&key.remote_ip);
	/* An accepted socket whose own address is not a local endpoint is the
	 * node proxy's, for a flow to a remote pod (HBONE outbound): the client's
	 * end never joins (its remote is not local), so neither does this one. */
	if (by_endpoint && passive && !comb_endpoint_splices(&key.local_ip))
		return;
	if (!by_endpoint) {
		comb_sock_key_swap(&peer, &key);
		if (!bpf_map_lookup_elem(&comb_splice_members, &peer))
			return;
	}
	if (bpf_sock_hash_update(skops, &comb_sock_hash, &key, BPF_ANY) != 0) {
		comb_stat_add(COMB_STAT(add_failures), 1);
		return;
	}
	comb_stat_add(COMB_STAT(sockets_added), 1);
	if (by_endpoint)
		bpf_map_update_elem(&comb_splice_members, &key, &one, BPF_ANY);
	/* Ask for the state callback so the TCP-first mark is freed on close. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void comb_sockops_state(struct bpf_sock_ops *skops)
{
	struct comb_sock_key key;
	struct bpf_sock *sk;

	/* args[1] is the new state. The socket stays in the sockhash until
	 * its owner closes it (sock_map_close), also after an RST. Do not
	 * delete it here (map_delete_elem is allowed from sockops): that drops
	 * the psock and purges redirected bytes not yet read, e.g. data that
	 * arrived before the peer's FIN or RST (measured on 6.18). We only
	 * count the close, forget the key for the other end's rule, and free
	 * the TCP-first mark now rather than when the socket is finally freed. */
	if (skops->args[1] != BPF_TCP_CLOSE)
		return;
	comb_stat_add(COMB_STAT(sockets_closed), 1);
	if (comb_sock_key_from_ops(&key, skops) == 0)
		bpf_map_delete_elem(&comb_splice_members, &key);
	sk = skops->sk;
	if (sk) {
		bpf_sk_storage_delete(&comb_splice_tcp_first, sk);
		bpf_sk_storage_delete(&comb_splice_watch, sk);
	}
}

/* Whether a sender whose peer holds `unread` redirected bytes must move to
 * TCP: at queue_limit at once (a bound on what one connection can queue);
 * at stall_limit or more only once the peer has stayed there for stall_ms (a
 * peer that stopped reading), since a reader that keeps up on average can
 * fall tens of MiB behind for a moment (iperf3: 42 MiB, measured). */
static __always_inline int comb_queue_over(struct bpf_sock *sk, __u64 unread, int *stalled)
{
	__u32 zero = 0;
	struct comb_config *cfg = bpf_map_lookup_elem(&comb_config, &zero);
	__u64 full = COMB_SPLICE_DEFAULT_QUEUE_LIMIT, stall = COMB_SPLICE_DEFAULT_STALL_LIMIT;
	__u64 stall_ns = (__u64)COMB_SPLICE_DEFAULT_STALL_MS * 1000000;
	struct comb_splice_watch *w;
	__u64 now;

	if (cfg) {
		if (cfg->queue_limit)
			full = cfg->queue_limit;
		if (cfg->stall_limit)
			stall = cfg->stall_limit;
		if (cfg->stall_ms)
			stall_ns = (__u64)cfg->stall_ms * 1000000;
	}
	*stalled = 0;
	if (unread >= full)
		return 1;
	w = bpf_sk_storage_get(&comb_splice_watch, sk, 0, 0);
	if (unread < stall) {
		if (w)
			w->over_since_ns = 0;
		return 0;
	}
	if (!w)
		w = bpf_sk_storage_get(&comb_splice_watch, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!w)
		return 0;
	now = bpf_ktime_get_ns();
	if (!w->over_since_ns) {
		w->over_since_ns = now;
		return 0;
	}
	*stalled = 1;
	return now - w->over_since_ns >= stall_ns;
}

/* Mark the socket TCP-first: it never redirects again. */
static __always_inline void comb_stick_to_tcp(struct bpf_sock *sk)
{
	__u8 *mark = bpf_sk_storage_get(&comb_splice_tcp_first, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (mark)
		*mark = 1;
	else
		comb_stat_add(COMB_STAT(sticky_failures), 1);
}

/* Backpressure (splice_queue.h): the message just redirected is queued
 * whatever we decide, so a peer holds at most the limit plus one message;
 * once over, later messages take TCP, whose bytes the peer reads after the
 * redirected ones (the TCP-first rule's safe direction). */
static __always_inline void comb_check_peer_queue(struct sk_msg_md *msg, struct bpf_sock *sk)
{
	__u32 zero = 0;
	struct comb_splice_queue_stats *q;
	__s64 unread = comb_redirect_target_unread(msg);
	int stalled;

	if (unread < 0)
		return;
	q = bpf_map_lookup_elem(&comb_splice_queue, &zero);
	if (q && (__u64)unread > q->max_unread)
		q->max_unread = unread;
	if (!comb_queue_over(sk, unread, &stalled))
		return;
	comb_stick_to_tcp(sk);
	bpf_sk_storage_delete(&comb_splice_watch, sk);
	if (q)
		__sync_fetch_and_add(stalled ? &q->fallbacks_stalled : &q->fallbacks_full, 1);
}

/* Verdict for one sendmsg on a sockhash member. Always SK_PASS: either the
 * redirect set up by bpf_msg_redirect_hash or plain TCP. */
static __always_inline int comb_msg_verdict(struct sk_msg_md *msg)
{
	struct comb_sock_key peer;
	struct bpf_sock *sk = msg->sk;
	__u64 size = msg->size;

	if (!sk)
		goto pass;
	if (bpf_sk_storage_get(&comb_splice_tcp_first, sk, 0, 0))
		goto pass;
	if (comb_peer_key_from_msg(&peer, msg) < 0)
		goto pass_first;
	if (bpf_msg_redirect_hash(msg, &comb_sock_hash, &peer, BPF_F_INGRESS) == SK_PASS) {
		comb_check_peer_queue(msg, sk);
		comb_stat_add(COMB_STAT(redirected_msgs), 1);
		comb_stat_add(COMB_STAT(redirected_bytes), size);
		return SK_PASS;
	}
pass_first:
	/* First byte over TCP: stick to TCP for the life of this socket. */
	comb_stick_to_tcp(sk);
pass:
	comb_stat_add(COMB_STAT(passed_msgs), 1);
	comb_stat_add(COMB_STAT(passed_bytes), size);
	return SK_PASS;
}

#endif /* COMB_SPLICE_H */
