/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Maglev backend selection for north-south traffic (lb_nodeport.h only;
 * the socket hooks stay random, as Cilium's do).
 *
 * A frontend whose master carries SVC_F_MAGLEV has a lookup table in
 * kpr_maglev_v1, keyed by its svc_id, that the agent computes from the
 * frontend's backend addresses, --maglev-table-size and --maglev-hash-seed
 * (src/maglev.rs). A new flow's hash picks a slot. Every node computes the
 * same table for the same backend set and the same hash for the same
 * flow, so a client reaches the same backend whichever node it enters,
 * and removing a backend moves few other flows.
 *
 * The hash covers the client's address and port, the frontend's port and
 * the protocol, and not the frontend's address: a NodePort's address is
 * the entering node's own, different on every node, and an LB IP or
 * externalIP is the same on every node anyway.
 */
#ifndef KPR_LB_MAGLEV_H
#define KPR_LB_MAGLEV_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lb_types.h"
#include "lb_maps.h"
#include "lb_select.h"

/* Slots of a table (--maglev-table-size; the agent writes tables of this
 * size) and the flow hash seed (--maglev-hash-seed, folded to 32 bits). */
const volatile __u32 maglev_table_size = 16381;
const volatile __u32 maglev_hash_seed = 0;

static __always_inline __u32 lb_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

/* The kernel's jhash_3words() (Bob Jenkins' lookup3 final mix). */
static __always_inline __u32 lb_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += 0xdeadbeef + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	c ^= b; c -= lb_rol32(b, 14);
	a ^= c; a -= lb_rol32(c, 11);
	b ^= a; b -= lb_rol32(a, 25);
	c ^= b; c -= lb_rol32(b, 16);
	a ^= c; a -= lb_rol32(c, 4);
	b ^= a; b -= lb_rol32(a, 14);
	c ^= b; c -= lb_rol32(b, 24);
	return c;
}

/* The hash of a flow from @saddr:@sport to a frontend's @dport/@proto:
 * the same on every node (see the top of this file). */
static __always_inline __u32 lb_flow_hash4(__be32 saddr, __be16 sport, __be16 dport, __u8 proto)
{
	return lb_jhash_3words(bpf_ntohl(saddr),
			       ((__u32)bpf_ntohs(sport) << 16) | bpf_ntohs(dport),
			       proto, maglev_hash_seed);
}

/* The backend id at slot @hash % table size of the frontend's table; 0
 * when it has none (the agent's ordered updates rule that out for a
 * SVC_F_MAGLEV master with backends) or the slot is beyond a table of an
 * older size. */
static __always_inline __u32 lb_pick_maglev(const struct lb_svc_val *master, __u32 hash)
{
	__u32 svc_id = master->svc_id, slot;
	__u32 *backend_id;
	void *table;

	if (maglev_table_size == 0)
		return 0;
	table = bpf_map_lookup_elem(&kpr_maglev_v1, &svc_id);
	if (!table)
		return 0;
	slot = hash % maglev_table_size;
	backend_id = bpf_map_lookup_elem(table, &slot);
	return backend_id ? *backend_id : 0;
}

/* The backend for a new north-south flow with hash @hash: as
 * lb_select_backend() (session affinity first), but a frontend flagged
 * SVC_F_MAGLEV picks from its Maglev table; should the table have no
 * answer, a random pick keeps the flow served. */
static __always_inline struct lb_backend *
lb_select_backend_hashed(struct lb_svc_key *key, const struct lb_svc_val *master,
			 __u64 client, __u32 hash, __u32 *backend_id)
{
	struct lb_backend *backend;

	if (!(master->flags & SVC_F_MAGLEV))
		return lb_select_backend(key, master, client, backend_id);
	*backend_id = 0;
	if (master->count == 0)
		return NULL;
	if (master->flags & SVC_F_AFFINITY) {
		backend = lb_affinity_lookup(master, client, backend_id);
		if (backend)
			return backend;
	}
	*backend_id = lb_pick_maglev(master, hash);
	backend = lb_lookup_backend(*backend_id);
	if (!backend) {
		*backend_id = lb_pick_random(key, master);
		backend = lb_lookup_backend(*backend_id);
	}
	if (backend && (master->flags & SVC_F_AFFINITY))
		lb_affinity_remember(master, client, *backend_id);
	return backend;
}

#endif /* KPR_LB_MAGLEV_H */
