/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * IPv6 packet parsing and rewriting for the tc programs, the counterpart
 * of lb_nat.h's IPv4 half: the IPv6/L4 view of a packet, address and port
 * rewrites with incremental checksum updates, hop limit decrement and
 * forwarding through the FIB.
 *
 * IPv6 has no header checksum: an address rewrite changes only the L4
 * checksum, through its pseudo-header. A 16-byte address does not fit
 * bpf_l4_csum_replace's 2/4-byte forms, so its difference is computed with
 * bpf_csum_diff and applied as a checksum delta (size 0), which is also
 * correct for CHECKSUM_PARTIAL skbs with BPF_F_PSEUDO_HDR, as lb_nat.h's.
 *
 * Only packets whose first next header is TCP or UDP are parsed: a packet
 * with extension headers (fragments, destination options, routing) is not
 * ours and goes on untouched, as does all ICMPv6 (neighbour discovery,
 * router advertisements, the node's own errors).
 */
#ifndef KPR_LB_NAT6_H
#define KPR_LB_NAT6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_nat.h"

#define AF_INET6 10

#define IP6_OFF      ETH_HLEN
#define IP6_HOP_OFF  (IP6_OFF + offsetof(struct ipv6hdr, hop_limit))
#define IP6_SRC_OFF  (IP6_OFF + offsetof(struct ipv6hdr, saddr))
#define IP6_DST_OFF  (IP6_OFF + offsetof(struct ipv6hdr, daddr))
#define IP6_HLEN     40

/* What the tc programs need to know of an IPv6 TCP/UDP packet. */
struct pkt6 {
	__be32 saddr[4];  /* source address */
	__be32 daddr[4];  /* destination address */
	__be16 sport;     /* source port */
	__be16 dport;     /* destination port */
	__u32  l4_off;    /* offset of the L4 header from the frame start */
	__u8   proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   hop_limit; /* IPv6 hop limit */
	__u8   tcp_flags; /* TCP flags byte (FIN, SYN, RST, ...); 0 for UDP */
	__u8   pad;
};

/* Fills @p from the IPv6 header at offset @off. Returns 0 for a TCP or
 * UDP packet without extension headers, -1 for anything else. */
static __always_inline int pkt6_parse_at(struct __sk_buff *skb, __u32 off, struct pkt6 *p)
{
	struct ipv6hdr ip6;
	__be16 ports[2];

	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
		return -1;
	if (ip6.version != 6 || (ip6.nexthdr != IPPROTO_TCP && ip6.nexthdr != IPPROTO_UDP))
		return -1;
	p->l4_off = off + IP6_HLEN;
	p->tcp_flags = 0;
	if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
		return -1;
	if (ip6.nexthdr == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, p->l4_off + 13, &p->tcp_flags, 1) < 0)
		return -1;
	__builtin_memcpy(p->saddr, &ip6.saddr, 16);
	__builtin_memcpy(p->daddr, &ip6.daddr, 16);
	p->sport = ports[0];
	p->dport = ports[1];
	p->proto = ip6.nexthdr;
	p->hop_limit = ip6.hop_limit;
	p->pad = 0;
	return 0;
}

/* Fills @p from an Ethernet frame. Returns 0 for an IPv6 TCP or UDP
 * packet, -1 for anything else (left alone by the caller). */
static __always_inline int pkt6_parse(struct __sk_buff *skb, struct pkt6 *p)
{
	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return -1;
	return pkt6_parse_at(skb, IP6_OFF, p);
}

static __always_inline int ip6_addr_eq(const __be32 a[4], const __be32 b[4])
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline __u32 l4_csum_off6(const struct pkt6 *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? 16 : 6);
}

/* Rewrites the address at @addr_off (source or destination) from @old to
 * @new and the L4 checksum's pseudo-header part. */
static __always_inline int nat_set_addr6(struct __sk_buff *skb, const struct pkt6 *p,
					 __u32 addr_off, const __be32 old[4], const __be32 new[4])
{
	__be32 o[4], n[4];
	__s64 diff;

	if (ip6_addr_eq(old, new))
		return 0;
	/* Copies on the stack: bpf_csum_diff takes stack or packet memory. */
	__builtin_memcpy(o, old, sizeof(o));
	__builtin_memcpy(n, new, sizeof(n));
	diff = bpf_csum_diff(o, sizeof(o), n, sizeof(n), 0);
	if (diff < 0)
		return -1;
	if (bpf_l4_csum_replace(skb, l4_csum_off6(p), 0, (__u32)diff,
				(p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0) |
					BPF_F_PSEUDO_HDR) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, addr_off, n, sizeof(n), 0);
}

/* Rewrites the port at @port_off from @old to @new and the L4 checksum. */
static __always_inline int nat_set_port6(struct __sk_buff *skb, const struct pkt6 *p,
					 __u32 port_off, __be16 old, __be16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, l4_csum_off6(p), old, new,
				(p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0) |
					sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, port_off, &new, sizeof(new), 0);
}

/* Rewrites the packet's 4-tuple to saddr:sport -> daddr:dport. */
static __always_inline int nat_rewrite6(struct __sk_buff *skb, const struct pkt6 *p,
					const __be32 saddr[4], __be16 sport,
					const __be32 daddr[4], __be16 dport)
{
	if (nat_set_addr6(skb, p, IP6_SRC_OFF, p->saddr, saddr) < 0 ||
	    nat_set_addr6(skb, p, IP6_DST_OFF, p->daddr, daddr) < 0 ||
	    nat_set_port6(skb, p, p->l4_off, p->sport, sport) < 0 ||
	    nat_set_port6(skb, p, p->l4_off + 2, p->dport, dport) < 0)
		return -1;
	return 0;
}

/* Decrements the hop limit of a packet this node forwards itself (no
 * header checksum to follow). */
static __always_inline int ip6_dec_hop(struct __sk_buff *skb, __u8 hop_limit)
{
	__u8 new_hop = hop_limit - 1;

	return bpf_skb_store_bytes(skb, IP6_HOP_OFF, &new_hop, 1, 0);
}

/* Routes saddr -> daddr as if the packet had come in on @ifindex (@ctx: the
 * skb or XDP context), as fib_lookup4(). BPF_FIB_LOOKUP_SRC in @flags also
 * learns the source address this node would use (fib->ipv6_src). */
static __always_inline long fib_lookup6(void *ctx, __u32 ifindex, struct bpf_fib_lookup *fib,
					__u8 proto, const __be32 saddr[4], const __be32 daddr[4],
					__u32 flags)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET6;
	fib->l4_protocol = proto;
	fib->tot_len = 0;
	__builtin_memcpy(fib->ipv6_src, saddr, 16);
	__builtin_memcpy(fib->ipv6_dst, daddr, 16);
	fib->ifindex = ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), flags);
}

/* fib_redirect() for IPv6: out of the interface @fib chose, with the MACs
 * it found or through the neighbour subsystem (neighbour discovery). */
static __always_inline int fib_redirect6(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
					 long rc)
{
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (fib_set_macs(skb, fib) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect(fib->ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh nh = { .nh_family = AF_INET6 };

		__builtin_memcpy(nh.ipv6_nh, fib->ipv6_dst, 16);
		return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	return TC_ACT_SHOT;
}

#endif /* KPR_LB_NAT6_H */
