/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * How many redirected bytes the peer of a sendmsg has not read yet.
 *
 * bpf_msg_redirect_hash queues a message on the peer's psock ingress list and
 * charges it to the machine-wide TCP memory only: no socket buffer bounds it,
 * so a sender to a peer that does not read could queue until sendmsg fails
 * with ENOMEM (1.5 GiB in 8 s, measured). TCP would block the sender after
 * its send buffer and the receive window. The verdict reads the peer's queue
 * length (struct sk_psock.msg_tot_len, the count FIONREAD reports) and, over
 * a limit, moves the socket to TCP for good (splice.h), where flow control
 * applies.
 *
 * The peer is the socket the redirect helper just chose: the kernel keeps it,
 * with a reference held, in the message's sk_redir, and the program's
 * context IS that struct sk_msg. These reads are bpf_probe_read_kernel of
 * CO-RE-relocated fields (kernel BTF), so a missing field fails no load
 * (msg_tot_len is recent) and an unexpected pointer reads as an error, never
 * a fault. Reading the context's address needs CAP_PERFMON, as the agent has.
 */
#ifndef COMB_SPLICE_QUEUE_H
#define COMB_SPLICE_QUEUE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

/* Views of kernel structs, only the fields read here. The ___comb suffix is
 * dropped when libbpf matches them against the running kernel's BTF. */
struct sock___comb {
	void *sk_user_data;
} __attribute__((preserve_access_index));

struct sk_psock___comb {
	__u32 msg_tot_len;
} __attribute__((preserve_access_index));

struct sk_msg___comb {
	struct sock___comb *sk_redir;
} __attribute__((preserve_access_index));

/* sk_user_data carries flags in its low bits (SK_USER_DATA_NOCOPY, _BPF,
 * _PSOCK); the psock pointer is the rest. */
#define COMB_SK_USER_DATA_PTRMASK (~7UL)

/* Bytes queued on the redirect target's ingress list and not yet read, or
 * -1 when unknown (no target, no psock, a kernel without the count). Call
 * only after bpf_msg_redirect_hash returned SK_PASS. */
static __always_inline __s64 comb_redirect_target_unread(struct sk_msg_md *msg)
{
	struct sk_msg___comb *kmsg = (void *)msg;
	struct sock___comb *peer;
	struct sk_psock___comb *psock = 0;
	unsigned long data;
	__u32 len = 0;

	if (!bpf_core_field_exists(psock->msg_tot_len))
		return -1;
	if (bpf_core_read(&peer, sizeof(peer), &kmsg->sk_redir) || !peer)
		return -1;
	if (bpf_core_read(&data, sizeof(data), &peer->sk_user_data))
		return -1;
	psock = (void *)(data & COMB_SK_USER_DATA_PTRMASK);
	if (!psock)
		return -1;
	if (bpf_core_read(&len, sizeof(len), &psock->msg_tot_len))
		return -1;
	return len;
}

#endif /* COMB_SPLICE_QUEUE_H */
