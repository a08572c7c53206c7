// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * North-south load balancing on tc (tcx) for the agent's --devices:
 * NodePort, LoadBalancer and externalIP frontends reached from outside the
 * node, in SNAT, DSR or hybrid mode.
 *
 *   ingress, to a frontend    pick a backend (lb_select.h), track the flow
 *                             (lb_ct.h), DNAT to the backend and, when the
 *                             backend is on another node, SNAT to this
 *                             node's address toward it with a port of the
 *                             SNAT range; forward through the FIB
 *   ingress, to a SNAT port   a remote backend's reply: back to the client
 *                             with the frontend as source; forward
 *   egress                    a local backend's reply (forwarded by the
 *                             stack, not SNATed): frontend as source (and
 *                             the client's own port, when it was remapped)
 *   ICMP errors               about a translated flow: translated in turn
 *                             and sent where the flow goes (lb_icmp_err.h)
 *   ingress, no backend       --service-no-backend-response reject: the
 *                             packet becomes an ICMP port unreachable, sent
 *                             back where it came from (lb_reject.h)
 *
 * DSR (lb_dsr.h): a new flow to a remote backend is encapsulated (IPIP)
 * toward it instead of SNATed; on the backend's node, ingress takes in
 * IPIP packets for a local backend (decapsulate, DNAT, forward) and
 * egress gives the reply the frontend as source, like any local
 * backend's, and clamps the TCP MSS of its SYN-ACK. A packet too big to
 * encapsulate is answered with ICMP fragmentation-needed.
 *
 * A packet for a local backend behind a veth whose peer is the pod's is
 * handed straight to the pod's namespace (lb_peerdev.h).
 *
 * The decision is lb_nodeport.h's, shared with the XDP program; with XDP
 * acceleration this ingress program sees what XDP handed on (no neighbour
 * entry yet, IP options, anything XDP does not rewrite).
 *
 * IPv6 frames are lb_nodeport6_tc.h's (the same decisions for IPv6
 * frontends and flows, SNAT only).
 *
 * Packets that are none of these go on untouched (TCX_NEXT), at the price
 * of one hash lookup (two at egress). ClusterIP frontends are not served
 * here: in-cluster clients reach them through the socket hooks.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Bytes of the packet, for the per-frontend and per-backend counters. */
#define NP_FRAME_LEN(ctx) (((struct __sk_buff *)(ctx))->len)
#include "lb_nodeport.h"
#include "lb_reject.h"
#include "lb_peerdev.h"
#include "lb_icmp_err.h"
#include "lb_frag.h"
#include "lb_nodeport6_tc.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Not ours: let the next tcx program or the stack have it. */
#define NP_PASS TC_ACT_UNSPEC

/* Sends a DSR flow's packet on, encapsulated as @fwd says; a packet too
 * big for the encapsulation gets an ICMP fragmentation-needed instead. */
static __always_inline int np_send_encap(struct __sk_buff *skb, const struct pkt4 *p,
					 struct np_fwd *fwd)
{
	__u32 mtu;

	if (!dsr_fits(skb, fwd->fib.ifindex, IPIP_HLEN, &mtu)) {
		np_count(NP_STAT_DSR_TOO_BIG);
		if (mtu > IPIP_HLEN && dsr_icmp_too_big(skb, p->daddr, mtu - IPIP_HLEN) == 0)
			return bpf_redirect(skb->ingress_ifindex, 0);
		return TC_ACT_SHOT;
	}
	if (ip4_dec_ttl(skb, p->ttl) < 0 || dsr_encap4(skb, fwd->saddr, fwd->daddr) < 0)
		return TC_ACT_SHOT;
	return fib_redirect(skb, &fwd->fib, fwd->fib_rc);
}

/* Sends a packet rewritten as @fwd says on at ingress: straight into a
 * local pod's namespace when the route leads to a peer device
 * (lb_peerdev.h), else out of the device the FIB chose. */
static __always_inline int np_send(struct __sk_buff *skb, struct np_fwd *fwd)
{
	if (fwd->fib_rc == BPF_FIB_LKUP_RET_SUCCESS && peer_dev(fwd->fib.ifindex)) {
		if (fib_set_macs(skb, &fwd->fib) < 0)
			return TC_ACT_SHOT;
		np_count(NP_STAT_PEER_REDIRECT);
		return bpf_redirect_peer(fwd->fib.ifindex, 0);
	}
	return fib_redirect(skb, &fwd->fib, fwd->fib_rc);
}

/* Answers @p with an ICMP port unreachable (lb_reject.h), or drops it
 * when it cannot be answered; counted either way. */
static __always_inline int np_reject(struct __sk_buff *skb, const struct pkt4 *p)
{
	int verdict = icmp4_reject(skb, p);

	if (verdict < 0) {
		np_count(NP_STAT_NO_BACKEND);
		return TC_ACT_SHOT;
	}
	np_count(NP_STAT_NO_BACKEND_REJECT);
	return verdict;
}

/* Gives a later fragment its datagram's ports (lb_frag.h); -1 when they
 * are not known (the packet is left alone). Counted. */
static __always_inline int np_frag_ports(struct pkt4 *p)
{
	if (frag4_ports(p) < 0) {
		np_count(NP_STAT_FRAG_UNKNOWN);
		return -1;
	}
	if (p->frag == PKT_FRAG_LATER)
		np_count(NP_STAT_FRAG_FOLLOWED);
	return 0;
}

/* An ICMP error at ingress about a translated flow (lb_icmp_err.h): one
 * from the way to a remote backend (the REPLY entry of a SNATed flow) goes
 * to the client, one from the way to the client (a flow's ORIG entry)
 * goes to the backend. Anything else goes on untouched. */
static __always_inline int np_icmp_error_ingress(struct __sk_buff *skb,
						 const struct icmp_err4 *q)
{
	__u64 now = bpf_ktime_get_ns();
	struct pkt4 outer = { .proto = IPPROTO_ICMP };
	struct np_fwd fwd = {};
	struct ct_entry *e;
	struct ct_key key;

	e = icmp_err4_flow(q, CT_DIR_REPLY, &key, now);
	if (!e || !(e->flags & CT_F_SNAT)) {
		e = icmp_err4_flow(q, CT_DIR_ORIG, &key, now);
		if (!e || (e->flags & CT_F_DSR_ENCAP))
			return NP_PASS;
	}
	outer.ttl = q->ttl;
	if (np_ttl_exceeded(&outer))
		return TC_ACT_SHOT;
	icmp_err4_outer(q, &key, e, &fwd.saddr, &fwd.daddr);
	if (np_route(skb, skb->ingress_ifindex, &outer, &fwd, 0, 0) != NP_V_FWD)
		return TC_ACT_SHOT;
	if (icmp_err4_rewrite(skb, q, e, fwd.saddr, fwd.daddr) < 0 ||
	    ip4_dec_ttl(skb, q->ttl) < 0)
		return TC_ACT_SHOT;
	np_count(NP_STAT_ICMP_ERROR);
	return np_send(skb, &fwd);
}

/* An ICMP error at egress from a local backend (port unreachable from a
 * UDP pod with nothing listening, ...) about a flow it was sent: the
 * client must see it come from the frontend, about its own packet. */
static __always_inline int np_icmp_error_egress(struct __sk_buff *skb, const struct icmp_err4 *q)
{
	struct ct_entry *e;
	struct ct_key key;
	__be32 saddr, daddr;

	e = icmp_err4_flow(q, CT_DIR_REPLY, &key, bpf_ktime_get_ns());
	if (!e || (e->flags & CT_F_SNAT))
		return NP_PASS;
	icmp_err4_outer(q, &key, e, &saddr, &daddr);
	if (icmp_err4_rewrite(skb, q, e, saddr, daddr) < 0)
		return TC_ACT_SHOT;
	np_count(NP_STAT_ICMP_ERROR);
	return NP_PASS;
}

/* Ingress for everything but IPv6 (kpr_np_ingress): a function of its
 * own, so that its stack and the IPv6 half's are not one frame. */
static __noinline int np4_tc_ingress(struct __sk_buff *skb)
{
	struct icmp_err4 icmp_err;
	__be32 outer_daddr;
	struct np_fwd fwd;
	struct pkt4 p;
	int decap = 0;
	int v;

	if (pkt4_parse(skb, &p) == 0) {
		if (np_frag_ports(&p) < 0)
			return NP_PASS;
		v = np_ingress(skb, skb->ingress_ifindex, &p, &fwd,
			       (skb->pkt_type != PACKET_HOST ? NP_O_L2_GROUP : 0) |
				       np_dsr_unfit(skb, &p));
	} else if (dsr_parse_ipip(skb, &p, &outer_daddr) == 0) {
		if (np_frag_ports(&p) < 0)
			return NP_PASS;
		v = np_dsr_ingress(skb, skb->ingress_ifindex, &p, outer_daddr, &fwd, 0);
		decap = 1;
	} else if (icmp_err4_parse(skb, &icmp_err) == 0) {
		return np_icmp_error_ingress(skb, &icmp_err);
	} else {
		return NP_PASS;
	}
	switch (v) {
	case NP_V_FWD:
		break;
	case NP_V_DROP:
		return TC_ACT_SHOT;
	case NP_V_REJECT:
		return np_reject(skb, &p);
	default:
		return NP_PASS;
	}
	if (fwd.encap)
		return np_send_encap(skb, &p, &fwd);
	if (decap && dsr_decap4(skb) < 0)
		return TC_ACT_SHOT;
	if (nat_rewrite4(skb, &p, fwd.saddr, fwd.sport, fwd.daddr, fwd.dport) < 0 ||
	    ip4_dec_ttl(skb, p.ttl) < 0)
		return TC_ACT_SHOT;
	return np_send(skb, &fwd);
}

SEC("tcx/ingress")
int kpr_np_ingress(struct __sk_buff *skb)
{
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return np6_tc_ingress(skb);
	return np4_tc_ingress(skb);
}

/* Egress for everything but IPv6 (kpr_np_egress), a function of its own
 * as np4_tc_ingress(). */
static __noinline int np4_tc_egress(struct __sk_buff *skb)
{
	struct icmp_err4 icmp_err;
	struct ct_entry *e;
	struct ct_key key;
	struct pkt4 p;
	__u64 now;

	if (pkt4_parse(skb, &p) < 0) {
		if (icmp_err4_parse(skb, &icmp_err) == 0)
			return np_icmp_error_egress(skb, &icmp_err);
		return NP_PASS;
	}
	if (np_frag_ports(&p) < 0)
		return NP_PASS;
	/* A local backend's reply, forwarded by the stack toward the client:
	 * only the source changes back to the frontend. */
	ct_key4(&key, &p, CT_DIR_REPLY);
	e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
	if (!e || (e->flags & CT_F_SNAT))
		return NP_PASS;
	now = bpf_ktime_get_ns();
	if (ct_expired(e, now))
		return NP_PASS;
	ct_touch(&key, e, pkt_ct_flags(&p, CT_DIR_REPLY), now);
	np_count(NP_STAT_REPLY);
	np_count_packet(skb, e->svc_id, e->backend_id, LB_DIR_REPLY);
	/* A DSR flow's client sends through another node, which adds 20
	 * bytes: the SYN-ACK tells it to send segments that still fit. */
	if ((e->flags & CT_F_DSR_DECAP) && (p.tcp_flags & TCP_FLAG_SYN) &&
	    dsr_clamp_mss(skb, &p))
		np_count(NP_STAT_MSS_CLAMP);
	/* The destination changes only for a flow whose client port was
	 * remapped (NP_STAT_PORT_REMAP); otherwise it is already the client's. */
	if (nat_rewrite4(skb, &p, e->nat_saddr[3], e->nat_sport, e->nat_daddr[3], e->nat_dport) < 0)
		return TC_ACT_SHOT;
	return NP_PASS;
}

SEC("tcx/egress")
int kpr_np_egress(struct __sk_buff *skb)
{
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return np6_tc_egress(skb);
	return np4_tc_egress(skb);
}
