// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Closing connected UDP sockets whose backend went away. A connected UDP
 * socket was translated once, at connect(): when its backend is removed
 * it keeps sending into the void (a DNS client whose resolver pod is gone
 * waits for its timeouts). The agent runs this UDP socket iterator in each
 * network namespace of its cgroup after a sync removed backends, with the
 * removed UDP backends in kpr_sock_destroy_filter; every socket connected
 * to one of them *through a Service* (it has an entry in kpr_sockrnat_v1,
 * which only the socket hooks on the agent's cgroup write) is destroyed
 * with bpf_sock_destroy (kernel >= 6.5): its next recv() fails with
 * ECONNABORTED, its next send() with EDESTADDRREQ (it is disconnected),
 * and the application reconnects to a live backend. Sockets connected to
 * the backend's address directly, not through a Service, are left alone.
 *
 * The kernel structures are declared here with the fields read only, and
 * relocated by CO-RE against the running kernel's BTF.
 */
#include <linux/bpf.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lb_types.h"
#include "lb_sockrnat.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Address families (include/linux/socket.h, not in the uapi headers). */
#define AF_INET 2
#define AF_INET6 10

/* What a connected socket's state is (TCP_ESTABLISHED, include/net/tcp_states.h). */
#define SK_STATE_CONNECTED 1

struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct udp_sock;
struct bpf_iter_meta;

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* A removed UDP backend, as the backends map holds its address. */
struct lb_sock_destroy_key {
	__be32 addr[4];      /* backend address, IPv4-mapped for IPv4 */
	__be16 port;         /* backend port */
	__u16  pad;          /* must be zero */
};

/* Removed UDP backends of one run, written by the agent before it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_sock_destroy_key);
	__type(value, __u8);
	__uint(max_entries, 1024);
} kpr_sock_destroy_filter SEC(".maps");

/* Sockets destroyed by this object, for the agent's log. */
__u64 destroyed = 0;

SEC("iter/udp")
int kpr_sock_destroy_udp(struct bpf_iter__udp *ctx)
{
	struct sock *sk = (struct sock *)ctx->udp_sk;
	struct lb_sock_destroy_key key = {};
	struct lb_sock_rnat_key rkey = {};
	unsigned short family;

	if (!sk)
		return 0;
	if (sk->__sk_common.skc_state != SK_STATE_CONNECTED)
		return 0;
	family = sk->__sk_common.skc_family;
	if (family == AF_INET) {
		key.addr[2] = bpf_htonl(0x0000ffff);
		key.addr[3] = sk->__sk_common.skc_daddr;
	} else if (family == AF_INET6) {
		__builtin_memcpy(key.addr, &sk->__sk_common.skc_v6_daddr, sizeof(key.addr));
	} else {
		return 0;
	}
	key.port = sk->__sk_common.skc_dport;
	if (!bpf_map_lookup_elem(&kpr_sock_destroy_filter, &key))
		return 0;
	rkey.cookie = bpf_get_socket_cookie(sk);
	__builtin_memcpy(rkey.addr, key.addr, sizeof(rkey.addr));
	rkey.port = key.port;
	if (!bpf_map_lookup_elem(&kpr_sockrnat_v1, &rkey))
		return 0;
	if (bpf_sock_destroy(&sk->__sk_common) == 0)
		__sync_fetch_and_add(&destroyed, 1);
	return 0;
}
