/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Identity policy maps (bpf/policy.c). Names are the pin names under
 * <pin_dir>/maps/; layouts in bpf/include/comb_policy_types.h. The maps the
 * uplink program shares (listeners, mesh) are in mesh_maps.h, the conntrack
 * map the proxy lookup program reads in ct_map.h. */
#ifndef COMB_POLICY_MAPS_H
#define COMB_POLICY_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_addr.h"
#include "comb_limits.h"
#include "comb_policy_types.h"
#include "mesh_maps.h"
#include "ct_map.h"

/* LPM tries must be NO_PREALLOC; replaced values are freed after RCU, so a
 * reader copying a value never sees it half-written. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, COMB_MAX_IPCACHE);
	__type(key, struct comb_ipcache_key);
	__type(value, struct comb_ipcache_value);
} comb_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, COMB_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct comb_policy_endpoint);
} comb_policy_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, COMB_MAX_POLICY);
	__type(key, struct comb_policy_key);
	__type(value, struct comb_policy_value);
} comb_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, COMB_MAX_FRAGS);
	__type(key, struct comb_frag_key);
	__type(value, struct comb_frag_value);
} comb_frag SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct comb_policy_config);
} comb_policy_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, COMB_MAX_POLICY_METRICS);
	__type(key, struct comb_policy_metric_key);
	__type(value, struct comb_policy_metric_value);
} comb_policy_metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, COMB_FLOW_RINGBUF_BYTES);
} comb_flow_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} comb_policy_events_lost SEC(".maps");

#endif /* COMB_POLICY_MAPS_H */
