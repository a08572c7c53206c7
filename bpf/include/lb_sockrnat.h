/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The socket reverse-translation map, on its own so that the socket
 * destroyer (sock_destroy.bpf.c) shares it without the other maps: an
 * entry says the socket of that cookie reached that backend through a
 * Service, which is what makes it the destroyer's to close.
 */
#ifndef KPR_LB_SOCKRNAT_H
#define KPR_LB_SOCKRNAT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_types.h"

/* (socket, backend) -> frontend, for recvmsg and getpeername */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_sock_rnat_key);
	__type(value, struct lb_sock_rnat_val);
	__uint(max_entries, 262144);
} kpr_sockrnat_v1 SEC(".maps");

#endif /* KPR_LB_SOCKRNAT_H */
