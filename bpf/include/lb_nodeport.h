/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The north-south decision, shared by the tc programs (bpf/nodeport.bpf.c)
 * and the XDP program (bpf/nodeport_xdp.bpf.c): for a packet that entered
 * on a --devices interface, whether it belongs to a frontend or to a
 * SNATed flow, which backend and which rewrite, and where it goes next.
 * The callers only parse, rewrite and send, each with its hook's means.
 *
 * A new flow, in this order: the frontend's loadBalancerSourceRanges are
 * checked (drop, counted); a backend is picked (session affinity, the
 * frontend's Maglev table, or at random: np_new_flow); a frontend without
 * backend gets the --service-no-backend-response (NP_V_REJECT or a counted
 * drop); the flow is opened to the backend as a local backend's, a SNATed
 * or a DSR one (np_open_flow).
 *
 * The frontend is the exact (destination, port, protocol) EXT one or, for
 * another local address of the node, the NodePort on that port
 * (np_wildcard_lookup).
 *
 * Conntrack is written here only; a packet that XDP hands on (XDP_PASS)
 * reaches the tc program, which decides again and finds the same state.
 *
 * With --nodeport-mode dsr|hybrid, a new flow to a backend on another node
 * is sent there IPIP-encapsulated instead of SNATed (np_open_flow), and a
 * packet another node encapsulated is taken in by np_dsr_ingress(), which
 * follows the backend that node chose (its source ranges, pick and
 * no-backend answer were that node's); the carrier and its packet work
 * are lb_dsr.h's.
 */
#ifndef KPR_LB_NODEPORT_H
#define KPR_LB_NODEPORT_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_types.h"
#include "lb_maps.h"
#include "lb_select.h"
#include "lb_maglev.h"
#include "lb_ct.h"
#include "lb_nat.h"
#include "lb_dsr.h"
#include "lb_verdict.h"
#include "lb_monitor.h"

/* The SNAT port range, host order; the agent keeps it out of the node's
 * ephemeral port range (net.ipv4.ip_local_port_range). */
const volatile __u16 snat_port_min = 61000;
const volatile __u16 snat_port_max = 65535;

/* How many ports a new SNATed flow tries before it is dropped. */
#define SNAT_TRIES 32

/* Frontend types served on the north-south path. */
#define NP_SVC_TYPES (SVC_F_NODE_PORT | SVC_F_LOADBALANCER | SVC_F_EXTERNAL_IP)

/* What a new flow to a frontend without any backend gets
 * (--service-no-backend-response): 1 = reject, an ICMP port unreachable
 * built by the tc program (what kube-proxy's REJECT sends); 0 = drop. */
const volatile __u8 no_backend_reject = 1;

/* counters, enum np_stat (v2: NP_STAT_SLOTS slots instead of NP_STAT_MAX) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, NP_STAT_SLOTS);
} kpr_npstats_v2 SEC(".maps");

static __always_inline void np_count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&kpr_npstats_v2, &stat);

	if (n)
		*n += 1;
}

static __always_inline void ct_key4(struct ct_key *key, const struct pkt4 *p, __u8 dir)
{
	__builtin_memset(key, 0, sizeof(*key));
	lb_addr_set_v4(key->saddr, p->saddr);
	lb_addr_set_v4(key->daddr, p->daddr);
	key->sport = p->sport;
	key->dport = p->dport;
	key->proto = p->proto;
	key->dir = dir;
}

/* State a packet of direction @dir with TCP flags @tcp_flags tells about
 * its flow (either family). */
static __always_inline __u16 ct_flags_of(__u8 tcp_flags, __u8 dir)
{
	__u16 flags = dir == CT_DIR_REPLY ? CT_F_ESTABLISHED : 0;

	if (tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		flags |= CT_F_CLOSING;
	return flags;
}

static __always_inline __u16 pkt_ct_flags(const struct pkt4 *p, __u8 dir)
{
	return ct_flags_of(p->tcp_flags, dir);
}

/* State a client's packet tells about a flow whose entry has @eflags: a
 * DSR flow's replies never pass here, so the client's first ACK (its
 * answer to the SYN-ACK) is what says the backend answered. */
static __always_inline __u16 pkt_orig_flags(const struct pkt4 *p, __u16 eflags)
{
	__u16 flags = pkt_ct_flags(p, CT_DIR_ORIG);

	if ((eflags & CT_F_DSR_ENCAP) &&
	    (p->proto != IPPROTO_TCP ||
	     (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_ACK))
		flags |= CT_F_ESTABLISHED;
	return flags;
}

static __always_inline int is_tcp_syn(const struct pkt4 *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* Finds a free SNAT port for the REPLY entry @rkey (whose dport it sets)
 * and inserts @rval there. Prefers the client's own port when it is in
 * the range. Returns 0, or -1 when SNAT_TRIES ports were all taken. */
static __always_inline int snat_insert_reply(struct ct_key *rkey, const struct ct_entry *rval,
					     __be16 client_port, __u64 now)
{
	__u32 range = (__u32)snat_port_max - snat_port_min + 1;
	__u16 port = bpf_ntohs(client_port);
	struct ct_entry *old;
	int i;

	if (snat_port_max < snat_port_min)
		return -1;
	if (port < snat_port_min || port > snat_port_max)
		port = snat_port_min + bpf_get_prandom_u32() % range;
	for (i = 0; i < SNAT_TRIES; i++) {
		rkey->dport = bpf_htons(port);
		if (bpf_map_update_elem(&kpr_ct_v1, rkey, rval, BPF_NOEXIST) == 0)
			return 0;
		/* Taken; a stale flow's port is as good as a free one. */
		old = bpf_map_lookup_elem(&kpr_ct_v1, rkey);
		if (old && ct_expired(old, now) &&
		    bpf_map_update_elem(&kpr_ct_v1, rkey, rval, BPF_ANY) == 0)
			return 0;
		port = snat_port_min + bpf_get_prandom_u32() % range;
	}
	return -1;
}

/* What to do with a packet: np_ingress()'s verdict. */
enum np_verdict {
	NP_V_PASS = 0, /* not ours, or left to the stack / the tc program */
	NP_V_DROP = 1, /* counted in kpr_npstats_v2 */
	NP_V_FWD  = 2, /* rewrite as struct np_fwd says and send */
	NP_V_REJECT = 3, /* no backend, reject mode: answer with ICMP port
			  * unreachable (tc builds it; XDP hands it on);
			  * counted by whoever sends it */
};

/* How to rewrite and where to send a packet (NP_V_FWD). */
struct np_fwd {
	__be32 saddr;                /* new source address; encap: outer source */
	__be32 daddr;                /* new destination address; encap: outer
				      * destination (the backend) */
	__be16 sport;                /* new source port (not with encap) */
	__be16 dport;                /* new destination port (not with encap) */
	__u32  encap;                /* 1: DSR, leave the packet as it is and put
				      * an IPIP header saddr -> daddr in front */
	long   fib_rc;               /* BPF_FIB_LKUP_RET_SUCCESS or _NO_NEIGH */
	struct bpf_fib_lookup fib;   /* egress ifindex, MACs / next hop */
};

/* Caller options of np_ingress(). */
enum np_opts {
	NP_O_NEED_NEIGH = 1 << 0, /* no neighbour entry: PASS instead of FWD
				   * (XDP cannot resolve one; tc can) */
	NP_O_TC_FOLLOWS = 1 << 1, /* what is passed on is decided again by the
				   * tc program: not counted here (XDP) */
	NP_O_L2_GROUP   = 1 << 2, /* the frame went to an L2 broadcast or
				   * multicast (or another host's) address:
				   * never a NodePort on a local address
				   * (np_wildcard_lookup) */
	NP_O_NO_DSR     = 1 << 3, /* the packet cannot be encapsulated nor
				   * refused with fragmentation-needed
				   * (np_dsr_unfit): a new flow it opens to a
				   * remote backend takes SNAT */
};

/* Reports a north-south decision to `kpr monitor` (lb_monitor.h): @ids is
 * svc_id | backend_id << 32, @what verdict | reason << 8 | hook << 16.
 * Not inlined, and packed so: the programs' stack is short, and this
 * subprogram must fit in what is left (a few bytes). */
static __noinline __attribute__((unused)) void np_emit(const struct pkt4 *p, __u64 ids,
							__u32 what)
{
	struct lb_event *ev = lb_monitor_reserve();

	if (!ev)
		return;
	ev->netns_cookie = 0;
	ev->cgroup_id = 0;
	lb_addr_set_v4(ev->client, p->saddr);
	lb_addr_set_v4(ev->frontend, p->daddr);
	ev->client_port = p->sport;
	ev->frontend_port = p->dport;
	ev->svc_id = (__u32)ids;
	ev->backend_id = ids >> 32;
	ev->pid = 0;
	ev->verdict = what & 0xff;
	ev->reason = (what >> 8) & 0xff;
	ev->hook = (what >> 16) & 0xff;
	ev->proto = p->proto;
	ev->pad = 0;
	bpf_ringbuf_submit(ev, 0);
}

/* The frame's length, for the byte counters: each program object says
 * how its context tells it (NP_FRAME_LEN, defined before this header). */
#ifndef NP_FRAME_LEN
#error "define NP_FRAME_LEN(ctx) before including lb_nodeport.h"
#endif

/* Counts a forwarded packet for its frontend and backend (lb_verdict.h).
 * Not inlined: the programs' stack is short. */
static __noinline __attribute__((unused)) void np_count_packet(void *ctx, __u32 svc_id,
								__u32 backend_id, __u32 dir)
{
	lb_count_packet(svc_id, backend_id, dir, NP_FRAME_LEN(ctx));
}

/* Counts the new-flow decision @verdict for frontend @svc_id
 * (lb_verdict.h; a conntrack hit is no decision) and reports it to `kpr
 * monitor`. @v is what the hook does with @p: a packet XDP
 * (NP_O_NEED_NEIGH) passes on is decided again by tc, and counted there
 * only. */
static __always_inline void np_report(const struct pkt4 *p, __u32 svc_id, __u32 backend_id,
				      __u32 verdict, __u32 reason, int v, __u32 opts)
{
	__u32 hook = (opts & NP_O_NEED_NEIGH) ? LB_HOOK_XDP : LB_HOOK_TC;

	if ((opts & NP_O_NEED_NEIGH) && v != NP_V_FWD && v != NP_V_DROP)
		return;
	if (reason != LB_R_CONNTRACK)
		lb_count_np(svc_id, verdict);
	np_emit(p, svc_id | (__u64)backend_id << 32, verdict | reason << 8 | hook << 16);
}

/* NP_O_NO_DSR when @p may open a DSR flow but could not be sent through
 * the tunnel: DF clear (a first fragment, or a sender that does not do
 * path MTU discovery) and too big for the device it came in on once the
 * outer header is added. An ICMP fragmentation-needed may not answer a
 * packet without DF, and a tc program cannot fragment, so such a flow is
 * SNATed instead of dropped; its replies come back through this node.
 * (XDP hands packets without DF of a DSR protocol to tc.) */
static __always_inline __u32 np_dsr_unfit(struct __sk_buff *skb, const struct pkt4 *p)
{
	__u32 mtu = 0;

	if (p->df || !dsr_for_proto(p->proto))
		return 0;
	return bpf_check_mtu(skb, 0, &mtu, IPIP_HLEN, 0) == BPF_MTU_CHK_RET_SUCCESS ? 0 : NP_O_NO_DSR;
}

/* Routes @fwd's destination; returns the verdict for a lookup result. */
static __always_inline int np_route(void *ctx, __u32 ifindex, const struct pkt4 *p,
				    struct np_fwd *fwd, __u32 fib_flags, __u32 opts)
{
	fwd->fib_rc = fib_lookup4(ctx, ifindex, &fwd->fib, p->proto, fwd->saddr,
				  fwd->daddr, fib_flags);
	if (fwd->fib_rc == BPF_FIB_LKUP_RET_SUCCESS)
		return NP_V_FWD;
	if (fwd->fib_rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return (opts & NP_O_NEED_NEIGH) ? NP_V_PASS : NP_V_FWD;
	np_count(NP_STAT_FIB_FAIL);
	return NP_V_DROP;
}

/* A packet of a tracked flow: rewrite as @e says. */
static __always_inline int np_tracked(void *ctx, __u32 ifindex, const struct pkt4 *p,
				      const struct ct_entry *e, struct np_fwd *fwd, __u32 opts)
{
	fwd->saddr = e->nat_saddr[3];
	fwd->daddr = e->nat_daddr[3];
	fwd->sport = e->nat_sport;
	fwd->dport = e->nat_dport;
	fwd->encap = !!(e->flags & CT_F_DSR_ENCAP);
	return np_route(ctx, ifindex, p, fwd, 0, opts);
}

/* np_tracked() for the flow (@key, @e) a packet belongs to; when it is
 * forwarded, the flow learns @add_flags and lives on from @now. */
static __always_inline int np_follow(void *ctx, __u32 ifindex, const struct pkt4 *p,
				     const struct ct_key *key, struct ct_entry *e,
				     __u16 add_flags, __u64 now, struct np_fwd *fwd, __u32 opts)
{
	int v = np_tracked(ctx, ifindex, p, e, fwd, opts);

	if (v == NP_V_FWD)
		ct_touch(key, e, add_flags, now);
	return v;
}

/* Whether @p must be dropped rather than forwarded: its TTL would run
 * out on the way (counted). */
static __always_inline int np_ttl_exceeded(const struct pkt4 *p)
{
	if (p->ttl > 1)
		return 0;
	np_count(NP_STAT_TTL);
	return 1;
}

/* A new DSR flow (routed by np_open_flow): one ORIG entry saying where
 * to encapsulate the client's packets to. */
static __always_inline int np_open_dsr(const struct pkt4 *p, const struct lb_backend *backend,
				       __u32 backend_id, __u32 svc_id,
				       const struct ct_key *okey, struct np_fwd *fwd, __u64 now)
{
	struct ct_entry oval = {};
	__u16 flags = CT_F_DSR_ENCAP;

	flags |= pkt_orig_flags(p, flags);
	fwd->saddr = fwd->fib.ipv4_src;
	fwd->sport = p->sport;
	fwd->encap = 1;
	lb_addr_set_v4(oval.nat_saddr, fwd->saddr);
	oval.nat_sport = p->sport;
	lb_addr_set_v4(oval.nat_daddr, fwd->daddr);
	oval.nat_dport = backend->port;
	oval.backend_id = backend_id;
	oval.svc_id = svc_id;
	oval.flags = flags;
	oval.created_ns = now;
	oval.expires_ns = now + ct_lifetime_ns(p->proto, flags);
	if (bpf_map_update_elem(&kpr_ct_v1, okey, &oval, BPF_ANY) != 0) {
		np_count(NP_STAT_CT_FAIL);
		return NP_V_DROP;
	}
	np_count(NP_STAT_FLOW_NEW);
	np_count(NP_STAT_FLOW_DSR);
	return NP_V_FWD;
}

/* A new flow from @p to @backend (id @backend_id) of frontend @svc_id:
 * route to it and write the flow's conntrack entries: a local backend's
 * pair, a SNATed pair, or one DSR entry. @add_flags go to both entries. */
static __always_inline int np_open_flow(void *ctx, __u32 ifindex, const struct pkt4 *p,
					const struct lb_backend *backend, __u32 backend_id,
					__u32 svc_id, const struct ct_key *okey,
					struct np_fwd *fwd, __u32 opts, __u16 add_flags)
{
	struct ct_entry oval = {}, rval = {};
	struct ct_key rkey = {};
	__u64 now = bpf_ktime_get_ns();
	__u16 flags;
	int snat, v;

	snat = !(backend->flags & BE_F_LOCAL);
	fwd->saddr = p->saddr;
	fwd->daddr = backend->addr[3];
	fwd->dport = backend->port;
	fwd->encap = 0;
	v = np_route(ctx, ifindex, p, fwd, snat ? BPF_FIB_LOOKUP_SRC : 0, opts);
	if (v != NP_V_FWD)
		return v;
	if (snat && dsr_for_proto(p->proto) && !(opts & NP_O_NO_DSR))
		return np_open_dsr(p, backend, backend_id, svc_id, okey, fwd, now);
	if (snat)
		fwd->saddr = fwd->fib.ipv4_src;

	flags = pkt_ct_flags(p, CT_DIR_ORIG) | add_flags;
	oval.backend_id = rval.backend_id = backend_id;
	oval.svc_id = rval.svc_id = svc_id;
	oval.created_ns = rval.created_ns = now;
	oval.expires_ns = rval.expires_ns = now + ct_lifetime_ns(p->proto, flags);

	/* REPLY: backend:bport -> snat:sport, back to frontend -> client. */
	lb_addr_set_v4(rkey.saddr, fwd->daddr);
	rkey.sport = fwd->dport;
	rkey.proto = p->proto;
	rkey.dir = CT_DIR_REPLY;
	lb_addr_set_v4(rval.nat_saddr, p->daddr);
	rval.nat_sport = p->dport;
	lb_addr_set_v4(rval.nat_daddr, p->saddr);
	rval.nat_dport = p->sport;
	if (!snat) {
		/* A local backend sees the client itself. Its reply tuple is
		 * taken when the client uses one source port toward two
		 * frontends of this backend (two NodePort addresses, a NodePort
		 * and a DSR flow from another node): a closing or stale holder
		 * gives way; a live one keeps it, and the new flow gets another
		 * source port, the client address kept, as netfilter's NAT does
		 * to keep tuples unique. Egress puts the client's port back.
		 * (SNAT to a node address would not do: the reply would come
		 * back on the pod's interface, where no kpr program sees it.) */
		lb_addr_set_v4(rkey.daddr, p->saddr);
		rkey.dport = p->sport;
		rval.flags = oval.flags = flags;
		if (bpf_map_update_elem(&kpr_ct_v1, &rkey, &rval, BPF_NOEXIST) != 0) {
			struct ct_entry *held = bpf_map_lookup_elem(&kpr_ct_v1, &rkey);

			if (held && !ct_expired(held, now) && !(held->flags & CT_F_CLOSING)) {
				if (snat_insert_reply(&rkey, &rval, p->sport, now) < 0) {
					np_count(NP_STAT_SNAT_EXHAUSTED);
					return NP_V_DROP;
				}
				np_count(NP_STAT_PORT_REMAP);
			} else {
				if (held)
					ct_delete_pair(&rkey, held);
				if (bpf_map_update_elem(&kpr_ct_v1, &rkey, &rval, BPF_ANY) != 0) {
					np_count(NP_STAT_CT_FAIL);
					return NP_V_DROP;
				}
			}
		}
	}
	if (snat) {
		flags |= CT_F_SNAT;
		rval.flags = oval.flags = flags;
		lb_addr_set_v4(rkey.daddr, fwd->saddr);
		if (snat_insert_reply(&rkey, &rval, p->sport, now) < 0) {
			np_count(NP_STAT_SNAT_EXHAUSTED);
			return NP_V_DROP;
		}
	}
	fwd->sport = rkey.dport;

	/* ORIG: client:cport -> frontend, on to snat:sport -> backend:bport. */
	lb_addr_set_v4(oval.nat_saddr, fwd->saddr);
	oval.nat_sport = fwd->sport;
	lb_addr_set_v4(oval.nat_daddr, fwd->daddr);
	oval.nat_dport = fwd->dport;
	if (bpf_map_update_elem(&kpr_ct_v1, okey, &oval, BPF_ANY) != 0) {
		bpf_map_delete_elem(&kpr_ct_v1, &rkey);
		np_count(NP_STAT_CT_FAIL);
		return NP_V_DROP;
	}
	np_count(NP_STAT_FLOW_NEW);
	if (snat)
		np_count(NP_STAT_FLOW_SNAT);
	return NP_V_FWD;
}

/* Whether the ICMP error of a reject may be sent for @p: not to a source
 * that is no single host (RFC 1122 3.2.2), nor for a TCP RST (the peer
 * already gave up). Such packets are dropped instead. */
static __always_inline int np_can_reject(const struct pkt4 *p)
{
	__u32 src = bpf_ntohl(p->saddr);

	if (src == 0 || src == 0xffffffff || (src >> 28) == 0xe || (src >> 24) == 0x7f)
		return 0;
	return !(p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_RST));
}

/* A new flow to a frontend that has no backend to pick. kube-proxy rejects
 * when the Service has no endpoint at all and drops when only a Local
 * external policy leaves this node without one (the endpoints elsewhere
 * are the load balancer's to find, through the health check node port);
 * the frontend's Internal-scope entry holds the cluster-wide set, so its
 * count tells the two apart. A frontend whose pick failed although it has
 * backends (a slot changing under the reconciler) is dropped as well. */
static __always_inline int np_no_backend(struct lb_svc_key *skey,
					 const struct lb_svc_val *master,
					 const struct pkt4 *p, __u32 opts)
{
	struct lb_svc_val *cluster;
	int local = 0;

	if (master->count == 0 && (master->flags & SVC_F_ETP_LOCAL)) {
		skey->scope = LB_SCOPE_INT;
		cluster = lb_lookup_master(skey);
		skey->scope = LB_SCOPE_EXT;
		local = cluster && cluster->count != 0;
	}
	if (!no_backend_reject || master->count != 0 || local || !np_can_reject(p))
		goto drop;
	np_report(p, master->svc_id, 0, LB_V_NO_BACKEND, LB_R_NONE, NP_V_REJECT, opts);
	return NP_V_REJECT;
drop:
	np_report(p, master->svc_id, 0, local ? LB_V_LOCAL_POLICY : LB_V_NO_BACKEND, LB_R_NONE,
		  NP_V_DROP, opts);
	np_count(NP_STAT_NO_BACKEND);
	return NP_V_DROP;
}

/* A new flow from @p to the frontend of @skey/@master: pick a backend
 * (session affinity, the frontend's Maglev table or at random), answer as
 * --service-no-backend-response says when there is none, else open the
 * flow to it (local, SNAT or DSR). */
static __always_inline int np_new_flow(void *ctx, __u32 ifindex, const struct pkt4 *p,
				       struct lb_svc_key *skey, const struct lb_svc_val *master,
				       const struct ct_key *okey, struct np_fwd *fwd, __u32 opts)
{
	struct lb_backend *backend;
	/* Affinity clients are netns cookies on the socket path; a set top
	 * bit keeps client addresses apart from them. */
	__u64 client = (1ULL << 63) | bpf_ntohl(p->saddr);
	__u32 backend_id;
	int v;

	backend = lb_select_backend_hashed(skey, master, client,
					   lb_flow_hash4(p->saddr, p->sport, p->dport, p->proto),
					   &backend_id);
	if (!backend)
		return np_no_backend(skey, master, p, opts);
	if (!lb_addr_is_v4(backend->addr)) {
		np_report(p, master->svc_id, 0, LB_V_NO_BACKEND, LB_R_NONE, NP_V_DROP, opts);
		np_count(NP_STAT_NO_BACKEND);
		return NP_V_DROP;
	}
	v = np_open_flow(ctx, ifindex, p, backend, backend_id, master->svc_id, okey, fwd,
			 opts, 0);
	np_report(p, master->svc_id, backend_id,
		  v == NP_V_DROP ? LB_V_FLOW_FAILED : LB_V_TRANSLATED,
		  (master->flags & SVC_F_AFFINITY) ? LB_R_AFFINITY :
		  (master->flags & SVC_F_MAGLEV)   ? LB_R_MAGLEV : LB_R_RANDOM, v, opts);
	if (v == NP_V_FWD)
		np_count_packet(ctx, master->svc_id, backend_id, LB_DIR_ORIG);
	return v;
}

/* A TCP SYN to no frontend may open the very tuple a local backend's reply
 * entry waits on: the client reused a source port of a translated flow to
 * reach the backend directly. Left alone, the backend's replies would get
 * the frontend as source at egress and the client would never see its
 * SYN-ACK; the client's SYN is the fresher truth, so the translated flow's
 * entries go. (UDP has no such marker; that case stays ambiguous, as it is
 * for netfilter.) One lookup per SYN that is not for a frontend. */
static __always_inline void np_direct_syn(const struct pkt4 *p)
{
	struct ct_entry *e;
	struct ct_key key;

	__builtin_memset(&key, 0, sizeof(key));
	lb_addr_set_v4(key.saddr, p->daddr);
	lb_addr_set_v4(key.daddr, p->saddr);
	key.sport = p->dport;
	key.dport = p->sport;
	key.proto = p->proto;
	key.dir = CT_DIR_REPLY;
	e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
	if (e && !(e->flags & CT_F_SNAT))
		ct_delete_pair(&key, e);
}

/* The frontend for a packet to an address of this node that is not one of
 * the node IPs the translation knows (another interface's address): the
 * node's NodePort on p->dport, as on a node IP, like kube-proxy's
 * "--dst-type LOCAL" and Cilium's 0.0.0.0:nodePort frontend. The
 * 127.0.0.1 NodePort frontend (programmed for every NodePort, with the
 * same backends, flags and Maglev table as the node IPs' ones) stands in
 * for the wildcard, as bind protection already uses it: no new frontends,
 * no new map. Cheap for traffic that is not a NodePort: one hash lookup;
 * only when the port is a NodePort does a FIB lookup (as if routed from
 * @ifindex) tell whether the destination is local (not forwarded). The
 * kernel's own table is the truth for "local", also for addresses added
 * later, without the agent mirroring them. @skey is left on the 127.0.0.1
 * frontend (the backends' key); the flow's conntrack keeps p->daddr, so
 * replies carry the address the client used. NULL when not served. */
static __always_inline struct lb_svc_val *np_wildcard_lookup(void *ctx, __u32 ifindex,
							     const struct pkt4 *p,
							     struct lb_svc_key *skey, __u32 opts)
{
	__u32 d = bpf_ntohl(p->daddr);
	struct bpf_fib_lookup fib;
	struct lb_svc_val *master;

	/* 0/8, loopback (127.0.0.1 itself was the exact lookup), multicast
	 * and limited broadcast are never a node's unicast address. */
	if ((d >> 24) == 0 || (d >> 24) == 0x7f || (d >> 28) >= 0xe || (opts & NP_O_L2_GROUP))
		return NULL;
	lb_addr_set_v4(skey->addr, bpf_htonl(0x7f000001));
	master = lb_lookup_master(skey);
	if (!master || !(master->flags & SVC_F_NODE_PORT))
		return NULL;
	/* NOT_FWDED: a local route (or a broadcast one, which the L2 check
	 * above mostly leaves out), not a unicast one. A node
	 * that does not forward on @ifindex (FWD_DISABLED) is not served
	 * here: it could not reach remote backends either. */
	if (fib_lookup4(ctx, ifindex, &fib, p->proto, p->saddr, p->daddr, 0) !=
	    BPF_FIB_LKUP_RET_NOT_FWDED)
		return NULL;
	return master;
}

/* A packet that no frontend matches, to a ClusterIP (on a port or
 * protocol its Service does not define): answered as a new flow to a
 * frontend without backend is (--service-no-backend-response; counted the
 * same), as kube-proxy rejects traffic to invalid ports of ClusterIPs.
 * NP_V_PASS when the destination is no ClusterIP. */
static __always_inline int np_invalid_port(const struct pkt4 *p)
{
	struct lb_svc_key key = {};

	lb_addr_set_v4(key.addr, p->daddr);
	if (!lb_port_rejected(&key))
		return NP_V_PASS;
	if (!no_backend_reject || p->frag == PKT_FRAG_LATER || !np_can_reject(p)) {
		np_count(NP_STAT_NO_BACKEND);
		return NP_V_DROP;
	}
	return NP_V_REJECT;
}

/* The decision for a packet that entered on @ifindex: a SNATed flow's
 * reply, a packet to a frontend (tracked or new), or not ours. On NP_V_FWD
 * the packet is to be rewritten as @fwd says, its TTL decremented, and
 * sent out of fwd->fib.ifindex. */
static __always_inline int np_ingress(void *ctx, __u32 ifindex, const struct pkt4 *p,
				      struct np_fwd *fwd, __u32 opts)
{
	struct lb_svc_key skey = {};
	struct lb_svc_val *master;
	struct lb_backend *backend;
	struct ct_entry *e;
	struct ct_key key;
	__u16 dport;
	__u64 now;
	int v;

	/* A remote backend's reply to a SNATed flow. */
	dport = bpf_ntohs(p->dport);
	if (dport >= snat_port_min && dport <= snat_port_max) {
		ct_key4(&key, p, CT_DIR_REPLY);
		e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
		if (e && (e->flags & CT_F_SNAT)) {
			now = bpf_ktime_get_ns();
			if (!ct_expired(e, now)) {
				if (np_ttl_exceeded(p))
					return NP_V_DROP;
				v = np_follow(ctx, ifindex, p, &key, e, pkt_ct_flags(p, CT_DIR_REPLY),
					      now, fwd, opts);
				if (v == NP_V_FWD) {
					np_count(NP_STAT_REPLY);
					np_count_packet(ctx, e->svc_id, e->backend_id, LB_DIR_REPLY);
				}
				return v;
			}
		}
	}

	lb_addr_set_v4(skey.addr, p->daddr);
	skey.port = p->dport;
	skey.proto = p->proto;
	skey.scope = LB_SCOPE_EXT;
	master = lb_lookup_master(&skey);
	if (!master)
		master = np_wildcard_lookup(ctx, ifindex, p, &skey, opts);
	if (!master && (v = np_invalid_port(p)) != NP_V_PASS) {
		np_report(p, 0, 0, LB_V_INVALID_PORT, LB_R_NONE, v, opts);
		return v;
	}
	if (!master || !(master->flags & NP_SVC_TYPES)) {
		if (is_tcp_syn(p))
			np_direct_syn(p);
		return NP_V_PASS;
	}
	if (np_ttl_exceeded(p))
		return NP_V_DROP;

	ct_key4(&key, p, CT_DIR_ORIG);
	e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
	if (e) {
		now = bpf_ktime_get_ns();
		backend = lb_lookup_backend(e->backend_id);
		/* Kept unless stale, its backend is gone (or the id now names
		 * another), or a SYN reopens a closing flow's tuple. */
		if (!ct_expired(e, now) && backend &&
		    backend->addr[3] == e->nat_daddr[3] && backend->port == e->nat_dport &&
		    !(is_tcp_syn(p) && (e->flags & CT_F_CLOSING))) {
			v = np_follow(ctx, ifindex, p, &key, e, pkt_orig_flags(p, e->flags), now,
				      fwd, opts);
			if (v == NP_V_FWD) {
				np_count(NP_STAT_FWD);
				np_count_packet(ctx, e->svc_id, e->backend_id, LB_DIR_ORIG);
				np_report(p, e->svc_id, e->backend_id, LB_V_TRANSLATED,
					  LB_R_CONNTRACK, v, opts);
			}
			return v;
		}
		ct_delete_pair(&key, e);
	}
	/* A later fragment opens no flow: its first fragment did, or was
	 * refused (no L4 header to pick a backend by, nothing to answer). */
	if (p->frag == PKT_FRAG_LATER) {
		np_count(NP_STAT_FRAG_UNKNOWN);
		return NP_V_DROP;
	}
	/* loadBalancerSourceRanges hold for new flows only, as kube-proxy's
	 * firewall does for connections conntrack already knows. */
	if (master->flags & SVC_F_SRC_RANGE) {
		__be32 saddr[4];

		lb_addr_set_v4(saddr, p->saddr);
		if (!lb_src_allowed(master, saddr)) {
			np_report(p, master->svc_id, 0, LB_V_SOURCE_RANGE, LB_R_NONE, NP_V_DROP,
				  opts);
			np_count(NP_STAT_SRC_RANGE);
			return NP_V_DROP;
		}
	}
	v = np_new_flow(ctx, ifindex, p, &skey, master, &key, fwd, opts);
	if (v == NP_V_FWD)
		np_count(NP_STAT_FWD);
	return v;
}

/* The decision for a packet another node encapsulated for DSR (inner
 * packet @p, outer destination @backend_addr): the local backend it is
 * for, tracked like any local backend's flow (CT_F_DSR_DECAP), so that
 * the reply gets the frontend as source at egress. NP_V_PASS when no
 * local backend of a frontend matches: the packet is not ours (or its
 * backend is not programmed here yet) and goes on unchanged. On NP_V_FWD
 * the caller removes the outer header, then rewrites as for np_ingress(). */
static __always_inline int np_dsr_ingress(void *ctx, __u32 ifindex, const struct pkt4 *p,
					  __be32 backend_addr, struct np_fwd *fwd, __u32 opts)
{
	struct lb_backend *backend;
	struct ct_entry *e;
	struct ct_key key;
	__u32 backend_id;
	__u64 now;
	int v;

	backend_id = dsr_lookup(p->daddr, p->dport, p->proto, backend_addr);
	backend = lb_lookup_backend(backend_id);
	if (!backend || !(backend->flags & BE_F_LOCAL) || !lb_addr_is_v4(backend->addr) ||
	    backend->addr[3] != backend_addr || backend->proto != p->proto) {
		if (!(opts & NP_O_TC_FOLLOWS))
			np_count(NP_STAT_DSR_MISS);
		return NP_V_PASS;
	}
	if (np_ttl_exceeded(p))
		return NP_V_DROP;
	ct_key4(&key, p, CT_DIR_ORIG);
	e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
	if (e) {
		now = bpf_ktime_get_ns();
		/* Kept while it leads to the backend the other node chose. */
		if (!ct_expired(e, now) && !(e->flags & (CT_F_SNAT | CT_F_DSR_ENCAP)) &&
		    e->nat_daddr[3] == backend_addr && e->nat_dport == backend->port &&
		    !(is_tcp_syn(p) && (e->flags & CT_F_CLOSING))) {
			v = np_follow(ctx, ifindex, p, &key, e, pkt_ct_flags(p, CT_DIR_ORIG), now,
				      fwd, opts);
			if (v == NP_V_FWD) {
				np_count(NP_STAT_FWD);
				np_count(NP_STAT_DSR_DECAP);
				np_count_packet(ctx, 0, backend_id, LB_DIR_ORIG);
			}
			return v;
		}
		ct_delete_pair(&key, e);
	}
	if (p->frag == PKT_FRAG_LATER) {
		np_count(NP_STAT_FRAG_UNKNOWN);
		return NP_V_DROP;
	}
	/* The frontend is another node's (its id is not known here): 0. */
	v = np_open_flow(ctx, ifindex, p, backend, backend_id, 0, &key, fwd, opts,
			 CT_F_DSR_DECAP);
	if (v == NP_V_FWD) {
		np_count(NP_STAT_FWD);
		np_count(NP_STAT_DSR_DECAP);
		np_count_packet(ctx, 0, backend_id, LB_DIR_ORIG);
	}
	return v;
}

#endif /* KPR_LB_NODEPORT_H */
