// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * North-south load balancing on tc (tcx) for the agent's --devices:
 * NodePort, LoadBalancer and externalIP frontends reached from outside the
 * node, in SNAT mode.
 *
 *   ingress, to a frontend    pick a backend (lb_select.h), track the flow
 *                             (lb_ct.h), DNAT to the backend and, when the
 *                             backend is on another node, SNAT to this
 *                             node's address toward it with a port of the
 *                             SNAT range; forward through the FIB
 *   ingress, to a SNAT port   a remote backend's reply: back to the client
 *                             with the frontend as source; forward
 *   egress                    a local backend's reply (forwarded by the
 *                             stack, not SNATed): frontend as source
 *
 * Packets that are none of these go on untouched (TCX_NEXT), at the price
 * of one hash lookup (two at egress). ClusterIP frontends are not served
 * here: in-cluster clients reach them through the socket hooks.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_types.h"
#include "lb_maps.h"
#include "lb_select.h"
#include "lb_ct.h"
#include "lb_nat.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Not ours: let the next tcx program or the stack have it. */
#define NP_PASS TC_ACT_UNSPEC

/* The SNAT port range, host order; the agent keeps it out of the node's
 * ephemeral port range (net.ipv4.ip_local_port_range). */
const volatile __u16 snat_port_min = 61000;
const volatile __u16 snat_port_max = 65535;

/* How many ports a new SNATed flow tries before it is dropped. */
#define SNAT_TRIES 32

/* Frontend types served on the north-south path. */
#define NP_SVC_TYPES (SVC_F_NODE_PORT | SVC_F_LOADBALANCER | SVC_F_EXTERNAL_IP)

/* counters, enum np_stat */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, NP_STAT_MAX);
} kpr_npstats_v1 SEC(".maps");

static __always_inline void np_count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&kpr_npstats_v1, &stat);

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

/* State a packet tells about its flow. */
static __always_inline __u16 pkt_ct_flags(const struct pkt4 *p, __u8 dir)
{
	__u16 flags = dir == CT_DIR_REPLY ? CT_F_ESTABLISHED : 0;

	if (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		flags |= CT_F_CLOSING;
	return flags;
}

static __always_inline int is_tcp_syn(const struct pkt4 *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* Rewrites a packet of a tracked flow as @e says and forwards it. */
static __always_inline int np_translate_fwd(struct __sk_buff *skb, const struct pkt4 *p,
					    const struct ct_entry *e)
{
	struct bpf_fib_lookup fib;
	__be32 saddr = e->nat_saddr[3], daddr = e->nat_daddr[3];
	long rc;

	if (p->ttl <= 1) {
		np_count(NP_STAT_TTL);
		return TC_ACT_SHOT;
	}
	rc = fib_lookup4(skb, &fib, p, saddr, daddr, 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
		np_count(NP_STAT_FIB_FAIL);
		return TC_ACT_SHOT;
	}
	if (nat_rewrite4(skb, p, saddr, e->nat_sport, daddr, e->nat_dport) < 0 ||
	    ip4_dec_ttl(skb, p->ttl) < 0)
		return TC_ACT_SHOT;
	return fib_redirect(skb, &fib, rc);
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

/* A new flow from @p to the frontend of @skey/@master: pick a backend,
 * write both conntrack entries, translate and forward. */
static __always_inline int np_new_flow(struct __sk_buff *skb, const struct pkt4 *p,
				       struct lb_svc_key *skey, const struct lb_svc_val *master,
				       const struct ct_key *okey)
{
	struct ct_entry oval = {}, rval = {};
	struct bpf_fib_lookup fib;
	struct lb_backend *backend;
	struct ct_key rkey = {};
	__u64 now = bpf_ktime_get_ns();
	/* Affinity clients are netns cookies on the socket path; a set top
	 * bit keeps client addresses apart from them. */
	__u64 client = (1ULL << 63) | bpf_ntohl(p->saddr);
	__be32 baddr, snat_addr;
	__u32 backend_id;
	__u16 flags;
	int snat;
	long rc;

	backend = lb_select_backend(skey, master, client, &backend_id);
	if (!backend || !lb_addr_is_v4(backend->addr)) {
		np_count(NP_STAT_NO_BACKEND);
		return TC_ACT_SHOT;
	}
	if (p->ttl <= 1) {
		np_count(NP_STAT_TTL);
		return TC_ACT_SHOT;
	}
	baddr = backend->addr[3];
	snat = !(backend->flags & BE_F_LOCAL);
	rc = fib_lookup4(skb, &fib, p, p->saddr, baddr, snat ? BPF_FIB_LOOKUP_SRC : 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
		np_count(NP_STAT_FIB_FAIL);
		return TC_ACT_SHOT;
	}
	snat_addr = snat ? fib.ipv4_src : p->saddr;

	flags = pkt_ct_flags(p, CT_DIR_ORIG);
	oval.backend_id = rval.backend_id = backend_id;
	oval.svc_id = rval.svc_id = master->svc_id;
	oval.created_ns = rval.created_ns = now;
	oval.expires_ns = rval.expires_ns = now + ct_lifetime_ns(p->proto, flags);

	/* REPLY: backend:bport -> snat:sport, back to frontend -> client. */
	lb_addr_set_v4(rkey.saddr, baddr);
	rkey.sport = backend->port;
	rkey.proto = p->proto;
	rkey.dir = CT_DIR_REPLY;
	lb_addr_set_v4(rval.nat_saddr, p->daddr);
	rval.nat_sport = p->dport;
	lb_addr_set_v4(rval.nat_daddr, p->saddr);
	rval.nat_dport = p->sport;
	if (!snat) {
		/* A local backend sees the client itself, unless another flow
		 * (the same client port to another frontend of this backend)
		 * holds that reply tuple already: then it is SNATed too. */
		lb_addr_set_v4(rkey.daddr, p->saddr);
		rkey.dport = p->sport;
		rval.flags = oval.flags = flags;
		if (bpf_map_update_elem(&kpr_ct_v1, &rkey, &rval, BPF_NOEXIST) != 0) {
			snat = 1;
			rc = fib_lookup4(skb, &fib, p, p->saddr, baddr, BPF_FIB_LOOKUP_SRC);
			if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
				np_count(NP_STAT_FIB_FAIL);
				return TC_ACT_SHOT;
			}
			snat_addr = fib.ipv4_src;
		}
	}
	if (snat) {
		flags |= CT_F_SNAT;
		rval.flags = oval.flags = flags;
		lb_addr_set_v4(rkey.daddr, snat_addr);
		if (snat_insert_reply(&rkey, &rval, p->sport, now) < 0) {
			np_count(NP_STAT_SNAT_EXHAUSTED);
			return TC_ACT_SHOT;
		}
	}

	/* ORIG: client:cport -> frontend, on to snat:sport -> backend:bport. */
	lb_addr_set_v4(oval.nat_saddr, snat_addr);
	oval.nat_sport = rkey.dport;
	lb_addr_set_v4(oval.nat_daddr, baddr);
	oval.nat_dport = backend->port;
	if (bpf_map_update_elem(&kpr_ct_v1, okey, &oval, BPF_ANY) != 0) {
		bpf_map_delete_elem(&kpr_ct_v1, &rkey);
		np_count(NP_STAT_CT_FAIL);
		return TC_ACT_SHOT;
	}
	np_count(NP_STAT_FLOW_NEW);
	np_count(NP_STAT_FWD);
	if (snat)
		np_count(NP_STAT_FLOW_SNAT);

	if (nat_rewrite4(skb, p, snat_addr, oval.nat_sport, baddr, oval.nat_dport) < 0 ||
	    ip4_dec_ttl(skb, p->ttl) < 0)
		return TC_ACT_SHOT;
	return fib_redirect(skb, &fib, rc);
}

SEC("tcx/ingress")
int kpr_np_ingress(struct __sk_buff *skb)
{
	struct lb_svc_key skey = {};
	struct lb_svc_val *master;
	struct lb_backend *backend;
	struct ct_entry *e;
	struct ct_key key;
	struct pkt4 p;
	__u16 dport;
	__u64 now;

	if (pkt4_parse(skb, &p) < 0)
		return NP_PASS;

	/* A remote backend's reply to a SNATed flow. */
	dport = bpf_ntohs(p.dport);
	if (dport >= snat_port_min && dport <= snat_port_max) {
		ct_key4(&key, &p, CT_DIR_REPLY);
		e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
		if (e && (e->flags & CT_F_SNAT)) {
			now = bpf_ktime_get_ns();
			if (!ct_expired(e, now)) {
				ct_touch(&key, e, pkt_ct_flags(&p, CT_DIR_REPLY), now);
				np_count(NP_STAT_REPLY);
				return np_translate_fwd(skb, &p, e);
			}
		}
	}

	lb_addr_set_v4(skey.addr, p.daddr);
	skey.port = p.dport;
	skey.proto = p.proto;
	skey.scope = LB_SCOPE_EXT;
	master = lb_lookup_master(&skey);
	if (!master || !(master->flags & NP_SVC_TYPES))
		return NP_PASS;

	ct_key4(&key, &p, CT_DIR_ORIG);
	e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
	if (e) {
		now = bpf_ktime_get_ns();
		backend = lb_lookup_backend(e->backend_id);
		/* Kept unless stale, its backend is gone (or the id now names
		 * another), or a SYN reopens a closing flow's tuple. */
		if (!ct_expired(e, now) && backend &&
		    backend->addr[3] == e->nat_daddr[3] && backend->port == e->nat_dport &&
		    !(is_tcp_syn(&p) && (e->flags & CT_F_CLOSING))) {
			ct_touch(&key, e, pkt_ct_flags(&p, CT_DIR_ORIG), now);
			np_count(NP_STAT_FWD);
			return np_translate_fwd(skb, &p, e);
		}
		ct_delete_pair(&key, e);
	}
	return np_new_flow(skb, &p, &skey, master, &key);
}

SEC("tcx/egress")
int kpr_np_egress(struct __sk_buff *skb)
{
	struct ct_entry *e;
	struct ct_key key;
	struct pkt4 p;
	__u64 now;

	if (pkt4_parse(skb, &p) < 0)
		return NP_PASS;
	/* A local backend's reply, forwarded by the stack toward the client:
	 * only the source changes back to the frontend. */
	ct_key4(&key, &p, CT_DIR_REPLY);
	e = bpf_map_lookup_elem(&kpr_ct_v1, &key);
	if (!e || (e->flags & CT_F_SNAT))
		return NP_PASS;
	now = bpf_ktime_get_ns();
	if (ct_expired(e, now))
		return NP_PASS;
	ct_touch(&key, e, pkt_ct_flags(&p, CT_DIR_REPLY), now);
	np_count(NP_STAT_REPLY);
	if (nat_rewrite4(skb, &p, e->nat_saddr[3], e->nat_sport, p.daddr, p.dport) < 0)
		return TC_ACT_SHOT;
	return NP_PASS;
}
