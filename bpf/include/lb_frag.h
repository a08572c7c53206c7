/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * IPv4 fragments of north-south flows. Only a datagram's first fragment
 * carries the L4 header, so only it can be matched to a frontend or a
 * flow; its ports are remembered here under (source, destination, IP id,
 * protocol), which every fragment of the datagram shares, and the later
 * fragments look them up and follow the flow (their addresses rewritten,
 * the first one's L4 checksum covering the datagram). Nothing is
 * reassembled: a forwarding node needs no more. Without this, a datagram
 * larger than the path MTU (a big DNS answer over UDP, say) to a NodePort
 * would never reach its backend: its fragments would be left to the node,
 * which has no socket on the NodePort.
 *
 * A later fragment that arrives before the first one is not known yet and
 * goes on untouched (counted), as with Cilium's fragment tracking.
 * Entries are not removed: the LRU map forgets them as new datagrams come.
 */
#ifndef KPR_LB_FRAG_H
#define KPR_LB_FRAG_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lb_nat.h"

/* A datagram: what all of its fragments share. */
struct frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8   proto;
	__u8   pad;
};

/* Its ports, from its first fragment. */
struct frag_ports {
	__be16 sport;
	__be16 dport;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
	__uint(max_entries, 8192);
} kpr_frag_v1 SEC(".maps");

/* Completes @p for fragments: a first fragment's ports are remembered for
 * its datagram, a later fragment gets them back. Returns 0, or -1 for a
 * later fragment of a datagram whose first fragment was not seen. */
static __always_inline int frag4_ports(struct pkt4 *p)
{
	struct frag_ports *known, ports;
	struct frag_key key;

	if (p->frag == PKT_WHOLE)
		return 0;
	key.saddr = p->saddr;
	key.daddr = p->daddr;
	key.id = p->ip_id;
	key.proto = p->proto;
	key.pad = 0;
	if (p->frag == PKT_FRAG_FIRST) {
		ports.sport = p->sport;
		ports.dport = p->dport;
		bpf_map_update_elem(&kpr_frag_v1, &key, &ports, BPF_ANY);
		return 0;
	}
	known = bpf_map_lookup_elem(&kpr_frag_v1, &key);
	if (!known)
		return -1;
	p->sport = known->sport;
	p->dport = known->dport;
	return 0;
}

#endif /* KPR_LB_FRAG_H */
