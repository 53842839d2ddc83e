/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The address type every feature's maps use, shared with userspace: its
 * #[repr(C)] twin is CombAddr in crates/comb-datapath/src/abi.rs, checked
 * against the objects' BTF by a unit test.
 */
#ifndef COMB_ADDR_H
#define COMB_ADDR_H

#include <linux/types.h>

/* Addresses are 16 bytes in network order; IPv4 is stored v4-mapped
 * (::ffff:a.b.c.d), so one layout serves both families. */
struct comb_addr {
	__u32 a[4];
};

#endif /* COMB_ADDR_H */
