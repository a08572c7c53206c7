// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * XDP acceleration of the north-south datapath (--nodeport-acceleration
 * native|generic): the ingress half of bpf/nodeport.bpf.c before any skb
 * exists. It takes the same decision (lb_nodeport.h, same maps and
 * conntrack) and rewrites and redirects the packets it can; everything
 * else goes on to the stack, where the tc ingress program (always attached
 * too) handles it:
 *
 *   - IPv4 with options, fragments, other protocols: XDP_PASS, unchanged
 *   - no neighbour entry for the next hop: XDP_PASS before any state is
 *     written (bpf_redirect_neigh exists for tc only)
 *   - replies from local backends: they never cross a device's ingress;
 *     the tc egress program rewrites them
 *   - a DSR frame that would not fit the egress MTU once encapsulated
 *     (tc answers it with ICMP fragmentation-needed)
 *   - rejects of frontends without backend: tc turns the packet into the
 *     ICMP error (an skb can be resized in place)
 *
 * IPv6 frames are lb_nodeport6_xdp.h's (SNAT and local backends).
 *
 * DSR is done here at both ends: a new or tracked DSR flow's frame gets
 * its IPIP header in front (bpf_xdp_adjust_head) and is redirected, and an
 * IPIP frame for a local backend loses it and is DNATed and redirected;
 * the reply's source and the SYN-ACK's MSS are tc egress's work.
 *
 * Checksums are updated incrementally and assume the checksum fields hold
 * full checksums, which is what arrives from a wire (a NIC's RX). Packets
 * built by a local stack with checksum offload (CHECKSUM_PARTIAL, e.g. over
 * a veth from a namespace of the same host) do not; the test bed turns TX
 * checksum offload off on its senders for that reason.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Bytes of the frame, for the per-frontend and per-backend counters. */
#define NP_FRAME_LEN(ctx) ((__u32)bpf_xdp_get_buff_len(ctx))
#include "lb_nodeport.h"
#include "lb_nodeport6_xdp.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline __u32 csum_add32(__u32 a, __u32 b)
{
	__u32 r = a + b;

	return r + (r < a);
}

/* The fields a NAT rewrite changes, laid out for bpf_csum_diff. */
struct nat_words {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

/* Rewrites the packet at @ip (TCP/UDP ports at @ports, checksum at
 * @l4_check) as @fwd says, decrements its TTL and sends it out of the
 * interface the FIB chose. */
static __always_inline int xdp_nat_send(struct ethhdr *eth, struct iphdr *ip, __be16 *ports,
					__sum16 *l4_check, const struct pkt4 *p,
					const struct np_fwd *fwd)
{
	struct nat_words old, new;
	__s64 diff;
	__u16 check;

	old.saddr = p->saddr;
	old.daddr = p->daddr;
	old.sport = p->sport;
	old.dport = p->dport;
	new.saddr = fwd->saddr;
	new.daddr = fwd->daddr;
	new.sport = fwd->sport;
	new.dport = fwd->dport;
	/* A UDP datagram without checksum (0) keeps none. */
	if (!(p->proto == IPPROTO_UDP && *l4_check == 0)) {
		diff = bpf_csum_diff((__be32 *)&old, sizeof(old), (__be32 *)&new, sizeof(new), 0);
		check = csum_fold(csum_add32((__u32)diff, ~(__u32)(__u16)*l4_check));
		if (p->proto == IPPROTO_UDP && check == 0)
			check = 0xffff;
		*l4_check = check;
	}
	ip->saddr = fwd->saddr;
	ip->daddr = fwd->daddr;
	ports[0] = fwd->sport;
	ports[1] = fwd->dport;
	ip->ttl--;
	ip->check = 0;
	ip->check = csum_fold((__u32)bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
	__builtin_memcpy(eth->h_dest, fwd->fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fwd->fib.smac, ETH_ALEN);
	np_count(NP_STAT_XDP_FWD);
	return bpf_redirect(fwd->fib.ifindex, 0);
}

/* Fills @p (and the L4 pointers) from the IPv4 header at @ip, which must
 * have no options. Returns 0 for TCP or UDP, -1 otherwise. */
static __always_inline int xdp_parse_l4(struct iphdr *ip, void *data_end, struct pkt4 *p,
					__be16 **ports, __sum16 **l4_check)
{
	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->version != 4 || ip->ihl != 5 ||
	    (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return -1;
	p->tcp_flags = 0;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(ip + 1);

		if ((void *)(th + 1) > data_end)
			return -1;
		*ports = (__be16 *)th;
		*l4_check = &th->check;
		p->tcp_flags = ((__u8 *)th)[13];
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(ip + 1);

		if ((void *)(uh + 1) > data_end)
			return -1;
		*ports = (__be16 *)uh;
		*l4_check = &uh->check;
	} else {
		return -1;
	}
	p->frag = PKT_WHOLE;
	p->ip_id = ip->id;
	p->df = !!(ip->frag_off & bpf_htons(IP_DF));
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->sport = (*ports)[0];
	p->dport = (*ports)[1];
	p->proto = ip->protocol;
	p->ttl = ip->ttl;
	p->l4_off = ETH_HLEN + sizeof(*ip);
	return 0;
}

/* A DSR flow's packet: decrement the inner TTL, put the outer header in
 * front (bpf_xdp_adjust_head) and send it. A frame that would not fit the
 * egress MTU goes on to tc, which answers it (ICMP). */
static __always_inline int xdp_encap_send(struct xdp_md *ctx, const struct np_fwd *fwd)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct iphdr *ip, *outer;
	__u32 mtu = 0;

	if (bpf_check_mtu(ctx, fwd->fib.ifindex, &mtu, IPIP_HLEN, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return XDP_PASS;
	ip->ttl--;
	ip->check = 0;
	ip->check = csum_fold((__u32)bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
	if (bpf_xdp_adjust_head(ctx, -IPIP_HLEN))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	outer = data + ETH_HLEN;
	ip = (void *)(outer + 1);
	if ((void *)(ip + 1) > data_end)
		return XDP_DROP;
	dsr_outer4(outer, fwd->saddr, fwd->daddr, bpf_ntohs(ip->tot_len), ip->tos);
	__builtin_memcpy(eth->h_dest, fwd->fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fwd->fib.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	np_count(NP_STAT_XDP_FWD);
	return bpf_redirect(fwd->fib.ifindex, 0);
}

/* An IPIP frame, maybe another node's DSR flow for a local backend:
 * decide, remove the outer header (bpf_xdp_adjust_head), DNAT and send. */
static __always_inline int xdp_dsr_decap(struct xdp_md *ctx, struct iphdr *outer, void *data_end)
{
	void *data;
	struct ethhdr *eth;
	struct np_fwd fwd;
	struct iphdr *ip;
	__be16 *ports;
	__sum16 *l4_check;
	struct pkt4 p;
	int v;

	if (outer->ihl != 5 || (outer->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return XDP_PASS;
	if (xdp_parse_l4((void *)(outer + 1), data_end, &p, &ports, &l4_check) < 0)
		return XDP_PASS;
	v = np_dsr_ingress(ctx, ctx->ingress_ifindex, &p, outer->daddr, &fwd,
			   NP_O_NEED_NEIGH | NP_O_TC_FOLLOWS);
	if (v == NP_V_DROP)
		return XDP_DROP;
	if (v != NP_V_FWD)
		return XDP_PASS;
	/* The Ethernet header moves up over the outer IP header. */
	if (bpf_xdp_adjust_head(ctx, IPIP_HLEN))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	ip = data + ETH_HLEN;
	if (xdp_parse_l4(ip, data_end, &p, &ports, &l4_check) < 0)
		return XDP_DROP;
	eth->h_proto = bpf_htons(ETH_P_IP);
	return xdp_nat_send(eth, ip, ports, l4_check, &p, &fwd);
}

/* XDP for everything but IPv6 (kpr_np_xdp): a function of its own, so
 * that its stack and the IPv6 half's are not one frame. */
static __noinline int np4_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct np_fwd fwd;
	struct iphdr *ip;
	__be16 *ports;
	__sum16 *l4_check;
	struct pkt4 p;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return XDP_PASS;
	if (ip->protocol == IPPROTO_IPIP && ip->version == 4)
		return xdp_dsr_decap(ctx, ip, data_end);
	if (xdp_parse_l4(ip, data_end, &p, &ports, &l4_check) < 0)
		return XDP_PASS;
	/* Without DF a packet of a DSR protocol may not fit the tunnel, and
	 * its flow then takes SNAT (np_dsr_unfit): tc decides that. */
	if (!p.df && dsr_for_proto(p.proto))
		return XDP_PASS;

	/* The group bit of the destination MAC: broadcast or multicast. */
	switch (np_ingress(ctx, ctx->ingress_ifindex, &p, &fwd,
			   NP_O_NEED_NEIGH | ((eth->h_dest[0] & 1) ? NP_O_L2_GROUP : 0))) {
	case NP_V_FWD:
		break;
	case NP_V_DROP:
		return XDP_DROP;
	default:
		/* NP_V_REJECT too: the tc program builds the ICMP error. */
		return XDP_PASS;
	}
	if (fwd.encap)
		return xdp_encap_send(ctx, &fwd);
	return xdp_nat_send(eth, ip, ports, l4_check, &p, &fwd);
}

SEC("xdp")
int kpr_np_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_IPV6))
		return np6_xdp(ctx);
	return np4_xdp(ctx);
}
