/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The maps of the load balancer. They are pinned by the agent under its
 * --bpf-root with the names below, which carry the layout version: a layout
 * change gets new names, so an agent never reads a map of another layout.
 * Capacities here are defaults; the agent sets them before load.
 *
 * The services and backends maps are preallocated: an insert then never
 * allocates (no ENOMEM under memory pressure, and a full sync of 200k
 * entries takes 40 % less time), at the price of their full size in
 * memory up front (about 100 bytes an entry).
 */
#ifndef KPR_LB_MAPS_H
#define KPR_LB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_types.h"

/* frontend (+ slot) -> master entry or backend slot */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_svc_val);
	__uint(max_entries, 65536);
} kpr_svc_v1 SEC(".maps");

/* backend id -> backend */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(max_entries, 65536);
} kpr_backends_v1 SEC(".maps");

/* (client, frontend) -> backend, for sessionAffinity ClientIP */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_val);
	__uint(max_entries, 65536);
} kpr_affinity_v1 SEC(".maps");

#include "lb_sockrnat.h"

/* (frontend id, client prefix) -> 1, for loadBalancerSourceRanges. An LPM
 * trie must not be preallocated; lookups take the longest matching prefix,
 * and svc_id's 32 bits always count, so one frontend never matches
 * another's prefixes. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lb_srcrange_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
} kpr_srcrange_v1 SEC(".maps");

/* One Maglev lookup table (the inner maps of kpr_maglev_v1): slot ->
 * backend id, never 0. The agent creates one per distinct backend set and
 * sizes it --maglev-table-size; BPF_F_INNER_MAP lets tables of another size
 * (left by an agent with another --maglev-table-size, until the new one
 * rewrites them) live in the same outer map, at the price of a
 * bounds-checked lookup instead of an inlined one. */
struct lb_maglev_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
};

/* frontend id (struct lb_svc_val.svc_id) -> its Maglev table, for masters
 * flagged SVC_F_MAGLEV (Cilium's cilium_lb4_maglev). Not preallocated: an
 * entry is a pointer, the memory is in the tables (4 bytes x table size). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__uint(max_entries, 65536);
	__array(values, struct lb_maglev_table);
} kpr_maglev_v1 SEC(".maps");

#endif /* KPR_LB_MAPS_H */
