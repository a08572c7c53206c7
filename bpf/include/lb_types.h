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
 * Any change to a struct here is a layout change: bump the _vN suffix of
 * the name of every map that holds the struct (each map's name carries its
 * own layout version; src/datapath/pins.rs names them on the Rust side,
 * and an agent removes the pins of names it does not know once its
 * programs are attached). The one exception is
 * giving meaning to bits or bytes that were always zero, when zero (what
 * every older writer left there) means the old behaviour:
 * struct lb_backend.flags, SVC_F_SRC_RANGE, SVC_F_SRC_RANGE_NODE,
 * SVC_F_MAGLEV, CT_F_DSR_ENCAP, CT_F_DSR_DECAP; and the port-reject
 * entries of the services map (SVC_F_PORT_REJECT), whose key has proto 0,
 * which no writer used before: older programs never look such a key up
 * and older agents skip it when they read the map.
 */
#ifndef KPR_LB_TYPES_H
#define KPR_LB_TYPES_H

#include <linux/types.h>

#include "lb_np_stats.h"


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
	SVC_F_SRC_RANGE     = 1 << 8, /* loadBalancerSourceRanges: new flows only from
				       * the prefixes kpr_srcrange_v1 holds for svc_id */
	SVC_F_SRC_RANGE_NODE = 1 << 9, /* with SVC_F_SRC_RANGE: a prefix holds a node
					* address, so a node-local client whose source
					* is not known yet (unbound socket) is let in */
	SVC_F_MAGLEV        = 1 << 10, /* north-south new flows pick from the
					  * frontend's Maglev table (kpr_maglev_v1[svc_id]);
					  * zero, as every older writer left it, is random */
	SVC_F_HOST_PORT     = 1 << 12, /* with SVC_F_NODE_PORT: a pod's hostPort
					  * (served as a NodePort; the type only
					  * tells tools) */
	SVC_F_PORT_REJECT   = 1 << 11, /* the port-reject entry of a ClusterIP (key
					  * port 0, proto 0, slot 0, scope EXT; no other
					  * field set): a destination on this address that
					  * no frontend matches is refused as an empty
					  * Service is (kube-proxy's "Reject traffic to
					  * invalid ports of ClusterIPs") */
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

/* Key of the source-range map (kpr_srcrange_v1, an LPM trie; the value is
 * a __u8 that is always 1). One entry per (frontend, allowed prefix); a
 * frontend has entries only while its master carries SVC_F_SRC_RANGE. */
struct lb_srcrange_key {
	__u32  prefixlen;    /* LPM trie header: 32 (svc_id) + prefix bits of addr */
	__u32  svc_id;       /* frontend id (struct lb_svc_val.svc_id), matched whole */
	__be32 addr[4];      /* prefix, IPv4-mapped for IPv4 (an IPv4 /n is /96+n) */
};

/* Flags of a backend (struct lb_backend.flags). */
enum lb_backend_flags {
	BE_F_LOCAL = 1 << 0, /* the endpoint runs on this node: north-south
			      * traffic reaches it without SNAT */
};

/* Value of the backends map, keyed by a __u32 backend id (never 0). */
struct lb_backend {
	__be32 addr[4];      /* backend address, IPv4-mapped for IPv4 */
	__be16 port;         /* backend port */
	__u8   proto;        /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   state;        /* enum lb_backend_state */
	__u8   flags;        /* enum lb_backend_flags; was padding in the first
			      * layout, so an entry written by an older agent
			      * reads as "not local" (SNAT), which is always safe */
	__u8   pad[3];       /* must be zero */
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

/*
 * North-south connection tracking (bpf/nodeport.bpf.c, map kpr_ct_v1).
 *
 * A flow has two entries, one per direction, each keyed by the packet's
 * tuple as it arrives and saying how to rewrite that packet:
 *
 *   ORIG   client:cport -> frontend:fport   rewrite to  snat:sport -> backend:bport
 *   REPLY  backend:bport -> snat:sport      rewrite to  frontend:fport -> client:cport
 *
 * where snat:sport is a node address and a port of the SNAT range for a
 * remote backend, and client:cport itself for a local one. The entries
 * mirror each other: the key of one entry's peer is its own rewrite with
 * source and destination swapped (ct_peer_key()), which is how the
 * datapath refreshes both at once and how the agent's GC removes pairs.
 */

/* Direction of a conntrack entry (struct ct_key.dir). */
enum ct_dir {
	CT_DIR_ORIG  = 0, /* client -> frontend, as it enters the node */
	CT_DIR_REPLY = 1, /* backend -> SNAT address or client, as it arrives */
};

/* Flags of a conntrack entry (struct ct_entry.flags); both entries of a
 * flow carry the same flags. The DSR flags were added without a new map
 * version: entries without them mean what they always meant, so a
 * restarted agent keeps every flow of kpr_ct_v1. */
enum ct_flags {
	CT_F_SNAT        = 1 << 0, /* source-NATed to a node address (remote backend) */
	CT_F_ESTABLISHED = 1 << 1, /* the backend has answered */
	CT_F_CLOSING     = 1 << 2, /* TCP FIN or RST seen */
	CT_F_DSR_ENCAP   = 1 << 3, /* DSR, on the node the client reached: the
				    * flow's packets are sent IPIP-encapsulated
				    * to the backend's node (nat_saddr = outer
				    * source, nat_daddr:nat_dport = the backend);
				    * an ORIG entry without REPLY peer, as the
				    * replies never come back through this node;
				    * ESTABLISHED once the client ACKs */
	CT_F_DSR_DECAP   = 1 << 4, /* DSR, on the backend's node: the flow came
				    * encapsulated from another node; a local
				    * backend's pair whose SYN-ACK gets its TCP
				    * MSS clamped (lb_dsr.h) */
};

/* Key of the conntrack map: the packet's 5-tuple and direction. */
struct ct_key {
	__be32 saddr[4];     /* source address, IPv4-mapped for IPv4 */
	__be32 daddr[4];     /* destination address, IPv4-mapped for IPv4 */
	__be16 sport;        /* source port */
	__be16 dport;        /* destination port */
	__u8   proto;        /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   dir;          /* enum ct_dir */
	__u8   pad[2];       /* must be zero */
};

/* Value of the conntrack map: how to rewrite a packet of this direction. */
struct ct_entry {
	__be32 nat_saddr[4]; /* new source address */
	__be32 nat_daddr[4]; /* new destination address */
	__be16 nat_sport;    /* new source port */
	__be16 nat_dport;    /* new destination port */
	__u32  backend_id;   /* backend of the flow (id in kpr_backends) */
	__u32  svc_id;       /* frontend of the flow (struct lb_svc_val.svc_id) */
	__u16  flags;        /* enum ct_flags */
	__u16  pad;          /* must be zero */
	__u64  created_ns;   /* bpf_ktime_get_ns() when the flow was created */
	__u64  expires_ns;   /* bpf_ktime_get_ns() after which the entry is stale */
};

/* Counters of the north-south datapath (index into kpr_npstats_v2, which
 * has NP_STAT_SLOTS slots: a new counter takes the next index and is no
 * layout change; an index is never reused for another meaning). The list
 * is lb_np_stats.h's, in its order. */
#define NP_STAT_ENUM(name, event, field, help) NP_STAT_##name,
enum np_stat {
	NP_STATS(NP_STAT_ENUM)
	NP_STAT_MAX,
};
#undef NP_STAT_ENUM

/* Slots of kpr_npstats_v2: room for counters to come, so adding one is
 * not a layout change of the pinned map. */
#define NP_STAT_SLOTS 32
_Static_assert(NP_STAT_MAX <= NP_STAT_SLOTS, "kpr_npstats_v2 has NP_STAT_SLOTS slots");

/* How north-south flows reach a backend on another node (the agent's
 * --nodeport-mode, const volatile nodeport_mode in lb_dsr.h). */
enum np_mode {
	NP_MODE_SNAT   = 0, /* source-NAT to this node; replies come back here */
	NP_MODE_DSR    = 1, /* direct server return for TCP and UDP */
	NP_MODE_HYBRID = 2, /* DSR for TCP, SNAT for UDP */
};

/*
 * Key of the DSR map (kpr_dsr_v1, lb_dsr.h): on a backend's node, which
 * local backend a packet that another node encapsulated for DSR is for.
 * The agent writes it from the services and backends maps: one entry per
 * north-south frontend and local backend. The value is the backend id.
 *
 * A NodePort frontend is keyed with the family's unspecified address
 * (::ffff:0.0.0.0): the client addressed the other node's IP, which is no
 * frontend here, but a nodePort is the same Service on every node.
 * LoadBalancer and externalIP frontends are keyed with their address.
 */
struct dsr_key {
	__be32 frontend[4];  /* frontend address (IPv4-mapped), or ::ffff:0.0.0.0
			      * for NodePorts */
	__be32 backend[4];   /* local backend address: the outer destination */
	__be16 port;         /* frontend port */
	__u8   proto;        /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad;          /* must be zero */
};

#endif /* KPR_LB_TYPES_H */
