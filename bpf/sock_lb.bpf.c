// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-level load balancing on cgroup v2 hooks: a connect() or sendmsg()
 * to a service frontend is rewritten to one of its backends before any
 * packet exists, so no per-packet NAT and no conntrack entry is needed for
 * traffic that starts on this node. recvmsg() and getpeername() translate
 * back, so applications only ever see the frontend address.
 *
 * Hook entry points are thin: they never fail a syscall except when the
 * destination is a frontend without a usable backend, or a ClusterIP on a
 * port or protocol its Service does not define (its port-reject entry),
 * which fails with ECONNREFUSED at once (what kube-proxy's REJECT rule
 * gives a client),
 * whatever --service-no-backend-response says (it is about what remote
 * clients are told; a local one is better told at once), or one whose
 * loadBalancerSourceRanges refuse the client, which fails with EPERM; and
 * when a socket of the node itself binds the address of a NodePort,
 * LoadBalancer or externalIP frontend (post_bind4/6: EADDRINUSE, as
 * Cilium's bind protection). A pod's unbound socket is judged by those
 * ranges at its first packet instead (cgroup_skb/egress, lb_src_pending.h),
 * which drops what they refuse.
 *
 * NodePorts are frontends on every address of the node, IPv4 and IPv6, for
 * both (lb_hostaddr.h): one more lookup only for destinations that are no
 * frontend.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_types.h"
#include "lb_maps.h"
#include "lb_select.h"
#include "lb_hostaddr.h"
#include "lb_src_pending.h"
#include "lb_verdict.h"
#include "lb_monitor.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define SYS_REJECT 0
#define SYS_PROCEED 1

/* Never read: they put the enums of lb_types.h into BTF, so the generated
 * Rust types carry their values and src/datapath/layout.rs checks its
 * constants against them instead of trusting a hand copy. */
const volatile enum lb_scope kpr_btf_scope = LB_SCOPE_EXT;
const volatile enum lb_svc_flags kpr_btf_svc_flags = SVC_F_CLUSTER_IP;
const volatile enum lb_backend_state kpr_btf_backend_state = BE_STATE_ACTIVE;
const volatile enum lb_backend_flags kpr_btf_backend_flags = BE_F_LOCAL;
const volatile enum np_stat kpr_btf_np_stat = NP_STAT_FLOW_NEW;
const volatile enum ct_dir kpr_btf_ct_dir = CT_DIR_ORIG;
const volatile enum ct_flags kpr_btf_ct_flags = CT_F_SNAT;
const volatile enum sock_stat kpr_btf_sock_stat = SOCK_STAT_SRC_RANGE;
const volatile enum lb_verdict kpr_btf_verdict = LB_V_TRANSLATED;
const volatile enum lb_hook kpr_btf_hook = LB_HOOK_CONNECT;
const volatile enum lb_reason kpr_btf_reason = LB_R_NONE;
const volatile enum lb_monitor_stat kpr_btf_monitor_stat = LB_MON_EMITTED;
/* ...and the ring buffer's record, which no map type names. */
const volatile struct lb_event kpr_btf_event = {};

/* Errno a client gets for a frontend with no usable backend. */
const volatile __u32 no_backend_errno = ECONNREFUSED;
/* bpf_set_retval (5.18+) sets that errno; without it (partial mode on an
 * older kernel) the reject is the kernel's default EPERM. The agent sets
 * this before load; the verifier drops the dead branch. */
const volatile __u8 use_set_retval = 1;
/* Network namespace cookie of the node itself (the agent's namespace):
 * bind protection applies to its sockets only, pods bind what they like in
 * their own namespaces. 0 (never a cookie) protects nothing. */
const volatile __u64 host_netns_cookie = 0;
/* The cgroup_skb/egress program is attached: an unbound socket of another
 * network namespace (a pod's) is judged by loadBalancerSourceRanges at its
 * first packet, by its real source address, instead of by the node's
 * addresses at connect()/sendmsg(). 0 (partial mode on a kernel without
 * it): every unbound socket is taken for the node's. */
const volatile __u8 defer_pod_src_ranges = 1;

enum sock_family { FAM_V4, FAM_V6 };
/* Which hook translates: sendmsg may carry a source address (IP_PKTINFO),
 * a field connect programs may not even read. */
enum sock_op { OP_CONNECT, OP_SENDMSG };

static __always_inline void ctx_get_addr(const struct bpf_sock_addr *ctx,
					 enum sock_family fam, __be32 addr[4])
{
	if (fam == FAM_V4) {
		lb_addr_set_v4(addr, ctx->user_ip4);
	} else {
		addr[0] = ctx->user_ip6[0];
		addr[1] = ctx->user_ip6[1];
		addr[2] = ctx->user_ip6[2];
		addr[3] = ctx->user_ip6[3];
	}
}

static __always_inline void ctx_set_addr(struct bpf_sock_addr *ctx,
					 enum sock_family fam, const __be32 addr[4])
{
	if (fam == FAM_V4) {
		ctx->user_ip4 = addr[3];
	} else {
		ctx->user_ip6[0] = addr[0];
		ctx->user_ip6[1] = addr[1];
		ctx->user_ip6[2] = addr[2];
		ctx->user_ip6[3] = addr[3];
	}
}

/* Fills @key with the frontend the socket addresses. */
static __always_inline void ctx_svc_key(const struct bpf_sock_addr *ctx,
					enum sock_family fam, __u8 proto,
					struct lb_svc_key *key)
{
	ctx_get_addr(ctx, fam, key->addr);
	key->port = (__be16)ctx->user_port;
	key->proto = proto;
	key->scope = LB_SCOPE_EXT;
}

/* What loadBalancerSourceRanges say of a client, at connect()/sendmsg(). */
enum src_verdict {
	SRC_ALLOW,
	SRC_REFUSE,
	SRC_DEFER, /* a pod's unbound socket: judged at its first packet */
};

/* Whether the socket of @ctx lives in a pod's network namespace and its
 * source-range decisions wait for its packets (lb_src_pending.h). */
static __always_inline int sock_in_pod(struct bpf_sock_addr *ctx)
{
	return defer_pod_src_ranges && bpf_get_netns_cookie(ctx) != host_netns_cookie;
}

/* Whether the client of @ctx may reach the frontend of @master under its
 * loadBalancerSourceRanges. kube-proxy checks node-local clients too (its
 * firewall runs on the output path), with the packet's source address.
 * That address is known here when the socket is bound or sendmsg names
 * one; otherwise the kernel picks it after this hook. A socket of the node
 * itself then gets a node address: let in when a prefix holds one
 * (SVC_F_SRC_RANGE_NODE), as kube-proxy's rule for the node does. A pod's
 * socket gets the pod's address, which only its packets tell: deferred. */
static __always_inline enum src_verdict sock_src_verdict(struct bpf_sock_addr *ctx,
							 enum sock_family fam, enum sock_op op,
							 const struct lb_svc_val *master)
{
	struct bpf_sock *sk = ctx->sk;
	__be32 src[4] = {};

	if (!(master->flags & SVC_F_SRC_RANGE))
		return SRC_ALLOW;
	if (fam == FAM_V4) {
		if (op == OP_SENDMSG)
			src[3] = ctx->msg_src_ip4;
		if (!src[3] && sk)
			src[3] = sk->src_ip4;
		if (src[3])
			lb_addr_set_v4(src, src[3]);
	} else {
		if (op == OP_SENDMSG) {
			src[0] = ctx->msg_src_ip6[0];
			src[1] = ctx->msg_src_ip6[1];
			src[2] = ctx->msg_src_ip6[2];
			src[3] = ctx->msg_src_ip6[3];
		}
		if (!(src[0] | src[1] | src[2] | src[3]) && sk) {
			src[0] = sk->src_ip6[0];
			src[1] = sk->src_ip6[1];
			src[2] = sk->src_ip6[2];
			src[3] = sk->src_ip6[3];
		}
		/* :: and ::ffff:0.0.0.0 (a dual-stack socket) are unbound. */
		if (lb_addr_is_v4(src) && !src[3])
			src[2] = 0;
	}
	if (!(src[0] | src[1] | src[2] | src[3])) {
		if (sock_in_pod(ctx))
			return SRC_DEFER;
		return (master->flags & SVC_F_SRC_RANGE_NODE) ? SRC_ALLOW : SRC_REFUSE;
	}
	return lb_src_allowed(master, src) ? SRC_ALLOW : SRC_REFUSE;
}

/* Counts the decision @verdict of a socket hook for frontend @svc_id
 * (lb_verdict.h) and, while `kpr monitor` runs, reports it with the
 * client and the address it asked for (@asked: the frontend). */
static __always_inline void sock_report(struct bpf_sock_addr *ctx, enum sock_family fam,
					enum sock_op op, __u8 proto,
					const struct lb_sock_rnat_val *asked, __u32 svc_id,
					__u32 backend_id, __u32 verdict, __u32 reason)
{
	struct bpf_sock *sk = ctx->sk;
	struct lb_event *ev;

	lb_count_sock(svc_id, verdict);
	ev = lb_monitor_reserve();
	if (!ev)
		return;
	ev->netns_cookie = bpf_get_netns_cookie(ctx);
	ev->cgroup_id = bpf_get_current_cgroup_id();
	__builtin_memset(ev->client, 0, sizeof(ev->client));
	ev->client_port = 0;
	if (sk) {
		if (fam == FAM_V4) {
			lb_addr_set_v4(ev->client, sk->src_ip4);
		} else {
			ev->client[0] = sk->src_ip6[0];
			ev->client[1] = sk->src_ip6[1];
			ev->client[2] = sk->src_ip6[2];
			ev->client[3] = sk->src_ip6[3];
		}
		/* host byte order in struct bpf_sock */
		ev->client_port = bpf_htons((__u16)sk->src_port);
	}
	__builtin_memcpy(ev->frontend, asked->addr, sizeof(ev->frontend));
	ev->frontend_port = asked->port;
	ev->svc_id = svc_id;
	ev->backend_id = backend_id;
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->hook = op == OP_CONNECT ? LB_HOOK_CONNECT : LB_HOOK_SENDMSG;
	ev->verdict = verdict;
	ev->reason = reason;
	ev->proto = proto;
	ev->pad = 0;
	bpf_ringbuf_submit(ev, 0);
}

/* Rewrites the destination of @ctx to a backend of the frontend it targets.
 * Returns 0 when translated or not a frontend, -errno when the frontend has
 * no usable backend (ECONNREFUSED) or refuses the client's source (EPERM,
 * what a locally sent packet dropped by netfilter gives its sender). */
static __always_inline int sock_translate(struct bpf_sock_addr *ctx,
					  enum sock_family fam, __u8 proto, enum sock_op op)
{
	struct lb_svc_key key = {};
	struct lb_svc_val *master;
	struct lb_backend *backend;
	struct lb_sock_rnat_key rkey = {};
	struct lb_sock_rnat_val rval = {};
	enum src_verdict src;
	__u32 range_id;
	__u32 backend_id;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 0;
	/* A mark of an earlier connect()/sendmsg() of a pod's socket is not
	 * this one's business (a datagram to another address, a reconnect). */
	if (sock_in_pod(ctx))
		lb_src_pending_clear(ctx->sk);

	ctx_svc_key(ctx, fam, proto, &key);
	/* What the application addressed: its peer, whatever key serves it. */
	__builtin_memcpy(rval.addr, key.addr, sizeof(rval.addr));
	rval.port = key.port;
	master = lb_lookup_master(&key);
	if (!master)
		master = lb_host_nodeport_lookup(&key);
	if (!master) {
		/* A ClusterIP on a port or protocol its Service lacks: refused
		 * as an empty Service is, not sent off untranslated. (The
		 * NodePort lookup may have moved the key's address.) */
		__builtin_memcpy(key.addr, rval.addr, sizeof(key.addr));
		if (!lb_port_rejected(&key))
			return 0;
		sock_report(ctx, fam, op, proto, &rval, 0, 0, LB_V_INVALID_PORT, LB_R_NONE);
		return -no_backend_errno;
	}
	src = sock_src_verdict(ctx, fam, op, master);
	/* The ranges are the frontend's (its external master's), and so
	 * are its counters. */
	range_id = master->svc_id;
	if (src == SRC_REFUSE) {
		sock_report(ctx, fam, op, proto, &rval, range_id, 0, LB_V_SOURCE_RANGE, LB_R_NONE);
		return -EPERM;
	}

	/* Node-local traffic uses the internal backend set when the frontend
	 * has one (externalTrafficPolicy Local must not limit it). */
	if (master->flags & SVC_F_HAS_INT_SCOPE) {
		key.scope = LB_SCOPE_INT;
		master = lb_lookup_master(&key);
		if (!master) {
			sock_report(ctx, fam, op, proto, &rval, range_id, 0, LB_V_NO_BACKEND,
				    LB_R_NONE);
			return -no_backend_errno;
		}
	}

	backend = lb_select_backend(&key, master, bpf_get_netns_cookie(ctx), &backend_id);
	/* A v4 socket can only reach an IPv4 backend; the agent never mixes
	 * families in a frontend, so this guards against corruption only. */
	if (!backend || (fam == FAM_V4 && !lb_addr_is_v4(backend->addr))) {
		/* internalTrafficPolicy Local without a backend on this node
		 * (or without any: the two look alike here). */
		sock_report(ctx, fam, op, proto, &rval, range_id, 0,
			    master->count == 0 && (master->flags & SVC_F_ITP_LOCAL) ?
				    LB_V_LOCAL_POLICY : LB_V_NO_BACKEND,
			    LB_R_NONE);
		return -no_backend_errno;
	}
	/* Without a mark the pod would go unjudged: refused instead. */
	if (src == SRC_DEFER && lb_src_pending_arm(ctx->sk, range_id)) {
		sock_report(ctx, fam, op, proto, &rval, range_id, 0, LB_V_SOURCE_RANGE, LB_R_NONE);
		return -EPERM;
	}

	rkey.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rkey.addr, backend->addr, sizeof(rkey.addr));
	rkey.port = backend->port;
	rval.svc_id = master->svc_id;
	/* Best effort: without the entry only the reported peer is wrong. */
	bpf_map_update_elem(&kpr_sockrnat_v1, &rkey, &rval, BPF_ANY);

	sock_report(ctx, fam, op, proto, &rval, range_id, backend_id, LB_V_TRANSLATED,
		    master->flags & SVC_F_AFFINITY ? LB_R_AFFINITY : LB_R_RANDOM);

	ctx_set_addr(ctx, fam, backend->addr);
	ctx->user_port = backend->port;
	return 0;
}

/* Rewrites the peer address of @ctx (a backend) back to the frontend the
 * socket was translated from, if any. */
static __always_inline void sock_rev_translate(struct bpf_sock_addr *ctx,
					       enum sock_family fam)
{
	struct lb_sock_rnat_key rkey = {};
	struct lb_sock_rnat_val *rval;

	rkey.cookie = bpf_get_socket_cookie(ctx);
	ctx_get_addr(ctx, fam, rkey.addr);
	rkey.port = (__be16)ctx->user_port;
	rval = bpf_map_lookup_elem(&kpr_sockrnat_v1, &rkey);
	if (!rval)
		return;
	ctx_set_addr(ctx, fam, rval->addr);
	ctx->user_port = rval->port;
}

static __always_inline int sock_verdict(int ret)
{
	if (ret < 0) {
		if (use_set_retval)
			bpf_set_retval(ret);
		return SYS_REJECT;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int kpr_connect4(struct bpf_sock_addr *ctx)
{
	return sock_verdict(sock_translate(ctx, FAM_V4, ctx->protocol, OP_CONNECT));
}

SEC("cgroup/connect6")
int kpr_connect6(struct bpf_sock_addr *ctx)
{
	return sock_verdict(sock_translate(ctx, FAM_V6, ctx->protocol, OP_CONNECT));
}

SEC("cgroup/sendmsg4")
int kpr_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_verdict(sock_translate(ctx, FAM_V4, IPPROTO_UDP, OP_SENDMSG));
}

SEC("cgroup/sendmsg6")
int kpr_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock_verdict(sock_translate(ctx, FAM_V6, IPPROTO_UDP, OP_SENDMSG));
}

SEC("cgroup/recvmsg4")
int kpr_recvmsg4(struct bpf_sock_addr *ctx)
{
	sock_rev_translate(ctx, FAM_V4);
	return SYS_PROCEED;
}

SEC("cgroup/recvmsg6")
int kpr_recvmsg6(struct bpf_sock_addr *ctx)
{
	sock_rev_translate(ctx, FAM_V6);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int kpr_getpeername4(struct bpf_sock_addr *ctx)
{
	sock_rev_translate(ctx, FAM_V4);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername6")
int kpr_getpeername6(struct bpf_sock_addr *ctx)
{
	sock_rev_translate(ctx, FAM_V6);
	return SYS_PROCEED;
}

/* The frontend id (never 0) whose traffic a socket bound to @addr:@port would take, of a
 * NodePort, LoadBalancer or externalIP frontend: the exact frontend, or,
 * for a wildcard address or any other address of the node (lb_hostaddr.h),
 * a NodePort of the family. NodePorts are always programmed on their
 * family's stand-in as well, 127.0.0.1 or [::] (src/translate), so that
 * entry says whether @port is a NodePort of the family. An IPv6 wildcard
 * socket is dual-stack (bpf_sock does not say whether IPV6_V6ONLY is set),
 * so it is checked against both families' NodePorts. */
static __always_inline __u32 bind_takes_frontend(__be32 addr[4], __be16 port,
						 __u8 proto, int v6_any)
{
	struct lb_svc_key key = { .port = port, .proto = proto, .scope = LB_SCOPE_EXT };
	struct lb_svc_val *master;

	__builtin_memcpy(key.addr, addr, sizeof(key.addr));
	master = lb_lookup_master(&key);
	if (master && (master->flags & (SVC_F_NODE_PORT | SVC_F_LOADBALANCER |
					SVC_F_EXTERNAL_IP)))
		return master->svc_id;
	if (v6_any || (lb_addr_is_v4(addr) && addr[3] == 0)) {
		lb_set_nodeport_wildcard(key.addr, 1);
		master = lb_lookup_master(&key);
		if (master && (master->flags & SVC_F_NODE_PORT))
			return master->svc_id;
		if (!v6_any)
			return 0;
		lb_set_nodeport_wildcard(key.addr, 0);
		master = lb_lookup_master(&key);
		return master && (master->flags & SVC_F_NODE_PORT) ? master->svc_id : 0;
	}
	master = lb_host_nodeport_lookup(&key);
	return master ? master->svc_id : 0;
}

static __always_inline int sock_post_bind(struct bpf_sock *ctx, enum sock_family fam)
{
	__u8 proto = ctx->protocol;
	__be32 addr[4];
	__u32 svc_id;
	int v6_any;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;
	if (bpf_get_netns_cookie(ctx) != host_netns_cookie)
		return SYS_PROCEED;
	if (fam == FAM_V4) {
		lb_addr_set_v4(addr, ctx->src_ip4);
	} else {
		addr[0] = ctx->src_ip6[0];
		addr[1] = ctx->src_ip6[1];
		addr[2] = ctx->src_ip6[2];
		addr[3] = ctx->src_ip6[3];
	}
	v6_any = !(addr[0] | addr[1] | addr[2] | addr[3]);
	/* src_port is in host byte order in struct bpf_sock. */
	svc_id = bind_takes_frontend(addr, bpf_htons((__u16)ctx->src_port), proto, v6_any);
	if (!svc_id)
		return SYS_PROCEED;
	lb_count_sock(svc_id, LB_V_BIND_REFUSED);
	if (use_set_retval)
		bpf_set_retval(-EADDRINUSE);
	return SYS_REJECT;
}

/* Verdicts of cgroup_skb programs. */
#define SKB_DROP 0
#define SKB_PASS 1

/* The source address of the IP packet in @skb (IPv4-mapped for IPv4);
 * -1 when it is no IP packet or too short. */
static __always_inline int skb_src_addr(struct __sk_buff *skb, __be32 src[4])
{
	__be32 v4;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, offsetof(struct iphdr, saddr), &v4, sizeof(v4)))
			return -1;
		lb_addr_set_v4(src, v4);
		return 0;
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return bpf_skb_load_bytes(skb, offsetof(struct ipv6hdr, saddr), src, 16) ? -1 : 0;
	return -1;
}

/* The first packet of a marked (pod's) socket after connect()/sendmsg():
 * its source address decides (lb_src_pending.h). Unmarked sockets cost a
 * socket storage lookup; a socket without storage at all, less. */
SEC("cgroup_skb/egress")
int kpr_skb_egress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct lb_src_pending *p;
	__be32 src[4] = {};

	if (!sk)
		return SKB_PASS;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return SKB_PASS;
	p = bpf_sk_storage_get(&kpr_srcpend, sk, 0, 0);
	if (!p || !p->armed)
		return SKB_PASS;
	/* A marked socket's packet that tells no source is not let through
	 * unjudged. */
	if (skb_src_addr(skb, src) || !lb_src_in_ranges(p->svc_id, src)) {
		sock_count(SOCK_STAT_SRC_RANGE);
		return SKB_DROP;
	}
	p->armed = 0;
	return SKB_PASS;
}

SEC("cgroup/post_bind4")
int kpr_post_bind4(struct bpf_sock *ctx)
{
	return sock_post_bind(ctx, FAM_V4);
}

SEC("cgroup/post_bind6")
int kpr_post_bind6(struct bpf_sock *ctx)
{
	return sock_post_bind(ctx, FAM_V6);
}
