/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Load-balancing events for `kpr monitor` (src/monitor/): one record per
 * decision into a BPF ring buffer, while a reader is there.
 *
 * Off until asked: every hook first reads kpr_monitor_v1[0].readers, which
 * `kpr monitor` raises while it runs (a runtime switch, no program
 * reload); with no reader, a decision costs that one array lookup. On, a
 * decision is (1) sampled: one in sample_every is kept, (2) rate-limited:
 * a token bucket per CPU lets rate events a second through, up to burst
 * at once, so a flood costs at most that much ring buffer work, and (3)
 * written if the ring buffer has room. What (1), (2) and (3) leave out is
 * counted in kpr_monstats_v1, which the reader reports at exit.
 *
 * Family-agnostic: addresses are 16 bytes (IPv4-mapped for IPv4), the
 * frontend and backend are ids, as in lb_verdict.h.
 */
#ifndef KPR_LB_MONITOR_H
#define KPR_LB_MONITOR_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define NSEC_PER_SEC_MON 1000000000ULL

/* One decision (the ring buffer's records). */
struct lb_event {
	__u64  ts_ns;         /* bpf_ktime_get_ns() of the decision */
	__u64  netns_cookie;  /* client's network namespace (socket hooks; 0 in tc/XDP) */
	__u64  cgroup_id;     /* client's cgroup v2 id (socket hooks; 0 in tc/XDP) */
	__be32 client[4];     /* client address, IPv4-mapped; :: when not bound yet */
	__be32 frontend[4];   /* address the client addressed, IPv4-mapped */
	__be16 client_port;   /* client port; 0 when not bound yet */
	__be16 frontend_port; /* port the client addressed */
	__u32  svc_id;        /* frontend id; 0 = none (invalid port, DSR decap) */
	__u32  backend_id;    /* chosen backend id; 0 = none */
	__u32  pid;           /* client's process (socket hooks; 0 in tc/XDP) */
	__u8   hook;          /* enum lb_hook */
	__u8   verdict;       /* enum lb_verdict */
	__u8   reason;        /* enum lb_reason */
	__u8   proto;         /* IPPROTO_TCP or IPPROTO_UDP */
	__u32  pad;           /* zero */
};

/* The switch and budget, kpr_monitor_v1[0], written by `kpr monitor`. */
struct lb_monitor_ctl {
	__u32 readers;        /* monitors running; 0 = off */
	__u32 sample_every;   /* keep one decision in this many; 0 or 1 = all */
	__u32 rate;           /* events a second per CPU; 0 = unlimited */
	__u32 burst;          /* events at once per CPU above the rate */
	__u32 reader_pids[8]; /* pids of the monitors (theirs to keep; unread here) */
};

/* Counters of kpr_monstats_v1 (per CPU), by index. */
enum lb_monitor_stat {
	LB_MON_EMITTED      = 0, /* written to the ring buffer */
	LB_MON_SAMPLED_OUT  = 1, /* left out by sample_every */
	LB_MON_RATE_LIMITED = 2, /* left out by the token bucket */
	LB_MON_RINGBUF_FULL = 3, /* lost: the ring buffer had no room */
	LB_MON_SLOTS        = 8,
};

/* A CPU's token bucket (kpr_monbudget, not pinned: each object its own). */
struct lb_monitor_budget {
	__u64 last_ns;        /* last refill */
	__u64 nano_tokens;    /* tokens x 1e9 */
	__u64 seen;           /* decisions seen while on, for sampling */
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} kpr_events_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_monitor_ctl);
	__uint(max_entries, 1);
} kpr_monitor_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, LB_MON_SLOTS);
} kpr_monstats_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_monitor_budget);
	__uint(max_entries, 1);
} kpr_monbudget SEC(".maps");

/* Key 0 in global data, not on the stack: the north-south programs
 * report from a subprogram that has almost no stack left (lb_nodeport.h). */
static const __u32 lb_mon_key0;

static __always_inline void lb_monitor_count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&kpr_monstats_v1, &stat);

	if (n)
		*n += 1;
}

/* Whether this decision may take a token of the CPU's bucket. */
static __always_inline int lb_monitor_take(const struct lb_monitor_ctl *ctl,
					   struct lb_monitor_budget *b)
{
	__u64 now, elapsed, cap;

	if (!ctl->rate)
		return 1;
	now = bpf_ktime_get_ns();
	elapsed = now - b->last_ns;
	if (elapsed > NSEC_PER_SEC_MON)
		elapsed = NSEC_PER_SEC_MON; /* a full bucket after 1 s; no overflow */
	b->last_ns = now;
	cap = (__u64)(ctl->burst ? ctl->burst : 1) * NSEC_PER_SEC_MON;
	b->nano_tokens += elapsed * ctl->rate;
	if (b->nano_tokens > cap)
		b->nano_tokens = cap;
	if (b->nano_tokens < NSEC_PER_SEC_MON)
		return 0;
	b->nano_tokens -= NSEC_PER_SEC_MON;
	return 1;
}

/* Room for one event, its ts_ns set, when a reader is there and the
 * sample and budget let it through (the caller fills every other field
 * and submits), else NULL. */
static __always_inline struct lb_event *lb_monitor_reserve(void)
{
	struct lb_monitor_budget *b;
	struct lb_monitor_ctl *ctl;
	struct lb_event *ev;

	ctl = bpf_map_lookup_elem(&kpr_monitor_v1, &lb_mon_key0);
	if (!ctl || !ctl->readers)
		return NULL;
	b = bpf_map_lookup_elem(&kpr_monbudget, &lb_mon_key0);
	if (!b)
		return NULL;
	b->seen += 1;
	if (ctl->sample_every > 1 && b->seen % ctl->sample_every != 0) {
		lb_monitor_count(LB_MON_SAMPLED_OUT);
		return NULL;
	}
	if (!lb_monitor_take(ctl, b)) {
		lb_monitor_count(LB_MON_RATE_LIMITED);
		return NULL;
	}
	ev = bpf_ringbuf_reserve(&kpr_events_v1, sizeof(*ev), 0);
	if (!ev) {
		lb_monitor_count(LB_MON_RINGBUF_FULL);
		return NULL;
	}
	lb_monitor_count(LB_MON_EMITTED);
	ev->ts_ns = bpf_ktime_get_ns();
	return ev;
}

#endif /* KPR_LB_MONITOR_H */
