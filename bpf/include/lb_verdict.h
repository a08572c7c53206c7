/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Per-frontend and per-backend counters, always on: what every hook
 * decided for each frontend (the verdicts below), and the packets and
 * bytes the north-south path moved per frontend and per backend. One
 * per-CPU update per decision, no lock, no atomic.
 *
 * Family-agnostic: the counters are keyed by frontend id (struct
 * lb_svc_val.svc_id) and backend id, never by an address, so the IPv4 and
 * IPv6 paths of every hook call the same functions. Id 0 is "no
 * frontend": the invalid-port refusals of a ClusterIP (its port-reject
 * entry has no id) and DSR flows another node chose the frontend of.
 *
 * The maps are not preallocated (memory per frontend that saw traffic,
 * not per possible one) and sized as the services and backends maps
 * (src/datapath/pins.rs), which they grow with (src/datapath/resize.rs).
 * Ids are reused lowest first (src/reconcile/ids.rs), so the entries never
 * outnumber the peak of frontends or backends; a reused id goes on from
 * its predecessor's counts (the metrics' frontend labels tell them apart).
 */
#ifndef KPR_LB_VERDICT_H
#define KPR_LB_VERDICT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* The verdicts, one list: LB_VERDICT(NAME, label, "help"). NAME gives
 * enum lb_verdict's LB_V_<NAME>, label the `verdict` label of the metric
 * families (src/metrics/verdicts.rs, checked against this enum's BTF). A
 * new verdict is a new row at the end, below LB_VERDICT_SLOTS: no layout
 * change. */
#define LB_VERDICTS(LB_VERDICT) \
	LB_VERDICT(TRANSLATED, translated, "Sent to a backend (socket hooks: connect/sendmsg rewritten; tc/XDP: new flow opened).") \
	LB_VERDICT(NO_BACKEND, no_backend, "Refused or dropped: the frontend has no usable backend.") \
	LB_VERDICT(SOURCE_RANGE, source_range, "Refused or dropped: the client is outside loadBalancerSourceRanges.") \
	LB_VERDICT(LOCAL_POLICY, local_policy, "Refused or dropped: a Local traffic policy leaves no backend on this node.") \
	LB_VERDICT(INVALID_PORT, invalid_port, "Refused or dropped: a ClusterIP on a port or protocol its Service does not define.") \
	LB_VERDICT(BIND_REFUSED, bind_refused, "A node socket's bind to a NodePort, LoadBalancer or externalIP frontend was refused.") \
	LB_VERDICT(FLOW_FAILED, flow_failed, "Dropped: a new north-south flow could not be opened (no SNAT port, conntrack write failed, no route).") \
	/* end of LB_VERDICTS */

#define LB_VERDICT_ENUM(name, label, help) LB_V_##name,
enum lb_verdict {
	LB_VERDICTS(LB_VERDICT_ENUM)
	LB_VERDICT_MAX,
};
#undef LB_VERDICT_ENUM

/* Slots per hook family in struct lb_fe_stats: room for verdicts to come. */
#define LB_VERDICT_SLOTS 8
_Static_assert(LB_VERDICT_MAX <= LB_VERDICT_SLOTS, "struct lb_fe_stats has LB_VERDICT_SLOTS");

/* Where a decision was taken (struct lb_event.hook). */
enum lb_hook {
	LB_HOOK_CONNECT = 0, /* cgroup connect4/6 */
	LB_HOOK_SENDMSG = 1, /* cgroup sendmsg4/6 */
	LB_HOOK_BIND    = 2, /* cgroup post_bind4/6 */
	LB_HOOK_TC      = 3, /* tc ingress/egress on a --devices interface */
	LB_HOOK_XDP     = 4, /* XDP on a --devices interface */
};

/* Why that backend (struct lb_event.reason). */
enum lb_reason {
	LB_R_NONE      = 0, /* no backend chosen (a refusal or drop) */
	LB_R_RANDOM    = 1, /* uniform pick among the frontend's slots */
	LB_R_AFFINITY  = 2, /* sessionAffinity ClientIP (remembered or new pick) */
	LB_R_MAGLEV    = 3, /* the frontend's Maglev table */
	LB_R_CONNTRACK = 4, /* a packet of a flow conntrack already holds */
};

/* Direction of a north-south packet (struct lb_fe_stats.packets index). */
enum lb_dir {
	LB_DIR_ORIG  = 0, /* client -> backend */
	LB_DIR_REPLY = 1, /* backend -> client */
};

/* Value of kpr_festats_v1 (per CPU), keyed by frontend id. */
struct lb_fe_stats {
	__u64 sock[LB_VERDICT_SLOTS]; /* socket-hook decisions, by enum lb_verdict */
	__u64 np[LB_VERDICT_SLOTS];   /* north-south new-flow decisions, by enum lb_verdict */
	__u64 packets[2];             /* north-south packets forwarded, by enum lb_dir */
	__u64 bytes[2];               /* their bytes (L2 frame as the hook saw it) */
};

/* Value of kpr_bestats_v1 (per CPU), keyed by backend id. */
struct lb_be_stats {
	__u64 packets[2];             /* north-south packets, by enum lb_dir */
	__u64 bytes[2];               /* their bytes */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct lb_fe_stats);
	__uint(max_entries, 65536);
} kpr_festats_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct lb_be_stats);
	__uint(max_entries, 65536);
} kpr_bestats_v1 SEC(".maps");

/* What a first decision inserts (global data, not the stack: the hooks
 * have little of it to spare). */
static const struct lb_fe_stats lb_fe_zero;
static const struct lb_be_stats lb_be_zero;

/* The counters of frontend @svc_id on this CPU, created at its first
 * decision; NULL only when the map is full or memory is short (the
 * decision then goes uncounted, never fails). */
static __always_inline struct lb_fe_stats *lb_fe_stats(__u32 svc_id)
{
	struct lb_fe_stats *s = bpf_map_lookup_elem(&kpr_festats_v1, &svc_id);

	if (s)
		return s;
	bpf_map_update_elem(&kpr_festats_v1, &svc_id, &lb_fe_zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&kpr_festats_v1, &svc_id);
}

/* Counts one socket-hook decision @verdict for frontend @svc_id. */
static __always_inline void lb_count_sock(__u32 svc_id, __u32 verdict)
{
	struct lb_fe_stats *s = lb_fe_stats(svc_id);

	if (s && verdict < LB_VERDICT_SLOTS)
		s->sock[verdict] += 1;
}

/* Counts one north-south new-flow decision @verdict for frontend @svc_id. */
static __always_inline void lb_count_np(__u32 svc_id, __u32 verdict)
{
	struct lb_fe_stats *s = lb_fe_stats(svc_id);

	if (s && verdict < LB_VERDICT_SLOTS)
		s->np[verdict] += 1;
}

/* Counts a north-south packet of @bytes forwarded in direction @dir for
 * frontend @svc_id and backend @backend_id (0: not counted for it). */
static __always_inline void lb_count_packet(__u32 svc_id, __u32 backend_id, __u32 dir,
					    __u32 bytes)
{
	struct lb_fe_stats *s = lb_fe_stats(svc_id);
	struct lb_be_stats *b;

	dir &= 1;
	if (s) {
		s->packets[dir] += 1;
		s->bytes[dir] += bytes;
	}
	if (!backend_id)
		return;
	b = bpf_map_lookup_elem(&kpr_bestats_v1, &backend_id);
	if (!b) {
		bpf_map_update_elem(&kpr_bestats_v1, &backend_id, &lb_be_zero, BPF_NOEXIST);
		b = bpf_map_lookup_elem(&kpr_bestats_v1, &backend_id);
		if (!b)
			return;
	}
	b->packets[dir] += 1;
	b->bytes[dir] += bytes;
}

#endif /* KPR_LB_VERDICT_H */
