/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Direct server return (--nodeport-mode dsr|hybrid): the carrier, the map
 * that finds a DSR flow's backend on the backend's node, and the packet
 * work of both ends on tc. The decisions are lb_nodeport.h's; the XDP
 * program does its own packet work (bpf/nodeport_xdp.bpf.c).
 *
 *   client C:c -> frontend F:f reaches node1; the backend B:b is on node2
 *   node1   encapsulates, inner packet unchanged:
 *             [IP node1 -> B, proto IPIP | IP C -> F | TCP/UDP c -> f]
 *           the outer destination is the backend itself, routed by the
 *           FIB like any pod address (toward node2)
 *   node2   on ingress of its --devices: finds B for (F:f, outer B) in
 *           kpr_dsr_v1, removes the outer header, DNATs to B:b, tracks the
 *           flow as a local backend's (C sees the real client address)
 *   reply   B:b -> C:c leaves node2 toward the client without crossing
 *           node1; node2's tc egress gives it the source F:f
 *
 * Why IPIP rather than Cilium's default IPv4 option or Geneve:
 *  - fabrics and cloud routers drop or slow-path packets with IP options
 *    (cybozu-go/neco#2140, the reason Cilium added Geneve dispatch); an
 *    IPIP packet is plain IPv4 to every router on the way;
 *  - it is what tcpdump, ip(8) and every IDS decode as they are: the
 *    inner packet is the client's own, untouched;
 *  - it needs no tunnel device and no UDP port on either node, and the
 *    kernel segments GSO packets with an IPIP header (SKB_GSO_IPXIP4)
 *    itself; Geneve adds a UDP and a Geneve header and its option on top
 *    of the outer IP header.
 * It needs what any DSR needs: pod (backend) addresses routed between
 * nodes, no source-address check on the client's address at the backend's
 * node (cloud src/dst checks), and a route from the backend's node to
 * the client through one of its --devices (whose egress rewrites the
 * reply's source).
 *
 * The 20-byte overhead: a full-size packet from the client does not fit
 * the path once encapsulated. For TCP, the backend's node lowers the MSS
 * the backend announces in its SYN-ACK to dsr_mss_max (the agent: the
 * smallest MTU of its --devices minus 60), so the client never sends a
 * segment that cannot be encapsulated; GSO packets are re-segmented
 * smaller by the kernel (bpf_skb_adjust_room). What still does not fit
 * (UDP, a flow set up before the clamp) is dropped, counted, and
 * answered with ICMP fragmentation-needed when the client set DF, so its
 * path MTU discovery works (hybrid mode keeps UDP on SNAT altogether).
 * The clamp assumes the nodes' devices share one MTU, as in most clusters.
 */
#ifndef KPR_LB_DSR_H
#define KPR_LB_DSR_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_types.h"
#include "lb_select.h"
#include "lb_nat.h"

/* --nodeport-mode; set by the agent before load. */
const volatile enum np_mode nodeport_mode = NP_MODE_SNAT;

/* Largest TCP MSS a DSR flow's SYN-ACK may announce, host order; 0: no
 * clamp. The agent sets the smallest MTU of its --devices minus 60 (outer
 * and inner IPv4 headers, TCP header). */
const volatile __u16 dsr_mss_max = 0;

/* The header of an ICMP fragmentation-needed message. */
struct icmp_frag_needed {
	__u8    type;       /* ICMP_DEST_UNREACH */
	__u8    code;       /* ICMP_FRAG_NEEDED */
	__sum16 checksum;   /* over the ICMP header and payload */
	__be16  unused;     /* zero */
	__be16  mtu;        /* next-hop MTU */
};
#define IPIP_HLEN 20 /* the outer header: IPv4 without options */
#define IPIP_TTL 64

/* (frontend, local backend address) -> backend id, written by the agent.
 * Hash without preallocation: it holds one entry per north-south frontend
 * and local backend, usually a small fraction of its capacity. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct dsr_key);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} kpr_dsr_v1 SEC(".maps");

/* Whether a new flow of @proto to a remote backend goes by DSR. */
static __always_inline int dsr_for_proto(__u8 proto)
{
	return nodeport_mode == NP_MODE_DSR ||
	       (nodeport_mode == NP_MODE_HYBRID && proto == IPPROTO_TCP);
}

/* The backend id of the local backend @backend for frontend @frontend:@port,
 * or 0. Tries the exact frontend (LoadBalancer, externalIP), then any node
 * address (NodePort). */
static __always_inline __u32 dsr_lookup(__be32 frontend, __be16 port, __u8 proto, __be32 backend)
{
	struct dsr_key key;
	__u32 *id;

	__builtin_memset(&key, 0, sizeof(key));
	lb_addr_set_v4(key.frontend, frontend);
	lb_addr_set_v4(key.backend, backend);
	key.port = port;
	key.proto = proto;
	id = bpf_map_lookup_elem(&kpr_dsr_v1, &key);
	if (id)
		return *id;
	key.frontend[3] = 0;
	id = bpf_map_lookup_elem(&kpr_dsr_v1, &key);
	return id ? *id : 0;
}

/* Fills @p from the inner packet of an IPIP frame, with l4_off as it will
 * be once the outer header is removed, and @outer_daddr. Returns 0 for an
 * IPIP packet carrying a TCP/UDP packet or fragment, -1 otherwise. */
static __always_inline int dsr_parse_ipip(struct __sk_buff *skb, struct pkt4 *p,
					  __be32 *outer_daddr)
{
	struct iphdr outer;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return -1;
	if (bpf_skb_load_bytes(skb, IP_OFF, &outer, sizeof(outer)) < 0)
		return -1;
	/* Only what dsr_encap4() builds: no options, not fragmented. */
	if (outer.version != 4 || outer.ihl != 5 || outer.protocol != IPPROTO_IPIP ||
	    (outer.frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return -1;
	if (pkt4_parse_at(skb, IP_OFF + IPIP_HLEN, p) < 0)
		return -1;
	p->l4_off -= IPIP_HLEN;
	*outer_daddr = outer.daddr;
	return 0;
}

/* Fills the outer header of a DSR packet around an inner one of @inner_len
 * bytes (its tot_len, host order) and type of service @tos. DF is set: an
 * encapsulated packet is never fragmented, so its IP id can stay 0 (RFC
 * 6864, atomic datagrams). */
static __always_inline void dsr_outer4(struct iphdr *o, __be32 saddr, __be32 daddr,
				       __u16 inner_len, __u8 tos)
{
	__builtin_memset(o, 0, sizeof(*o));
	o->version = 4;
	o->ihl = 5;
	o->tos = tos;
	o->tot_len = bpf_htons(inner_len + IPIP_HLEN);
	o->frag_off = bpf_htons(IP_DF);
	o->ttl = IPIP_TTL;
	o->protocol = IPPROTO_IPIP;
	o->saddr = saddr;
	o->daddr = daddr;
	o->check = csum_fold((__u32)bpf_csum_diff(0, 0, (__be32 *)o, sizeof(*o), 0));
}

/* Puts an outer IPv4 header saddr -> daddr in front of the packet's IP
 * header. A GSO packet's segments are made 20 bytes smaller by the kernel,
 * so each still fits the MTU once encapsulated. */
static __always_inline int dsr_encap4(struct __sk_buff *skb, __be32 saddr, __be32 daddr)
{
	struct iphdr inner, outer;

	if (bpf_skb_load_bytes(skb, IP_OFF, &inner, sizeof(inner)) < 0)
		return -1;
	if (bpf_skb_adjust_room(skb, IPIP_HLEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) < 0)
		return -1;
	dsr_outer4(&outer, saddr, daddr, bpf_ntohs(inner.tot_len), inner.tos);
	return bpf_skb_store_bytes(skb, IP_OFF, &outer, sizeof(outer), 0);
}

/* Removes the outer header dsr_parse_ipip() accepted. */
static __always_inline int dsr_decap4(struct __sk_buff *skb)
{
	return bpf_skb_adjust_room(skb, -IPIP_HLEN, BPF_ADJ_ROOM_MAC, 0);
}

/* Whether the packet, @len_diff bytes longer, fits the MTU of @ifindex. A
 * GSO packet fits (its segments are checked when they are made); its MTU
 * goes to @mtu. */
static __always_inline int dsr_fits(struct __sk_buff *skb, __u32 ifindex, __s32 len_diff,
				    __u32 *mtu)
{
	*mtu = 0;
	return bpf_check_mtu(skb, ifindex, mtu, len_diff, 0) == BPF_MTU_CHK_RET_SUCCESS;
}

/* Turns a client's packet that is too big to encapsulate into an ICMP
 * fragmentation-needed from @from (this node) back to the client, with
 * next-hop MTU @mtu, and returns 0; the caller sends it back out of the
 * device it came in on. Its payload is the start of the offending packet
 * (IP header and 8 bytes, RFC 792), which is what the client's stack
 * matches the error against (a frontend destination it connected to).
 * -1: the packet had DF clear or could not be rewritten (drop it). */
static __always_inline int dsr_icmp_too_big(struct __sk_buff *skb, __be32 from, __u16 mtu)
{
	struct {
		struct iphdr ip;
		struct icmp_frag_needed icmp;
		struct iphdr orig;
		__u8 l4[8];
	} r; /* 56 bytes, every member 4-byte aligned: no padding */
	__u8 macs[2 * ETH_ALEN];
	__u32 csum;

	_Static_assert(sizeof(r) == 56, "ICMP reply without padding");
	if (bpf_skb_load_bytes(skb, IP_OFF, &r.orig, sizeof(r.orig) + sizeof(r.l4)) < 0)
		return -1;
	if (r.orig.ihl != 5 || !(r.orig.frag_off & bpf_htons(IP_DF)))
		return -1;
	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)) < 0)
		return -1;
	/* Make the frame exactly Ethernet + the reply, then write it. */
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r), 0) < 0)
		return -1;
	__builtin_memset(&r.icmp, 0, sizeof(r.icmp));
	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_FRAG_NEEDED;
	r.icmp.mtu = bpf_htons(mtu);
	csum = bpf_csum_diff(0, 0, (__be32 *)&r.icmp,
			     sizeof(r.icmp) + sizeof(r.orig) + sizeof(r.l4), 0);
	r.icmp.checksum = csum_fold(csum);
	dsr_outer4(&r.ip, from, r.orig.saddr,
		   sizeof(r.icmp) + sizeof(r.orig) + sizeof(r.l4), 0);
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.frag_off = 0;
	r.ip.check = 0;
	r.ip.check = csum_fold((__u32)bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0));
	if (bpf_skb_store_bytes(skb, IP_OFF, &r, sizeof(r), 0) < 0)
		return -1;
	/* Back where it came from: the source MAC becomes the destination. */
	if (bpf_skb_store_bytes(skb, 0, macs + ETH_ALEN, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, macs, ETH_ALEN, 0) < 0)
		return -1;
	return 0;
}

/* Most TCP options looked at for the MSS (it comes first in practice). */
#define TCP_OPT_SCAN 8
#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_MSS 2

/* Lowers the MSS option of a TCP SYN(-ACK) to dsr_mss_max. Returns 1 when
 * it was lowered, 0 when it was not (absent, already small, clamp off). */
static __always_inline int dsr_clamp_mss(struct __sk_buff *skb, const struct pkt4 *p)
{
	__u32 off, end;
	__u8 doff, opt[2];
	__be16 mss, new;
	int i;

	if (dsr_mss_max == 0 ||
	    bpf_skb_load_bytes(skb, p->l4_off + 12, &doff, 1) < 0)
		return 0;
	off = p->l4_off + 20;
	end = p->l4_off + (__u32)(doff >> 4) * 4;
	for (i = 0; i < TCP_OPT_SCAN; i++) {
		if (off + 2 > end || bpf_skb_load_bytes(skb, off, opt, 2) < 0)
			return 0;
		if (opt[0] == TCPOPT_EOL)
			return 0;
		if (opt[0] == TCPOPT_NOP) {
			off++;
			continue;
		}
		if (opt[1] < 2)
			return 0;
		if (opt[0] == TCPOPT_MSS && opt[1] == 4) {
			if (bpf_skb_load_bytes(skb, off + 2, &mss, 2) < 0 ||
			    bpf_ntohs(mss) <= dsr_mss_max)
				return 0;
			new = bpf_htons(dsr_mss_max);
			if (bpf_l4_csum_replace(skb, l4_csum_off(p), mss, new, sizeof(new)) < 0 ||
			    bpf_skb_store_bytes(skb, off + 2, &new, sizeof(new), 0) < 0)
				return 0;
			return 1;
		}
		off += opt[1];
	}
	return 0;
}

#endif /* KPR_LB_DSR_H */
