/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * ICMPv6 errors about packets of translated IPv6 flows, translated in
 * turn: lb_icmp_err.h's counterpart, with the same reasoning (the flow is
 * the one whose key is the quote reversed; the error goes where the flow
 * goes, the quote becomes the packet the receiver sent). Packet Too Big
 * above all: without it a backend behind a NodePort never learns the path
 * MTU toward the client (IPv6 routers do not fragment), and large replies
 * vanish.
 *
 * Served: destination unreachable, packet too big and time exceeded
 * (RFC 4443 types 1, 2, 3) whose IPv6 header has no extension header and
 * whose quote is a TCP or UDP packet without extension headers. Neighbour
 * discovery and every other ICMPv6 message are not errors and are never
 * parsed here.
 *
 * Checksums: unlike IPv4's, the ICMPv6 checksum covers the outer
 * addresses (pseudo-header) and the quote's header, so every rewritten
 * address and port updates it: outer addresses as pseudo-header changes,
 * quoted ones as data. The quote's own L4 checksum is left alone, as for
 * IPv4.
 */
#ifndef KPR_LB_ICMP_ERR6_H
#define KPR_LB_ICMP_ERR6_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_types.h"
#include "lb_ct.h"
#include "lb_nat6.h"

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif
#define ICMPV6_ERR_DEST_UNREACH 1
#define ICMPV6_ERR_PKT_TOOBIG   2
#define ICMPV6_ERR_TIME_EXCEED  3

/* Offsets of an error without extension headers. */
#define ICMP6_OFF       (IP6_OFF + IP6_HLEN)
#define ICMP6_CSUM_OFF  (ICMP6_OFF + 2)
#define ICMP6_QUOTE_OFF (ICMP6_OFF + 8)
#define ICMP6_Q_SRC_OFF (ICMP6_QUOTE_OFF + offsetof(struct ipv6hdr, saddr))
#define ICMP6_Q_DST_OFF (ICMP6_QUOTE_OFF + offsetof(struct ipv6hdr, daddr))
#define ICMP6_Q_L4_OFF  (ICMP6_QUOTE_OFF + IP6_HLEN)

/* An ICMPv6 error about a TCP or UDP packet, as parsed. */
struct icmp_err6 {
	__be32 saddr[4];     /* outer source (whoever reports) */
	__be32 daddr[4];     /* outer destination */
	__be32 q_saddr[4];   /* the quoted packet's addresses and ports */
	__be32 q_daddr[4];
	__be16 q_sport;
	__be16 q_dport;
	__u8   q_proto;      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   hop_limit;    /* outer hop limit */
	__u8   pad[2];
};

/* Fills @q from an Ethernet frame. Returns 0 for an ICMPv6 error of a type
 * above quoting a TCP or UDP packet, -1 for anything else. */
static __always_inline int icmp_err6_parse(struct __sk_buff *skb, struct icmp_err6 *q)
{
	struct ipv6hdr ip6, quoted;
	__be16 ports[2];
	__u8 type;

	if (skb->protocol != bpf_htons(ETH_P_IPV6) ||
	    bpf_skb_load_bytes(skb, IP6_OFF, &ip6, sizeof(ip6)) < 0)
		return -1;
	if (ip6.version != 6 || ip6.nexthdr != IPPROTO_ICMPV6)
		return -1;
	if (bpf_skb_load_bytes(skb, ICMP6_OFF, &type, 1) < 0 ||
	    (type != ICMPV6_ERR_DEST_UNREACH && type != ICMPV6_ERR_PKT_TOOBIG &&
	     type != ICMPV6_ERR_TIME_EXCEED))
		return -1;
	if (bpf_skb_load_bytes(skb, ICMP6_QUOTE_OFF, &quoted, sizeof(quoted)) < 0 ||
	    quoted.version != 6 ||
	    (quoted.nexthdr != IPPROTO_TCP && quoted.nexthdr != IPPROTO_UDP))
		return -1;
	if (bpf_skb_load_bytes(skb, ICMP6_Q_L4_OFF, ports, sizeof(ports)) < 0)
		return -1;
	__builtin_memcpy(q->saddr, &ip6.saddr, 16);
	__builtin_memcpy(q->daddr, &ip6.daddr, 16);
	__builtin_memcpy(q->q_saddr, &quoted.saddr, 16);
	__builtin_memcpy(q->q_daddr, &quoted.daddr, 16);
	q->q_sport = ports[0];
	q->q_dport = ports[1];
	q->q_proto = quoted.nexthdr;
	q->hop_limit = ip6.hop_limit;
	return 0;
}

/* The live conntrack entry of direction @dir whose key is @q's quote
 * reversed (written to @key), or NULL. */
static __always_inline struct ct_entry *icmp_err6_flow(const struct icmp_err6 *q, __u8 dir,
						       struct ct_key *key, __u64 now)
{
	struct ct_entry *e;

	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->saddr, q->q_daddr, 16);
	__builtin_memcpy(key->daddr, q->q_saddr, 16);
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
static __always_inline void icmp_err6_outer(const struct icmp_err6 *q, const struct ct_key *key,
					    const struct ct_entry *e, __be32 saddr[4],
					    __be32 daddr[4])
{
	if (ip6_addr_eq(key->saddr, e->nat_saddr))
		__builtin_memcpy(saddr, q->saddr, 16);
	else
		__builtin_memcpy(saddr, e->nat_saddr, 16);
	__builtin_memcpy(daddr, e->nat_daddr, 16);
}

/* Rewrites the 16-byte address at @off from @old to @new and the ICMPv6
 * checksum: @csum_flags BPF_F_PSEUDO_HDR for an outer address (in the
 * pseudo-header), 0 for a quoted one (in the message). */
static __always_inline int icmp_err6_set_addr(struct __sk_buff *skb, __u32 off,
					      const __be32 old[4], const __be32 new[4],
					      __u64 csum_flags)
{
	__be32 o[4], n[4];
	__s64 diff;

	if (ip6_addr_eq(old, new))
		return 0;
	__builtin_memcpy(o, old, sizeof(o));
	__builtin_memcpy(n, new, sizeof(n));
	diff = bpf_csum_diff(o, sizeof(o), n, sizeof(n), 0);
	if (diff < 0 ||
	    bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, 0, (__u32)diff, csum_flags) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, n, sizeof(n), 0);
}

/* Rewrites a quoted port at @off from @old to @new, and the ICMPv6
 * checksum. */
static __always_inline int icmp_err6_set_port(struct __sk_buff *skb, __u32 off, __be16 old,
					      __be16 new)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, old, new, sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/* Rewrites the error @q about the flow of @e: outer addresses @saddr ->
 * @daddr (icmp_err6_outer), the quote reversed from e's rewrite. Returns
 * 0, or -1 (the caller drops the packet). */
static __always_inline int icmp_err6_rewrite(struct __sk_buff *skb, const struct icmp_err6 *q,
					     const struct ct_entry *e, const __be32 saddr[4],
					     const __be32 daddr[4])
{
	if (icmp_err6_set_addr(skb, IP6_SRC_OFF, q->saddr, saddr, BPF_F_PSEUDO_HDR) < 0 ||
	    icmp_err6_set_addr(skb, IP6_DST_OFF, q->daddr, daddr, BPF_F_PSEUDO_HDR) < 0 ||
	    icmp_err6_set_addr(skb, ICMP6_Q_SRC_OFF, q->q_saddr, e->nat_daddr, 0) < 0 ||
	    icmp_err6_set_addr(skb, ICMP6_Q_DST_OFF, q->q_daddr, e->nat_saddr, 0) < 0 ||
	    icmp_err6_set_port(skb, ICMP6_Q_L4_OFF, q->q_sport, e->nat_dport) < 0 ||
	    icmp_err6_set_port(skb, ICMP6_Q_L4_OFF + 2, q->q_dport, e->nat_sport) < 0)
		return -1;
	return 0;
}

#endif /* KPR_LB_ICMP_ERR6_H */
