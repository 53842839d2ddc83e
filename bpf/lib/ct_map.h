/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The policy conntrack map (comb_ct), on its own so the proxy lookup program
 * (proxy_lookup.c) shares it through its pin without the other policy maps.
 * Layout and semantics in bpf/include/comb_policy_types.h. */
#ifndef COMB_CT_MAP_H
#define COMB_CT_MAP_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_limits.h"
#include "comb_policy_types.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, COMB_MAX_CT);
	__type(key, struct comb_ct_key);
	__type(value, struct comb_ct_value);
} comb_ct SEC(".maps");

#endif /* COMB_CT_MAP_H */
