//! The load balancer's domain model: frontends, backends and the desired
//! state the reconciler programs. Independent of BPF encodings (see
//! datapath::layout) and of Kubernetes objects (see translate).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// L4 protocol of a frontend or backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IANA protocol number the datapath stores.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u8,
            Protocol::Udp => libc::IPPROTO_UDP as u8,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        match n as i32 {
            libc::IPPROTO_TCP => Some(Protocol::Tcp),
            libc::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// The protocol as Kubernetes spells it ("TCP", "UDP").
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which traffic a frontend's backend set serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Traffic from outside the node, and node-local traffic unless the
    /// frontend also has an internal set.
    External,
    /// Node-local traffic, for frontends whose two sets differ (traffic policies).
    Internal,
}

/// Address, port and protocol: how a frontend or a backend is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L4Addr {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for L4Addr {
    /// `10.0.0.1:80/TCP`, `[fd00::1]:53/UDP`: `cilium service list`'s form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.proto),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.proto),
        }
    }
}

/// A frontend: what clients address (a ClusterIP:port, a NodePort, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: L4Addr,
    pub scope: Scope,
}

impl Frontend {
    pub fn new(ip: IpAddr, port: u16, proto: Protocol) -> Frontend {
        Frontend {
            addr: L4Addr { ip, port, proto },
            scope: Scope::External,
        }
    }
}

/// The Service type a frontend was derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalIP,
    /// A pod's `hostPort`: served as a NodePort on its host IP (or on every
    /// node address), backed by that pod alone.
    HostPort,
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Whether a backend takes new flows normally or only as a fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// A ready endpoint.
    Active,
    /// Serving but terminating; used only when no endpoint is ready.
    Terminating,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Terminating => "terminating",
        }
    }
}

/// How the north-south datapath picks the backend of a new flow
/// (`--lb-algorithm`, the `service.kpr.io/lb-algorithm` annotation;
/// Cilium's `loadBalancer.algorithm`). The socket hooks always pick at random.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LbAlgorithm {
    /// Uniformly at random among the frontend's backends.
    #[default]
    Random,
    /// Maglev consistent hashing of the flow: every node picks the same
    /// backend for the same client address and port.
    Maglev,
}

impl LbAlgorithm {
    /// `random` or `maglev`: the flag's and the annotation's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LbAlgorithm::Random => "random",
            LbAlgorithm::Maglev => "maglev",
        }
    }

    /// Parses the annotation's value (exactly `random` or `maglev`).
    pub fn parse(s: &str) -> Option<LbAlgorithm> {
        match s {
            "random" => Some(LbAlgorithm::Random),
            "maglev" => Some(LbAlgorithm::Maglev),
            _ => None,
        }
    }
}

impl fmt::Display for LbAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-frontend options the datapath acts on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrontendOptions {
    /// sessionAffinity ClientIP timeout in seconds; None = no affinity.
    pub affinity_timeout: Option<u32>,
    /// Node-local traffic uses the frontend's Internal-scope entry.
    pub has_internal_scope: bool,
    pub external_traffic_local: bool,
    pub internal_traffic_local: bool,
    /// A prefix of the frontend's source ranges holds an address of this
    /// node: node-local clients whose source is not known yet (unbound
    /// sockets) are let in. Meaningless without source ranges.
    pub source_ranges_admit_node: bool,
    /// North-south new flows pick their backend from the frontend's Maglev
    /// table instead of at random (only External-scope NodePort,
    /// LoadBalancer and ExternalIP frontends get it).
    pub maglev: bool,
}

/// A backend of a frontend, as translation chose it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: L4Addr,
    pub state: BackendState,
    /// The endpoint runs on this node (its `nodeName` is this node's):
    /// north-south traffic reaches it without SNAT.
    pub local: bool,
}

impl Backend {
    /// An active backend on another node.
    pub fn remote(addr: L4Addr) -> Backend {
        Backend {
            addr,
            state: BackendState::Active,
            local: false,
        }
    }
}

/// Everything the datapath needs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    /// `namespace/name:port-name` of the Service, for logs and capacity
    /// decisions; not stored in the maps.
    pub service: ServiceRef,
    pub svc_type: ServiceType,
    pub options: FrontendOptions,
    /// Backends in slot order; addresses are of the frontend's family.
    pub backends: Vec<Backend>,
    /// loadBalancerSourceRanges: the client prefixes allowed to open flows
    /// (sorted, host bits cleared, of the frontend's family). Empty: every
    /// client.
    pub source_ranges: Vec<IpNet>,
}

/// Names the Service (and port) a frontend belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
}

impl ServiceRef {
    /// `namespace/name`: the unit the reconciler admits or refuses as a whole.
    pub fn service_key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port_name.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}
