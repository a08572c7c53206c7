/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The addresses of the node itself: every address of the agent's network
 * namespace (IPv4 ones IPv4-mapped, as everywhere), kept in step by the
 * agent from netlink address events (src/datapath/host_addrs.rs).
 *
 * A NodePort is served on every address of the node, not only on the node
 * IPs the translation knows: kube-proxy matches `--dst-type LOCAL`, Cilium
 * has its 0.0.0.0:nodePort wildcard frontend. The tc and XDP programs ask
 * the FIB whether a destination is local; the socket hooks cannot
 * (bpf_fib_lookup is for tc and XDP only), so they ask this map, for
 * node-local clients connecting to such an address and for bind
 * protection.
 *
 * The 127.0.0.1 NodePort frontend (programmed for every IPv4 NodePort, with
 * the node IPs' backends and flags; src/translate) stands in for the
 * wildcard, so no frontend is added per address; the [::] NodePort frontend
 * (every IPv6 NodePort, Cilium's [::]:nodePort) does for IPv6.
 */
#ifndef KPR_LB_HOSTADDR_H
#define KPR_LB_HOSTADDR_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_types.h"
#include "lb_maps.h"
#include "lb_select.h"

/* Key of kpr_hostaddr_v1. */
struct lb_host_addr {
	__be32 addr[4]; /* IPv6, or IPv4-mapped (::ffff:a.b.c.d) */
};

/* node address -> 1. Small (a node has a handful of addresses); not
 * preallocated. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lb_host_addr);
	__type(value, __u8);
	__uint(max_entries, 4096);
} kpr_hostaddr_v1 SEC(".maps");

static __always_inline int lb_is_host_addr(const __be32 addr[4])
{
	struct lb_host_addr key;

	__builtin_memcpy(key.addr, addr, sizeof(key.addr));
	return bpf_map_lookup_elem(&kpr_hostaddr_v1, &key) != NULL;
}

/* Puts the stand-in NodePort address of @addr's family in @addr:
 * 127.0.0.1 for IPv4, [::] for IPv6. */
static __always_inline void lb_set_nodeport_wildcard(__be32 addr[4], int v4)
{
	if (v4) {
		lb_addr_set_v4(addr, bpf_htonl(0x7f000001));
	} else {
		addr[0] = 0;
		addr[1] = 0;
		addr[2] = 0;
		addr[3] = 0;
	}
}

/* The NodePort frontend for @key's port and protocol on an address of the
 * node that no frontend has (@key holds that address; it is left on the
 * family's stand-in, 127.0.0.1 or [::], the backends' key, when found).
 * NULL when the address is no address of the node or the port no
 * NodePort. */
static __always_inline struct lb_svc_val *lb_host_nodeport_lookup(struct lb_svc_key *key)
{
	struct lb_svc_val *master;

	if (!lb_is_host_addr(key->addr))
		return NULL;
	lb_set_nodeport_wildcard(key->addr, lb_addr_is_v4(key->addr));
	master = lb_lookup_master(key);
	if (master && (master->flags & SVC_F_NODE_PORT))
		return master;
	return NULL;
}

#endif /* KPR_LB_HOSTADDR_H */
