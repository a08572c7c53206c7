/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The north-south counters: the one list of them. Each row is
 *   NP_STAT(NAME, event, field, "help")
 * NAME gives enum np_stat's NP_STAT_<NAME> (lb_types.h), event the `event`
 * label of kpr_nodeport_events_total, field the counter's field in the
 * agent's NodePortStats, help their documentation. build.rs
 * reads the rows (one per line, in this form) to generate the Rust side,
 * so adding a counter is adding a row here, at the end: a row's position
 * is its index in kpr_npstats_v2, never reused for another meaning. */
#ifndef KPR_LB_NP_STATS_H
#define KPR_LB_NP_STATS_H

#define NP_STATS(NP_STAT) \
	NP_STAT(FLOW_NEW, flow_new, flows_new, "A flow was created.") \
	NP_STAT(FLOW_SNAT, flow_snat, flows_snat, "A flow was created with SNAT (remote backend).") \
	NP_STAT(FWD, forward, packets_fwd, "A packet was translated toward a backend.") \
	NP_STAT(REPLY, reply, packets_reply, "A reply was translated back toward the client.") \
	NP_STAT(NO_BACKEND, drop_no_backend, drop_no_backend, "Dropped: the frontend has no usable backend (drop mode, a Local external policy without local backend, or a reject that could not be built).") \
	NP_STAT(SNAT_EXHAUSTED, drop_snat_exhausted, drop_snat_exhausted, "Dropped: no free port in the SNAT range.") \
	NP_STAT(FIB_FAIL, drop_fib, drop_fib, "Dropped: no route or neighbour toward the backend or client.") \
	NP_STAT(CT_FAIL, drop_conntrack, drop_ct, "Dropped: a conntrack entry could not be written, or a local backend's reply tuple is held by a live flow (client port reused across frontends).") \
	NP_STAT(TTL, drop_ttl, drop_ttl, "Dropped: TTL exhausted.") \
	NP_STAT(XDP_FWD, xdp_forward, xdp_fwd, "A packet XDP translated and redirected itself.") \
	NP_STAT(NO_BACKEND_REJECT, reject_no_backend, reject_no_backend, "A new flow to a frontend without backend was answered with ICMP port unreachable (--service-no-backend-response reject).") \
	NP_STAT(SRC_RANGE, drop_source_range, drop_source_range, "Dropped: the source is outside the frontend's loadBalancerSourceRanges.") \
	NP_STAT(FLOW_DSR, flow_dsr, flows_dsr, "A flow was created with DSR (remote backend, IPIP to its node).") \
	NP_STAT(DSR_DECAP, dsr_decap, dsr_decap, "A packet another node encapsulated for DSR reached a local backend.") \
	NP_STAT(DSR_MISS, dsr_miss, dsr_miss, "An IPIP packet matched no local backend of a frontend (left alone: not ours, or not programmed yet).") \
	NP_STAT(DSR_TOO_BIG, drop_dsr_too_big, drop_dsr_too_big, "Dropped: too big to encapsulate for DSR (ICMP fragmentation-needed sent).") \
	NP_STAT(MSS_CLAMP, mss_clamp, mss_clamped, "A DSR SYN-ACK's TCP MSS was lowered to leave room for the encapsulation.") \
	NP_STAT(PORT_REMAP, port_remap, port_remapped, "A flow to a local backend got another client source port: its reply tuple was a live flow's of another frontend.") \
	NP_STAT(PEER_REDIRECT, peer_redirect, peer_redirects, "A packet to a local backend was handed straight into its pod's namespace (bpf_redirect_peer), not transmitted on the host side.") \
	NP_STAT(ICMP_ERROR, icmp_error, icmp_errors, "An ICMP error about a translated flow was translated in turn and sent where the flow goes (path MTU, port unreachable, ...).") \
	NP_STAT(FRAG_FOLLOWED, fragment_followed, fragments_followed, "A later IP fragment was given its datagram's ports and followed its flow.") \
	NP_STAT(FRAG_UNKNOWN, fragment_unknown, fragments_unknown, "A later IP fragment of a datagram whose first fragment was not seen (left alone), or whose flow was never opened (dropped).") \
	/* end of NP_STATS */

#endif
