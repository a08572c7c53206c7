/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The north-south decision for IPv6, shared by the tc programs
 * (lb_nodeport6_tc.h) and the XDP program (lb_nodeport6_xdp.h): the
 * counterpart of lb_nodeport.h's np_ingress() for a packet whose
 * addresses are IPv6, on the same maps.
 *
 * Nothing new is stored: the services, backends, source-range and Maglev
 * maps already hold IPv6 frontends and backends (16-byte addresses, for
 * the socket hooks), and the conntrack map's keys and entries are 16-byte
 * too, so an IPv6 flow is one more pair in kpr_ct_v1 with the same pair
 * discipline, lifetimes, GC and `kpr ct list`. The frontend map is keyed
 * by the address itself (IPv6 frontends are not IPv4-mapped), so a packet
 * of one family never matches a frontend of the other.
 *
 * Served like IPv4: NodePort on the node's IPv6 node IPs, LoadBalancer
 * ingress and externalIP frontends; a local backend sees the client (so
 * externalTrafficPolicy Local keeps it); a remote one is reached with SNAT
 * to the node's own IPv6 address toward it (the FIB's source) and a port
 * of the SNAT range; loadBalancerSourceRanges and Maglev as IPv4's.
 *
 * Not (yet) served over IPv6: DSR (--nodeport-mode dsr|hybrid SNATs IPv6
 * flows, whose replies then come back through this node: correct, not
 * direct), the wildcard NodePort on node addresses that are no node IP,
 * and fragments (left to the stack). ICMPv6 errors about translated flows
 * are lb_icmp_err6.h's.
 */
#ifndef KPR_LB_NODEPORT6_H
#define KPR_LB_NODEPORT6_H

#include "lb_nodeport.h"
#include "lb_nat6.h"

/* How to rewrite and where to send an IPv6 packet (NP_V_FWD). */
struct np_fwd6 {
	__be32 saddr[4];             /* new source address */
	__be32 daddr[4];             /* new destination address */
	__be16 sport;                /* new source port */
	__be16 dport;                /* new destination port */
	__u32  ifindex;              /* in: the device the packet came in on */
	__u32  opts;                 /* in: enum np_opts of the caller */
	long   fib_rc;               /* BPF_FIB_LKUP_RET_SUCCESS or _NO_NEIGH */
	struct bpf_fib_lookup fib;   /* egress ifindex, MACs / next hop */
};

/* What the IPv6 half keeps of the packet at hand outside the stack: its
 * 16-byte addresses make the frames too big for the 512-byte stack (its
 * call chain's frames add up). */
struct np6_scratch {
	struct np_fwd6 fwd;   /* the verdict's rewrite and route */
	struct ct_key rkey;   /* a new flow's REPLY key */
	struct ct_entry val;  /* a new flow's entry, REPLY then ORIG */
};

/* One struct np6_scratch per CPU (a program runs to its end on its CPU).
 * Not pinned: scratch space of each loaded object, never read by the
 * agent. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct np6_scratch);
	__uint(max_entries, 1);
} kpr_np6_scratch SEC(".maps");

/* This CPU's struct np6_scratch; NULL never happens for index 0 but the
 * verifier wants it checked. */
static __always_inline struct np6_scratch *np6_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&kpr_np6_scratch, &zero);
}

/* The packet's struct np_fwd6, in this CPU's scratch. */
static __always_inline struct np_fwd6 *np6_fwd_scratch(void)
{
	struct np6_scratch *s = np6_scratch();

	return s ? &s->fwd : NULL;
}

static __always_inline void ct_key6(struct ct_key *key, const struct pkt6 *p, __u8 dir)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->saddr, p->saddr, sizeof(key->saddr));
	__builtin_memcpy(key->daddr, p->daddr, sizeof(key->daddr));
	key->sport = p->sport;
	key->dport = p->dport;
	key->proto = p->proto;
	key->dir = dir;
}

/* pkt_ct_flags() for an IPv6 packet. */
static __always_inline __u16 pkt6_ct_flags(const struct pkt6 *p, __u8 dir)
{
	return ct_flags_of(p->tcp_flags, dir);
}

static __always_inline int is_tcp_syn6(const struct pkt6 *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* The hash of a flow from @saddr:@sport to a frontend's @dport/@proto,
 * as lb_flow_hash4() (the same on every node, for Maglev). */
static __always_inline __u32 lb_flow_hash6(const __be32 saddr[4], __be16 sport, __be16 dport,
					   __u8 proto)
{
	__u32 h = lb_jhash_3words(bpf_ntohl(saddr[0]), bpf_ntohl(saddr[1]), bpf_ntohl(saddr[2]),
				  maglev_hash_seed);

	return lb_jhash_3words(h ^ bpf_ntohl(saddr[3]),
			       ((__u32)bpf_ntohs(sport) << 16) | bpf_ntohs(dport), proto,
			       maglev_hash_seed);
}

/* Whether @p must be dropped rather than forwarded: its hop limit would
 * run out on the way (counted as TTL). */
static __always_inline int np6_hop_exceeded(const struct pkt6 *p)
{
	if (p->hop_limit > 1)
		return 0;
	np_count(NP_STAT_TTL);
	return 1;
}

/* Routes @fwd's destination; returns the verdict for a lookup result. */
static __always_inline int np6_route(void *ctx, __u32 ifindex, const struct pkt6 *p,
				     struct np_fwd6 *fwd, __u32 fib_flags, __u32 opts)
{
	fwd->fib_rc = fib_lookup6(ctx, ifindex, &fwd->fib, p->proto, fwd->saddr, fwd->daddr,
				  fib_flags);
	if (fwd->fib_rc == BPF_FIB_LKUP_RET_SUCCESS)
		return NP_V_FWD;
	if (fwd->fib_rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return (opts & NP_O_NEED_NEIGH) ? NP_V_PASS : NP_V_FWD;
	np_count(NP_STAT_FIB_FAIL);
	return NP_V_DROP;
}

/* A packet of the tracked flow (@key, @e): rewrite as @e says; when it is
 * forwarded, the flow learns @add_flags and lives on from @now. */
static __always_inline int np6_follow(void *ctx, __u32 ifindex, const struct pkt6 *p,
				      const struct ct_key *key, struct ct_entry *e,
				      __u16 add_flags, __u64 now, struct np_fwd6 *fwd, __u32 opts)
{
	int v;

	__builtin_memcpy(fwd->saddr, e->nat_saddr, sizeof(fwd->saddr));
	__builtin_memcpy(fwd->daddr, e->nat_daddr, sizeof(fwd->daddr));
	fwd->sport = e->nat_sport;
	fwd->dport = e->nat_dport;
	v = np6_route(ctx, ifindex, p, fwd, 0, opts);
	if (v == NP_V_FWD)
		ct_touch(key, e, add_flags, now);
	return v;
}

/* A new flow from @p to @backend (id @backend_id) of frontend @svc_id:
 * route to it and write the flow's pair, as np_open_flow() does for a
 * local backend (the client kept) or a remote one (SNAT). */
static __always_inline int np6_open_flow(void *ctx, __u32 ifindex, const struct pkt6 *p,
					 const struct lb_backend *backend, __u32 backend_id,
					 __u32 svc_id, const struct ct_key *okey,
					 struct np_fwd6 *fwd, __u32 opts)
{
	/* One entry, written as the REPLY one, then rewritten into the ORIG
	 * one; it and the REPLY key live in the scratch (np6_scratch). */
	struct np6_scratch *s = np6_scratch();
	struct ct_entry *val;
	struct ct_key *rkey;
	__u64 now = bpf_ktime_get_ns();
	__u16 flags;
	int snat, v;

	if (!s)
		return NP_V_DROP;
	val = &s->val;
	rkey = &s->rkey;
	__builtin_memset(val, 0, sizeof(*val));
	__builtin_memset(rkey, 0, sizeof(*rkey));

	snat = !(backend->flags & BE_F_LOCAL);
	__builtin_memcpy(fwd->saddr, p->saddr, sizeof(fwd->saddr));
	__builtin_memcpy(fwd->daddr, backend->addr, sizeof(fwd->daddr));
	fwd->dport = backend->port;
	v = np6_route(ctx, ifindex, p, fwd, snat ? BPF_FIB_LOOKUP_SRC : 0, opts);
	if (v != NP_V_FWD)
		return v;
	if (snat)
		__builtin_memcpy(fwd->saddr, fwd->fib.ipv6_src, sizeof(fwd->saddr));

	flags = pkt6_ct_flags(p, CT_DIR_ORIG) | (snat ? CT_F_SNAT : 0);
	val->backend_id = backend_id;
	val->svc_id = svc_id;
	val->created_ns = now;
	val->expires_ns = now + ct_lifetime_ns(p->proto, flags);
	val->flags = flags;

	/* REPLY: backend:bport -> snat:sport (or the client), back to
	 * frontend -> client. */
	__builtin_memcpy(rkey->saddr, fwd->daddr, sizeof(rkey->saddr));
	rkey->sport = fwd->dport;
	rkey->proto = p->proto;
	rkey->dir = CT_DIR_REPLY;
	__builtin_memcpy(val->nat_saddr, p->daddr, sizeof(val->nat_saddr));
	val->nat_sport = p->dport;
	__builtin_memcpy(val->nat_daddr, p->saddr, sizeof(val->nat_daddr));
	val->nat_dport = p->sport;
	__builtin_memcpy(rkey->daddr, fwd->saddr, sizeof(rkey->daddr));
	if (!snat) {
		/* As np_open_flow(): a live holder of the reply tuple keeps it
		 * and the new flow gets another client port; a stale or
		 * closing one gives way. */
		rkey->dport = p->sport;
		if (bpf_map_update_elem(&kpr_ct_v1, rkey, val, BPF_NOEXIST) != 0) {
			struct ct_entry *held = bpf_map_lookup_elem(&kpr_ct_v1, rkey);

			if (held && !ct_expired(held, now) && !(held->flags & CT_F_CLOSING)) {
				if (snat_insert_reply(rkey, val, p->sport, now) < 0) {
					np_count(NP_STAT_SNAT_EXHAUSTED);
					return NP_V_DROP;
				}
				np_count(NP_STAT_PORT_REMAP);
			} else {
				if (held)
					ct_delete_pair(rkey, held);
				if (bpf_map_update_elem(&kpr_ct_v1, rkey, val, BPF_ANY) != 0) {
					np_count(NP_STAT_CT_FAIL);
					return NP_V_DROP;
				}
			}
		}
	} else if (snat_insert_reply(rkey, val, p->sport, now) < 0) {
		np_count(NP_STAT_SNAT_EXHAUSTED);
		return NP_V_DROP;
	}
	fwd->sport = rkey->dport;

	/* ORIG: client:cport -> frontend, on to snat:sport -> backend:bport. */
	__builtin_memcpy(val->nat_saddr, fwd->saddr, sizeof(val->nat_saddr));
	val->nat_sport = fwd->sport;
	__builtin_memcpy(val->nat_daddr, fwd->daddr, sizeof(val->nat_daddr));
	val->nat_dport = fwd->dport;
	if (bpf_map_update_elem(&kpr_ct_v1, okey, val, BPF_ANY) != 0) {
		bpf_map_delete_elem(&kpr_ct_v1, rkey);
		np_count(NP_STAT_CT_FAIL);
		return NP_V_DROP;
	}
	np_count(NP_STAT_FLOW_NEW);
	if (snat)
		np_count(NP_STAT_FLOW_SNAT);
	return NP_V_FWD;
}

/* Whether an ICMPv6 error may answer @p: not to an unspecified, loopback
 * or multicast source (RFC 4443 2.4), nor for a TCP RST. */
static __always_inline int np6_can_reject(const struct pkt6 *p)
{
	if ((bpf_ntohl(p->saddr[0]) >> 24) == 0xff)
		return 0;
	if (p->saddr[0] == 0 && p->saddr[1] == 0 && p->saddr[2] == 0 &&
	    (p->saddr[3] == 0 || p->saddr[3] == bpf_htonl(1)))
		return 0;
	return !(p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_RST));
}

/* np_no_backend() for IPv6: reject when the Service has no endpoint at
 * all, drop when only a Local external policy leaves this node without. */
static __always_inline int np6_no_backend(struct lb_svc_key *skey,
					  const struct lb_svc_val *master, const struct pkt6 *p)
{
	struct lb_svc_val *cluster;

	if (!no_backend_reject || master->count != 0 || !np6_can_reject(p))
		goto drop;
	if (master->flags & SVC_F_ETP_LOCAL) {
		skey->scope = LB_SCOPE_INT;
		cluster = lb_lookup_master(skey);
		skey->scope = LB_SCOPE_EXT;
		if (cluster && cluster->count != 0)
			goto drop;
	}
	return NP_V_REJECT;
drop:
	np_count(NP_STAT_NO_BACKEND);
	return NP_V_DROP;
}

/* A new flow from @p to the frontend of @skey/@master, as np_new_flow();
 * fwd->ifindex and fwd->opts say where it came in and the caller's
 * options. A function of its own (at most five arguments): its stack is
 * not np6_ingress()'s frame. */
static __noinline int np6_new_flow(void *ctx, const struct pkt6 *p, struct lb_svc_key *skey,
				   const struct lb_svc_val *master, struct np_fwd6 *fwd)
{
	__u32 hash = lb_flow_hash6(p->saddr, p->sport, p->dport, p->proto);
	/* The affinity client: a set top bit keeps it apart from the socket
	 * path's netns cookies, bit 62 from IPv4 clients. */
	__u64 client = (3ULL << 62) | lb_jhash_3words(bpf_ntohl(p->saddr[0] ^ p->saddr[1]),
						      bpf_ntohl(p->saddr[2]),
						      bpf_ntohl(p->saddr[3]), 0);
	struct lb_backend *backend;
	struct ct_key okey;
	__u32 backend_id;
	int v;

	backend = lb_select_backend_hashed(skey, master, client, hash, &backend_id);
	if (!backend)
		return np6_no_backend(skey, master, p);
	if (lb_addr_is_v4(backend->addr)) {
		np_count(NP_STAT_NO_BACKEND);
		return NP_V_DROP;
	}
	ct_key6(&okey, p, CT_DIR_ORIG);
	v = np6_open_flow(ctx, fwd->ifindex, p, backend, backend_id, master->svc_id, &okey, fwd,
			  fwd->opts);
	if (v == NP_V_FWD)
		np_count(NP_STAT_FWD);
	return v;
}

/* np_direct_syn() for IPv6: a SYN that is for no frontend, from a client
 * whose source port a translated flow to this same pod still holds, opens
 * a direct connection; the translated flow's entries go, or its reply
 * rule would rewrite the pod's SYN-ACK at egress. @key is the caller's
 * (the XDP program's stack is nearly full). */
static __always_inline void np6_direct_syn(const struct pkt6 *p, struct ct_key *key)
{
	struct ct_entry *e;

	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->saddr, p->daddr, sizeof(key->saddr));
	__builtin_memcpy(key->daddr, p->saddr, sizeof(key->daddr));
	key->sport = p->dport;
	key->dport = p->sport;
	key->proto = p->proto;
	key->dir = CT_DIR_REPLY;
	e = bpf_map_lookup_elem(&kpr_ct_v1, key);
	if (e && !(e->flags & CT_F_SNAT))
		ct_delete_pair(key, e);
}

/* The decision for an IPv6 packet that entered on @ifindex, as
 * np_ingress(): a SNATed flow's reply, a packet to a frontend (tracked or
 * new), or not ours. On NP_V_FWD the packet is to be rewritten as @fwd
 * says, its hop limit decremented, and sent out of fwd->fib.ifindex. */
static __always_inline int np6_ingress(void *ctx, __u32 ifindex, const struct pkt6 *p,
				       struct np_fwd6 *fwd, __u32 opts)
{
	struct lb_svc_key skey = {};
	struct lb_svc_val *master;
	struct lb_backend *backend;
	struct ct_entry *e;
	struct ct_key key;
	__u16 dport;
	__u64 now;
	int v;

	fwd->ifindex = ifindex;
	fwd->opts = opts;
	/* A remote backend's reply to a SNATed flow. */
	dport = bpf_ntohs(p->dport);
	if (dport >= snat_port_min && dport <= snat_port_max) {
		ct_key6(&key, p, CT_DIR_REPLY);
		e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
		if (e && (e->flags & CT_F_SNAT)) {
			now = bpf_ktime_get_ns();
			if (!ct_expired(e, now)) {
				if (np6_hop_exceeded(p))
					return NP_V_DROP;
				v = np6_follow(ctx, ifindex, p, &key, e,
					       pkt6_ct_flags(p, CT_DIR_REPLY), now, fwd, opts);
				if (v == NP_V_FWD)
					np_count(NP_STAT_REPLY);
				return v;
			}
		}
	}

	__builtin_memcpy(skey.addr, p->daddr, sizeof(skey.addr));
	skey.port = p->dport;
	skey.proto = p->proto;
	skey.scope = LB_SCOPE_EXT;
	master = lb_lookup_master(&skey);
	if (!master || !(master->flags & NP_SVC_TYPES)) {
		if (is_tcp_syn6(p))
			np6_direct_syn(p, &key);
		return NP_V_PASS;
	}
	if (np6_hop_exceeded(p))
		return NP_V_DROP;

	ct_key6(&key, p, CT_DIR_ORIG);
	e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
	if (e) {
		now = bpf_ktime_get_ns();
		backend = lb_lookup_backend(e->backend_id);
		/* Kept unless stale, its backend is gone (or the id now names
		 * another), or a SYN reopens a closing flow's tuple. */
		if (!ct_expired(e, now) && backend && ip6_addr_eq(backend->addr, e->nat_daddr) &&
		    backend->port == e->nat_dport &&
		    !(is_tcp_syn6(p) && (e->flags & CT_F_CLOSING))) {
			v = np6_follow(ctx, ifindex, p, &key, e, pkt6_ct_flags(p, CT_DIR_ORIG), now,
				       fwd, opts);
			if (v == NP_V_FWD)
				np_count(NP_STAT_FWD);
			return v;
		}
		ct_delete_pair(&key, e);
	}
	if (!lb_src_allowed(master, p->saddr)) {
		np_count(NP_STAT_SRC_RANGE);
		return NP_V_DROP;
	}
	return np6_new_flow(ctx, p, &skey, master, fwd);
}

#endif /* KPR_LB_NODEPORT6_H */
