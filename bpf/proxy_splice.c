/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Comb proxy splice: once the node proxy has decided a connection (opaque
 * TCP allowed by policy, a WebSocket after its upgrade), it hands its
 * downstream and upstream sockets to the kernel; every skb received on one is
 * sent out of the other without crossing userspace.
 *
 * Program
 *   comb_px_verdict (sk_skb/verdict, no strparser): attached to comb_px_socks.
 *     Runs from the socket's data_ready (tcp_read_skb, in order) for each skb
 *     received; looks up the socket's peer by cookie (comb_px_peers) and
 *     redirects the skb to the peer's egress (found in comb_px_redir).
 *     Counts bytes per socket. Drops only empty skbs (a pure FIN, already
 *     recorded by TCP): anything else it cannot redirect is passed to the
 *     socket's own queue, where the proxy reads and forwards it.
 *
 * Pairing order (userspace, crates/comb-datapath/src/proxy_splice.rs):
 * peers entries, then both sockets into comb_px_redir, then both into
 * comb_px_socks, then a kick (setsockopt SO_RCVLOWAT runs tcp_data_ready)
 * so bytes queued before the insert are verdicted, in order, before any
 * newer ones.
 *
 * What the kernel does not do for us: FIN is not forwarded (the proxy sees
 * EOF and shuts the peer down once the peer has sent everything it was
 * given), and there is no backpressure from the peer's send buffer to this
 * socket's receive window (redirected skbs wait in the peer's psock queue).
 *
 * Pins (by the agent): maps under <pin_dir>/maps/ (adopted by a restarted
 * agent; pairs die with their sockets, stale peers entries are removed on
 * load), the program under <pin_dir>/progs/. The program is attached to the
 * sockhash with BPF_PROG_ATTACH and lives as long as the map.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "proxy_splice.h"

SEC("sk_skb/verdict")
int comb_px_verdict(struct __sk_buff *skb)
{
	return comb_px_verdict_skb(skb);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
