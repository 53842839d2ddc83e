/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Conntrack of the identity policy (policy.c): lookups, refresh, creation.
 * Semantics are in bpf/include/comb_policy_types.h (struct comb_ct_key). */
#ifndef COMB_POLICY_CT_H
#define COMB_POLICY_CT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_policy_types.h"
#include "policy_maps.h"
#include "policy_parse.h"

#define COMB_NSEC_PER_SEC 1000000000ULL
/* Used for a timeout left 0 in comb_policy_config (never written). */
#define COMB_CT_TCP_DEFAULT_NS (21600ULL * COMB_NSEC_PER_SEC)
#define COMB_CT_CLOSE_DEFAULT_NS (10ULL * COMB_NSEC_PER_SEC)
#define COMB_CT_OTHER_DEFAULT_NS (60ULL * COMB_NSEC_PER_SEC)
/* A deadline is rewritten only when it moves by more than this (or by more
 * than an eighth of the lifetime, for lifetimes under 8 s): no map write per
 * packet of a busy flow. */
#define COMB_CT_REFRESH_SLACK_NS COMB_NSEC_PER_SEC

/* Settings read once per packet. */
struct comb_policy_settings {
	__u64 ct_tcp_ns;
	__u64 ct_close_ns;
	__u64 ct_other_ns;
	__u32 flags;
};

static __always_inline void comb_policy_settings_read(struct comb_policy_settings *s)
{
	__u32 zero = 0;
	struct comb_policy_config *c = bpf_map_lookup_elem(&comb_policy_config, &zero);

	s->flags = c ? c->flags : 0;
	s->ct_tcp_ns = c && c->ct_tcp_ns ? c->ct_tcp_ns : COMB_CT_TCP_DEFAULT_NS;
	s->ct_close_ns = c && c->ct_close_ns ? c->ct_close_ns : COMB_CT_CLOSE_DEFAULT_NS;
	s->ct_other_ns = c && c->ct_other_ns ? c->ct_other_ns : COMB_CT_OTHER_DEFAULT_NS;
}

/* The packet's own tuple in `dir`, or (reverse) the tuple of the flow it
 * would be a reply to, in the other direction. */
static __always_inline void comb_ct_key_fill(struct comb_ct_key *k, const struct comb_pkt *p,
					     __u8 dir, int reverse)
{
	if (reverse) {
		k->saddr = p->daddr;
		k->daddr = p->saddr;
		k->sport = p->dport;
		k->dport = p->sport;
		k->direction = dir ^ 1;
	} else {
		k->saddr = p->saddr;
		k->daddr = p->daddr;
		k->sport = p->sport;
		k->dport = p->dport;
		k->direction = dir;
	}
	k->protocol = p->protocol;
	k->pad[0] = 0;
	k->pad[1] = 0;
}

/* Lifetime of an entry with these flags after a packet of `p`'s protocol. */
static __always_inline __u64 comb_ct_lifetime(const struct comb_pkt *p, __u32 flags,
					      const struct comb_policy_settings *s)
{
	if (p->protocol != COMB_IPPROTO_TCP)
		return s->ct_other_ns;
	if ((flags & COMB_CT_F_CLOSING) || !(flags & COMB_CT_F_SEEN_REPLY))
		return s->ct_close_ns;
	return s->ct_tcp_ns;
}

static __always_inline __u32 comb_ct_closing(const struct comb_pkt *p)
{
	return p->protocol == COMB_IPPROTO_TCP &&
	       (p->tcp_flags & (COMB_TCP_FIN | COMB_TCP_RST)) ? COMB_CT_F_CLOSING : 0;
}

/* A packet of a known flow: update flags and deadline, writing only what
 * changes (and the deadline only when it moves by more than the slack). */
static __always_inline void comb_ct_touch(struct comb_ct_value *v, const struct comb_pkt *p,
					  __u64 now, const struct comb_policy_settings *s,
					  int reply)
{
	__u32 flags = v->flags;
	__u32 want = flags | comb_ct_closing(p) | (reply ? COMB_CT_F_SEEN_REPLY : 0);
	__u64 old = v->expires_ns;
	__u64 life = comb_ct_lifetime(p, want, s);
	__u64 slack = life / 8 < COMB_CT_REFRESH_SLACK_NS ? life / 8 : COMB_CT_REFRESH_SLACK_NS;
	__u64 exp = now + life;

	/* Flags only ever gain bits; two CPUs racing write the same ones. */
	if (want != flags)
		v->flags = want;
	if (want != flags || exp > old + slack || exp + slack < old)
		v->expires_ns = exp;
}

/* A live entry; an expired one counts as missing. A TCP SYN (without ACK)
 * on a closing entry starts a new connection on a reused tuple: judged
 * again rather than riding on the old verdict. */
static __always_inline struct comb_ct_value *comb_ct_live(const struct comb_ct_key *k,
							  const struct comb_pkt *p, __u64 now)
{
	struct comb_ct_value *v = bpf_map_lookup_elem(&comb_ct, k);

	if (!v || v->expires_ns <= now)
		return 0;
	if ((v->flags & COMB_CT_F_CLOSING) && p->protocol == COMB_IPPROTO_TCP &&
	    (p->tcp_flags & (COMB_TCP_SYN | COMB_TCP_ACK)) == COMB_TCP_SYN)
		return 0;
	return v;
}

/* COMB_REASON_CT_ESTABLISHED, COMB_REASON_CT_REPLY, or 0 (judge it).
 * `*flags` gets the matching entry's flags (COMB_CT_F_PROXY on an
 * established one: the packet goes to the node proxy; COMB_CT_F_HBONE on a
 * reply: it goes back to the proxy's HBONE delivery socket), 0 on a miss. */
static __always_inline __u8 comb_ct_lookup(const struct comb_pkt *p, __u8 dir, __u64 now,
					   const struct comb_policy_settings *s, __u32 *flags)
{
	struct comb_ct_key k;
	struct comb_ct_value *v;

	*flags = 0;
	comb_ct_key_fill(&k, p, dir, 0);
	v = comb_ct_live(&k, p, now);
	if (v) {
		comb_ct_touch(v, p, now, s, 0);
		*flags = v->flags;
		return COMB_REASON_CT_ESTABLISHED;
	}
	comb_ct_key_fill(&k, p, dir, 1);
	v = comb_ct_live(&k, p, now);
	if (v) {
		comb_ct_touch(v, p, now, s, 1);
		*flags = v->flags;
		return COMB_REASON_CT_REPLY;
	}
	return 0;
}

static __always_inline int comb_addr_eq(const struct comb_addr *a, const struct comb_addr *b)
{
	return a->a[0] == b->a[0] && a->a[1] == b->a[1] && a->a[2] == b->a[2] &&
	       a->a[3] == b->a[3];
}

/* An ICMP error (p->icmp_error): COMB_REASON_CT_RELATED when the packet it
 * quotes belongs to a live flow, else 0 (judge the error by policy, and
 * track nothing). The quoted packet is as its sender sent it and crossed
 * this hook in the other direction (the error goes back the way it came):
 * it is established in {quoted tuple, other dir} (an error about a packet in
 * the flow's original direction) or a reply in {reversed quoted tuple, dir}
 * (about a reply). An error goes to the sender of the quoted packet; one
 * that does not is not related to anything. The entry is not refreshed: an
 * error neither keeps a flow alive nor counts as its reply. */
static __always_inline __u8 comb_ct_related(struct __sk_buff *skb, const struct comb_pkt *p,
					    __u8 dir, __u64 now)
{
	struct comb_pkt q = {};
	struct comb_ct_key k;

	if (comb_parse_quoted(skb, p->l4_off + COMB_ICMP_HLEN, p->v6, &q) < 0)
		return 0;
	if (!comb_addr_eq(&q.saddr, &p->daddr))
		return 0;
	comb_ct_key_fill(&k, &q, dir ^ 1, 0);
	if (comb_ct_live(&k, &q, now))
		return COMB_REASON_CT_RELATED;
	comb_ct_key_fill(&k, &q, dir ^ 1, 1);
	if (comb_ct_live(&k, &q, now))
		return COMB_REASON_CT_RELATED;
	return 0;
}

/* A new flow was allowed: remember it (replacing an expired entry). `flags`:
 * COMB_CT_F_PROXY for a flow redirected to the node proxy (with
 * COMB_CT_F_HBONE: to its HBONE outbound listener), COMB_CT_F_HBONE alone
 * for a stream the proxy delivered from a tunnel, else 0. */
static __always_inline void comb_ct_create(const struct comb_pkt *p, __u8 dir, __u64 now,
					   const struct comb_policy_settings *s, __u32 ifindex,
					   __u8 reason, __u32 policy, __u32 flags)
{
	struct comb_ct_key k;
	struct comb_ct_value v = {};

	comb_ct_key_fill(&k, p, dir, 0);
	v.flags = comb_ct_closing(p) | flags;
	v.expires_ns = now + comb_ct_lifetime(p, v.flags, s);
	v.created_ns = now;
	v.endpoint = ifindex;
	v.policy = policy;
	v.reason = reason;
	bpf_map_update_elem(&comb_ct, &k, &v, BPF_ANY);
}

#endif /* COMB_POLICY_CT_H */
