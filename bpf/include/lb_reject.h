/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The reject of --service-no-backend-response reject: a packet that would
 * open a flow to a frontend without backend is turned, in place, into the
 * ICMP "destination unreachable, port unreachable" a host with no such
 * service would send, and sent back out of the interface it came in on.
 *
 * ICMP for TCP too, not a TCP RST: it is what kube-proxy's REJECT rule
 * (iptables' default icmp-port-unreachable, nftables' reject) and Cilium's
 * no-backend reply send, so clients see what they saw before kpr (Linux
 * fails connect() with ECONNREFUSED at once, as for a RST); one builder
 * serves both protocols; and the error quotes the offending header, which
 * a RST could not, so NATs and firewalls on the way translate it back.
 *
 * Only the tc program builds it (an skb can be resized in place with
 * bpf_skb_change_tail); XDP hands such packets on. Like the kernel's own
 * ICMP errors it is not sent for packets with IP options (the quote would
 * have to carry them), to non-unicast sources, or for a RST; unlike them
 * it is not rate limited: one small error per offending packet, as Cilium
 * does.
 */
#ifndef KPR_LB_REJECT_H
#define KPR_LB_REJECT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_nat.h"

/* An ICMP destination unreachable header (RFC 792). */
struct reject_icmphdr {
	__u8    type;     /* ICMP_DEST_UNREACH */
	__u8    code;     /* ICMP_PORT_UNREACH */
	__sum16 checksum; /* over the ICMP header and the quote */
	__be32  unused;   /* zero */
};

/* What the error quotes of the offending packet: its IP header (no
 * options) and the first 8 bytes of its payload (RFC 792): the ports, all
 * a client needs to find its socket. */
#define REJECT_QUOTE_LEN (sizeof(struct iphdr) + 8)
/* The frame the packet becomes: Ethernet, IP, ICMP, quote. */
#define REJECT_FRAME_LEN \
	(ETH_HLEN + sizeof(struct iphdr) + sizeof(struct reject_icmphdr) + REJECT_QUOTE_LEN)
/* Default TTL of the error (Linux's net.ipv4.ip_default_ttl). */
#define REJECT_TTL 64
/* TOS of ICMP errors, as Linux sends them (IPTOS_PREC_INTERNETCONTROL). */
#define REJECT_TOS 0xc0

/* Rewrites the IPv4 packet @p of @skb into an ICMP port unreachable from
 * its destination to its source and redirects it out of the interface it
 * arrived on. Returns the tc verdict (a redirect), or -1 when the packet
 * cannot be answered (the caller drops it). */
static __always_inline int icmp4_reject(struct __sk_buff *skb, const struct pkt4 *p)
{
	__u8 icmp[sizeof(struct reject_icmphdr) + REJECT_QUOTE_LEN] __attribute__((aligned(4))) = {};
	struct reject_icmphdr *ih = (struct reject_icmphdr *)icmp;
	struct iphdr ip = {};
	struct ethhdr eth;
	__u8 macs[2 * ETH_ALEN];

	if (p->l4_off != ETH_HLEN + sizeof(struct iphdr))
		return -1; /* IP options */
	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)) < 0 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, icmp + sizeof(*ih), REJECT_QUOTE_LEN) < 0)
		return -1;
	/* Back to the previous hop: the MACs swapped. */
	__builtin_memcpy(eth.h_dest, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(eth.h_source, macs, ETH_ALEN);
	eth.h_proto = bpf_htons(ETH_P_IP);

	ih->type = ICMP_DEST_UNREACH;
	ih->code = ICMP_PORT_UNREACH;
	ih->checksum = csum_fold((__u32)bpf_csum_diff(0, 0, (__be32 *)icmp, sizeof(icmp), 0));

	ip.version = 4;
	ip.ihl = 5;
	ip.tos = REJECT_TOS;
	ip.tot_len = bpf_htons(sizeof(ip) + sizeof(icmp));
	ip.ttl = REJECT_TTL;
	ip.protocol = IPPROTO_ICMP;
	ip.saddr = p->daddr; /* the frontend */
	ip.daddr = p->saddr;
	ip.check = csum_fold((__u32)bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0));

	/* BPF_F_RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE skb's sum true to
	 * the new bytes. */
	if (bpf_skb_change_tail(skb, REJECT_FRAME_LEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), BPF_F_RECOMPUTE_CSUM) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), BPF_F_RECOMPUTE_CSUM) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), icmp, sizeof(icmp),
				BPF_F_RECOMPUTE_CSUM) < 0)
		return -1;
	return bpf_redirect(skb->ingress_ifindex, 0);
}

#endif /* KPR_LB_REJECT_H */
