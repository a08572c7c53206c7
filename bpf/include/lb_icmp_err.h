/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * ICMP errors about packets of translated north-south flows, translated
 * in turn, as netfilter does for RELATED traffic. Without this a backend
 * never hears "fragmentation needed" for the replies it sends a client
 * through a NodePort (a path MTU black hole: the error is addressed to
 * the frontend, which no socket of the node owns), and a client never
 * hears "port unreachable" from a UDP backend with nothing listening (it
 * waits for a timeout instead of failing at once).
 *
 * An error quotes the IP header and at least 8 bytes (the ports) of the
 * packet it is about. That packet travelled against the error, so the
 * conntrack entry of the flow is the one whose key is the quote reversed.
 * A packet matching that key would have been rewritten to
 * nat_saddr:nat_sport -> nat_daddr:nat_dport; the quote, being its
 * reverse, becomes nat_daddr:nat_dport -> nat_saddr:nat_sport, and the
 * error itself goes where the flow goes: its destination becomes
 * nat_daddr, and its source nat_saddr when the flow's direction rewrites
 * sources (a router's address is kept otherwise).
 *
 *   tc ingress, REPLY entry with SNAT   an error from the way to a remote
 *                                       backend: to the client
 *   tc ingress, ORIG entry              an error from the way to the client
 *                                       about a reply: to the backend
 *   tc egress, REPLY entry, no SNAT     a local backend's own error (port
 *                                       unreachable): from the frontend
 *
 * Checksums: the outer and the quoted IP header each get an incremental
 * update, which leaves the ICMP checksum right (a valid header sums to the
 * same whatever its addresses); quoted ports update the ICMP checksum. The
 * quote's own L4 checksum is left alone: no receiver checks a quote's.
 * Not translated: errors about DSR flows on the node that encapsulates
 * them (the quote would have to be sent through the tunnel), IPv6.
 */
#ifndef KPR_LB_ICMP_ERR_H
#define KPR_LB_ICMP_ERR_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_types.h"
#include "lb_ct.h"
#include "lb_nat.h"

#define ICMP_TIME_EXCEEDED 11 /* type: time exceeded (a TTL ran out) */

/* An ICMPv4 error about a TCP or UDP packet, as parsed. */
struct icmp_err4 {
	__be32 saddr;        /* outer source (whoever reports) */
	__be32 daddr;        /* outer destination */
	__u32  icmp_off;     /* offset of the ICMP header */
	__u32  quote_off;    /* offset of the quoted IP header */
	__u32  quote_l4_off; /* offset of the quoted L4 header (its ports) */
	__be32 q_saddr;      /* the quoted packet's addresses and ports */
	__be32 q_daddr;
	__be16 q_sport;
	__be16 q_dport;
	__u8   q_proto;      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   ttl;          /* outer TTL */
	__u8   pad[2];
};

/* Fills @q from an Ethernet frame. Returns 0 for an unfragmented IPv4
 * ICMP destination unreachable or time exceeded that quotes a TCP or UDP
 * packet, -1 for anything else. */
static __always_inline int icmp_err4_parse(struct __sk_buff *skb, struct icmp_err4 *q)
{
	struct iphdr ip, quoted;
	__be16 ports[2];
	__u8 type;

	if (skb->protocol != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, IP_OFF, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 4 || ip.ihl < 5 || ip.protocol != IPPROTO_ICMP ||
	    (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return -1;
	q->icmp_off = IP_OFF + (__u32)ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, q->icmp_off, &type, 1) < 0 ||
	    (type != ICMP_DEST_UNREACH && type != ICMP_TIME_EXCEEDED))
		return -1;
	q->quote_off = q->icmp_off + 8;
	if (bpf_skb_load_bytes(skb, q->quote_off, &quoted, sizeof(quoted)) < 0)
		return -1;
	/* A quoted later fragment has payload where the ports would be. */
	if (quoted.version != 4 || quoted.ihl < 5 ||
	    (quoted.protocol != IPPROTO_TCP && quoted.protocol != IPPROTO_UDP) ||
	    (quoted.frag_off & bpf_htons(IP_OFFSET)))
		return -1;
	q->quote_l4_off = q->quote_off + (__u32)quoted.ihl * 4;
	if (bpf_skb_load_bytes(skb, q->quote_l4_off, ports, sizeof(ports)) < 0)
		return -1;
	q->saddr = ip.saddr;
	q->daddr = ip.daddr;
	q->ttl = ip.ttl;
	q->q_saddr = quoted.saddr;
	q->q_daddr = quoted.daddr;
	q->q_sport = ports[0];
	q->q_dport = ports[1];
	q->q_proto = quoted.protocol;
	return 0;
}

/* The live conntrack entry of direction @dir whose key is @q's quote
 * reversed (written to @key), or NULL. */
static __always_inline struct ct_entry *icmp_err4_flow(const struct icmp_err4 *q, __u8 dir,
						       struct ct_key *key, __u64 now)
{
	struct ct_entry *e;

	__builtin_memset(key, 0, sizeof(*key));
	lb_addr_set_v4(key->saddr, q->q_daddr);
	lb_addr_set_v4(key->daddr, q->q_saddr);
	key->sport = q->q_dport;
	key->dport = q->q_sport;
	key->proto = q->q_proto;
	key->dir = dir;
	e = bpf_map_lookup_elem(&kpr_ct_v1, key);
	if (!e || ct_expired(e, now))
		return NULL;
	return e;
}

/* The outer addresses the error about the flow (@key, @e) gets. */
static __always_inline void icmp_err4_outer(const struct icmp_err4 *q, const struct ct_key *key,
					    const struct ct_entry *e, __be32 *saddr,
					    __be32 *daddr)
{
	*saddr = key->saddr[3] != e->nat_saddr[3] ? e->nat_saddr[3] : q->saddr;
	*daddr = e->nat_daddr[3];
}

/* Rewrites a quoted port at @off from @old to @new, and the ICMP checksum. */
static __always_inline int icmp_err4_set_port(struct __sk_buff *skb, const struct icmp_err4 *q,
					      __u32 off, __be16 old, __be16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, q->icmp_off + 2, old, new, sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/* Rewrites the error @q about the flow (@key, @e): outer source and
 * destination @saddr -> @daddr (icmp_err4_outer), the quote reversed from
 * e's rewrite. Returns 0, or -1 (the caller drops the packet). */
static __always_inline int icmp_err4_rewrite(struct __sk_buff *skb, const struct icmp_err4 *q,
					     const struct ct_entry *e, __be32 saddr, __be32 daddr)
{
	__u32 q_csum = q->quote_off + offsetof(struct iphdr, check);

	if (ip4_set_addr(skb, IP_SRC_OFF, IP_CSUM_OFF, q->saddr, saddr) < 0 ||
	    ip4_set_addr(skb, IP_DST_OFF, IP_CSUM_OFF, q->daddr, daddr) < 0 ||
	    ip4_set_addr(skb, q->quote_off + offsetof(struct iphdr, saddr), q_csum,
			       q->q_saddr, e->nat_daddr[3]) < 0 ||
	    ip4_set_addr(skb, q->quote_off + offsetof(struct iphdr, daddr), q_csum,
			       q->q_daddr, e->nat_saddr[3]) < 0 ||
	    icmp_err4_set_port(skb, q, q->quote_l4_off, q->q_sport, e->nat_dport) < 0 ||
	    icmp_err4_set_port(skb, q, q->quote_l4_off + 2, q->q_dport, e->nat_sport) < 0)
		return -1;
	return 0;
}

#endif /* KPR_LB_ICMP_ERR_H */
