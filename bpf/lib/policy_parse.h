/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet parsing for the identity policy (policy.c): the IPv4/IPv6 header,
 * IPv6 extension headers, fragments, the ports of TCP/UDP/SCTP, the echo
 * identifier of ICMP/ICMPv6 echoes and the packet an ICMP error quotes.
 * Reads go through bpf_skb_load_bytes, so non-linear skbs parse like linear
 * ones and a truncated header is a failed load, never an out-of-bounds read. */
#ifndef COMB_POLICY_PARSE_H
#define COMB_POLICY_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "comb_addr.h"

#define COMB_IPPROTO_HOPOPTS 0
#define COMB_IPPROTO_ICMP 1
#define COMB_IPPROTO_TCP 6
#define COMB_IPPROTO_UDP 17
#define COMB_IPPROTO_ROUTING 43
#define COMB_IPPROTO_FRAGMENT 44
#define COMB_IPPROTO_ICMPV6 58
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

#define COMB_ICMP_ECHO_REPLY 0
#define COMB_ICMP_DEST_UNREACH 3
#define COMB_ICMP_ECHO 8
#define COMB_ICMP_TIME_EXCEEDED 11
#define COMB_ICMP_PARAMETERPROB 12
#define COMB_ICMPV6_DEST_UNREACH 1
#define COMB_ICMPV6_PARAMPROB 4
#define COMB_ICMPV6_ECHO_REQUEST 128
#define COMB_ICMPV6_ECHO_REPLY 129
/* An ICMP/ICMPv6 header is 8 bytes (type, code, checksum, 4 bytes that depend
 * on the type: an echo's identifier and sequence, unused in errors); an error
 * quotes the offending packet right after it. */
#define COMB_ICMP_HLEN 8

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
	__u32 l4_off;    /* ICMP errors: offset of the ICMP header */
	__u8 v6;         /* IPv6 (ICMPv6 is the ICMP of the family) */
	__u8 icmp_error; /* an ICMP/ICMPv6 error message (see comb_icmp_is_error) */
	__u8 pad[2];
};

static __always_inline void comb_addr_from_v4(struct comb_addr *a, __be32 ip4)
{
	a->a[0] = 0;
	a->a[1] = 0;
	a->a[2] = bpf_htonl(0x0000ffff);
	a->a[3] = ip4;
}

static __always_inline int comb_is_icmp(__u8 protocol, int v6)
{
	return protocol == (v6 ? COMB_IPPROTO_ICMPV6 : COMB_IPPROTO_ICMP);
}

/* Errors quote the packet they are about: ICMPv4 destination unreachable,
 * time exceeded, parameter problem; ICMPv6 destination unreachable, packet
 * too big, time exceeded, parameter problem. */
static __always_inline int comb_icmp_is_error(__u8 type, int v6)
{
	if (v6)
		return type >= COMB_ICMPV6_DEST_UNREACH && type <= COMB_ICMPV6_PARAMPROB;
	return type == COMB_ICMP_DEST_UNREACH || type == COMB_ICMP_TIME_EXCEEDED ||
	       type == COMB_ICMP_PARAMETERPROB;
}

/* The "ports" of an ICMP message `h` (its 8-byte header): an echo request's
 * identifier is its source port, an echo reply's its destination port, so a
 * reply's reversed tuple is its request's. Other messages keep 0 and 0. */
static __always_inline void comb_icmp_ports(const __u8 *h, int v6, struct comb_pkt *p)
{
	__u8 req = v6 ? COMB_ICMPV6_ECHO_REQUEST : COMB_ICMP_ECHO;
	__u8 rep = v6 ? COMB_ICMPV6_ECHO_REPLY : COMB_ICMP_ECHO_REPLY;

	if (h[0] == req)
		__builtin_memcpy(&p->sport, &h[4], 2);
	else if (h[0] == rep)
		__builtin_memcpy(&p->dport, &h[4], 2);
}

/* Ports (and TCP flags) at `off`; < 0 when the header is truncated. ICMP of
 * the packet's family: the echo identifier (comb_icmp_ports), and errors are
 * flagged for the conntrack lookup of the packet they quote. */
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
		if (!comb_is_icmp(p->protocol, p->v6))
			return 0;
		if (bpf_skb_load_bytes(skb, off, h, COMB_ICMP_HLEN) < 0)
			return -1;
		if (comb_icmp_is_error(h[0], p->v6)) {
			p->icmp_error = 1;
			p->l4_off = off;
		} else {
			comb_icmp_ports(h, p->v6, p);
		}
		return 0;
	}
	__builtin_memcpy(&p->sport, &h[0], 2);
	__builtin_memcpy(&p->dport, &h[2], 2);
	return 0;
}

/* Protocols whose destination port the policy matches; ICMP "ports" (echo
 * identifiers) are for conntrack only. */
static __always_inline int comb_has_ports(__u8 protocol)
{
	return protocol == COMB_IPPROTO_TCP || protocol == COMB_IPPROTO_UDP ||
	       protocol == COMB_IPPROTO_SCTP;
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
	p->v6 = 1;
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

/* The packet an ICMP error quotes, at `off`: its IP header (IPv4 with
 * options, IPv6 without extension headers) and the first 8 bytes of what
 * follows (all ICMPv4 guarantees). Addresses, protocol and ports as that
 * packet carried them, an echo's identifier mapped like comb_icmp_ports.
 * Ports stay 0 for an IPv4 later fragment and behind IPv6 extension headers
 * (then `protocol` is the extension header's, which no flow has). < 0 when
 * it cannot be read or is not of the error's family. */
static __always_inline int comb_parse_quoted(struct __sk_buff *skb, __u32 off, int v6,
					     struct comb_pkt *q)
{
	__u8 h[COMB_ICMP_HLEN];

	q->v6 = v6;
	if (v6) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
			return -1;
		__builtin_memcpy(&q->saddr, &ip6.saddr, sizeof(q->saddr));
		__builtin_memcpy(&q->daddr, &ip6.daddr, sizeof(q->daddr));
		q->protocol = ip6.nexthdr;
		off += sizeof(ip6);
	} else {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.version != 4 ||
		    ip.ihl < 5)
			return -1;
		comb_addr_from_v4(&q->saddr, ip.saddr);
		comb_addr_from_v4(&q->daddr, ip.daddr);
		q->protocol = ip.protocol;
		if (bpf_ntohs(ip.frag_off) & 0x1fff)
			return 0;
		off += ip.ihl * 4;
	}
	if (comb_has_ports(q->protocol)) {
		if (bpf_skb_load_bytes(skb, off, h, 4) < 0)
			return -1;
		__builtin_memcpy(&q->sport, &h[0], 2);
		__builtin_memcpy(&q->dport, &h[2], 2);
	} else if (comb_is_icmp(q->protocol, v6)) {
		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
			return -1;
		comb_icmp_ports(h, v6, q);
	}
	return 0;
}

#endif /* COMB_POLICY_PARSE_H */
