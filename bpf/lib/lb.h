/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Socket load balancer logic; entry points and the design are in lb_sock.c. */
#ifndef COMB_LB_H
#define COMB_LB_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "comb_lb_types.h"
#include "lb_maps.h"
#include "addr.h"

#define COMB_IPPROTO_TCP 6
#define COMB_IPPROTO_UDP 17
#define COMB_ECONNREFUSED 111

/* Outcome of a lookup. */
#define COMB_LB_PASS 0    /* not a service (or not ours to translate) */
#define COMB_LB_XLATE 1   /* backend chosen */
#define COMB_LB_REFUSE 2  /* a service without backends */

/* How often the service entry is read again when the backend set it names
 * was retired between reading it and reading the backend (each retry sees a
 * newer version, so this only fails under back-to-back updates). */
#define COMB_LB_TRIES 3

#define COMB_LB_STAT(field) (__builtin_offsetof(struct comb_lb_stats, field) / sizeof(__u64))

static __always_inline void comb_lb_stat_add(__u32 idx)
{
	__u32 zero = 0;
	__u64 *s = bpf_map_lookup_elem(&comb_lb_stats, &zero);

	if (s && idx < sizeof(struct comb_lb_stats) / sizeof(__u64))
		__sync_fetch_and_add(&s[idx], 1);
}

/* Host-only mode: translate only sockets of the node's own netns. */
static __always_inline int comb_lb_wanted(void *ctx)
{
	__u32 zero = 0;
	struct comb_lb_config *cfg = bpf_map_lookup_elem(&comb_lb_config, &zero);

	if (!cfg || !(cfg->flags & COMB_LB_CFG_F_HOST_ONLY))
		return 1;
	return bpf_get_netns_cookie(ctx) == cfg->host_netns_cookie;
}

/* Who is asking: the client identity for Maglev and affinity. */
struct comb_lb_client {
	__u64 netns_cookie;
	struct comb_addr src;	/* zero when not bound */
	__u16 src_port;		/* host order, 0 when not bound */
};

static __always_inline __u32 comb_lb_mix(__u32 h, __u32 w)
{
	h ^= w;
	h *= 0x9e3779b1;
	h ^= h >> 15;
	h *= 0x85ebca77;
	h ^= h >> 13;
	return h;
}

static __always_inline __u32 comb_lb_client_hash(const struct comb_lb_client *c)
{
	__u32 h = 0x636f6d62;

	h = comb_lb_mix(h, (__u32)c->netns_cookie);
	h = comb_lb_mix(h, (__u32)(c->netns_cookie >> 32));
	h = comb_lb_mix(h, c->src.a[0]);
	h = comb_lb_mix(h, c->src.a[1]);
	h = comb_lb_mix(h, c->src.a[2]);
	h = comb_lb_mix(h, c->src.a[3]);
	h = comb_lb_mix(h, c->src_port);
	return h;
}

/* Linear search of one version's backends for an address (affinity after
 * the backend set changed; done once per client and version). */
struct comb_lb_search {
	__u32 svc_id;
	__u32 version;
	struct comb_addr ip;
	__u16 port;
	__s64 found;
};

static long comb_lb_search_cb(__u32 i, void *data)
{
	struct comb_lb_search *s = data;
	struct comb_lb_backend_key k = { .svc_id = s->svc_id, .version = s->version, .index = i };
	struct comb_lb_backend *b = bpf_map_lookup_elem(&comb_lb_backends, &k);

	if (b && b->port == s->port && b->ip.a[0] == s->ip.a[0] && b->ip.a[1] == s->ip.a[1] &&
	    b->ip.a[2] == s->ip.a[2] && b->ip.a[3] == s->ip.a[3]) {
		s->found = i;
		return 1;
	}
	return 0;
}

static __always_inline int comb_lb_same(const struct comb_lb_backend *b,
					const struct comb_lb_affinity *a)
{
	return b->port == a->port && b->ip.a[0] == a->ip.a[0] && b->ip.a[1] == a->ip.a[1] &&
	       b->ip.a[2] == a->ip.a[2] && b->ip.a[3] == a->ip.a[3];
}

/* The remembered backend, if not expired and still in the current set. */
static __always_inline int comb_lb_affinity_get(const struct comb_lb_affinity_key *ak,
						const struct comb_lb_svc *svc, __u64 now,
						struct comb_lb_backend *out)
{
	struct comb_lb_affinity *a = bpf_map_lookup_elem(&comb_lb_affinity, ak);
	struct comb_lb_backend_key bk;
	struct comb_lb_backend *b;
	struct comb_lb_search s;

	if (!a)
		return 0;
	if (now - a->last_used_ns > (__u64)svc->affinity_timeout_secs * 1000000000ULL)
		return 0;
	if (a->version == svc->version) {
		bk.svc_id = svc->id;
		bk.version = svc->version;
		bk.index = a->index;
		b = bpf_map_lookup_elem(&comb_lb_backends, &bk);
		if (!b || !comb_lb_same(b, a))
			return 0;
	} else {
		__builtin_memset(&s, 0, sizeof(s));
		s.svc_id = svc->id;
		s.version = svc->version;
		s.ip = a->ip;
		s.port = a->port;
		s.found = -1;
		bpf_loop(svc->count, comb_lb_search_cb, &s, 0);
		if (s.found < 0)
			return 0;
		a->version = svc->version;
		a->index = (__u32)s.found;
	}
	a->last_used_ns = now;
	__builtin_memset(out, 0, sizeof(*out));
	out->ip = a->ip;
	out->port = a->port;
	return 1;
}

static __always_inline void comb_lb_affinity_put(const struct comb_lb_affinity_key *ak,
						 const struct comb_lb_svc *svc, __u32 index,
						 const struct comb_lb_backend *b, __u64 now)
{
	struct comb_lb_affinity a;

	__builtin_memset(&a, 0, sizeof(a));
	a.ip = b->ip;
	a.port = b->port;
	a.version = svc->version;
	a.index = index;
	a.last_used_ns = now;
	bpf_map_update_elem(&comb_lb_affinity, ak, &a, BPF_ANY);
}

/* Choose a backend for key. Fills *out and *vip_svc_id on COMB_LB_XLATE. */
static __always_inline int comb_lb_select(const struct comb_lb_svc_key *key,
					  const struct comb_lb_client *cl,
					  struct comb_lb_backend *out)
{
	struct comb_lb_affinity_key ak;
	struct comb_lb_maglev_key mk;
	struct comb_lb_backend_key bk;
	struct comb_lb_backend *b;
	struct comb_lb_maglev *tbl;
	struct comb_lb_svc *p, svc;
	__u64 now = 0;
	__u32 idx, slot;
	int try;

	for (try = 0; try < COMB_LB_TRIES; try++) {
		p = bpf_map_lookup_elem(&comb_lb_services, key);
		if (!p)
			return COMB_LB_PASS;
		/* One consistent snapshot: the element is replaced, never
		 * written in place, and freed only after RCU (NO_PREALLOC). */
		svc = *p;
		if (svc.count == 0)
			return COMB_LB_REFUSE;

		if (svc.flags & COMB_LB_F_AFFINITY) {
			__builtin_memset(&ak, 0, sizeof(ak));
			ak.netns_cookie = cl->netns_cookie;
			ak.client = cl->src;
			ak.svc_id = svc.id;
			now = bpf_ktime_get_boot_ns();
			if (comb_lb_affinity_get(&ak, &svc, now, out)) {
				comb_lb_stat_add(COMB_LB_STAT(affinity_hits));
				return COMB_LB_XLATE;
			}
		}

		if (svc.flags & COMB_LB_F_MAGLEV) {
			mk.svc_id = svc.id;
			mk.version = svc.version;
			tbl = bpf_map_lookup_elem(&comb_lb_maglev, &mk);
			if (!tbl) {
				comb_lb_stat_add(COMB_LB_STAT(version_retries));
				continue;
			}
			slot = comb_lb_client_hash(cl) % COMB_LB_MAGLEV_M;
			/* Keep the bound check next to the access: clang would
			 * otherwise hoist the hash out of the loop and the
			 * verifier lose the range of the spilled value. */
			asm volatile("" : "+r"(slot));
			if (slot >= COMB_LB_MAGLEV_M)
				return COMB_LB_PASS;
			idx = tbl->idx[slot];
		} else {
			idx = bpf_get_prandom_u32() % svc.count;
		}

		bk.svc_id = svc.id;
		bk.version = svc.version;
		bk.index = idx;
		b = bpf_map_lookup_elem(&comb_lb_backends, &bk);
		if (!b) {
			comb_lb_stat_add(COMB_LB_STAT(version_retries));
			continue;
		}
		*out = *b;
		if (svc.flags & COMB_LB_F_AFFINITY)
			comb_lb_affinity_put(&ak, &svc, idx, out, now);
		return COMB_LB_XLATE;
	}
	/* The set changed under us COMB_LB_TRIES times in a row: refuse
	 * rather than send to the VIP, which nothing answers. */
	return COMB_LB_REFUSE;
}

static __always_inline void comb_lb_revnat_put(void *ctx, const struct comb_lb_backend *b,
					       const struct comb_lb_svc_key *key)
{
	struct comb_lb_revnat_key rk;
	struct comb_lb_revnat rv;

	__builtin_memset(&rk, 0, sizeof(rk));
	__builtin_memset(&rv, 0, sizeof(rv));
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.ip = b->ip;
	rk.port = b->port;
	rv.vip = key->vip;
	rv.port = key->port;
	if (bpf_map_update_elem(&comb_lb_revnat, &rk, &rv, BPF_ANY) != 0)
		comb_lb_stat_add(COMB_LB_STAT(revnat_failures));
}

static __always_inline int comb_lb_refuse(void)
{
	comb_lb_stat_add(COMB_LB_STAT(refused_no_backend));
	bpf_set_retval(-COMB_ECONNREFUSED);
	return 0;
}

static __always_inline void comb_lb_client_from_sk(void *ctx, struct bpf_sock *sk,
						   struct comb_lb_client *cl)
{
	__builtin_memset(cl, 0, sizeof(*cl));
	cl->netns_cookie = bpf_get_netns_cookie(ctx);
	if (!sk)
		return;
	if (sk->family == COMB_AF_INET) {
		if (sk->src_ip4)
			comb_addr_set_v4(&cl->src, sk->src_ip4);
	} else {
		cl->src.a[0] = sk->src_ip6[0];
		cl->src.a[1] = sk->src_ip6[1];
		cl->src.a[2] = sk->src_ip6[2];
		cl->src.a[3] = sk->src_ip6[3];
	}
	cl->src_port = (__u16)sk->src_port;
}

/* connect4 / sendmsg4. Returns the program's return value. */
static __always_inline int comb_lb_xlate4(struct bpf_sock_addr *ctx, int is_sendmsg)
{
	struct comb_lb_svc_key key;
	struct comb_lb_client cl;
	struct comb_lb_backend b;
	__u32 proto = ctx->protocol;
	int r;

	if (proto != COMB_IPPROTO_TCP && proto != COMB_IPPROTO_UDP)
		return 1;
	if (is_sendmsg && proto != COMB_IPPROTO_UDP)
		return 1;
	__builtin_memset(&key, 0, sizeof(key));
	comb_addr_set_v4(&key.vip, ctx->user_ip4);
	key.port = bpf_ntohs((__u16)ctx->user_port);
	key.proto = (__u8)proto;
	/* Cheap test first: most connects are not to a Service. */
	if (!bpf_map_lookup_elem(&comb_lb_services, &key))
		return 1;
	if (!comb_lb_wanted(ctx))
		return 1;
	comb_lb_client_from_sk(ctx, ctx->sk, &cl);
	if (is_sendmsg && ctx->msg_src_ip4)
		comb_addr_set_v4(&cl.src, ctx->msg_src_ip4);

	r = comb_lb_select(&key, &cl, &b);
	if (r == COMB_LB_PASS)
		return 1;
	if (r == COMB_LB_REFUSE)
		return comb_lb_refuse();
	/* An AF_INET socket can only reach an IPv4 backend. */
	if (!comb_addr_is_v4(&b.ip))
		return comb_lb_refuse();
	comb_lb_revnat_put(ctx, &b, &key);
	ctx->user_ip4 = b.ip.a[3];
	ctx->user_port = bpf_htons(b.port);
	comb_lb_stat_add(is_sendmsg ? COMB_LB_STAT(sendmsgs_translated)
				    : COMB_LB_STAT(connects_translated));
	return 1;
}

/* connect6 / sendmsg6: IPv6 services, and IPv4 ones reached through a
 * dual-stack socket as ::ffff:a.b.c.d (same key, v4-mapped). */
static __always_inline int comb_lb_xlate6(struct bpf_sock_addr *ctx, int is_sendmsg)
{
	struct comb_lb_svc_key key;
	struct comb_lb_client cl;
	struct comb_lb_backend b;
	__u32 proto = ctx->protocol;
	int r;

	if (proto != COMB_IPPROTO_TCP && proto != COMB_IPPROTO_UDP)
		return 1;
	if (is_sendmsg && proto != COMB_IPPROTO_UDP)
		return 1;
	__builtin_memset(&key, 0, sizeof(key));
	key.vip.a[0] = ctx->user_ip6[0];
	key.vip.a[1] = ctx->user_ip6[1];
	key.vip.a[2] = ctx->user_ip6[2];
	key.vip.a[3] = ctx->user_ip6[3];
	key.port = bpf_ntohs((__u16)ctx->user_port);
	key.proto = (__u8)proto;
	if (!bpf_map_lookup_elem(&comb_lb_services, &key))
		return 1;
	if (!comb_lb_wanted(ctx))
		return 1;
	comb_lb_client_from_sk(ctx, ctx->sk, &cl);
	if (is_sendmsg && (ctx->msg_src_ip6[0] | ctx->msg_src_ip6[1] | ctx->msg_src_ip6[2] |
			   ctx->msg_src_ip6[3])) {
		cl.src.a[0] = ctx->msg_src_ip6[0];
		cl.src.a[1] = ctx->msg_src_ip6[1];
		cl.src.a[2] = ctx->msg_src_ip6[2];
		cl.src.a[3] = ctx->msg_src_ip6[3];
	}

	r = comb_lb_select(&key, &cl, &b);
	if (r == COMB_LB_PASS)
		return 1;
	if (r == COMB_LB_REFUSE)
		return comb_lb_refuse();
	/* A v4 VIP (v4-mapped) needs a v4 backend and a v6 VIP a v6 one. */
	if (comb_addr_is_v4(&b.ip) != comb_addr_is_v4(&key.vip))
		return comb_lb_refuse();
	comb_lb_revnat_put(ctx, &b, &key);
	ctx->user_ip6[0] = b.ip.a[0];
	ctx->user_ip6[1] = b.ip.a[1];
	ctx->user_ip6[2] = b.ip.a[2];
	ctx->user_ip6[3] = b.ip.a[3];
	ctx->user_port = bpf_htons(b.port);
	comb_lb_stat_add(is_sendmsg ? COMB_LB_STAT(sendmsgs_translated)
				    : COMB_LB_STAT(connects_translated));
	return 1;
}

/* recvmsg / getpeername: the peer address the application sees is the
 * backend's; show the Service address it asked for instead. */
static __always_inline struct comb_lb_revnat *comb_lb_revnat_find(void *ctx,
								  const struct comb_addr *ip,
								  __u16 port)
{
	struct comb_lb_revnat_key rk;

	__builtin_memset(&rk, 0, sizeof(rk));
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.ip = *ip;
	rk.port = port;
	return bpf_map_lookup_elem(&comb_lb_revnat, &rk);
}

static __always_inline int comb_lb_reverse4(struct bpf_sock_addr *ctx)
{
	struct comb_lb_revnat *rv;
	struct comb_addr ip;

	comb_addr_set_v4(&ip, ctx->user_ip4);
	rv = comb_lb_revnat_find(ctx, &ip, bpf_ntohs((__u16)ctx->user_port));
	if (!rv || !comb_addr_is_v4(&rv->vip))
		return 1;
	ctx->user_ip4 = rv->vip.a[3];
	ctx->user_port = bpf_htons(rv->port);
	comb_lb_stat_add(COMB_LB_STAT(replies_reversed));
	return 1;
}

static __always_inline int comb_lb_reverse6(struct bpf_sock_addr *ctx)
{
	struct comb_lb_revnat *rv;
	struct comb_addr ip;

	ip.a[0] = ctx->user_ip6[0];
	ip.a[1] = ctx->user_ip6[1];
	ip.a[2] = ctx->user_ip6[2];
	ip.a[3] = ctx->user_ip6[3];
	rv = comb_lb_revnat_find(ctx, &ip, bpf_ntohs((__u16)ctx->user_port));
	if (!rv)
		return 1;
	ctx->user_ip6[0] = rv->vip.a[0];
	ctx->user_ip6[1] = rv->vip.a[1];
	ctx->user_ip6[2] = rv->vip.a[2];
	ctx->user_ip6[3] = rv->vip.a[3];
	ctx->user_port = bpf_htons(rv->port);
	comb_lb_stat_add(COMB_LB_STAT(replies_reversed));
	return 1;
}

#endif /* COMB_LB_H */
