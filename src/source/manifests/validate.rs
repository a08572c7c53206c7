//! The API server's validation, done by the standalone source itself: in
//! Kubernetes mode nothing invalid ever reaches kpr, in standalone mode
//! nothing else stands between a manifest and the maps.
//!
//! An object that breaks a rule is skipped whole, as the API server would
//! refuse it whole, with a counted reason:
//! - names and namespaces: DNS-1123 labels (a Service's name, every
//!   namespace) or subdomains (an EndpointSlice's name), and the
//!   `kubernetes.io/service-name` label a label value, so `/` can never make
//!   two namespace/name keys collide ([`SkipReason::InvalidName`]);
//! - clusterIPs, externalIPs and endpoint addresses: no unspecified,
//!   loopback, broadcast, link-local or multicast address, as the API
//!   server and kube-proxy refuse them ([`SkipReason::InvalidAddress`]);
//! - nodePort and healthCheckNodePort inside the NodePort range
//!   (`--service-node-port-range`, kube-apiserver's flag and default
//!   30000-32767) ([`SkipReason::InvalidPort`]).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::skip::SkipReason;
use crate::translate::{SERVICE_NAME_LABEL, ZONE_LABEL};

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

/// What the validation is configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Inclusive range of nodePort and healthCheckNodePort values.
    pub node_port_range: (u16, u16),
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            node_port_range: DEFAULT_NODE_PORT_RANGE,
        }
    }
}

/// Why an object is refused: the counted reason and the specifics.
pub type Invalid = (SkipReason, String);

/// An object kind the API server validates.
pub trait Validate {
    /// Checks the object (its namespace already defaulted).
    fn validate(&self, rules: &Rules) -> Result<(), Invalid>;
}

impl Validate for Service {
    fn validate(&self, rules: &Rules) -> Result<(), Invalid> {
        let meta = &self.metadata;
        dns1123_label("metadata.name", meta.name.as_deref().unwrap_or(""))?;
        dns1123_label(
            "metadata.namespace",
            meta.namespace.as_deref().unwrap_or(""),
        )?;
        let Some(spec) = &self.spec else {
            return Ok(());
        };
        let cluster_ips = spec
            .cluster_ip
            .iter()
            .chain(spec.cluster_ips.iter().flatten());
        for ip in cluster_ips.filter(|ip| !ip.is_empty() && *ip != "None") {
            routable("spec.clusterIPs", ip)?;
        }
        for ip in spec.external_ips.iter().flatten() {
            routable("spec.externalIPs", ip)?;
        }
        let (low, high) = rules.node_port_range;
        let in_range = |field: &str, port: i32| {
            if port == 0 || (i32::from(low)..=i32::from(high)).contains(&port) {
                Ok(())
            } else {
                Err((
                    SkipReason::InvalidPort,
                    format!("{field} {port} is outside the NodePort range {low}-{high}"),
                ))
            }
        };
        for port in spec.ports.iter().flatten() {
            in_range("spec.ports[].nodePort", port.node_port.unwrap_or(0))?;
        }
        in_range(
            "spec.healthCheckNodePort",
            spec.health_check_node_port.unwrap_or(0),
        )
    }
}

/// A Node is read for its name, zone label and addresses: the name must
/// be one the API server takes, and addresses that do not parse are left
/// out when the node's addresses are read, as from the API.
impl Validate for Node {
    fn validate(&self, _rules: &Rules) -> Result<(), Invalid> {
        dns1123_subdomain("metadata.name", self.metadata.name.as_deref().unwrap_or(""))?;
        if let Some(zone) = self
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
        {
            label_value(ZONE_LABEL, zone)?;
        }
        Ok(())
    }
}

/// A Pod is read for its hostPorts: its name and namespace must be ones
/// the API server takes; ports and addresses are checked as they are
/// translated.
impl Validate for Pod {
    fn validate(&self, _rules: &Rules) -> Result<(), Invalid> {
        let meta = &self.metadata;
        dns1123_subdomain("metadata.name", meta.name.as_deref().unwrap_or(""))?;
        dns1123_label(
            "metadata.namespace",
            meta.namespace.as_deref().unwrap_or(""),
        )
    }
}

impl Validate for EndpointSlice {
    fn validate(&self, _rules: &Rules) -> Result<(), Invalid> {
        let meta = &self.metadata;
        dns1123_subdomain("metadata.name", meta.name.as_deref().unwrap_or(""))?;
        dns1123_label(
            "metadata.namespace",
            meta.namespace.as_deref().unwrap_or(""),
        )?;
        if let Some(service) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            label_value(SERVICE_NAME_LABEL, service)?;
        }
        if self.address_type == "FQDN" {
            return Ok(());
        }
        for endpoint in &self.endpoints {
            for address in &endpoint.addresses {
                routable("endpoints[].addresses", address)?;
            }
        }
        Ok(())
    }
}

/// A unicast address a Service may use: parses, and is not unspecified,
/// loopback, broadcast, link-local or multicast (also as an IPv4-mapped
/// IPv6 address).
pub fn routable(field: &str, text: &str) -> Result<(), Invalid> {
    let invalid = |why: &str| {
        Err((
            SkipReason::InvalidAddress,
            format!("{field} {text:?} {why}"),
        ))
    };
    let Ok(ip) = text.parse::<IpAddr>() else {
        return invalid("is not an IP address");
    };
    let why = match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("is unspecified"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("is a loopback address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("is the broadcast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("is link-local"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("is multicast"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("is unspecified"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("is a loopback address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("is link-local"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("is multicast"),
        _ => None,
    };
    match why {
        Some(why) => invalid(why),
        None => Ok(()),
    }
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn dns1123_label(field: &str, value: &str) -> Result<(), Invalid> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err((
            SkipReason::InvalidName,
            format!("{field} {value:?} is not a DNS-1123 label (a-z, 0-9, '-', at most 63)"),
        ))
    }
}

/// RFC 1123 subdomain: at most 253 characters of dot-separated labels.
pub fn dns1123_subdomain(field: &str, value: &str) -> Result<(), Invalid> {
    let ok = value.len() <= 253
        && value
            .split('.')
            .all(|label| dns1123_label(field, label).is_ok());
    if ok {
        Ok(())
    } else {
        Err((
            SkipReason::InvalidName,
            format!("{field} {value:?} is not a DNS-1123 subdomain"),
        ))
    }
}

/// A label value: at most 63 of `[A-Za-z0-9-_.]`, alphanumeric at both ends.
pub fn label_value(field: &str, value: &str) -> Result<(), Invalid> {
    let edge = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    let ok = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && edge(value.chars().next())
        && edge(value.chars().last());
    if ok {
        Ok(())
    } else {
        Err((
            SkipReason::InvalidName,
            format!("label {field} {value:?} is not a valid label value"),
        ))
    }
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
