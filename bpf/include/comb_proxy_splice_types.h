/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Types of the proxy splice (bpf/proxy_splice.c) shared with userspace. Each
 * struct has a #[repr(C)] twin in crates/comb-datapath/src/proxy_splice.rs,
 * checked against this object's BTF by a unit test: change both together.
 * The maps are pinned and adopted across agent restarts, so sizes are ABI.
 */
#ifndef COMB_PROXY_SPLICE_TYPES_H
#define COMB_PROXY_SPLICE_TYPES_H

#include <linux/types.h>

/* comb_px_peers: key = socket cookie of one side of a spliced pair. */
struct comb_px_peer {
	__u64 peer;     /* socket cookie of the other side */
	__u64 bytes;    /* received on this socket and redirected to the peer */
	__u64 skbs;     /* skbs redirected */
	__u64 failures; /* skbs whose redirect failed (passed to userspace) */
};

/* comb_px_stats: PERCPU_ARRAY with a single entry at index 0. */
struct comb_px_stats {
	__u64 redirected_skbs;
	__u64 redirected_bytes;
	/* Redirect failed (peer no longer in the sockhash): passed to userspace. */
	__u64 redirect_failures;
	/* Socket in the sockhash but not paired (yet, or any more): passed. */
	__u64 unpaired_skbs;
	__u64 unpaired_bytes;
	__u64 reserved[3];
};

/* Sockets, not pairs: two per pair. */
#define COMB_PX_MAX_SOCKS 65536

#endif /* COMB_PROXY_SPLICE_TYPES_H */
