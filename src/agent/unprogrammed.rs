//! The Services that are not programmed now, one entry each with why: what
//! `kpr_services_unprogrammed{reason}`, `kpr status` and (Kubernetes mode)
//! the Warning Events show, so that no Service goes unserved unseen.
//!
//! Three causes, kept apart because different steps decide them: the maps
//! refused the Service (capacity, a frontend another Service owns, ids,
//! slots, Maglev; the reconciler retries it on every full sync), or
//! translation refused it (what the API server would refuse, or nothing kpr
//! can program: it has skips and not one frontend), or, in standalone mode,
//! the manifest source's validation refused it before it reached the store
//! (replaced after every reload). A full sync replaces the first two; an
//! incremental one updates only the Services it synced, so the table stays
//! exact between full syncs. An entry goes when its Service is programmed
//! or deleted.

use std::collections::{BTreeMap, BTreeSet};

use crate::metrics::{Metrics, UnprogrammedReason};
use crate::reconcile::{Refusal, RefusalReason};
use crate::skip::SkipReason;
use crate::status::UnprogrammedService;
use crate::translate::{ServiceTranslation, Skipped, Translation};

/// The Services not programmed now, by `namespace/name`.
#[derive(Debug, Default)]
pub struct Unprogrammed {
    /// Refused by the maps: the first refusal of each Service.
    refused: BTreeMap<String, Entry>,
    /// Refused by translation.
    invalid: BTreeMap<String, Entry>,
    /// Refused by the manifest source's validation (never in the store).
    rejected: BTreeMap<String, Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    reason: UnprogrammedReason,
    message: String,
}

impl Unprogrammed {
    /// After a full sync: `refused` is every Service the maps refuse.
    pub fn replace_refused(&mut self, refused: &[Refusal]) {
        self.refused.clear();
        self.add_refused(refused);
    }

    /// After a sync of the Services `synced` only: their entries are
    /// replaced by `refused`, every other Service keeps its own.
    pub fn update_refused<'a>(
        &mut self,
        synced: impl IntoIterator<Item = &'a String>,
        refused: &[Refusal],
    ) {
        for service in synced {
            self.refused.remove(service);
        }
        self.add_refused(refused);
    }

    fn add_refused(&mut self, refused: &[Refusal]) {
        for r in refused {
            self.refused.entry(r.service.clone()).or_insert(Entry {
                reason: reason_of(&r.reason),
                message: r.to_string(),
            });
        }
    }

    /// After translating every Service.
    pub fn replace_invalid(&mut self, t: &Translation) {
        self.invalid.clear();
        for (service, frontends) in &t.desired {
            if frontends.is_empty() {
                self.set_invalid(service, &t.skipped);
            }
        }
    }

    /// After translating the Service `service` alone (None: it is gone).
    pub fn update_invalid(
        &mut self,
        service: &str,
        t: Option<&ServiceTranslation>,
        skipped: &[Skipped],
    ) {
        self.invalid.remove(service);
        if t.is_some_and(|t| t.frontends.is_empty()) {
            self.set_invalid(service, skipped);
        }
    }

    /// Records `service` (which has no frontend) as invalid when
    /// translation skipped something of it.
    fn set_invalid(&mut self, service: &str, skipped: &[Skipped]) {
        let object = format!("Service {service}");
        if let Some(s) = skipped.iter().find(|s| s.object == object) {
            self.invalid.insert(
                service.to_string(),
                Entry {
                    reason: UnprogrammedReason::Invalid,
                    message: format!(
                        "service {service} not programmed: {} ({})",
                        s.detail, s.reason
                    ),
                },
            );
        }
    }

    /// After a reload of the manifests: `rejected` is every Service their
    /// validation refuses, by `namespace/name`, with the reason and detail.
    pub fn replace_rejected<'a>(
        &mut self,
        rejected: impl IntoIterator<Item = (&'a String, SkipReason, &'a str)>,
    ) {
        self.rejected = rejected
            .into_iter()
            .map(|(service, reason, detail)| {
                let entry = Entry {
                    reason: UnprogrammedReason::Invalid,
                    message: format!("service {service} not programmed: {detail} ({reason})"),
                };
                (service.clone(), entry)
            })
            .collect();
    }

    /// One entry per Service, sorted by Service (a Service refused by
    /// translation has no frontend, so the maps cannot refuse it too; one
    /// the source refused never reached either).
    pub fn list(&self) -> Vec<UnprogrammedService> {
        let mut all: BTreeMap<&String, &Entry> = self.rejected.iter().collect();
        all.extend(self.invalid.iter());
        all.extend(self.refused.iter());
        all.into_iter()
            .map(|(service, e)| UnprogrammedService {
                service: service.clone(),
                reason: e.reason.as_label().to_string(),
                message: e.message.clone(),
            })
            .collect()
    }

    /// The messages of every entry, to log each only when it first shows.
    pub fn messages(&self) -> BTreeSet<String> {
        self.refused
            .values()
            .chain(self.invalid.values())
            .chain(self.rejected.values())
            .map(|e| e.message.clone())
            .collect()
    }

    /// Sets `kpr_services_unprogrammed{reason}` for every reason.
    pub fn publish(&self, metrics: &Metrics) {
        let list = self.list();
        for &reason in UnprogrammedReason::ALL {
            let n = list
                .iter()
                .filter(|u| u.reason == reason.as_label())
                .count();
            metrics.set_unprogrammed(reason, n);
        }
    }
}

fn reason_of(reason: &RefusalReason) -> UnprogrammedReason {
    match reason {
        RefusalReason::Capacity { .. } => UnprogrammedReason::Capacity,
        RefusalReason::FrontendConflict { .. } => UnprogrammedReason::FrontendConflict,
        RefusalReason::IdsExhausted => UnprogrammedReason::IdsExhausted,
        RefusalReason::TooManyBackends { .. } => UnprogrammedReason::TooManyBackends,
        RefusalReason::Maglev { .. } => UnprogrammedReason::Maglev,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::maps::MapName;
    use crate::model::{
        Frontend, FrontendOptions, FrontendSpec, Protocol, ServiceRef, ServiceType,
    };
    use crate::skip::SkipReason;

    fn capacity(service: &str) -> Refusal {
        Refusal {
            service: service.into(),
            reason: RefusalReason::Capacity {
                map: MapName::Services,
                needed: 3,
                free: 1,
                capacity: 4,
            },
        }
    }

    fn conflict(service: &str) -> Refusal {
        Refusal {
            service: service.into(),
            reason: RefusalReason::FrontendConflict {
                frontend: Frontend::new("10.96.0.1".parse().unwrap(), 80, Protocol::Tcp),
                owner: "default/owner".into(),
            },
        }
    }

    fn reasons(u: &Unprogrammed) -> Vec<(String, String)> {
        u.list()
            .into_iter()
            .map(|e| (e.service, e.reason))
            .collect()
    }

    fn pair(service: &str, reason: &str) -> (String, String) {
        (service.into(), reason.into())
    }

    #[test]
    fn an_incremental_sync_keeps_the_refusals_of_services_it_did_not_touch() {
        let mut u = Unprogrammed::default();
        u.replace_refused(&[capacity("ns/a"), conflict("ns/b")]);
        // Only ns/a was synced, and programmed this time.
        u.update_refused([&"ns/a".to_string()], &[]);
        assert_eq!(reasons(&u), [pair("ns/b", "frontend_conflict")]);
        // A full sync with no refusal clears everything.
        u.replace_refused(&[]);
        assert!(u.list().is_empty());
    }

    #[test]
    fn a_service_is_listed_once_with_its_first_refusal() {
        let mut u = Unprogrammed::default();
        u.replace_refused(&[conflict("ns/a"), capacity("ns/a")]);
        let list = u.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].reason, "frontend_conflict");
        assert!(list[0].message.contains("10.96.0.1"), "{}", list[0].message);
    }

    #[test]
    fn a_service_translation_refused_whole_is_invalid_until_it_has_frontends() {
        let skipped = vec![Skipped {
            object: "Service ns/bad".into(),
            reason: SkipReason::InvalidAddress,
            detail: "clusterIP 127.0.0.1 is loopback".into(),
        }];
        let empty = ServiceTranslation::default();
        let mut u = Unprogrammed::default();
        u.update_invalid("ns/bad", Some(&empty), &skipped);
        assert_eq!(reasons(&u), [pair("ns/bad", "invalid")]);
        assert!(u.list()[0].message.contains("loopback"));

        // A skip of one port of a Service that still has frontends is no
        // unprogrammed Service.
        let mut partial = ServiceTranslation::default();
        partial.frontends.insert(
            Frontend::new("10.96.0.2".parse().unwrap(), 80, Protocol::Tcp),
            FrontendSpec {
                service: ServiceRef {
                    namespace: "ns".into(),
                    name: "bad".into(),
                    port_name: String::new(),
                },
                svc_type: ServiceType::ClusterIP,
                options: FrontendOptions::default(),
                backends: Vec::new(),
                source_ranges: Vec::new(),
            },
        );
        u.update_invalid("ns/bad", Some(&partial), &skipped);
        assert!(u.list().is_empty());

        // Deleted: gone.
        u.update_invalid("ns/bad", Some(&empty), &skipped);
        u.update_invalid("ns/bad", None, &[]);
        assert!(u.list().is_empty());
    }

    #[test]
    fn a_service_the_source_rejected_is_invalid_until_a_reload_no_longer_rejects_it() {
        let service = "ns/bad".to_string();
        let mut u = Unprogrammed::default();
        u.replace_rejected([(
            &service,
            SkipReason::InvalidPort,
            "nodePort 80 is out of range",
        )]);
        // A full sync (nothing refused, nothing invalid) keeps it: the
        // Service never reached translation.
        u.replace_refused(&[]);
        u.replace_invalid(&Translation::default());
        assert_eq!(reasons(&u), [pair("ns/bad", "invalid")]);
        assert!(
            u.list()[0].message.contains("nodePort 80"),
            "{}",
            u.list()[0].message
        );
        u.replace_rejected([]);
        assert!(u.list().is_empty());
    }

    #[test]
    fn the_gauge_counts_services_per_reason_and_drops_to_zero() {
        let metrics = Metrics::new();
        let mut u = Unprogrammed::default();
        u.replace_refused(&[capacity("ns/a"), capacity("ns/b"), conflict("ns/c")]);
        u.publish(&metrics);
        let text = metrics.encode();
        assert!(text.contains("kpr_services_unprogrammed{reason=\"capacity\"} 2\n"));
        assert!(text.contains("kpr_services_unprogrammed{reason=\"frontend_conflict\"} 1\n"));
        u.replace_refused(&[]);
        u.publish(&metrics);
        let text = metrics.encode();
        assert!(text.contains("kpr_services_unprogrammed{reason=\"capacity\"} 0\n"));
    }
}
