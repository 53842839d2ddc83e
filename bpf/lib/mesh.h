/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The mesh in the policy programs (policy.c steps 5b, 6c, 6d): HBONE outbound
 * steering, HBONE delivery, PeerAuthentication STRICT. What the kernel knows
 * of the mesh comes from two maps (mesh_maps.h): comb_mesh_ports {endpoint,
 * 0} says whether a local pod is enrolled and its default mode,
 * {endpoint, port} its port-level modes; comb_mesh_addrs says which
 * addresses are HBONE peers (remote mesh pods) and which are local mesh pods. */
#ifndef COMB_MESH_H
#define COMB_MESH_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "comb_policy_types.h"
#include "policy_maps.h"
#include "policy_parse.h"
#include "listeners.h"

/* The endpoint's own mesh flags ({endpoint, 0}); 0 = not in the mesh. */
static __always_inline __u32 comb_mesh_flags(__u32 endpoint)
{
	struct comb_mesh_port_key k = { .endpoint = endpoint };
	struct comb_mesh_port *v = bpf_map_lookup_elem(&comb_mesh_ports, &k);

	return v ? v->flags : 0;
}

/* A new TCP flow from a local pod (tcx ingress of its veth) that its egress
 * (and, for a local destination, the L7 redirect) let through unredirected:
 * when the pod is enrolled and the destination is an HBONE peer, a SYN is
 * marked (proxy_lookup.c hands it to the HBONE outbound listener through the
 * conntrack entry this creates), and COMB_CT_F_PROXY |
 * COMB_CT_F_HBONE is returned with *reason = HBONE_REDIRECT. No listener (or
 * not a SYN): 0 with *reason = HBONE_UNAVAILABLE, forwarded in plaintext so
 * the destination's PeerAuthentication decides. Anything else (dport 15008
 * included): 0, untouched. */
static __always_inline __u32 comb_hbone_out_new(struct __sk_buff *skb, const struct comb_pkt *p,
						__u32 ifindex, __u8 *reason)
{
	struct comb_mesh_addr *m;

	/* A pod speaking HBONE itself (dport 15008) is not tunnelled twice. */
	if (p->protocol != COMB_IPPROTO_TCP || p->frag != COMB_FRAG_NONE || *reason >= 128 ||
	    p->dport == bpf_htons(COMB_HBONE_PORT))
		return 0;
	if (!(comb_mesh_flags(ifindex) & COMB_MESH_F_ENROLLED))
		return 0;
	m = bpf_map_lookup_elem(&comb_mesh_addrs, &p->daddr);
	if (!m || !(m->flags & COMB_MESH_ADDR_F_PEER))
		return 0;
	if (!comb_is_syn(p) ||
	    comb_listener_ready(comb_listener_slot(COMB_HBONE_OUT_LISTENER_V4, p)) < 0) {
		*reason = COMB_REASON_HBONE_UNAVAILABLE;
		return 0;
	}
	comb_proxy_mark(skb);
	*reason = COMB_REASON_HBONE_REDIRECT;
	return COMB_CT_F_PROXY | COMB_CT_F_HBONE;
}

/* Sent by the node proxy from an HBONE tunnel: a locally sent packet (never
 * forwarded: a mark on a forwarded packet could come from anywhere on the
 * node) whose socket had COMB_HBONE_DELIVERY_MARK. */
static __always_inline int comb_hbone_delivered(struct __sk_buff *skb)
{
	return skb->ingress_ifindex == 0 &&
	       (skb->mark & COMB_PROXY_MARK_MASK) == COMB_HBONE_DELIVERY_MARK;
}

/* The packet came from another node: it entered this node through an
 * interface that is not a local pod's veth (the uplink, a tunnel device),
 * and the node did not send it itself (ingress_ifindex 0: the node's own
 * sockets, the proxy's HBONE deliveries and upstream connections). Decided
 * by interface, not by the source's identity: a pod identity is shared by
 * local and remote pods, and a source address can be forged on the wire,
 * the interface a packet entered by cannot. */
static __always_inline int comb_from_other_node(struct __sk_buff *skb)
{
	__u32 iif = skb->ingress_ifindex;

	return iif != 0 && !bpf_map_lookup_elem(&comb_policy_endpoints, &iif);
}

/* PeerAuthentication STRICT for a new flow to local endpoint `ifindex` (tcx
 * egress of its veth): plaintext TCP or UDP from another node to an enrolled
 * pod whose mode for the destination port is STRICT. Other protocols (ICMP:
 * NetworkPolicy only, as in Istio) and non-enrolled pods are never refused
 * here. */
static __always_inline int comb_mtls_required(struct __sk_buff *skb, const struct comb_pkt *p,
					      __u32 ifindex)
{
	struct comb_mesh_port_key k = { .endpoint = ifindex };
	struct comb_mesh_port *v;
	__u32 flags;

	if (p->protocol != COMB_IPPROTO_TCP && p->protocol != COMB_IPPROTO_UDP)
		return 0;
	if (!comb_from_other_node(skb))
		return 0;
	v = bpf_map_lookup_elem(&comb_mesh_ports, &k);
	if (!v || !(v->flags & COMB_MESH_F_ENROLLED))
		return 0;
	flags = v->flags;
	if (p->dport) {
		k.port = p->dport;
		v = bpf_map_lookup_elem(&comb_mesh_ports, &k);
		if (v)
			flags = v->flags;
	}
	return (flags & COMB_MESH_F_STRICT) != 0;
}

#endif /* COMB_MESH_H */
