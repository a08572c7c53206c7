/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The IPv6 half of the tc programs (bpf/nodeport.bpf.c hands every
 * ETH_P_IPV6 frame here): the decision is lb_nodeport6.h's, this file
 * rewrites and sends, as the IPv4 half does.
 *
 *   ingress, to a frontend    DNAT (+ SNAT for a remote backend), forward
 *                             through the FIB, or straight into a local
 *                             pod's namespace (bpf_redirect_peer)
 *   ingress, to a SNAT port   a remote backend's reply: back to the client
 *   egress                    a local backend's reply: frontend as source
 *   ingress, no backend       --service-no-backend-response reject: an
 *                             ICMPv6 port unreachable (lb_reject6.h)
 *   ICMPv6 errors             about a translated flow (packet too big,
 *                             unreachable, time exceeded): translated in
 *                             turn and sent where the flow goes
 *                             (lb_icmp_err6.h)
 *
 * Anything else (ICMPv6, neighbour discovery included; extension headers)
 * goes on untouched.
 */
#ifndef KPR_LB_NODEPORT6_TC_H
#define KPR_LB_NODEPORT6_TC_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>

#include "lb_nodeport6.h"
#include "lb_peerdev.h"
#include "lb_reject6.h"
#include "lb_icmp_err6.h"

/* Sends a packet rewritten as @fwd says on at ingress (np_send()'s
 * IPv6 counterpart). */
static __always_inline int np6_send(struct __sk_buff *skb, struct np_fwd6 *fwd)
{
	if (fwd->fib_rc == BPF_FIB_LKUP_RET_SUCCESS && peer_dev(fwd->fib.ifindex)) {
		if (fib_set_macs(skb, &fwd->fib) < 0)
			return TC_ACT_SHOT;
		np_count(NP_STAT_PEER_REDIRECT);
		return bpf_redirect_peer(fwd->fib.ifindex, 0);
	}
	return fib_redirect6(skb, &fwd->fib, fwd->fib_rc);
}

/* An ICMPv6 error at ingress about a translated flow, as
 * np_icmp_error_ingress(): one from the way to a remote backend goes to
 * the client, one from the way to the client goes to the backend.
 * Anything else goes on untouched. A function of its own: its stack is
 * not np6_tc_ingress()'s. */
static __noinline int np6_icmp_error_ingress(struct __sk_buff *skb)
{
	struct np_fwd6 *fwd = np6_fwd_scratch();
	__u64 now = bpf_ktime_get_ns();
	struct pkt6 outer = { .proto = IPPROTO_ICMPV6 };
	struct icmp_err6 q;
	struct ct_entry *e;
	struct ct_key key;

	if (!fwd || icmp_err6_parse(skb, &q) < 0)
		return TC_ACT_UNSPEC;
	e = icmp_err6_flow(&q, CT_DIR_REPLY, &key, now);
	if (!e || !(e->flags & CT_F_SNAT)) {
		e = icmp_err6_flow(&q, CT_DIR_ORIG, &key, now);
		if (!e || (e->flags & CT_F_DSR_ENCAP))
			return TC_ACT_UNSPEC;
	}
	outer.hop_limit = q.hop_limit;
	if (np6_hop_exceeded(&outer))
		return TC_ACT_SHOT;
	icmp_err6_outer(&q, &key, e, fwd->saddr, fwd->daddr);
	if (np6_route(skb, skb->ingress_ifindex, &outer, fwd, 0, 0) != NP_V_FWD)
		return TC_ACT_SHOT;
	if (icmp_err6_rewrite(skb, &q, e, fwd->saddr, fwd->daddr) < 0 ||
	    ip6_dec_hop(skb, q.hop_limit) < 0)
		return TC_ACT_SHOT;
	np_count(NP_STAT_ICMP_ERROR);
	return np6_send(skb, fwd);
}

/* An ICMPv6 error at egress from a local backend (port unreachable from a
 * UDP pod with nothing listening, ...) about a flow it was sent: the
 * client must see it come from the frontend, about its own packet. */
static __noinline int np6_icmp_error_egress(struct __sk_buff *skb)
{
	__be32 saddr[4], daddr[4];
	struct icmp_err6 q;
	struct ct_entry *e;
	struct ct_key key;

	if (icmp_err6_parse(skb, &q) < 0)
		return TC_ACT_UNSPEC;
	e = icmp_err6_flow(&q, CT_DIR_REPLY, &key, bpf_ktime_get_ns());
	if (!e || (e->flags & CT_F_SNAT))
		return TC_ACT_UNSPEC;
	icmp_err6_outer(&q, &key, e, saddr, daddr);
	if (icmp_err6_rewrite(skb, &q, e, saddr, daddr) < 0)
		return TC_ACT_SHOT;
	np_count(NP_STAT_ICMP_ERROR);
	return TC_ACT_UNSPEC;
}

/* np6_l4_ingress()'s and np6_l4_egress()'s answer for a frame that is
 * no TCP or UDP packet: maybe an ICMPv6 error (no tc verdict is 1000). */
#define NP6_NOT_L4 1000

/* tc ingress for an IPv6 TCP or UDP packet. */
static __noinline int np6_l4_ingress(struct __sk_buff *skb)
{
	struct np_fwd6 *fwd = np6_fwd_scratch();
	struct pkt6 p;
	int verdict;

	if (!fwd)
		return TC_ACT_UNSPEC;
	if (pkt6_parse(skb, &p) < 0)
		return NP6_NOT_L4;
	switch (np6_ingress(skb, skb->ingress_ifindex, &p, fwd, 0)) {
	case NP_V_FWD:
		break;
	case NP_V_DROP:
		return TC_ACT_SHOT;
	case NP_V_REJECT:
		verdict = icmp6_reject(skb, &p);
		if (verdict < 0) {
			np_count(NP_STAT_NO_BACKEND);
			return TC_ACT_SHOT;
		}
		np_count(NP_STAT_NO_BACKEND_REJECT);
		return verdict;
	default:
		return TC_ACT_UNSPEC;
	}
	if (nat_rewrite6(skb, &p, fwd->saddr, fwd->sport, fwd->daddr, fwd->dport) < 0 ||
	    ip6_dec_hop(skb, p.hop_limit) < 0)
		return TC_ACT_SHOT;
	return np6_send(skb, fwd);
}

/* tc egress for an IPv6 TCP or UDP packet: a local backend's reply,
 * forwarded by the stack toward the client, gets the frontend as source
 * (and the client's own port back, when it was remapped). */
static __noinline int np6_l4_egress(struct __sk_buff *skb)
{
	struct ct_entry *e;
	struct ct_key key;
	struct pkt6 p;
	__u64 now;

	if (pkt6_parse(skb, &p) < 0)
		return NP6_NOT_L4;
	ct_key6(&key, &p, CT_DIR_REPLY);
	e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
	if (!e || (e->flags & CT_F_SNAT))
		return TC_ACT_UNSPEC;
	now = bpf_ktime_get_ns();
	if (ct_expired(e, now))
		return TC_ACT_UNSPEC;
	ct_touch(&key, e, pkt6_ct_flags(&p, CT_DIR_REPLY), now);
	np_count(NP_STAT_REPLY);
	if (nat_rewrite6(skb, &p, e->nat_saddr, e->nat_sport, e->nat_daddr, e->nat_dport) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

/* tc ingress for an IPv6 frame. Each half is a function of its own and
 * this one has no stack: the chain of frames stays under 512 bytes. */
static __always_inline int np6_tc_ingress(struct __sk_buff *skb)
{
	int verdict = np6_l4_ingress(skb);

	return verdict == NP6_NOT_L4 ? np6_icmp_error_ingress(skb) : verdict;
}

/* tc egress for an IPv6 frame, as np6_tc_ingress(). */
static __always_inline int np6_tc_egress(struct __sk_buff *skb)
{
	int verdict = np6_l4_egress(skb);

	return verdict == NP6_NOT_L4 ? np6_icmp_error_egress(skb) : verdict;
}

#endif /* KPR_LB_NODEPORT6_TC_H */
