/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Packet parsing and rewriting for the tc programs: the IPv4/L4 view of a
 * packet, address and port rewrites with incremental checksum updates, TTL
 * decrement and forwarding through the FIB.
 *
 * Checksums are updated with bpf_l3/l4_csum_replace rather than recomputed,
 * which is also correct for CHECKSUM_PARTIAL skbs (locally generated or
 * veth traffic): BPF_F_PSEUDO_HDR updates only what the pseudo-header
 * contributes. UDP datagrams without a checksum (0) keep none
 * (BPF_F_MARK_MANGLED_0).
 */
#ifndef KPR_LB_NAT_H
#define KPR_LB_NAT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2

#ifndef offsetof
#define offsetof(type, member) __builtin_offsetof(type, member)
#endif

#define IP_OFF  ETH_HLEN
#define IP_CSUM_OFF (IP_OFF + offsetof(struct iphdr, check))
#define IP_TTL_OFF  (IP_OFF + offsetof(struct iphdr, ttl))
#define IP_SRC_OFF  (IP_OFF + offsetof(struct iphdr, saddr))
#define IP_DST_OFF  (IP_OFF + offsetof(struct iphdr, daddr))

#define IP_DF     0x4000
#define IP_MF     0x2000
#define IP_OFFSET 0x1fff

/* ICMP types and codes (RFC 792, 1191); linux/icmp.h pulls in libc
 * headers a BPF build does not have. */
#define ICMP_DEST_UNREACH 3 /* type: destination unreachable */
#define ICMP_PORT_UNREACH 3 /* its code: port unreachable */
#define ICMP_FRAG_NEEDED  4 /* its code: fragmentation needed and DF set */

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* One's complement fold of a 32-bit checksum sum (a bpf_csum_diff()
 * result), complemented: the value of a checksum field. */
static __always_inline __sum16 csum_fold(__u32 c)
{
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__sum16)~c;
}

/* Where a packet stands among the fragments of its datagram. */
enum pkt_frag {
	PKT_WHOLE      = 0, /* not fragmented */
	PKT_FRAG_FIRST = 1, /* the first fragment: it has the L4 header */
	PKT_FRAG_LATER = 2, /* a later fragment: no L4 header, its ports are
			     * the first one's (lb_frag.h) */
};

/* What the tc programs need to know of an IPv4 TCP/UDP packet. */
struct pkt4 {
	__be32 saddr;     /* source address */
	__be32 daddr;     /* destination address */
	__be16 sport;     /* source port */
	__be16 dport;     /* destination port */
	__u32  l4_off;    /* offset of the L4 header from the frame start
			   * (of the payload, for a later fragment) */
	__u8   proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   ttl;       /* IP TTL */
	__u8   tcp_flags; /* TCP flags byte (FIN, SYN, RST, ... ); 0 for UDP
			   * and later fragments */
	__u8   frag;      /* enum pkt_frag */
	__be16 ip_id;     /* IP identification (of a fragment's datagram) */
	__u8   df;        /* 1: don't fragment (DF) is set */
	__u8   pad;
};

/* Fills @p from the IPv4 header at offset @off. Returns 0 for a TCP or UDP
 * packet or fragment (a later fragment's ports are 0: lb_frag.h knows
 * them), -1 for anything else. */
static __always_inline int pkt4_parse_at(struct __sk_buff *skb, __u32 off, struct pkt4 *p)
{
	struct iphdr ip;
	__be16 ports[2];
	__u8 ihl;

	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 4 || (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP))
		return -1;
	ihl = ip.ihl;
	if (ihl < 5)
		return -1;
	p->l4_off = off + (__u32)ihl * 4;
	p->tcp_flags = 0;
	p->ip_id = ip.id;
	p->df = !!(ip.frag_off & bpf_htons(IP_DF));
	if (ip.frag_off & bpf_htons(IP_OFFSET)) {
		p->frag = PKT_FRAG_LATER;
		ports[0] = ports[1] = 0;
	} else {
		p->frag = (ip.frag_off & bpf_htons(IP_MF)) ? PKT_FRAG_FIRST : PKT_WHOLE;
		/* A first fragment must hold the whole L4 header, checksum
		 * included: its rewrite would land in the next fragment's
		 * bytes (or the frame's padding) otherwise. */
		if (p->frag == PKT_FRAG_FIRST &&
		    bpf_ntohs(ip.tot_len) < (__u32)ihl * 4 + (ip.protocol == IPPROTO_TCP ? 20 : 8))
			return -1;
		if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
			return -1;
		if (ip.protocol == IPPROTO_TCP &&
		    bpf_skb_load_bytes(skb, p->l4_off + 13, &p->tcp_flags, 1) < 0)
			return -1;
	}
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->sport = ports[0];
	p->dport = ports[1];
	p->proto = ip.protocol;
	p->ttl = ip.ttl;
	return 0;
}

/* Fills @p from an Ethernet frame. Returns 0 for an IPv4 TCP or UDP
 * packet or fragment, -1 for anything else (left alone by the caller). */
static __always_inline int pkt4_parse(struct __sk_buff *skb, struct pkt4 *p)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return -1;
	return pkt4_parse_at(skb, IP_OFF, p);
}

static __always_inline __u32 l4_csum_off(const struct pkt4 *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? 16 : 6);
}

static __always_inline __u64 l4_csum_flags(const struct pkt4 *p)
{
	return p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Rewrites the IPv4 address at @off from @old to @new and the checksum of
 * its IP header at @csum_off (the packet's own header, or one an ICMP
 * error quotes). */
static __always_inline int ip4_set_addr(struct __sk_buff *skb, __u32 off, __u32 csum_off,
					__be32 old, __be32 new)
{
	if (old == new)
		return 0;
	if (bpf_l3_csum_replace(skb, csum_off, old, new, sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/* Rewrites the address at @addr_off (source or destination) from @old to
 * @new, updating the IP and L4 checksums (a later fragment has no L4
 * header: the first one's checksum covers the whole datagram). */
static __always_inline int nat_set_addr4(struct __sk_buff *skb, const struct pkt4 *p,
					 __u32 addr_off, __be32 old, __be32 new)
{
	if (old == new)
		return 0;
	if (p->frag != PKT_FRAG_LATER &&
	    bpf_l4_csum_replace(skb, l4_csum_off(p), old, new,
				l4_csum_flags(p) | BPF_F_PSEUDO_HDR | sizeof(new)) < 0)
		return -1;
	return ip4_set_addr(skb, addr_off, IP_CSUM_OFF, old, new);
}

/* Rewrites the port at @port_off from @old to @new and the L4 checksum
 * (not in a later fragment, which carries no ports). */
static __always_inline int nat_set_port(struct __sk_buff *skb, const struct pkt4 *p,
					__u32 port_off, __be16 old, __be16 new)
{
	if (old == new || p->frag == PKT_FRAG_LATER)
		return 0;
	if (bpf_l4_csum_replace(skb, l4_csum_off(p), old, new,
				l4_csum_flags(p) | sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, port_off, &new, sizeof(new), 0);
}

/* Rewrites the packet's 4-tuple to saddr:sport -> daddr:dport. */
static __always_inline int nat_rewrite4(struct __sk_buff *skb, const struct pkt4 *p,
					__be32 saddr, __be16 sport,
					__be32 daddr, __be16 dport)
{
	if (nat_set_addr4(skb, p, IP_SRC_OFF, p->saddr, saddr) < 0 ||
	    nat_set_addr4(skb, p, IP_DST_OFF, p->daddr, daddr) < 0 ||
	    nat_set_port(skb, p, p->l4_off, p->sport, sport) < 0 ||
	    nat_set_port(skb, p, p->l4_off + 2, p->dport, dport) < 0)
		return -1;
	return 0;
}

/* Decrements the TTL of a packet this node forwards itself. */
static __always_inline int ip4_dec_ttl(struct __sk_buff *skb, __u8 ttl)
{
	__u8 new_ttl = ttl - 1;

	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, bpf_htons((__u16)ttl << 8),
				bpf_htons((__u16)new_ttl << 8), 2) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, IP_TTL_OFF, &new_ttl, 1, 0);
}

/* Routes saddr -> daddr as if the packet had come in on @ifindex (@ctx: the
 * skb or XDP context). @flags: 0, or BPF_FIB_LOOKUP_SRC to also learn the
 * source address this node would use toward daddr (fib->ipv4_src).
 * Returns a BPF_FIB_LKUP_RET_*. */
static __always_inline long fib_lookup4(void *ctx, __u32 ifindex, struct bpf_fib_lookup *fib,
					__u8 proto, __be32 saddr, __be32 daddr, __u32 flags)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->l4_protocol = proto;
	/* tot_len 0: the kernel checks the packet against the egress MTU
	 * itself (is_skb_forwardable for skbs), which accounts for GSO; an
	 * explicit length would refuse every GRO-aggregated packet. */
	fib->tot_len = 0;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->ifindex = ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), flags);
}

/* Writes the MACs a successful FIB lookup found into the frame. */
static __always_inline int fib_set_macs(struct __sk_buff *skb, const struct bpf_fib_lookup *fib)
{
	if (bpf_skb_store_bytes(skb, 0, fib->dmac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib->smac, ETH_ALEN, 0) < 0)
		return -1;
	return 0;
}

/* Sends the (rewritten) packet out of the interface @fib chose: with the
 * MACs it found, or through the neighbour subsystem when it found none.
 * Returns a tc verdict; TC_ACT_SHOT when the route does not forward. */
static __always_inline int fib_redirect(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
					long rc)
{
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (fib_set_macs(skb, fib) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect(fib->ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh nh = {
			.nh_family = AF_INET,
			.ipv4_nh = fib->ipv4_dst, /* the next hop, after the lookup */
		};
		return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
	}
	return TC_ACT_SHOT;
}

#endif /* KPR_LB_NAT_H */
