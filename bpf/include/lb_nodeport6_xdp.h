/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The IPv6 half of the XDP program (bpf/nodeport_xdp.bpf.c hands every
 * ETH_P_IPV6 frame here): lb_nodeport6.h's decision, and the rewrite and
 * redirect of what it forwards, before any skb exists. As for IPv4,
 * everything else goes on to the stack and the tc program: packets with
 * extension headers, ICMPv6, a next hop without neighbour entry (before
 * any state is written), rejects (tc builds the ICMPv6 error), replies of
 * local backends (tc egress).
 *
 * The L4 checksum is updated incrementally and assumes it holds a full
 * checksum, what arrives from a wire (lb_nodeport's XDP file says why).
 */
#ifndef KPR_LB_NODEPORT6_XDP_H
#define KPR_LB_NODEPORT6_XDP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "lb_nodeport6.h"

/* One's complement sum of two 32-bit partial sums. */
static __always_inline __u32 csum6_add(__u32 a, __u32 b)
{
	__u32 r = a + b;

	return r + (r < a);
}

/* XDP for an IPv6 frame (a function of its own: its stack is not the
 * IPv4 half's). */
static __noinline int np6_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__be16 old_ports[2], new_ports[2];
	struct ipv6hdr *ip6;
	struct np_fwd6 *fwd = np6_fwd_scratch();
	__sum16 *l4_check;
	__be16 *ports;
	struct pkt6 p;
	__s64 diff;
	__u16 check;
	int v;

	ip6 = (void *)(eth + 1);
	if (!fwd || (void *)(ip6 + 1) > data_end || ip6->version != 6)
		return XDP_PASS;
	p.tcp_flags = 0;
	if (ip6->nexthdr == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(ip6 + 1);

		if ((void *)(th + 1) > data_end)
			return XDP_PASS;
		ports = (__be16 *)th;
		l4_check = &th->check;
		p.tcp_flags = ((__u8 *)th)[13];
	} else if (ip6->nexthdr == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(ip6 + 1);

		if ((void *)(uh + 1) > data_end)
			return XDP_PASS;
		ports = (__be16 *)uh;
		l4_check = &uh->check;
	} else {
		return XDP_PASS;
	}
	__builtin_memcpy(p.saddr, &ip6->saddr, 16);
	__builtin_memcpy(p.daddr, &ip6->daddr, 16);
	p.sport = ports[0];
	p.dport = ports[1];
	p.proto = ip6->nexthdr;
	p.hop_limit = ip6->hop_limit;
	p.l4_off = ETH_HLEN + sizeof(*ip6);
	p.pad = 0;

	v = np6_ingress(ctx, ctx->ingress_ifindex, &p, fwd, NP_O_NEED_NEIGH | NP_O_TC_FOLLOWS);
	if (v == NP_V_DROP)
		return XDP_DROP;
	if (v != NP_V_FWD)
		return XDP_PASS; /* NP_V_REJECT too: tc builds the ICMPv6 error */

	/* Every rewritten field is in the L4 checksum (the addresses through
	 * the pseudo-header): one difference, chained over the three. */
	old_ports[0] = p.sport;
	old_ports[1] = p.dport;
	new_ports[0] = fwd->sport;
	new_ports[1] = fwd->dport;
	diff = bpf_csum_diff(p.saddr, 16, fwd->saddr, 16, 0);
	diff = bpf_csum_diff(p.daddr, 16, fwd->daddr, 16, (__u32)diff);
	diff = bpf_csum_diff((__be32 *)old_ports, 4, (__be32 *)new_ports, 4, (__u32)diff);
	check = csum_fold(csum6_add((__u32)diff, ~(__u32)(__u16)*l4_check));
	if (p.proto == IPPROTO_UDP && check == 0)
		check = 0xffff;
	*l4_check = check;
	__builtin_memcpy(&ip6->saddr, fwd->saddr, 16);
	__builtin_memcpy(&ip6->daddr, fwd->daddr, 16);
	ports[0] = fwd->sport;
	ports[1] = fwd->dport;
	ip6->hop_limit--;
	__builtin_memcpy(eth->h_dest, fwd->fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fwd->fib.smac, ETH_ALEN);
	np_count(NP_STAT_XDP_FWD);
	return bpf_redirect(fwd->fib.ifindex, 0);
}

#endif /* KPR_LB_NODEPORT6_XDP_H */
