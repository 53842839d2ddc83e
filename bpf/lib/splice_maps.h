/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Local splice map definitions. Names are the pin names under <pin_dir>/maps/. */
#ifndef COMB_SPLICE_MAPS_H
#define COMB_SPLICE_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_splice_types.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct comb_config);
} comb_config SEC(".maps");

/* Local endpoints (pods on this node), keyed by address. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, COMB_MAX_ENDPOINTS);
	__type(key, struct comb_addr);
	__type(value, struct comb_endpoint_info);
} comb_endpoints SEC(".maps");

/* Established local<->local TCP sockets; the sk_msg program is attached here.
 * The kernel removes a socket from it when the socket closes. A u64 value
 * makes userspace lookups return the socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, COMB_MAX_SPLICED_SOCKS);
	__type(key, struct comb_sock_key);
	__type(value, __u64);
} comb_sock_hash SEC(".maps");

/* Keys of the sockets sockops added because their REMOTE is a local endpoint
 * (see comb_sockops_established): the other end of such a connection is added
 * too when it is established, whatever its remote address (a pod answering the
 * node proxy, which connects from the node's address or, for HBONE delivery,
 * from the original remote source). LRU: a key whose socket died without the
 * state callback (e.g. added before the agent asked for it) ages out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, COMB_MAX_SPLICED_SOCKS);
	__type(key, struct comb_sock_key);
	__type(value, __u8);
} comb_splice_members SEC(".maps");

/* Per-socket mark: this sockhash member sent over plain TCP once and so
 * must never be redirected (see splice.c). Socket-local storage is freed with
 * the socket and cannot fill up or evict, unlike a hash keyed by tuple. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u8);
} comb_splice_tcp_first SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct comb_splice_stats);
} comb_splice_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct comb_splice_queue_stats);
} comb_splice_queue SEC(".maps");

/* Per sender whose peer went over stall_limit (splice_queue.h); freed with
 * the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct comb_splice_watch);
} comb_splice_watch SEC(".maps");

#endif /* COMB_SPLICE_MAPS_H */
