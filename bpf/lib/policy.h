/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Identity policy logic; entry points and the design are in policy.c. */
#ifndef COMB_POLICY_H
#define COMB_POLICY_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "comb_policy_types.h"
#include "policy_maps.h"
#include "policy_parse.h"
#include "policy_ct.h"
#include "policy_redirect.h"
#include "mesh.h"

/* The outcome for one packet. */
struct comb_verdict {
	__u32 peer_identity; /* 0 = not looked up (malformed) */
	__u32 policy;
	__u8 verdict;        /* COMB_VERDICT_*, for flow events */
	__u8 reason;         /* COMB_REASON_*; >= 128 drops */
	__u8 event;          /* emit a flow event (when enabled) */
};

static __always_inline int comb_reason_drops(__u8 reason)
{
	return reason >= 128;
}

static __always_inline void comb_policy_count(__u32 ifindex, __u8 dir, __u8 reason, __u32 len)
{
	struct comb_policy_metric_key k = {
		.endpoint = ifindex,
		.direction = dir,
		.reason = reason,
	};
	struct comb_policy_metric_value *v = bpf_map_lookup_elem(&comb_policy_metrics, &k);

	if (!v) {
		struct comb_policy_metric_value zero = {};

		/* Creates the entry zeroed on every CPU; a racing creator wins. */
		bpf_map_update_elem(&comb_policy_metrics, &k, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&comb_policy_metrics, &k);
		if (!v)
			return; /* map full */
	}
	/* Atomic even though per-CPU: both programs can interleave on one CPU. */
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, len);
}

/* A real (not inlined) function: its signature puts struct comb_flow_event
 * into the object's BTF, which the Rust twin is checked against. */
static __attribute__((noinline)) int comb_flow_submit(struct comb_flow_event *e)
{
	__u32 zero = 0;
	__u64 *lost;

	if (bpf_ringbuf_output(&comb_flow_events, e, sizeof(*e), 0) < 0) {
		lost = bpf_map_lookup_elem(&comb_policy_events_lost, &zero);
		if (lost)
			__sync_fetch_and_add(lost, 1);
		return -1;
	}
	return 0;
}

static __always_inline void comb_flow_emit(struct __sk_buff *skb, const struct comb_pkt *p,
					   __u8 dir, __u32 ep_identity,
					   const struct comb_verdict *vd)
{
	struct comb_flow_event e = {};

	e.time_ns = bpf_ktime_get_boot_ns();
	e.saddr = p->saddr;
	e.daddr = p->daddr;
	e.sport = p->sport;
	e.dport = p->dport;
	e.protocol = p->protocol;
	e.direction = dir;
	e.verdict = vd->verdict;
	e.reason = vd->reason;
	e.endpoint = skb->ifindex;
	if (dir == COMB_DIR_INGRESS) {
		e.src_identity = vd->peer_identity;
		e.dst_identity = ep_identity;
	} else {
		e.src_identity = ep_identity;
		e.dst_identity = vd->peer_identity;
	}
	e.policy = vd->policy;
	e.len = skb->len;
	comb_flow_submit(&e);
}

/* Count, report, and turn the outcome into a tc return code. */
static __always_inline int comb_policy_finish(struct __sk_buff *skb, const struct comb_pkt *p,
					      __u8 dir, __u32 ep_identity,
					      const struct comb_policy_settings *s,
					      const struct comb_verdict *vd)
{
	int drop = comb_reason_drops(vd->reason);

	comb_policy_count(skb->ifindex, dir, vd->reason, skb->len);
	if ((vd->event || drop) && (s->flags & COMB_POLICY_CFG_F_EVENTS))
		comb_flow_emit(skb, p, dir, ep_identity, vd);
	return drop ? TC_ACT_SHOT : TC_ACT_OK;
}

/* The peer's identity (COMB_ID_WORLD when unknown); `*endpoint` gets its
 * local endpoint with ingress REDIRECT entries, 0 for none. */
static __always_inline __u32 comb_ipcache_peer(const struct comb_addr *a, __u32 *endpoint)
{
	struct comb_ipcache_key k = { .prefixlen = 128, .addr = *a };
	struct comb_ipcache_value *v = bpf_map_lookup_elem(&comb_ipcache, &k);

	*endpoint = v ? v->endpoint : 0;
	return v && v->identity ? v->identity : COMB_ID_WORLD;
}

static __always_inline __u32 comb_ipcache_identity(const struct comb_addr *a)
{
	__u32 endpoint;

	return comb_ipcache_peer(a, &endpoint);
}

/* Judge a new flow: {ep, peer, dir, proto, port}, then {ep, ANY, ...}; no
 * entry = not enforced here. The port is the destination port of TCP, UDP
 * and SCTP, 0 for everything else: an ICMP echo identifier is a conntrack
 * "port" only, so ICMP meets the any-protocol entries (prefix 72) and
 * protocol-wide ones, whatever its identifier. Values are sanitised so that
 * the reason always agrees with the verdict (reasons >= 128 drop): a bad
 * entry fails closed. */
static __always_inline struct comb_policy_value *
comb_policy_lookup(__u32 endpoint, __u32 identity, __u8 dir, const struct comb_pkt *p)
{
	struct comb_policy_key k = {
		.prefixlen = COMB_POLICY_PREFIX_FULL,
		.endpoint = endpoint,
		.identity = identity,
		.direction = dir,
		.protocol = p->protocol,
		.port = comb_has_ports(p->protocol) ? p->dport : 0,
	};
	struct comb_policy_value *v = bpf_map_lookup_elem(&comb_policy, &k);

	if (!v) {
		k.identity = COMB_ID_ANY;
		v = bpf_map_lookup_elem(&comb_policy, &k);
	}
	return v;
}

/* An entry's value as the outcome, sanitised. A REDIRECT gets the reason for
 * "cannot redirect": L7_VISIBILITY forwards, anything else drops with
 * PROXY_UNAVAILABLE; comb_redirect_new replaces it when it redirects. */
static __always_inline void comb_policy_apply(const struct comb_policy_value *v,
					      struct comb_verdict *vd)
{
	__u8 reason = v->reason;

	vd->verdict = v->verdict;
	vd->policy = v->policy;
	switch (vd->verdict) {
	case COMB_VERDICT_ALLOW:
		vd->reason = reason && !comb_reason_drops(reason) ? reason : COMB_REASON_POLICY_ALLOW;
		break;
	case COMB_VERDICT_REDIRECT:
		vd->reason = reason == COMB_REASON_L7_VISIBILITY ? COMB_REASON_L7_VISIBILITY
								 : COMB_REASON_PROXY_UNAVAILABLE;
		break;
	default:
		vd->verdict = COMB_VERDICT_DENY;
		vd->reason = comb_reason_drops(reason) ? reason : COMB_REASON_POLICY_DENIED;
		break;
	}
}

static __always_inline void comb_policy_judge(__u32 ifindex, __u8 dir, const struct comb_pkt *p,
					      struct comb_verdict *vd)
{
	struct comb_policy_value *v = comb_policy_lookup(ifindex, vd->peer_identity, dir, p);

	if (!v) {
		vd->verdict = COMB_VERDICT_ALLOW;
		vd->reason = COMB_REASON_NO_POLICY;
		return;
	}
	comb_policy_apply(v, vd);
}

/* A new flow from a local pod (tcx ingress of its veth), judged in `vd` by
 * the pod's egress. Not denied and to a local endpoint with ingress REDIRECT
 * entries (`peer_endpoint`): that endpoint's ingress entry for the pod's
 * identity decides whether it is a REDIRECT. A REDIRECT of a TCP SYN whose
 * family has a listener is assigned to it and marked: COMB_CT_F_PROXY is
 * returned and the reason becomes PROXY_REDIRECT. Otherwise 0 is returned:
 * the pod's own REDIRECT keeps its "cannot redirect" reason (drop or
 * L7_VISIBILITY); the destination's leaves `vd` as the pod's egress judged it. */
static __always_inline __u32 comb_redirect_new(struct __sk_buff *skb, const struct comb_pkt *p,
					       __u32 ep_identity, __u32 peer_endpoint,
					       struct comb_verdict *vd)
{
	struct comb_verdict own = *vd;
	struct comb_policy_value *v;

	if (p->protocol != COMB_IPPROTO_TCP || p->frag != COMB_FRAG_NONE)
		return 0;
	if (vd->verdict != COMB_VERDICT_REDIRECT) {
		if (comb_reason_drops(vd->reason) || !peer_endpoint)
			return 0;
		v = comb_policy_lookup(peer_endpoint, ep_identity, COMB_DIR_INGRESS, p);
		if (!v || v->verdict != COMB_VERDICT_REDIRECT)
			return 0;
		comb_policy_apply(v, vd);
	}
	if (!comb_is_syn(p) || comb_proxy_ready(p) < 0) {
		/* The destination's REDIRECT that cannot be redirected here is
		 * judged again by the destination's own hook (tcx egress of its
		 * veth), so its drop or visibility pass is counted there, on the
		 * endpoint whose policy it is. */
		*vd = own;
		return 0;
	}
	comb_proxy_mark(skb);
	vd->reason = COMB_REASON_PROXY_REDIRECT;
	return COMB_CT_F_PROXY;
}

static __always_inline void comb_frag_key_fill(struct comb_frag_key *k, const struct comb_pkt *p)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->id = p->frag_id;
	k->protocol = p->frag_proto;
	k->pad[0] = 0;
	k->pad[1] = 0;
	k->pad[2] = 0;
}

/* First fragment judged: later ones of the datagram follow it. */
static __always_inline void comb_frag_remember(const struct comb_pkt *p,
					       const struct comb_verdict *vd)
{
	struct comb_frag_key k;
	struct comb_frag_value v = {};

	comb_frag_key_fill(&k, p);
	v.sport = p->sport;
	v.dport = p->dport;
	v.verdict = comb_reason_drops(vd->reason) ? COMB_VERDICT_DENY : COMB_VERDICT_ALLOW;
	v.reason = vd->reason;
	bpf_map_update_elem(&comb_frag, &k, &v, BPF_ANY);
}

/* A later fragment: the first fragment's ports and verdict, or unknown. */
static __always_inline void comb_frag_follow(struct comb_pkt *p, struct comb_verdict *vd)
{
	struct comb_frag_key k;
	struct comb_frag_value *v;

	comb_frag_key_fill(&k, p);
	v = bpf_map_lookup_elem(&comb_frag, &k);
	if (!v) {
		vd->verdict = COMB_VERDICT_DENY;
		vd->reason = COMB_REASON_FRAG_UNKNOWN;
		return;
	}
	p->sport = v->sport;
	p->dport = v->dport;
	if (v->verdict == COMB_VERDICT_ALLOW) {
		vd->verdict = COMB_VERDICT_ALLOW;
		vd->reason = COMB_REASON_FRAGMENT;
	} else {
		vd->verdict = COMB_VERDICT_DENY;
		vd->reason = comb_reason_drops(v->reason) ? v->reason : COMB_REASON_POLICY_DENIED;
	}
}

/* One packet on a local endpoint's host-side veth. `dir` is the endpoint's
 * view: COMB_DIR_EGRESS for packets from the pod (peer = destination),
 * COMB_DIR_INGRESS for packets to it (peer = source). */
static __always_inline int comb_policy_run(struct __sk_buff *skb, __u8 dir)
{
	struct comb_policy_settings s;
	struct comb_policy_endpoint *ep;
	struct comb_verdict vd = {};
	struct comb_pkt p = {};
	__u32 ifindex = skb->ifindex;
	__u32 ep_identity, peer_endpoint, ct_flags = 0;
	__u64 now;
	int r;

	ep = bpf_map_lookup_elem(&comb_policy_endpoints, &ifindex);
	if (!ep)
		return TC_ACT_OK;
	ep_identity = ep->identity;
	comb_policy_settings_read(&s);

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		r = comb_parse_ipv4(skb, &p);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		r = comb_parse_ipv6(skb, &p);
	} else {
		vd.reason = COMB_REASON_NOT_IP;
		vd.verdict = COMB_VERDICT_ALLOW;
		return comb_policy_finish(skb, &p, dir, ep_identity, &s, &vd);
	}
	if (r < 0) {
		vd.verdict = COMB_VERDICT_DENY;
		vd.reason = COMB_REASON_MALFORMED;
		return comb_policy_finish(skb, &p, dir, ep_identity, &s, &vd);
	}

	if (p.frag == COMB_FRAG_LATER) {
		comb_frag_follow(&p, &vd);
		if (comb_reason_drops(vd.reason))
			vd.peer_identity = comb_ipcache_identity(dir == COMB_DIR_EGRESS ? &p.daddr
											 : &p.saddr);
		return comb_policy_finish(skb, &p, dir, ep_identity, &s, &vd);
	}

	now = bpf_ktime_get_boot_ns();
	/* An ICMP error is never a flow of its own: related to the flow it
	 * quotes, or judged as a new ICMP packet without being tracked. */
	if (p.icmp_error)
		vd.reason = comb_ct_related(skb, &p, dir, now);
	else
		vd.reason = comb_ct_lookup(&p, dir, now, &s, &ct_flags);
	if (vd.reason) {
		vd.verdict = COMB_VERDICT_ALLOW;
		/* PROXY entries exist in the egress direction only; HBONE
		 * delivery entries (HBONE without PROXY) in the ingress one, and
		 * their replies cross the pod's tcx ingress. */
		if (dir == COMB_DIR_EGRESS && vd.reason == COMB_REASON_CT_ESTABLISHED &&
		    (ct_flags & COMB_CT_F_PROXY))
			comb_redirect_established(skb);
		else if (dir == COMB_DIR_EGRESS && vd.reason == COMB_REASON_CT_REPLY &&
			 (ct_flags & (COMB_CT_F_HBONE | COMB_CT_F_PROXY)) == COMB_CT_F_HBONE)
			comb_proxy_mark(skb);
	} else if (dir == COMB_DIR_INGRESS && !p.icmp_error &&
		   comb_mtls_required(skb, &p, ifindex)) {
		/* 5b. PeerAuthentication STRICT: before policy (authentication
		 * first, as in Istio); never tracked. */
		vd.peer_identity = comb_ipcache_identity(&p.saddr);
		vd.verdict = COMB_VERDICT_DENY;
		vd.reason = COMB_REASON_MTLS_REQUIRED;
		vd.event = 1;
	} else {
		vd.peer_identity = comb_ipcache_peer(dir == COMB_DIR_EGRESS ? &p.daddr : &p.saddr,
						     &peer_endpoint);
		comb_policy_judge(ifindex, dir, &p, &vd);
		/* tcx egress (to the pod) cannot redirect: REDIRECT keeps its
		 * "cannot redirect" reason there. */
		if (dir == COMB_DIR_EGRESS && !p.icmp_error) {
			ct_flags = comb_redirect_new(skb, &p, ep_identity, peer_endpoint, &vd);
			/* 6c. Not sent to the L7 proxy: HBONE to a remote peer. */
			if (!ct_flags)
				ct_flags = comb_hbone_out_new(skb, &p, ifindex, &vd.reason);
		} else if (dir == COMB_DIR_INGRESS && comb_hbone_delivered(skb)) {
			/* 6d. Delivered by the node proxy from a tunnel: judged
			 * by the source's identity as always; a REDIRECT was the
			 * proxy's to judge (it applies L7 policy to the stream
			 * before delivering it). Replies go back to the proxy. */
			ct_flags = COMB_CT_F_HBONE;
			if (vd.verdict == COMB_VERDICT_REDIRECT)
				vd.reason = COMB_REASON_PROXY_REDIRECT;
		}
		if (!comb_reason_drops(vd.reason) && !p.icmp_error)
			comb_ct_create(&p, dir, now, &s, ifindex, vd.reason, vd.policy, ct_flags);
		vd.event = 1;
	}
	if (p.frag == COMB_FRAG_FIRST)
		comb_frag_remember(&p, &vd);
	return comb_policy_finish(skb, &p, dir, ep_identity, &s, &vd);
}

#endif /* COMB_POLICY_H */
