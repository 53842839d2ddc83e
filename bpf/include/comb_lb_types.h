/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket load balancer types (bpf/lb_sock.c), shared with userspace. Every
 * struct here has a #[repr(C)] twin in crates/comb-datapath/src/lb/abi.rs,
 * checked against the BTF of sock.bpf.o by a unit test: change both
 * together. The maps are pinned and adopted across agent restarts, so these
 * sizes are part of the on-node ABI.
 */
#ifndef COMB_LB_TYPES_H
#define COMB_LB_TYPES_H

#include <linux/types.h>

#include "comb_addr.h"

/* Maglev lookup table size; must equal comb_model::maglev::M. */
#define COMB_LB_MAGLEV_M 16381

#define COMB_LB_MAX_SERVICES 65536
/* Backend entries over all services and both live versions of each. */
#define COMB_LB_MAX_BACKEND_ENTRIES 262144
/* Maglev tables (64 KiB each, allocated on use): services with Maglev x 2. */
#define COMB_LB_MAX_MAGLEV_TABLES 4096
#define COMB_LB_MAX_AFFINITY 262144
#define COMB_LB_MAX_REVNAT 262144

/* comb_lb_services key: one Service VIP:port/protocol. Port in host order,
 * protocol is IPPROTO_TCP or IPPROTO_UDP. */
struct comb_lb_svc_key {
	struct comb_addr vip;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

#define COMB_LB_F_MAGLEV (1U << 0)
#define COMB_LB_F_AFFINITY (1U << 1)

/* comb_lb_services value. version names the backend set (and Maglev
 * table) readers use; count is the number of backends in it, 0 = refuse. */
struct comb_lb_svc {
	__u32 id;
	__u32 version;
	__u32 count;
	__u32 flags;
	__u32 affinity_timeout_secs;
	__u32 reserved[3];
};

/* comb_lb_backends key: backend `index` (0..count) of one version. */
struct comb_lb_backend_key {
	__u32 svc_id;
	__u32 version;
	__u32 index;
};

/* comb_lb_backends value. Port in host order. */
struct comb_lb_backend {
	struct comb_addr ip;
	__u16 port;
	__u16 pad;
	__u32 reserved;
};

/* comb_lb_maglev key; the value is the table: slot -> backend index. */
struct comb_lb_maglev_key {
	__u32 svc_id;
	__u32 version;
};

struct comb_lb_maglev {
	__u32 idx[COMB_LB_MAGLEV_M];
};

/* comb_lb_affinity key: the client is its network namespace (a pod) plus
 * its bound source address, if any (at connect() time a socket usually has
 * none: then the netns alone, which is the pod IP for a pod). */
struct comb_lb_affinity_key {
	__u64 netns_cookie;
	struct comb_addr client;
	__u32 svc_id;
	__u32 pad;
};

/* comb_lb_affinity value: the remembered backend, where it was found
 * (version, index: a cheap validity check while the set is unchanged) and
 * when it was last used (bpf_ktime_get_boot_ns, so it counts suspend). */
struct comb_lb_affinity {
	struct comb_addr ip;
	__u16 port;
	__u16 pad;
	__u32 version;
	__u32 index;
	__u32 reserved;
	__u64 last_used_ns;
};

/* comb_lb_revnat key: a socket (cookie) and the backend it was sent to. */
struct comb_lb_revnat_key {
	__u64 cookie;
	struct comb_addr ip;
	__u16 port;
	__u16 pad;
	__u32 pad2;
};

/* comb_lb_revnat value: the Service address the application asked for. */
struct comb_lb_revnat {
	struct comb_addr vip;
	__u16 port;
	__u16 pad;
	__u32 svc_id;
};

/* comb_lb_config: ARRAY with a single entry at index 0. With HOST_ONLY,
 * only sockets of the network namespace host_netns_cookie are translated. */
#define COMB_LB_CFG_F_HOST_ONLY (1U << 0)
struct comb_lb_config {
	__u32 flags;
	__u32 reserved;
	__u64 host_netns_cookie;
};

/* comb_lb_stats: PERCPU_ARRAY with a single entry at index 0. */
struct comb_lb_stats {
	__u64 connects_translated;
	__u64 sendmsgs_translated;
	__u64 replies_reversed;
	__u64 refused_no_backend;
	__u64 affinity_hits;
	/* A backend lookup missed because its version was retired meanwhile;
	 * the service entry was read again. */
	__u64 version_retries;
	/* The reverse-NAT entry could not be written (getpeername / UDP
	 * replies then show the backend). */
	__u64 revnat_failures;
	__u64 reserved;
};

#endif /* COMB_LB_TYPES_H */
