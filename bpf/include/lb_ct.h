/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking for north-south traffic: the conntrack map, entry
 * lifetimes and the pair discipline of struct ct_key / struct ct_entry
 * (lb_types.h). Only bpf/nodeport.bpf.c includes it, so the map exists
 * only when the north-south datapath is loaded.
 *
 * Lifetimes are per protocol and state, set by the agent before load.
 * A DSR flow on the node that encapsulates it has one entry (ORIG) only.
 * Both entries of a flow always carry the same flags and expiry: a hit on
 * either refreshes both (at most once a second per flow, to keep writes to
 * shared cache lines rare). A stale entry is ignored by the datapath and
 * removed by the agent's GC, or by LRU eviction under pressure.
 */
#ifndef KPR_LB_CT_H
#define KPR_LB_CT_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include "lb_types.h"

#ifndef NSEC_PER_SEC
#define NSEC_PER_SEC 1000000000ULL
#endif

/* Lifetimes in seconds (Cilium's defaults; kube-proxy's nf_conntrack ones
 * are 120 s SYN_SENT, 5 days established, 120 s TIME_WAIT, 30/120 s UDP). */
const volatile __u32 ct_timeout_tcp_syn = 60;      /* until the backend answers */
const volatile __u32 ct_timeout_tcp = 21600;       /* established */
const volatile __u32 ct_timeout_tcp_closing = 10;  /* after FIN or RST */
const volatile __u32 ct_timeout_udp = 60;          /* since the last packet */

/* Entries are refreshed when their expiry would move by more than this. */
#define CT_REFRESH_NS NSEC_PER_SEC

/* (packet tuple, direction) -> rewrite */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(max_entries, 131072);
} kpr_ct_v1 SEC(".maps");

static __always_inline __u64 ct_lifetime_ns(__u8 proto, __u16 flags)
{
	__u32 s;

	if (proto != IPPROTO_TCP)
		s = ct_timeout_udp;
	else if (flags & CT_F_CLOSING)
		s = ct_timeout_tcp_closing;
	else if (flags & CT_F_ESTABLISHED)
		s = ct_timeout_tcp;
	else
		s = ct_timeout_tcp_syn;
	return (__u64)s * NSEC_PER_SEC;
}

static __always_inline int ct_expired(const struct ct_entry *e, __u64 now)
{
	return now > e->expires_ns;
}

/* The key of the other direction's entry of the flow @e belongs to. */
static __always_inline void ct_peer_key(const struct ct_key *key,
					const struct ct_entry *e,
					struct ct_key *peer)
{
	__builtin_memcpy(peer->saddr, e->nat_daddr, sizeof(peer->saddr));
	__builtin_memcpy(peer->daddr, e->nat_saddr, sizeof(peer->daddr));
	peer->sport = e->nat_dport;
	peer->dport = e->nat_sport;
	peer->proto = key->proto;
	peer->dir = key->dir == CT_DIR_ORIG ? CT_DIR_REPLY : CT_DIR_ORIG;
	peer->pad[0] = 0;
	peer->pad[1] = 0;
}

/* Whether the flow of @e has a second entry (a DSR flow has none on the
 * node that encapsulates it). */
static __always_inline int ct_has_peer(const struct ct_entry *e)
{
	return !(e->flags & CT_F_DSR_ENCAP);
}

/* Removes both entries of the flow of (@key, @e). */
static __always_inline void ct_delete_pair(const struct ct_key *key,
					   const struct ct_entry *e)
{
	struct ct_key peer;

	if (ct_has_peer(e)) {
		ct_peer_key(key, e, &peer);
		bpf_map_delete_elem(&kpr_ct_v1, &peer);
	}
	bpf_map_delete_elem(&kpr_ct_v1, key);
}

/* Accounts a packet that hit (@key, @e): adds @add_flags (state learnt
 * from the packet) and pushes the expiry of both entries forward. */
static __always_inline void ct_touch(const struct ct_key *key,
				     struct ct_entry *e, __u16 add_flags,
				     __u64 now)
{
	__u16 flags = e->flags | add_flags;
	__u64 expires = now + ct_lifetime_ns(key->proto, flags);
	struct ct_entry *peer;
	struct ct_key pkey;

	if (flags == e->flags && expires < e->expires_ns + CT_REFRESH_NS)
		return;
	e->flags = flags;
	e->expires_ns = expires;
	if (!ct_has_peer(e))
		return;
	ct_peer_key(key, e, &pkey);
	peer = bpf_map_lookup_elem(&kpr_ct_v1, &pkey);
	if (peer) {
		peer->flags |= flags;
		peer->expires_ns = expires;
	}
}

#endif /* KPR_LB_CT_H */
