/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Comb local splice: TCP between two pods on this node skips the TCP/IP
 * stack. Each sendmsg goes straight into the peer socket's receive queue.
 *
 * Programs
 *   comb_sockops (sockops): attached to every local pod's cgroup, one pinned
 *     bpf_link per pod, and to the node proxy's (the agent's) cgroup. On
 *     ACTIVE/PASSIVE_ESTABLISHED, when comb_config enables splice and the
 *     REMOTE address is a local endpoint with splice on (comb_endpoints), the
 *     socket goes into comb_sock_hash (an accepted one only when its own
 *     address is such an endpoint too) and its key into comb_splice_members;
 *     a socket whose remote is not an endpoint goes in when its other end's
 *     key is a member (a pod's end of a connection the proxy opened). The
 *     local side needs no other check: this program only runs in local pods'
 *     and the proxy's cgroups.
 *   comb_sk_msg (sk_msg): attached to comb_sock_hash, so it runs on each
 *     sendmsg of a member socket. It looks up the PEER (own key with local
 *     and remote swapped) and redirects to its ingress queue, else passes;
 *     a peer over the queue limit moves the sender to TCP.
 *
 * Key layout (struct comb_sock_key, 40 bytes): local ip, remote ip (16 bytes
 * each, network order, IPv4 as ::ffff:a.b.c.d), local port, remote port (host
 * order u16), family of the addresses (AF_INET for v4-mapped). A v6 socket
 * talking v4-mapped and its AF_INET peer thus build matching keys.
 *
 * Sticky TCP-first rule: the receiver (tcp_bpf_recvmsg) drains the psock
 * ingress queue before sk_receive_queue. If a socket sent bytes over TCP
 * (peer not yet, or never, in the sockhash) and later redirected, the peer
 * could read newer redirected bytes before older TCP ones. So the first miss
 * marks the socket in comb_splice_tcp_first (socket-local storage, freed
 * with the socket; sk_msg may use it on this kernel) and it never redirects
 * again. sockops enables the state callback on every socket it adds, to
 * count closes and free the mark at TCP_CLOSE. The reverse switch
 * (redirect first, TCP later, e.g. after the peer closed) is harmless: the
 * older, redirected bytes are read first.
 *
 * Pins (by the agent, see crates/comb-datapath): maps under <pin_dir>/maps/
 * (adopted by a restarted agent, so live connections keep their sockhash
 * entries), programs under <pin_dir>/progs/, cgroup links under
 * <pin_dir>/links/<id>. sk_msg is attached to the sockhash with
 * BPF_PROG_ATTACH and lives as long as the map does.
 *
 * Kernel-level differences from plain TCP (tcp_bpf_recvmsg, 6.18), none of
 * which these programs can change: a blocking read that is woken with no
 * data queued returns EAGAIN. The wakeups are the socket's own state
 * changes: shutdown(SHUT_WR) itself, the ACK of our FIN (FIN_WAIT1 ->
 * FIN_WAIT2), and an RST (the read after it gives ECONNRESET). Unread
 * redirected bytes are purged at close, so close sends FIN, not RST.
 * Socket buffer sizes make no difference (they do not bound this path);
 * what bounds it is the queue limit (comb_config.queue_limit, see
 * splice_queue.h): a sender whose peer holds that many unread redirected
 * bytes moves to TCP for good, the TCP-first rule's safe direction.
 *
 * Turning splice off affects new connections only; spliced ones stay
 * spliced (switching mid-stream is safe but buys nothing).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "comb_splice_types.h"
#include "splice_maps.h"
#include "sock_key.h"
#include "splice.h"

SEC("sockops")
int comb_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		comb_sockops_established(skops, 0);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		comb_sockops_established(skops, 1);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		comb_sockops_state(skops);
		break;
	}
	return 1;
}

SEC("sk_msg")
int comb_sk_msg(struct sk_msg_md *msg)
{
	return comb_msg_verdict(msg);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
