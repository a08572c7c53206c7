/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Datapath types shared by every kpr BPF program and mirrored, through the
 * generated skeleton types (never by hand), in src/datapath/layout.rs.
 *
 * Conventions, kept on both sides of the boundary:
 *  - addresses are 16 bytes in network byte order; IPv4 is stored
 *    IPv4-mapped (::ffff:a.b.c.d) so one map and one code path serve both
 *    families and a dual-stack socket connecting to ::ffff:VIP is matched too;
 *  - ports are __be16;
 *  - backend slot 0 of a frontend is its master entry; slots 1..count hold
 *    backend ids;
 *  - backend id 0 and service id 0 are invalid ("none").
 *
 * Any change to a struct here is a layout change: bump KPR_LAYOUT_VERSION
 * and the _vN suffix of every map name in lb_maps.h.
 */
#ifndef KPR_LB_TYPES_H
#define KPR_LB_TYPES_H

#include <linux/types.h>

#define KPR_LAYOUT_VERSION 1

/* Frontend scopes (struct lb_svc_key.scope). */
enum lb_scope {
	LB_SCOPE_EXT = 0, /* backends for traffic that enters from outside */
	LB_SCOPE_INT = 1, /* backends for node-local traffic when they differ */
};

/* Flags of a master entry (struct lb_svc_val.flags, slot 0 only). */
enum lb_svc_flags {
	SVC_F_CLUSTER_IP    = 1 << 0, /* service type, exactly one of these four */
	SVC_F_NODE_PORT     = 1 << 1,
	SVC_F_LOADBALANCER  = 1 << 2,
	SVC_F_EXTERNAL_IP   = 1 << 3,
	SVC_F_AFFINITY      = 1 << 4, /* sessionAffinity ClientIP; see affinity_timeout */
	SVC_F_HAS_INT_SCOPE = 1 << 5, /* node-local traffic uses the LB_SCOPE_INT entries */
	SVC_F_ETP_LOCAL     = 1 << 6, /* externalTrafficPolicy Local */
	SVC_F_ITP_LOCAL     = 1 << 7, /* internalTrafficPolicy Local */
};

/* Backend states (struct lb_backend.state). */
enum lb_backend_state {
	BE_STATE_ACTIVE      = 0, /* ready endpoint */
	BE_STATE_TERMINATING = 1, /* serving but terminating (used only as fallback) */
};

/* Key of the services map: one entry per (frontend, slot). */
struct lb_svc_key {
	__be32 addr[4];      /* frontend address, IPv4-mapped for IPv4 */
	__be16 port;         /* frontend port */
	__u16  slot;         /* 0 = master entry, 1..count = backend slot */
	__u8   proto;        /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   scope;        /* enum lb_scope */
	__u8   pad[2];       /* must be zero */
};

/* Value of the services map. Master entries (slot 0) use count, svc_id,
 * flags and affinity_timeout; backend slots use backend_id and svc_id. */
struct lb_svc_val {
	__u32 backend_id;       /* slot > 0: id in the backends map; slot 0: 0 */
	__u32 count;            /* slot 0: number of backend slots; 0 = no backend */
	__u32 svc_id;           /* id of this frontend (affinity, reverse NAT) */
	__u32 affinity_timeout; /* slot 0: seconds of ClientIP affinity, 0 = off */
	__u16 flags;            /* slot 0: enum lb_svc_flags */
	__u16 pad;              /* must be zero */
};

/* Value of the backends map, keyed by a __u32 backend id (never 0). */
struct lb_backend {
	__be32 addr[4];      /* backend address, IPv4-mapped for IPv4 */
	__be16 port;         /* backend port */
	__u8   proto;        /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   state;        /* enum lb_backend_state */
	__u32  pad;          /* must be zero */
};

/* Session affinity: which backend a client last used for a frontend. */
struct lb_affinity_key {
	__u64 client;        /* socket LB: the client's network namespace cookie */
	__u32 svc_id;        /* frontend id (struct lb_svc_val.svc_id) */
	__u32 pad;           /* must be zero */
};

struct lb_affinity_val {
	__u64 last_used_ns;  /* bpf_ktime_get_ns() of the last connect */
	__u32 backend_id;    /* backend chosen for this client */
	__u32 pad;
};

/* Reverse translation for sockets: which frontend a translated socket
 * talked to, so recvmsg() and getpeername() report the VIP. */
struct lb_sock_rnat_key {
	__u64  cookie;       /* bpf_get_socket_cookie() of the client socket */
	__be32 addr[4];      /* backend address the socket was sent to */
	__be16 port;         /* backend port */
	__u16  pad[3];
};

struct lb_sock_rnat_val {
	__be32 addr[4];      /* frontend address to report */
	__be16 port;         /* frontend port to report */
	__u16  pad;
	__u32  svc_id;       /* frontend id, for the control plane */
};

#endif /* KPR_LB_TYPES_H */
