//! Crafted Ethernet frames for BPF_PROG_TEST_RUN.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// IPv4 "more fragments" flag in the frag_off field.
pub const MF: u16 = 0x2000;

const ETH_IP: u16 = 0x0800;
const ETH_IP6: u16 = 0x86dd;
const ETH_ARP: u16 = 0x0806;

pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (20 bytes) + `l4`. `frag` is the whole frag_off field (flags | offset/8).
pub fn ipv4_hdr(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, id: u16, frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, id: u16, frag: u16, l4: &[u8]) -> Vec<u8> {
    eth(ETH_IP, &ipv4_hdr(src, dst, proto, id, frag, l4))
}

/// A TCP header without options (20 bytes, checksum left 0: nothing here checks it).
pub fn tcp_hdr(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes()); // seq
    h.extend_from_slice(&(if flags & ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
    h.extend_from_slice(&[0x50, flags]);
    h.extend_from_slice(&65535u16.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]);
    h
}

pub fn udp_hdr(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub fn tcp4(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    ipv4(v4(src), v4(dst), TCP, 1, 0, &tcp_hdr(sport, dport, flags))
}

pub fn udp4(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    ipv4(v4(src), v4(dst), UDP, 1, 0, &udp_hdr(sport, dport, b"ping"))
}

/// An ICMP echo request.
pub fn icmp4(src: &str, dst: &str) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0, 0, 1, 0, 1];
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(v4(src), v4(dst), ICMP, 1, 0, &m)
}

/// An ICMP message: type, code, the 4 type-specific bytes, then `body` (checksum filled in).
pub fn icmp_msg(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An ICMP echo request (`reply` false) or reply with identifier `id` (sequence 1).
pub fn icmp4_echo(src: &str, dst: &str, reply: bool, id: u16) -> Vec<u8> {
    let [a, b] = id.to_be_bytes();
    let m = icmp_msg(if reply { 0 } else { 8 }, 0, [a, b, 0, 1], b"ping");
    ipv4(v4(src), v4(dst), ICMP, 1, 0, &m)
}

/// An ICMP error (`ty`/`code`, e.g. 3/3 port unreachable, 3/4 fragmentation needed) quoting
/// the IPv4 packet of the frame `quoted` as routers do: its IP header and the first 8 bytes
/// after it.
pub fn icmp4_error(src: &str, dst: &str, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let quoted = &quoted[14..];
    let ihl = usize::from(quoted[0] & 0x0f) * 4;
    let cut = &quoted[..quoted.len().min(ihl + 8)];
    let rest = if (ty, code) == (3, 4) {
        [0, 0, 0x05, 0xdc] // next-hop MTU 1500
    } else {
        [0; 4]
    };
    ipv4(v4(src), v4(dst), ICMP, 2, 0, &icmp_msg(ty, code, rest, cut))
}

/// The IPv4 frame `frame` (from the builders here: no options) with `words` 4-byte words of IP
/// options (NOPs, then end of list) after the fixed header.
pub fn ipv4_with_options(frame: &[u8], words: u8) -> Vec<u8> {
    assert!((1..=10).contains(&words));
    let hdr = &frame[14..];
    let mut p = hdr[..20].to_vec();
    let mut opts = vec![1u8; usize::from(words) * 4];
    *opts.last_mut().unwrap() = 0;
    p.extend_from_slice(&opts);
    p.extend_from_slice(&hdr[20..]);
    p[0] = 0x45 + words;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    let hl = 20 + usize::from(words) * 4;
    let c = checksum(&p[..hl]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    eth(ETH_IP, &p)
}

/// An ICMPv6 echo request (`reply` false) or reply with identifier `id` (checksum left 0).
pub fn icmp6_echo(src: &str, dst: &str, reply: bool, id: u16) -> Vec<u8> {
    let mut m = vec![if reply { 129 } else { 128 }, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(b"ping");
    ipv6(src, dst, &[], ICMPV6, &m)
}

/// An ICMPv6 error (`ty`: 1 unreachable, 2 packet too big, 3 time exceeded, 4 parameter
/// problem) quoting the whole of `quoted` (an IPv6 frame from [`ipv6`]; its Ethernet header
/// is dropped).
pub fn icmp6_error(src: &str, dst: &str, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&if ty == 2 { 1280u32 } else { 0 }.to_be_bytes());
    m.extend_from_slice(&quoted[14..]);
    ipv6(src, dst, &[], ICMPV6, &m)
}

/// The first fragment of a UDP datagram (its header and some payload, MF set).
pub fn udp4_first_fragment(src: &str, sport: u16, dst: &str, dport: u16, id: u16) -> Vec<u8> {
    let mut l4 = udp_hdr(sport, dport, &[0xab; 32]);
    l4[4..6].copy_from_slice(&3000u16.to_be_bytes()); // the whole datagram's length
    ipv4(v4(src), v4(dst), UDP, id, MF, &l4)
}

/// A later fragment: payload only, at byte offset `offset` (a multiple of 8).
pub fn udp4_later_fragment(src: &str, dst: &str, id: u16, offset: u16, more: bool) -> Vec<u8> {
    let frag = (offset / 8) | if more { MF } else { 0 };
    ipv4(v4(src), v4(dst), UDP, id, frag, &[0xcd; 64])
}

/// An ARP request.
pub fn arp() -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    a.extend_from_slice(&[198, 18, 1, 2]);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&[198, 18, 1, 1]);
    eth(ETH_ARP, &a)
}

/// An IPv4 header announcing 40 bytes of options (ihl 15) that the frame does not have.
pub fn ipv4_options_cut() -> Vec<u8> {
    let mut p = ipv4(
        "198.18.1.3".parse().unwrap(),
        "198.18.1.2".parse().unwrap(),
        TCP,
        1,
        0,
        &[],
    );
    p[14] = 0x4f;
    p
}

/// An IPv6 packet: `exts` are (header type, 8-byte-multiple body incl. its 2-byte prefix
/// filled in here) chained before the upper-layer `proto` header `l4`.
pub fn ipv6(src: &str, dst: &str, exts: &[(u8, Vec<u8>)], proto: u8, l4: &[u8]) -> Vec<u8> {
    let src: Ipv6Addr = src.parse().unwrap();
    let dst: Ipv6Addr = dst.parse().unwrap();
    let mut body = Vec::new();
    let types: Vec<u8> = exts.iter().map(|(t, _)| *t).chain([proto]).collect();
    for (i, (_, e)) in exts.iter().enumerate() {
        let mut e = e.clone();
        assert!(e.len() >= 8 && e.len() % 8 == 0);
        e[0] = types[i + 1];
        if types[i] != 44 {
            e[1] = (e.len() / 8 - 1) as u8;
        }
        body.extend_from_slice(&e);
    }
    body.extend_from_slice(l4);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.push(types[0]);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&body);
    eth(ETH_IP6, &h)
}

/// An 8-byte option header (hop-by-hop / destination options): PadN.
pub fn v6_opts() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 fragment header at byte `offset` with id.
pub fn v6_frag(offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut f = vec![0, 0];
    f.extend_from_slice(&((offset / 8) << 3 | u16::from(more)).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f
}
