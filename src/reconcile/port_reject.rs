//! Port-reject entries: one services-map entry per ClusterIP (port 0,
//! protocol 0) that makes the datapath refuse a port or protocol none of
//! the address's frontends defines, as an empty Service is refused
//! (kube-proxy's "Reject traffic to invalid ports of ClusterIPs"). Only
//! ClusterIPs get one: NodePorts, externalIPs and load-balancer IPs may be
//! addresses of nodes, which serve other things on other ports.
//!
//! An address has its entry while a ClusterIP frontend of it is programmed.
//! Entries are written after the masters of a sync (a port about to be
//! served is never refused) and removed after the removed masters. Only
//! addresses whose masters a sync touches are looked at, and every address
//! on the first sync after the maps were read (a previous agent may have
//! left entries of addresses that are gone).

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::plan::Plan;
use super::{LbMaps, Reconciler, ServiceFrontends};
use crate::model::{Frontend, L4Addr, Protocol, Scope, ServiceType};

impl<M: LbMaps> Reconciler<M> {
    /// Plans the port-reject entries that the planned masters change.
    pub(super) fn plan_port_rejects(&mut self, plan: &mut Plan) {
        let mut touched: BTreeSet<IpAddr> = plan
            .put_masters
            .iter()
            .map(|(fe, _, _)| fe.addr.ip)
            .chain(plan.delete_masters.iter().map(|(fe, _)| fe.addr.ip))
            .collect();
        if self.port_rejects_unchecked {
            touched.extend(self.actual.frontends.keys().map(|fe| fe.addr.ip));
            touched.extend(self.actual.port_rejects.iter().copied());
        }
        for ip in touched {
            let wanted = self.has_cluster_ip_frontend(ip);
            let present = self.actual.port_rejects.contains(&ip);
            if wanted && !present {
                self.actual.port_rejects.insert(ip);
                plan.put_port_rejects.push(ip);
            } else if !wanted && present {
                self.actual.port_rejects.remove(&ip);
                plan.delete_port_rejects.push(ip);
            }
        }
    }

    /// Whether a ClusterIP frontend of `ip` is (planned to be) programmed.
    fn has_cluster_ip_frontend(&self, ip: IpAddr) -> bool {
        let first = Frontend {
            addr: L4Addr {
                ip,
                port: 0,
                proto: Protocol::Tcp,
            },
            scope: Scope::External,
        };
        let last = Frontend {
            addr: L4Addr {
                ip,
                port: u16::MAX,
                proto: Protocol::Udp,
            },
            scope: Scope::Internal,
        };
        self.actual
            .frontends
            .range(first..=last)
            .any(|(_, e)| e.master.svc_type == ServiceType::ClusterIP)
    }

    /// Port-reject entries `fes` adds: its ClusterIP addresses without one.
    pub(super) fn added_port_rejects(&self, fes: &ServiceFrontends) -> usize {
        fes.iter()
            .filter(|(_, spec)| spec.svc_type == ServiceType::ClusterIP)
            .map(|(fe, _)| fe.addr.ip)
            .filter(|ip| !self.actual.port_rejects.contains(ip))
            .collect::<BTreeSet<_>>()
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fake::FakeMaps;
    use crate::datapath::maps::{Capacity, LbMaps};
    use crate::model::{Backend, FrontendOptions, FrontendSpec, ServiceRef};
    use crate::reconcile::tests::{desired, ip};
    use crate::reconcile::DesiredByService;

    fn frontend(addr: &str, port: u16, proto: Protocol) -> Frontend {
        Frontend::new(ip(addr), port, proto)
    }

    fn spec(svc_type: ServiceType) -> FrontendSpec {
        FrontendSpec {
            service: ServiceRef {
                namespace: "default".into(),
                name: "web".into(),
                port_name: String::new(),
            },
            svc_type,
            options: FrontendOptions::default(),
            backends: vec![Backend::remote(L4Addr {
                ip: ip("10.244.0.11"),
                port: 8080,
                proto: Protocol::Tcp,
            })],
            source_ranges: Vec::new(),
        }
    }

    fn web(frontends: &[(Frontend, ServiceType)]) -> DesiredByService {
        let fes = frontends.iter().map(|(f, t)| (*f, spec(*t))).collect();
        desired(vec![("default/web".to_string(), fes)])
    }

    fn rejects(r: &Reconciler<FakeMaps>) -> Vec<IpAddr> {
        r.maps().port_rejects.iter().copied().collect()
    }

    #[test]
    fn a_cluster_ip_gets_one_entry_for_all_its_ports_and_loses_it_with_its_last_frontend() {
        let mut r = Reconciler::new(FakeMaps::new()).unwrap();
        let tcp = frontend("10.96.0.10", 80, Protocol::Tcp);
        let udp = frontend("10.96.0.10", 53, Protocol::Udp);
        r.sync_full(
            &web(&[(tcp, ServiceType::ClusterIP), (udp, ServiceType::ClusterIP)]),
            true,
        )
        .unwrap();
        assert_eq!(rejects(&r), [ip("10.96.0.10")]);
        // One port goes: the address keeps its entry.
        r.sync_full(&web(&[(udp, ServiceType::ClusterIP)]), true)
            .unwrap();
        assert_eq!(rejects(&r), [ip("10.96.0.10")]);
        // The last one goes (the Service is deleted): so does the entry.
        r.sync_full(&DesiredByService::new(), true).unwrap();
        assert!(rejects(&r).is_empty());
        assert!(r.maps().violations.is_empty(), "{:?}", r.maps().violations);
        assert_eq!(r.service_entries(), 0);
    }

    #[test]
    fn node_ports_external_ips_and_load_balancer_ips_get_none() {
        let mut r = Reconciler::new(FakeMaps::new()).unwrap();
        let d = web(&[
            (
                frontend("10.96.0.10", 80, Protocol::Tcp),
                ServiceType::ClusterIP,
            ),
            (
                frontend("192.0.2.1", 30080, Protocol::Tcp),
                ServiceType::NodePort,
            ),
            (
                frontend("198.51.100.7", 80, Protocol::Tcp),
                ServiceType::ExternalIP,
            ),
            (
                frontend("198.51.100.8", 80, Protocol::Tcp),
                ServiceType::LoadBalancer,
            ),
        ]);
        r.sync_full(&d, true).unwrap();
        assert_eq!(rejects(&r), [ip("10.96.0.10")]);
        assert_eq!(r.service_entries(), 4 * 2 + 1);
    }

    #[test]
    fn an_entry_left_for_an_address_that_is_gone_is_removed_by_the_first_sync() {
        let mut maps = FakeMaps::new();
        maps.port_rejects.insert(ip("10.96.0.99"));
        let mut r = Reconciler::new(maps).unwrap();
        assert_eq!(r.snapshot().port_rejects.len(), 1);
        // An incremental sync of an unrelated Service checks every address
        // once after the maps were read.
        let tcp = frontend("10.96.0.10", 80, Protocol::Tcp);
        let fes = web(&[(tcp, ServiceType::ClusterIP)]);
        r.sync_services(fes.into_iter().collect()).unwrap();
        assert_eq!(rejects(&r), [ip("10.96.0.10")]);
        assert_eq!(r.maps().snapshot().unwrap(), *r.snapshot());
    }

    #[test]
    fn admission_counts_the_entry_a_new_cluster_ip_adds() {
        // A master, a slot and the port-reject entry: 3 entries.
        let cap = |services| Capacity {
            services,
            backends: 8,
            source_ranges: 8,
            maglev: 8,
        };
        let d = web(&[(
            frontend("10.96.0.10", 80, Protocol::Tcp),
            ServiceType::ClusterIP,
        )]);
        let mut small = Reconciler::new(FakeMaps::with_capacity(cap(2))).unwrap();
        let out = small.sync_full(&d, true).unwrap();
        assert_eq!(out.refused.len(), 1, "{out:?}");
        let mut fits = Reconciler::new(FakeMaps::with_capacity(cap(3))).unwrap();
        let out = fits.sync_full(&d, true).unwrap();
        assert!(out.refused.is_empty(), "{out:?}");
        assert_eq!(rejects(&fits), [ip("10.96.0.10")]);
    }
}
