/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The reject of --service-no-backend-response reject for IPv6: the packet
 * becomes, in place, the ICMPv6 "destination unreachable, port
 * unreachable" (RFC 4443 3.1, type 1 code 4) a host with no such service
 * would send, from the frontend to the client, out of the interface it
 * came in on; lb_reject.h's IPv4 builder explains the choices (ICMP for
 * TCP too, no rate limit). The quote is the IPv6 header and the first 8
 * bytes of the payload (the ports), less than RFC 4443 allows but all a
 * client needs to find its socket.
 */
#ifndef KPR_LB_REJECT6_H
#define KPR_LB_REJECT6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_nat6.h"

#define ICMPV6_DEST_UNREACH 1 /* type: destination unreachable */
#define ICMPV6_PORT_UNREACH 4 /* its code: port unreachable */
#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif

/* An ICMPv6 destination unreachable header. */
struct reject6_icmphdr {
	__u8    type;     /* ICMPV6_DEST_UNREACH */
	__u8    code;     /* ICMPV6_PORT_UNREACH */
	__sum16 checksum; /* over the pseudo-header, the ICMPv6 header and the quote */
	__be32  unused;   /* zero */
};

#define REJECT6_QUOTE_LEN (IP6_HLEN + 8)
#define REJECT6_ICMP_LEN  (sizeof(struct reject6_icmphdr) + REJECT6_QUOTE_LEN)
#define REJECT6_FRAME_LEN (ETH_HLEN + IP6_HLEN + REJECT6_ICMP_LEN)
/* Hop limit of the error (Linux's default). */
#define REJECT6_HOP_LIMIT 64

/* The IPv6 pseudo-header the ICMPv6 checksum covers (RFC 8200 8.1). */
struct reject6_pseudo {
	__be32 saddr[4];
	__be32 daddr[4];
	__be32 len;
	__be32 nexthdr;
};

/* Rewrites the IPv6 packet @p of @skb into an ICMPv6 port unreachable
 * from its destination to its source and redirects it out of the
 * interface it arrived on. Returns the tc verdict, or -1 when the packet
 * cannot be answered (the caller drops it). */
static __always_inline int icmp6_reject(struct __sk_buff *skb, const struct pkt6 *p)
{
	__u8 icmp[REJECT6_ICMP_LEN] __attribute__((aligned(4))) = {};
	struct reject6_icmphdr *ih = (struct reject6_icmphdr *)icmp;
	struct reject6_pseudo ph = {};
	struct ipv6hdr ip6 = {};
	struct ethhdr eth;
	__u8 macs[2 * ETH_ALEN];
	__s64 sum;

	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)) < 0 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, icmp + sizeof(*ih), REJECT6_QUOTE_LEN) < 0)
		return -1;
	__builtin_memcpy(eth.h_dest, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(eth.h_source, macs, ETH_ALEN);
	eth.h_proto = bpf_htons(ETH_P_IPV6);

	__builtin_memcpy(ph.saddr, p->daddr, sizeof(ph.saddr)); /* the frontend */
	__builtin_memcpy(ph.daddr, p->saddr, sizeof(ph.daddr));
	ph.len = bpf_htonl(REJECT6_ICMP_LEN);
	ph.nexthdr = bpf_htonl(IPPROTO_ICMPV6);
	ih->type = ICMPV6_DEST_UNREACH;
	ih->code = ICMPV6_PORT_UNREACH;
	sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	if (sum < 0)
		return -1;
	sum = bpf_csum_diff(0, 0, (__be32 *)icmp, sizeof(icmp), (__u32)sum);
	if (sum < 0)
		return -1;
	ih->checksum = csum_fold((__u32)sum);

	ip6.version = 6;
	ip6.payload_len = bpf_htons(REJECT6_ICMP_LEN);
	ip6.nexthdr = IPPROTO_ICMPV6;
	ip6.hop_limit = REJECT6_HOP_LIMIT;
	__builtin_memcpy(&ip6.saddr, p->daddr, 16);
	__builtin_memcpy(&ip6.daddr, p->saddr, 16);

	if (bpf_skb_change_tail(skb, REJECT6_FRAME_LEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), BPF_F_RECOMPUTE_CSUM) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6), BPF_F_RECOMPUTE_CSUM) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + IP6_HLEN, icmp, sizeof(icmp),
				BPF_F_RECOMPUTE_CSUM) < 0)
		return -1;
	return bpf_redirect(skb->ingress_ifindex, 0);
}

#endif /* KPR_LB_REJECT6_H */
