/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Frontend lookup and backend selection, shared by the socket-LB hooks and
 * the north-south programs. Functions return a backend or NULL; callers
 * decide what a miss means at their hook.
 */
#ifndef KPR_LB_SELECT_H
#define KPR_LB_SELECT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_types.h"
#include "lb_maps.h"

#define NSEC_PER_SEC 1000000000ULL

static __always_inline void lb_addr_set_v4(__be32 addr[4], __be32 ip4)
{
	addr[0] = 0;
	addr[1] = 0;
	addr[2] = bpf_htonl(0x0000ffff);
	addr[3] = ip4;
}

static __always_inline int lb_addr_is_v4(const __be32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff);
}

/* The master entry of a frontend, or NULL when the destination is no
 * frontend: the single lookup that untouched traffic pays. */
static __always_inline struct lb_svc_val *
lb_lookup_master(struct lb_svc_key *key)
{
	key->slot = 0;
	return bpf_map_lookup_elem(&kpr_svc_v1, key);
}

/* Whether the address of @key is a ClusterIP whose port-reject entry
 * says that a port (or protocol) no frontend of it defines is refused.
 * Looked up only after the exact lookup missed; @key's port, protocol,
 * slot and scope are overwritten. */
static __always_inline int lb_port_rejected(struct lb_svc_key *key)
{
	struct lb_svc_val *val;

	key->port = 0;
	key->proto = 0;
	key->slot = 0;
	key->scope = LB_SCOPE_EXT;
	val = bpf_map_lookup_elem(&kpr_svc_v1, key);
	return val && (val->flags & SVC_F_PORT_REJECT);
}

static __always_inline struct lb_backend *
lb_lookup_backend(__u32 backend_id)
{
	if (backend_id == 0)
		return NULL;
	return bpf_map_lookup_elem(&kpr_backends_v1, &backend_id);
}

/* A backend id picked uniformly among the frontend's slots; 0 when the
 * slot is missing, which the ordered updates of the agent rule out. */
static __always_inline __u32
lb_pick_random(struct lb_svc_key *key, const struct lb_svc_val *master)
{
	struct lb_svc_val *slot;

	key->slot = (bpf_get_prandom_u32() % master->count) + 1;
	slot = bpf_map_lookup_elem(&kpr_svc_v1, key);
	key->slot = 0;
	return slot ? slot->backend_id : 0;
}

/* The backend @client used for the frontend of @master within its
 * affinity_timeout, if it still exists (its time is refreshed), else NULL.
 * The agent removes affinity entries that point at backends it takes out
 * of the frontend. */
static __always_inline struct lb_backend *
lb_affinity_lookup(const struct lb_svc_val *master, __u64 client, __u32 *backend_id)
{
	struct lb_affinity_key akey = { .client = client, .svc_id = master->svc_id };
	struct lb_affinity_val *aval;
	struct lb_backend *backend;
	__u64 now = bpf_ktime_get_ns();

	aval = bpf_map_lookup_elem(&kpr_affinity_v1, &akey);
	if (!aval || now - aval->last_used_ns >
			     (__u64)master->affinity_timeout * NSEC_PER_SEC)
		return NULL;
	backend = lb_lookup_backend(aval->backend_id);
	if (backend) {
		aval->last_used_ns = now;
		*backend_id = aval->backend_id;
	}
	return backend;
}

/* Remembers @backend_id as @client's backend for the frontend of @master. */
static __always_inline void
lb_affinity_remember(const struct lb_svc_val *master, __u64 client, __u32 backend_id)
{
	struct lb_affinity_key akey = { .client = client, .svc_id = master->svc_id };
	struct lb_affinity_val nval = {
		.last_used_ns = bpf_ktime_get_ns(),
		.backend_id = backend_id,
	};

	bpf_map_update_elem(&kpr_affinity_v1, &akey, &nval, BPF_ANY);
}

/* Backend for a client of a frontend with ClientIP affinity: the one this
 * client used within affinity_timeout seconds if it still exists, else a
 * new random pick that is remembered. */
static __always_inline struct lb_backend *
lb_select_affine(struct lb_svc_key *key, const struct lb_svc_val *master,
		 __u64 client, __u32 *backend_id)
{
	struct lb_backend *backend;

	backend = lb_affinity_lookup(master, client, backend_id);
	if (backend)
		return backend;
	*backend_id = lb_pick_random(key, master);
	backend = lb_lookup_backend(*backend_id);
	if (backend)
		lb_affinity_remember(master, client, *backend_id);
	return backend;
}

/* Whether a prefix of the loadBalancerSourceRanges of frontend @svc_id
 * holds @saddr (16 bytes, IPv4-mapped for IPv4). */
static __always_inline int lb_src_in_ranges(__u32 svc_id, const __be32 saddr[4])
{
	struct lb_srcrange_key key;

	key.prefixlen = 32 + 128;
	key.svc_id = svc_id;
	__builtin_memcpy(key.addr, saddr, sizeof(key.addr));
	return bpf_map_lookup_elem(&kpr_srcrange_v1, &key) != NULL;
}

/* Whether a client at @saddr (16 bytes, IPv4-mapped for IPv4) may open a
 * flow to the frontend of @master: always, unless the frontend has
 * loadBalancerSourceRanges and none of its prefixes holds @saddr. */
static __always_inline int lb_src_allowed(const struct lb_svc_val *master,
					  const __be32 saddr[4])
{
	if (!(master->flags & SVC_F_SRC_RANGE))
		return 1;
	return lb_src_in_ranges(master->svc_id, saddr);
}

/* The backend for a new flow to the frontend of @master, or NULL when the
 * frontend has no usable backend; its id goes to @backend_id. @client
 * identifies the client for session affinity. */
static __always_inline struct lb_backend *
lb_select_backend(struct lb_svc_key *key, const struct lb_svc_val *master,
		  __u64 client, __u32 *backend_id)
{
	*backend_id = 0;
	if (master->count == 0)
		return NULL;
	if (master->flags & SVC_F_AFFINITY)
		return lb_select_affine(key, master, client, backend_id);
	*backend_id = lb_pick_random(key, master);
	return lb_lookup_backend(*backend_id);
}

#endif /* KPR_LB_SELECT_H */
