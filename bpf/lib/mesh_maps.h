/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Maps shared by the policy programs (policy.c) and the node uplink program
 * (uplink.c): the proxy's listeners and what the mesh makes of addresses and
 * ports. Both objects pin them under the same names in <pin_dir>/maps/, so
 * they are one map each. Layouts in bpf/include/comb_policy_types.h. */
#ifndef COMB_MESH_MAPS_H
#define COMB_MESH_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_addr.h"
#include "comb_policy_types.h"

/* Values are sockets (userspace writes an fd, reads the socket cookie); a
 * closed socket leaves the map by itself. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, COMB_PROXY_LISTENERS);
	__type(key, __u32);
	__type(value, __u64);
} comb_proxy_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, COMB_MAX_MESH_ADDRS);
	__type(key, struct comb_addr);
	__type(value, struct comb_mesh_addr);
} comb_mesh_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, COMB_MAX_MESH_PORTS);
	__type(key, struct comb_mesh_port_key);
	__type(value, struct comb_mesh_port);
} comb_mesh_ports SEC(".maps");

#endif /* COMB_MESH_MAPS_H */
