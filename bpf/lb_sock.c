/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Comb socket load balancer: kube-proxy's job done at connect() time.
 *
 * A connect() (TCP, UDP) or unconnected sendmsg() (UDP) to a Service
 * VIP:port is rewritten to one backend address in the cgroup sock_addr hooks,
 * before any packet exists: no per-packet NAT, no conntrack entry. The
 * application keeps seeing the VIP: recvmsg (UDP replies' source) and
 * getpeername (TCP and connected UDP) are rewritten back using a reverse-NAT
 * entry keyed by socket cookie + backend, written at translation time.
 *
 * Programs (all attached to one cgroup with pinned bpf_links,
 * <pin_dir>/links/lb-<hook>):
 *   cgroup/connect4, connect6     TCP and UDP connect
 *   cgroup/sendmsg4, sendmsg6     UDP sendto/sendmsg with an address
 *   cgroup/recvmsg4, recvmsg6     UDP: source address VIP again
 *   cgroup/getpeername4, 6        peer address VIP again
 * The *6 hooks also serve IPv4 Services reached through dual-stack sockets
 * (::ffff:a.b.c.d): every address is stored v4-mapped, so the key matches.
 *
 * Maps (bpf/lib/lb_maps.h; types in bpf/include/comb_lb_types.h):
 *   comb_lb_services  {vip, port, proto} -> {id, version, count, flags,
 *                     affinity timeout}. count 0 = a Service without
 *                     backends: connect/sendmsg fail at once with
 *                     ECONNREFUSED (bpf_set_retval), never a hang.
 *   comb_lb_backends  {id, version, index} -> backend ip + port
 *   comb_lb_maglev    {id, version} -> u32[16381] slot -> backend index
 *   comb_lb_affinity  LRU {netns cookie, bound source ip, id} -> backend,
 *                     version/index where it was found, last use (boot
 *                     time ns, so suspend counts as time passing)
 *   comb_lb_revnat    LRU {socket cookie, backend ip, port} -> vip, port
 *   comb_lb_config    host-only flag + the node's netns cookie
 *   comb_lb_stats     per-CPU counters
 *
 * Update protocol (userspace, crates/comb-datapath/src/lb.rs): a reader never
 * sees a half-written backend set.
 *   1. write backends 0..n-1 (and the Maglev table) under version v+1 -
 *      no reader looks at v+1 yet;
 *   2. flip: one update of the service entry to {version v+1, count n}; a
 *      hash update replaces the element atomically, and NO_PREALLOC defers
 *      freeing the old one past RCU, so a reader copies either the old or
 *      the new entry, whole;
 *   3. delete version v's backends and table.
 * A reader that copied the entry before step 2 can find version v gone in
 * step 3: a miss then means "retired", so it reads the service entry again
 * (it now names v+1; up to COMB_LB_TRIES times, counted in version_retries).
 * Removing a Service deletes the entry first, then its backends. Service ids
 * are allocated by userspace and live in the service entries, so a restarted
 * agent adopts them with the pinned maps; it also deletes backend/table
 * entries no live (id, version) names (an agent that died mid-update).
 *
 * Backend choice: random (bpf_get_prandom_u32) by default; with
 * COMB_LB_F_MAGLEV the Maglev table indexed by a hash of the client (netns
 * cookie, bound source address and port - unbound at connect() in the
 * common case, so one pod maps to one backend); with COMB_LB_F_AFFINITY
 * (sessionAffinity ClientIP) the remembered backend while it is in the
 * current set and was used within the timeout. The client is identified by
 * its netns (a pod; its IP is not yet bound at connect() time) and its bound
 * source address if any.
 *
 * Host-only mode (COMB_LB_CFG_F_HOST_ONLY): the programs may sit on a cgroup
 * covering pods too, but only sockets whose bpf_get_netns_cookie() equals
 * the configured cookie (the node's netns) are translated.
 *
 * Only TCP and UDP are translated; headless Services are never in the map.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lb.h"

SEC("cgroup/connect4")
int comb_lb_connect4(struct bpf_sock_addr *ctx)
{
	return comb_lb_xlate4(ctx, 0);
}

SEC("cgroup/connect6")
int comb_lb_connect6(struct bpf_sock_addr *ctx)
{
	return comb_lb_xlate6(ctx, 0);
}

SEC("cgroup/sendmsg4")
int comb_lb_sendmsg4(struct bpf_sock_addr *ctx)
{
	return comb_lb_xlate4(ctx, 1);
}

SEC("cgroup/sendmsg6")
int comb_lb_sendmsg6(struct bpf_sock_addr *ctx)
{
	return comb_lb_xlate6(ctx, 1);
}

SEC("cgroup/recvmsg4")
int comb_lb_recvmsg4(struct bpf_sock_addr *ctx)
{
	return comb_lb_reverse4(ctx);
}

SEC("cgroup/recvmsg6")
int comb_lb_recvmsg6(struct bpf_sock_addr *ctx)
{
	return comb_lb_reverse6(ctx);
}

SEC("cgroup/getpeername4")
int comb_lb_getpeername4(struct bpf_sock_addr *ctx)
{
	return comb_lb_reverse4(ctx);
}

SEC("cgroup/getpeername6")
int comb_lb_getpeername6(struct bpf_sock_addr *ctx)
{
	return comb_lb_reverse6(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
