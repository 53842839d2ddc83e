/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Comb node uplink: HBONE inbound without iptables. One tcx ingress program
 * on each of the node's uplink interfaces (combd --uplink; links pinned as
 * <pin_dir>/links/uplink-<ifindex>, crates/comb-datapath/src/policy/uplink.rs).
 *
 * HBONE peers address a pod's tunnel to <pod IP>:15008 (Istio ambient's
 * wire); the node proxy terminates it. The logic (bpf/lib/uplink.h):
 *   - TCP to a local mesh pod's IP, dport 15008: skb->mark COMB_PROXY_MARK
 *     (the node's policy routing, fwmark 0xb00/0xf00 -> local table, delivers
 *     it to this node's stack instead of forwarding it to the pod); the
 *     node namespace's sk_lookup program (proxy_lookup.c) hands a SYN to the
 *     HBONE inbound listener (comb_proxy_listeners[COMB_HBONE_IN_LISTENER_V4/
 *     _V6]), so the accepted socket's local address is <pod IP>:15008 and
 *     the proxy knows which pod (and certificate) the tunnel is for.
 *   - TCP from sport 15008 to a local mesh pod's IP whose 4-tuple belongs to
 *     a socket of the node (the proxy's outbound HBONE connection, bound with
 *     IP_TRANSPARENT to the source pod's IP): marked only.
 *   - Everything else passes untouched and uncounted.
 * Maps are shared with policy.c through their pins (bpf/lib/mesh_maps.h).
 * Returns TC_ACT_OK (TCX_PASS) always.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "uplink.h"

SEC("tcx/ingress")
int comb_uplink_ingress(struct __sk_buff *skb)
{
	return comb_uplink_run(skb);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
