/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Local splice types (bpf/splice.c), shared with userspace. Every struct here
 * has a #[repr(C)] twin in crates/comb-datapath/src/splice/abi.rs, checked
 * against this
 * object's BTF by a unit test: change both together. Maps are pinned and
 * adopted across agent restarts, so sizes are part of the on-node ABI; the
 * reserved fields leave room to grow without re-creating maps.
 */
#ifndef COMB_SPLICE_TYPES_H
#define COMB_SPLICE_TYPES_H

#include <linux/types.h>

#include "comb_addr.h"
#include "comb_limits.h"

/* One TCP socket, seen from its own side. Ports are in host order.
 * family is the family of the addresses (AF_INET for v4-mapped ones), not
 * of the socket, so a dual-stack AF_INET6 socket talking to ::ffff:x and the
 * AF_INET peer socket compute matching keys. */
struct comb_sock_key {
	struct comb_addr local_ip;
	struct comb_addr remote_ip;
	__u16 local_port;
	__u16 remote_port;
	__u32 family;
};

/* comb_endpoints: key struct comb_addr, value: */
#define COMB_EP_F_SPLICE (1U << 0)
struct comb_endpoint_info {
	__u32 flags;
	__u32 reserved;
};

/* comb_config: ARRAY with a single entry at index 0. */
#define COMB_CFG_F_SPLICE (1U << 0)
struct comb_config {
	__u32 flags;
	/* Backpressure (splice_queue.h). 0 in any field (an older agent's
	 * entry) means its default. A sender moves to TCP when its peer holds
	 * queue_limit unread redirected bytes, or has held stall_limit or more
	 * for stall_ms without getting below it. */
	__u32 queue_limit;
	__u32 stall_limit;
	__u32 stall_ms;
};

#define COMB_SPLICE_DEFAULT_QUEUE_LIMIT (128U << 20)
#define COMB_SPLICE_DEFAULT_STALL_LIMIT (4U << 20)
#define COMB_SPLICE_DEFAULT_STALL_MS 1000U

/* comb_splice_stats: PERCPU_ARRAY with a single entry at index 0. */
struct comb_splice_stats {
	__u64 redirected_msgs;
	__u64 redirected_bytes;
	__u64 passed_msgs;
	__u64 passed_bytes;
	__u64 sockets_added;
	__u64 add_failures;
	/* Could not record a socket as TCP-first (no memory); should stay 0. */
	__u64 sticky_failures;
	/* Sockhash members that reached TCP_CLOSE. */
	__u64 sockets_closed;
};

/* comb_splice_queue: PERCPU_ARRAY with a single entry at index 0. A map of
 * its own rather than more comb_splice_stats fields: pinned maps are adopted
 * only when their value size is unchanged. */
struct comb_splice_queue_stats {
	/* Sockets moved to TCP because their peer held queue_limit unread. */
	__u64 fallbacks_full;
	/* ... because their peer stayed at stall_limit or more for stall_ms. */
	__u64 fallbacks_stalled;
	/* The most unread bytes a redirect target held, seen at a verdict. */
	__u64 max_unread;
	__u64 reserved;
};

/* comb_splice_watch (socket storage of a sender whose peer is over
 * stall_limit): when it got there. */
struct comb_splice_watch {
	__u64 over_since_ns;
};

#define COMB_MAX_SPLICED_SOCKS 65536

#endif /* COMB_SPLICE_TYPES_H */
