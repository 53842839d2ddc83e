/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Socket LB maps. Names are the pin names under <pin_dir>/maps/. */
#ifndef COMB_LB_MAPS_H
#define COMB_LB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_lb_types.h"

/* NO_PREALLOC on every map a reader holds a value pointer of while
 * userspace may replace it: a preallocated hash recycles the replaced
 * element at once (per-CPU spare), a non-preallocated one frees it after an
 * RCU grace period, so a reader never sees a value being overwritten. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, COMB_LB_MAX_SERVICES);
	__type(key, struct comb_lb_svc_key);
	__type(value, struct comb_lb_svc);
} comb_lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, COMB_LB_MAX_BACKEND_ENTRIES);
	__type(key, struct comb_lb_backend_key);
	__type(value, struct comb_lb_backend);
} comb_lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, COMB_LB_MAX_MAGLEV_TABLES);
	__type(key, struct comb_lb_maglev_key);
	__type(value, struct comb_lb_maglev);
} comb_lb_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, COMB_LB_MAX_AFFINITY);
	__type(key, struct comb_lb_affinity_key);
	__type(value, struct comb_lb_affinity);
} comb_lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, COMB_LB_MAX_REVNAT);
	__type(key, struct comb_lb_revnat_key);
	__type(value, struct comb_lb_revnat);
} comb_lb_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct comb_lb_config);
} comb_lb_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct comb_lb_stats);
} comb_lb_stats SEC(".maps");

#endif /* COMB_LB_MAPS_H */
