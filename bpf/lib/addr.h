/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* struct comb_addr helpers shared by the socket-level features (splice, LB). */
#ifndef COMB_ADDR_HELPERS_H
#define COMB_ADDR_HELPERS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "comb_addr.h"

/* No libc socket headers for the BPF target. */
#define COMB_AF_INET 2
#define COMB_AF_INET6 10

static __always_inline void comb_addr_set_v4(struct comb_addr *a, __u32 ip4_be)
{
	a->a[0] = 0;
	a->a[1] = 0;
	a->a[2] = bpf_htonl(0x0000ffff);
	a->a[3] = ip4_be;
}

static __always_inline int comb_addr_is_v4(const struct comb_addr *a)
{
	return a->a[0] == 0 && a->a[1] == 0 && a->a[2] == bpf_htonl(0x0000ffff);
}

#endif /* COMB_ADDR_HELPERS_H */
