/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet parsing for the identity policy (policy.c): the IPv4/IPv6 header,
 * IPv6 extension headers, fragments and the ports of TCP/UDP/SCTP. Reads go
 * through bpf_skb_load_bytes, so non-linear skbs parse like linear ones and
 * a truncated header is a failed load, never an out-of-bounds read. */
#ifndef COMB_POLICY_PARSE_H
#define COMB_POLICY_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "comb_types.h"

#define COMB_IPPROTO_HOPOPTS 0
#define COMB_IPPROTO_TCP 6
#define COMB_IPPROTO_UDP 17
#define COMB_IPPROTO_ROUTING 43
#define COMB_IPPROTO_FRAGMENT 44
#define COMB_IPPROTO_DSTOPTS 60
#define COMB_IPPROTO_SCTP 132

#define COMB_TCP_FIN 0x01
#define COMB_TCP_SYN 0x02
#define COMB_TCP_RST 0x04
#define COMB_TCP_ACK 0x10

/* IPv6 extension headers skipped before giving up (malformed). */
#define COMB_IPV6_MAX_EXT 8

#define COMB_FRAG_NONE 0
#define COMB_FRAG_FIRST 1 /* offset 0, more fragments follow */
#define COMB_FRAG_LATER 2 /* offset > 0: no L4 header */

/* What the policy needs of one packet. */
struct comb_pkt {
	struct comb_addr saddr;
	struct comb_addr daddr;
	__be16 sport; /* 0 for protocols without ports, and in later fragments */
	__be16 dport;
	__u8 protocol;   /* upper-layer protocol */
	__u8 tcp_flags;
	__u8 frag;       /* COMB_FRAG_* */
	__u8 frag_proto; /* IPv4 protocol / IPv6 fragment header next header */
	__u32 frag_id;   /* host order; IPv4 ids are 16 bits */
};

static __always_inline void comb_addr_from_v4(struct comb_addr *a, __be32 ip4)
{
	a->a[0] = 0;
	a->a[1] = 0;
	a->a[2] = bpf_htonl(0x0000ffff);
	a->a[3] = ip4;
}

/* Ports (and TCP flags) at `off`; < 0 when the header is truncated. */
static __always_inline int comb_parse_l4(struct __sk_buff *skb, __u32 off, struct comb_pkt *p)
{
	__u8 h[14];

	switch (p->protocol) {
	case COMB_IPPROTO_TCP:
		/* Ports at 0, flags at 13; a TCP header is at least 20 bytes. */
		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0 || off + 20 > skb->len)
			return -1;
		p->tcp_flags = h[13];
		break;
	case COMB_IPPROTO_UDP:
	case COMB_IPPROTO_SCTP:
		/* UDP header 8 bytes, SCTP common header 12. */
		if (bpf_skb_load_bytes(skb, off, h, 4) < 0 || off + 8 > skb->len)
			return -1;
		break;
	default:
		return 0;
	}
	__builtin_memcpy(&p->sport, &h[0], 2);
	__builtin_memcpy(&p->dport, &h[2], 2);
	return 0;
}

static __always_inline int comb_parse_ipv4(struct __sk_buff *skb, struct comb_pkt *p)
{
	struct iphdr ip;
	__u32 hlen;
	__u16 frag, tot;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 4)
		return -1;
	/* Before the checks below: flow events of malformed packets name them. */
	comb_addr_from_v4(&p->saddr, ip.saddr);
	comb_addr_from_v4(&p->daddr, ip.daddr);
	hlen = ip.ihl * 4;
	tot = bpf_ntohs(ip.tot_len);
	/* tot_len 0 is a BIG TCP GSO packet (length from the skb). */
	if (hlen < sizeof(ip) || (tot && tot < hlen))
		return -1;
	p->protocol = ip.protocol;
	p->frag_proto = ip.protocol;
	frag = bpf_ntohs(ip.frag_off);
	if (frag & 0x1fff) {
		p->frag = COMB_FRAG_LATER;
		p->frag_id = bpf_ntohs(ip.id);
		return 0;
	}
	if (frag & 0x2000) {
		p->frag = COMB_FRAG_FIRST;
		p->frag_id = bpf_ntohs(ip.id);
	}
	return comb_parse_l4(skb, ETH_HLEN + hlen, p);
}

struct comb_ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset << 3 | M */
	__be32 id;
};

static __always_inline int comb_parse_ipv6(struct __sk_buff *skb, struct comb_pkt *p)
{
	struct ipv6hdr ip;
	struct comb_ipv6_frag_hdr fh;
	__u32 off = ETH_HLEN + sizeof(ip);
	__u8 nexthdr, ext[2];
	__u16 fo;
	int i;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 6)
		return -1;
	__builtin_memcpy(&p->saddr, &ip.saddr, sizeof(p->saddr));
	__builtin_memcpy(&p->daddr, &ip.daddr, sizeof(p->daddr));
	nexthdr = ip.nexthdr;
	for (i = 0; i < COMB_IPV6_MAX_EXT; i++) {
		switch (nexthdr) {
		case COMB_IPPROTO_HOPOPTS:
		case COMB_IPPROTO_ROUTING:
		case COMB_IPPROTO_DSTOPTS:
			if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
				return -1;
			nexthdr = ext[0];
			off += ((__u32)ext[1] + 1) * 8;
			break;
		case COMB_IPPROTO_FRAGMENT:
			if (bpf_skb_load_bytes(skb, off, &fh, sizeof(fh)) < 0)
				return -1;
			off += sizeof(fh);
			nexthdr = fh.nexthdr;
			fo = bpf_ntohs(fh.frag_off);
			p->frag_id = bpf_ntohl(fh.id);
			p->frag_proto = fh.nexthdr;
			if (fo & 0xfff8) {
				p->frag = COMB_FRAG_LATER;
				p->protocol = nexthdr;
				return 0;
			}
			/* Offset 0 without M is an atomic fragment: a whole packet. */
			if (fo & 1)
				p->frag = COMB_FRAG_FIRST;
			break;
		default:
			p->protocol = nexthdr;
			if (p->frag == COMB_FRAG_NONE)
				p->frag_proto = nexthdr;
			return comb_parse_l4(skb, off, p);
		}
	}
	return -1; /* more extension headers than we follow */
}

#endif /* COMB_POLICY_PARSE_H */
