/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Straight into a pod: a packet that tc ingress sends to a local backend
 * behind a veth (or netkit) device whose peer lives in another network
 * namespace is handed to that peer's receive path with bpf_redirect_peer()
 * rather than transmitted on the host-side device. That skips the device's
 * transmit path and one trip through the per-CPU backlog queue (a softirq
 * round) for every packet toward the pod: Cilium's "BPF host routing".
 *
 * The kernel drops a peer redirect to a device without a peer, or whose
 * peer is in the same namespace, and the program cannot ask a device's
 * kind, so the agent lists the devices that qualify in kpr_peerdev_v1
 * (src/datapath/peer_devices.rs), kept in step from netlink link events.
 * A device missing from the map (not listed yet, or the map full) only
 * misses the shortcut: the packet takes bpf_redirect() as before.
 */
#ifndef KPR_LB_PEERDEV_H
#define KPR_LB_PEERDEV_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* ifindex (this namespace) -> 1: a veth or netkit device whose peer is in
 * another network namespace. Preallocated: one lookup per packet to a
 * local backend. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 4096);
} kpr_peerdev_v1 SEC(".maps");

static __always_inline int peer_dev(__u32 ifindex)
{
	return bpf_map_lookup_elem(&kpr_peerdev_v1, &ifindex) != NULL;
}

#endif /* KPR_LB_PEERDEV_H */
