/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * loadBalancerSourceRanges decided where the client's address is known.
 *
 * connect() and sendmsg() of an unbound socket run before the kernel picks
 * the source address. For the node's own sockets the source is then a node
 * address, so the hooks decide by the node's addresses at once. A pod's
 * socket (another network namespace) would be misjudged that way: its
 * source is the pod's address. The hooks translate it and mark the socket
 * (socket local storage) with the frontend whose ranges judge it; the
 * cgroup_skb/egress program of the same cgroup reads the real source
 * address of the socket's next packet: inside the ranges, the mark is
 * cleared (the socket's later packets cost one storage lookup); outside,
 * the packet is dropped (kube-proxy's firewall chains DROP such traffic
 * from pods), and so is every retry (a TCP connect does not establish).
 *
 * sendmsg() marks per datagram, and every connect() or sendmsg() of a
 * pod's socket that needs no decision clears a mark left before, so a
 * datagram is judged by the frontend it was sent to. (Two threads sending
 * at once on one unconnected socket to frontends of different ranges may
 * see each other's mark; a pod reaches the backends' addresses directly
 * anyway, so nothing is gained by that.) Drops are counted in
 * kpr_sockstats_v1 (kpr_socket_source_range_drops_total).
 */
#ifndef KPR_LB_SRC_PENDING_H
#define KPR_LB_SRC_PENDING_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* A socket's pending source-range decision. */
struct lb_src_pending {
	__u32 svc_id;        /* frontend (struct lb_svc_val.svc_id) whose
			      * loadBalancerSourceRanges judge the next packet */
	__u8  armed;         /* 1: judge the next packet; 0: nothing pending */
	__u8  pad[3];        /* must be zero */
};

/* socket -> its pending decision. Not pinned: a mark lives from a hook to
 * the packet the same system call sends. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct lb_src_pending);
} kpr_srcpend SEC(".maps");

/* Counters of the socket hooks (index into kpr_sockstats_v1, which has
 * SOCK_STAT_SLOTS slots: a new counter takes the next index and is no
 * layout change; an index is never reused for another meaning). */
enum sock_stat {
	SOCK_STAT_SRC_RANGE = 0, /* a pod's packet dropped: its source is outside
				  * the frontend's loadBalancerSourceRanges */
	SOCK_STAT_MAX,
};
#define SOCK_STAT_SLOTS 8
_Static_assert(SOCK_STAT_MAX <= SOCK_STAT_SLOTS, "kpr_sockstats_v1 has SOCK_STAT_SLOTS slots");

/* counters, enum sock_stat; pinned, read by the agent for its metrics */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SOCK_STAT_SLOTS);
} kpr_sockstats_v1 SEC(".maps");

static __always_inline void sock_count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&kpr_sockstats_v1, &stat);

	if (n)
		*n += 1;
}

/* Marks @sk: its next packet is judged by the ranges of frontend @svc_id.
 * Returns 0, or -1 when no storage could be had (the caller refuses the
 * socket rather than let it through unjudged). */
static __always_inline int lb_src_pending_arm(struct bpf_sock *sk, __u32 svc_id)
{
	struct lb_src_pending *p;

	p = bpf_sk_storage_get(&kpr_srcpend, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!p)
		return -1;
	p->svc_id = svc_id;
	p->armed = 1;
	return 0;
}

/* Clears a mark left on @sk by an earlier connect() or sendmsg(). */
static __always_inline void lb_src_pending_clear(struct bpf_sock *sk)
{
	struct lb_src_pending *p;

	p = bpf_sk_storage_get(&kpr_srcpend, sk, 0, 0);
	if (p)
		p->armed = 0;
}

#endif /* KPR_LB_SRC_PENDING_H */
