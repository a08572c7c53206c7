//! Kubernetes mode: a Warning Event (`events.k8s.io/v1`, reason
//! `ServiceNotProgrammed`) on each Service kpr cannot program, so that
//! `kubectl describe service` and `kubectl events` show it where its owner
//! looks.
//!
//! One Event per Service per distinct reason and message, not one per
//! sync: a refusal repeats on every retry until its cause goes away. A
//! Service that is programmed (or deleted) is forgotten, so a later
//! refusal gets a new Event. Events are rate-bounded: they queue (at most
//! [`QUEUE`]) for one task that creates one every [`SPACING`]; what does
//! not fit in the queue is not marked sent and is offered again by the
//! next sync. The API's refusal to create Events (RBAC without the chart's
//! `events.enabled`) is logged once; Events are best effort and never
//! fail a sync.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::mpsc;

use crate::source::store::ObjectStore;
use crate::status::UnprogrammedService;

/// The Event reason.
pub const REASON: &str = "ServiceNotProgrammed";
/// The reporting controller of kpr's Events.
pub const CONTROLLER: &str = "kpr.io/agent";
/// Events waiting to be created, at most.
const QUEUE: usize = 64;
/// Time between two Event creations (at most 10 a second).
const SPACING: Duration = Duration::from_millis(100);
/// The API limit of an Event's note.
const NOTE_MAX: usize = 1024;

/// Sends the Events; see the module docs.
pub struct ServiceEvents {
    tx: mpsc::Sender<Event>,
    /// What the last Event of each Service said: (reason label, message).
    sent: BTreeMap<String, (String, String)>,
    /// `reportingInstance`: the node's name.
    instance: String,
}

impl ServiceEvents {
    /// Starts the task that creates Events through `client`, reported as
    /// coming from kpr on `node_name`.
    pub fn spawn(client: Client, node_name: &str) -> ServiceEvents {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(create_events(client, rx));
        ServiceEvents {
            tx,
            sent: BTreeMap::new(),
            instance: format!("kpr-{node_name}"),
        }
    }

    /// Offers an Event for each Service of `unprogrammed` whose reason or
    /// message differs from its last Event; forgets the Services that are
    /// programmed now.
    pub fn update(&mut self, unprogrammed: &[UnprogrammedService], store: &ObjectStore) {
        self.sent
            .retain(|service, _| unprogrammed.iter().any(|u| &u.service == service));
        for u in unprogrammed {
            let said = (u.reason.clone(), u.message.clone());
            if self.sent.get(&u.service) == Some(&said) {
                continue;
            }
            let Some(svc) = store.service(&u.service) else {
                continue;
            };
            let event = warning(&svc.metadata, &u.message, &self.instance);
            match self.tx.try_send(event) {
                Ok(()) => {
                    self.sent.insert(u.service.clone(), said);
                }
                // Full: offered again by the next sync. Closed: the task
                // ended (the runtime is stopping).
                Err(_) => break,
            }
        }
    }
}

/// The Warning Event about the Service of `meta`.
fn warning(meta: &ObjectMeta, message: &str, instance: &str) -> Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    let name = meta.name.clone().unwrap_or_default();
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: meta.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some(REASON.into()),
        action: Some("Program".into()),
        note: Some(truncate(message, NOTE_MAX)),
        reporting_controller: Some(CONTROLLER.into()),
        reporting_instance: Some(truncate(instance, 128)),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            name: Some(name),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..ObjectReference::default()
        }),
        ..Event::default()
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Creates the queued Events one every [`SPACING`] until the queue closes.
async fn create_events(client: Client, mut rx: mpsc::Receiver<Event>) {
    let mut refused_logged = false;
    while let Some(event) = rx.recv().await {
        let namespace = event.metadata.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(client.clone(), namespace);
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 403 => {
                if !refused_logged {
                    refused_logged = true;
                    tracing::warn!(
                        error = %e,
                        "not allowed to create Events: unprogrammed Services show in kpr status and kpr_services_unprogrammed only (grant create on events.k8s.io events; chart: events.enabled)"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "creating an Event failed"),
        }
        tokio::time::sleep(SPACING).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_is_cut_to_the_api_limit_on_a_character_boundary() {
        let long = "é".repeat(NOTE_MAX);
        let cut = truncate(&long, NOTE_MAX);
        assert!(cut.len() <= NOTE_MAX);
        assert_eq!(cut.len(), NOTE_MAX);
        assert_eq!(truncate("short", NOTE_MAX), "short");
    }

    fn unprogrammed(service: &str, message: &str) -> UnprogrammedService {
        UnprogrammedService {
            service: service.into(),
            reason: "frontend_conflict".into(),
            message: message.into(),
        }
    }

    #[test]
    fn one_event_per_service_and_distinct_message_and_again_after_it_was_programmed() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let mut events = ServiceEvents {
            tx,
            sent: BTreeMap::new(),
            instance: "kpr-node1".into(),
        };
        let mut store = ObjectStore::new();
        let mut svc = k8s_openapi::api::core::v1::Service::default();
        svc.metadata.name = Some("web".into());
        svc.metadata.namespace = Some("t".into());
        store.apply_service(svc);
        let mut sent = || {
            let mut notes = Vec::new();
            while let Ok(e) = rx.try_recv() {
                notes.push(e.note.unwrap_or_default());
            }
            notes
        };

        let first = [unprogrammed("t/web", "taken by t/a")];
        events.update(&first, &store);
        events.update(&first, &store);
        assert_eq!(sent(), ["taken by t/a"], "one Event, not one per sync");
        let other = [unprogrammed("t/web", "taken by t/b")];
        events.update(&other, &store);
        assert_eq!(sent(), ["taken by t/b"], "a new message is a new Event");
        // Programmed, then refused again: a new Event.
        events.update(&[], &store);
        events.update(&other, &store);
        assert_eq!(sent(), ["taken by t/b"]);
        // A Service gone from the store gets none.
        events.update(&[unprogrammed("t/gone", "x")], &store);
        assert!(sent().is_empty());
    }

    #[test]
    fn a_full_queue_is_offered_again_by_the_next_sync() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut events = ServiceEvents {
            tx,
            sent: BTreeMap::new(),
            instance: "kpr-node1".into(),
        };
        let mut store = ObjectStore::new();
        for name in ["a", "b"] {
            let mut svc = k8s_openapi::api::core::v1::Service::default();
            svc.metadata.name = Some(name.into());
            svc.metadata.namespace = Some("t".into());
            store.apply_service(svc);
        }
        let both = [unprogrammed("t/a", "m"), unprogrammed("t/b", "m")];
        events.update(&both, &store);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "the queue held one");
        events.update(&both, &store);
        let e = rx.try_recv().expect("t/b offered again");
        assert_eq!(e.regarding.and_then(|r| r.name).as_deref(), Some("b"));
    }

    #[test]
    fn the_event_is_a_warning_regarding_the_service_by_uid() {
        let meta = ObjectMeta {
            name: Some("web".into()),
            namespace: Some("shop".into()),
            uid: Some("u-1".into()),
            ..ObjectMeta::default()
        };
        let e = warning(&meta, "service shop/web not programmed: why", "kpr-node1");
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some(REASON));
        assert_eq!(e.metadata.namespace.as_deref(), Some("shop"));
        let r = e.regarding.expect("regarding");
        assert_eq!(r.kind.as_deref(), Some("Service"));
        assert_eq!(r.uid.as_deref(), Some("u-1"));
        assert_eq!(r.name.as_deref(), Some("web"));
    }
}
