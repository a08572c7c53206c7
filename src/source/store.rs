//! The objects the Kubernetes watchers last reported, and which Services
//! changed since the last sync. Pure bookkeeping, no I/O: the watch loop
//! feeds it events, the agent takes the changes and translates only those.
//!
//! A relist (the watcher's Init .. InitDone) replaces a kind's objects as a
//! whole and marks every key that was or is present as changed, so objects
//! deleted while the watch was down are removed (Cilium #48050's bug).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use crate::source::slim::{self, SlimSlice};
use crate::translate::{host_port_key, object_key};

/// Annotation the EndpointSlice controller sets to when the change that led
/// to this slice version happened (kube-proxy's network programming latency).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The kinds the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];
}

/// What changed since the last sync.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// Every Service must be re-translated (node change, relist, resync).
    pub all: bool,
    /// Services to re-translate (`namespace/name`).
    pub services: BTreeSet<String>,
    /// EndpointSlice trigger times of the changes, per Service.
    pub trigger_times: Vec<Timestamp>,
    /// EndpointSlice events in these changes.
    pub endpoint_changes: u64,
    /// Service events in these changes.
    pub service_changes: u64,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }
}

pub struct ObjectStore {
    /// Trigger times before this are not this agent's to measure (kube-proxy
    /// ignores them the same way).
    started: Timestamp,
    /// Shared, not copied: the manifest source keeps the same objects.
    services: BTreeMap<String, Arc<Service>>,
    slices: BTreeMap<String, Arc<SlimSlice>>,
    /// Each Service's slice keys, sorted: a vector, as a Service almost
    /// always has one slice (a set's first node alone is ~300 bytes).
    slices_by_service: BTreeMap<String, Vec<String>>,
    node: Option<Node>,
    /// Pods with hostPorts (standalone mode), by [`host_port_key`]; their
    /// changes are marked under that key, as a Service's are.
    pods: BTreeMap<String, Arc<Pod>>,
    /// Objects of a relist in progress, per kind.
    relist: BTreeMap<Kind, Vec<Relisted>>,
    listed: BTreeSet<Kind>,
    pending: Changes,
}

enum Relisted {
    Service(Box<Service>),
    Slice(Box<SlimSlice>),
    Node(Box<Node>),
}

impl Default for ObjectStore {
    fn default() -> Self {
        ObjectStore {
            started: Timestamp::now(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slices_by_service: BTreeMap::new(),
            node: None,
            pods: BTreeMap::new(),
            relist: BTreeMap::new(),
            listed: BTreeSet::new(),
            pending: Changes::default(),
        }
    }
}

impl ObjectStore {
    pub fn new() -> ObjectStore {
        ObjectStore::default()
    }

    /// Every watcher has delivered its initial list: only now may stale
    /// entries be pruned.
    pub fn initial_lists_complete(&self) -> bool {
        Kind::ALL.iter().all(|k| self.listed.contains(k))
    }

    pub fn is_listed(&self, kind: Kind) -> bool {
        self.listed.contains(&kind)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values().map(|s| &**s)
    }

    pub fn service(&self, key: &str) -> Option<&Service> {
        self.services.get(key).map(|s| &**s)
    }

    /// The Service stored under `key` (`namespace/name`), shared.
    pub fn service_shared(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// Every Service with its `namespace/name` key.
    pub fn services_by_key(&self) -> impl Iterator<Item = (&String, &Service)> {
        self.services.iter().map(|(k, s)| (k, &**s))
    }

    /// The EndpointSlice stored under `key` (`namespace/name`), shared.
    pub fn slice_shared(&self, key: &str) -> Option<&Arc<SlimSlice>> {
        self.slices.get(key)
    }

    /// The EndpointSlices of a Service that kube-proxy would see (not
    /// labelled for another proxy or headless), rebuilt as API objects
    /// for translation.
    pub fn slices_of(&self, service_key: &str) -> Vec<EndpointSlice> {
        self.slices_by_service
            .get(service_key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .filter(|s| s.is_for_default_proxy())
            .map(|s| s.to_k8s())
            .collect()
    }

    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }

    /// The pod of a [`host_port_key`].
    pub fn pod(&self, key: &str) -> Option<&Pod> {
        self.pods.get(key).map(|p| &**p)
    }

    pub fn pod_shared(&self, key: &str) -> Option<&Arc<Pod>> {
        self.pods.get(key)
    }

    /// Every pod, by [`host_port_key`].
    pub fn pods_by_key(&self) -> impl Iterator<Item = (&String, &Pod)> {
        self.pods.iter().map(|(k, p)| (k, &**p))
    }

    pub fn apply_pod(&mut self, pod: Arc<Pod>) {
        let key = pod_key(&pod);
        self.pending.services.insert(key.clone());
        self.pods.insert(key, pod);
    }

    pub fn delete_pod(&mut self, pod: &Pod) {
        let key = pod_key(pod);
        self.pending.services.insert(key.clone());
        self.pods.remove(&key);
    }

    pub fn apply_service(&mut self, svc: impl Into<Arc<Service>>) {
        let svc = svc.into();
        let key = object_key(&svc.metadata);
        self.pending.services.insert(key.clone());
        self.pending.service_changes += 1;
        self.services.insert(key, svc);
    }

    pub fn delete_service(&mut self, svc: &Service) {
        let key = object_key(&svc.metadata);
        self.pending.services.insert(key.clone());
        self.pending.service_changes += 1;
        self.services.remove(&key);
    }

    pub fn apply_slice(&mut self, slice: impl Into<Arc<SlimSlice>>) {
        self.put_slice(slice.into(), true);
    }

    /// Stores a slice; `measure` says whether its trigger time is a change
    /// this agent should time (not for slices a relist merely re-delivers).
    fn put_slice(&mut self, slice: Arc<SlimSlice>, measure: bool) {
        let key = slice.key();
        let unchanged = self.slices.get(&key) == Some(&slice);
        if let Some(old) = self.slices.remove(&key) {
            self.unindex_slice(&key, &old);
        }
        self.note_slice_change(&slice, measure && !unchanged);
        if let Some(svc) = slice.service_key() {
            let keys = self.slices_by_service.entry(svc).or_default();
            if let Err(i) = keys.binary_search(&key) {
                keys.reserve_exact(1);
                keys.insert(i, key.clone());
            }
        }
        self.slices.insert(key, slice);
    }

    pub fn delete_slice(&mut self, slice: &SlimSlice) {
        let key = slice.key();
        if let Some(old) = self.slices.remove(&key) {
            self.unindex_slice(&key, &old);
        }
        self.note_slice_change(slice, false);
    }

    fn unindex_slice(&mut self, key: &str, old: &SlimSlice) {
        if let Some(svc) = old.service_key() {
            self.pending.services.insert(svc.clone());
            if let Some(keys) = self.slices_by_service.get_mut(&svc) {
                if let Ok(i) = keys.binary_search_by(|k| k.as_str().cmp(key)) {
                    keys.remove(i);
                }
                if keys.is_empty() {
                    self.slices_by_service.remove(&svc);
                }
            }
        }
    }

    fn note_slice_change(&mut self, slice: &SlimSlice, measure: bool) {
        self.pending.endpoint_changes += 1;
        if let Some(svc) = slice.service_key() {
            self.pending.services.insert(svc);
        }
        if !measure {
            return;
        }
        let trigger = slice.annotation(TRIGGER_TIME_ANNOTATION);
        if let Some(t) = trigger
            .and_then(|t| t.parse::<Timestamp>().ok())
            .filter(|t| *t >= self.started)
        {
            self.pending.trigger_times.push(t);
        }
    }

    /// The agent's own Node changed (addresses, zone): every Service may change.
    pub fn set_node(&mut self, node: Option<Node>) {
        // Heartbeats and image lists change all the time; only what the
        // translation reads (labels, addresses) re-translates everything.
        let relevant = |n: &Option<Node>| {
            n.as_ref().map(|n| {
                (
                    n.metadata.labels.clone(),
                    n.status.as_ref().and_then(|s| s.addresses.clone()),
                )
            })
        };
        if relevant(&self.node) != relevant(&node) {
            self.pending.all = true;
        }
        self.node = node;
    }

    /// A watcher (re)starts listing `kind`.
    pub fn begin_relist(&mut self, kind: Kind) {
        self.relist.insert(kind, Vec::new());
    }

    pub fn relist_service(&mut self, svc: Service) {
        self.relist
            .entry(Kind::Service)
            .or_default()
            .push(Relisted::Service(Box::new(svc)));
    }

    pub fn relist_slice(&mut self, slice: SlimSlice) {
        self.relist
            .entry(Kind::EndpointSlice)
            .or_default()
            .push(Relisted::Slice(Box::new(slice)));
    }

    pub fn relist_node(&mut self, node: Node) {
        self.relist
            .entry(Kind::Node)
            .or_default()
            .push(Relisted::Node(Box::new(node)));
    }

    /// The relist of `kind` is complete: its objects replace the old ones.
    pub fn end_relist(&mut self, kind: Kind) {
        let items = self.relist.remove(&kind).unwrap_or_default();
        match kind {
            Kind::Service => {
                self.pending.services.extend(self.services.keys().cloned());
                self.services.clear();
                for item in items {
                    if let Relisted::Service(svc) = item {
                        self.apply_service(*svc);
                    }
                }
            }
            Kind::EndpointSlice => {
                let old: Vec<Arc<SlimSlice>> = self.slices.values().cloned().collect();
                for slice in &old {
                    self.delete_slice(slice);
                }
                for item in items {
                    if let Relisted::Slice(slice) = item {
                        self.put_slice(Arc::new(*slice), false);
                    }
                }
            }
            Kind::Node => {
                let node = items.into_iter().find_map(|i| match i {
                    Relisted::Node(n) => Some(*n),
                    _ => None,
                });
                self.set_node(node);
            }
        }
        if self.listed.contains(&kind) {
            // A relist after the first: re-check everything against it.
            self.pending.all = true;
        }
        self.listed.insert(kind);
    }

    /// Takes what changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.pending)
    }

    pub fn has_changes(&self) -> bool {
        !self.pending.is_empty()
    }

    /// What changed since the last [`ObjectStore::take_changes`], not taken.
    pub fn pending(&self) -> &Changes {
        &self.pending
    }
}

/// A watched kind: how its objects enter the store (slimmed: see
/// [`slim`]).
pub trait Watched: Sized {
    const KIND: Kind;
    fn apply(self, store: &mut ObjectStore);
    fn delete(self, store: &mut ObjectStore);
    fn relist(self, store: &mut ObjectStore);
}

impl Watched for Service {
    const KIND: Kind = Kind::Service;
    fn apply(self, store: &mut ObjectStore) {
        store.apply_service(slim::service(self))
    }
    fn delete(self, store: &mut ObjectStore) {
        store.delete_service(&self)
    }
    fn relist(self, store: &mut ObjectStore) {
        store.relist_service(slim::service(self))
    }
}

impl Watched for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn apply(self, store: &mut ObjectStore) {
        store.apply_slice(SlimSlice::from(self))
    }
    fn delete(self, store: &mut ObjectStore) {
        store.delete_slice(&SlimSlice::from(self))
    }
    fn relist(self, store: &mut ObjectStore) {
        store.relist_slice(SlimSlice::from(self))
    }
}

impl Watched for Node {
    const KIND: Kind = Kind::Node;
    fn apply(self, store: &mut ObjectStore) {
        store.set_node(Some(slim::node(self)))
    }
    fn delete(self, store: &mut ObjectStore) {
        store.set_node(None)
    }
    fn relist(self, store: &mut ObjectStore) {
        store.relist_node(slim::node(self))
    }
}

/// A pod's [`host_port_key`].
pub fn pod_key(pod: &Pod) -> String {
    host_port_key(
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or(""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    fn slice(name: &str, svc: &str) -> SlimSlice {
        slice_triggered(name, svc, &Timestamp::now().to_string())
    }

    fn slice_triggered(name: &str, svc: &str, trigger: &str) -> SlimSlice {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": svc},
                         "annotations": {TRIGGER_TIME_ANNOTATION: trigger}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.0.1"]}]
        }))
        .unwrap();
        SlimSlice::from(slice)
    }

    #[test]
    fn pruning_waits_for_every_initial_list() {
        let mut s = ObjectStore::new();
        for kind in [Kind::Service, Kind::EndpointSlice] {
            s.begin_relist(kind);
            s.end_relist(kind);
        }
        assert!(!s.initial_lists_complete());
        s.begin_relist(Kind::Node);
        s.end_relist(Kind::Node);
        assert!(s.initial_lists_complete());
    }

    #[test]
    fn slice_changes_mark_their_service_and_carry_trigger_times() {
        let mut s = ObjectStore::new();
        s.apply_service(svc("a"));
        s.take_changes();
        s.apply_slice(slice("a-1", "a"));
        let c = s.take_changes();
        assert_eq!(c.services, BTreeSet::from(["ns/a".to_string()]));
        assert_eq!(c.trigger_times.len(), 1);
        assert_eq!(c.endpoint_changes, 1);
        assert_eq!(s.slices_of("ns/a").len(), 1);
        s.delete_slice(&slice("a-1", "a"));
        assert!(s.slices_of("ns/a").is_empty());
        assert!(s.take_changes().services.contains("ns/a"));
    }

    #[test]
    fn a_slice_moving_to_another_service_marks_both() {
        let mut s = ObjectStore::new();
        s.apply_slice(slice("x", "a"));
        s.take_changes();
        s.apply_slice(slice("x", "b"));
        let c = s.take_changes();
        assert_eq!(
            c.services,
            BTreeSet::from(["ns/a".to_string(), "ns/b".to_string()])
        );
        assert!(s.slices_of("ns/a").is_empty());
    }

    #[test]
    fn relisted_slices_and_old_trigger_times_are_not_timed() {
        let mut s = ObjectStore::new();
        s.begin_relist(Kind::EndpointSlice);
        s.relist_slice(slice("a-1", "a"));
        s.end_relist(Kind::EndpointSlice);
        assert!(
            s.take_changes().trigger_times.is_empty(),
            "a relist is not a change to time"
        );
        s.apply_slice(slice_triggered("a-1", "a", "2020-01-01T00:00:00Z"));
        assert!(
            s.take_changes().trigger_times.is_empty(),
            "a trigger before the agent started is not ours"
        );
    }

    #[test]
    fn a_relist_removes_what_was_deleted_while_disconnected() {
        let mut s = ObjectStore::new();
        s.begin_relist(Kind::Service);
        s.relist_service(svc("a"));
        s.relist_service(svc("b"));
        s.end_relist(Kind::Service);
        s.begin_relist(Kind::EndpointSlice);
        s.relist_slice(slice("b-1", "b"));
        s.end_relist(Kind::EndpointSlice);
        s.take_changes();
        // Watch lost; b and its slice deleted meanwhile; relist.
        s.begin_relist(Kind::Service);
        s.relist_service(svc("a"));
        s.end_relist(Kind::Service);
        s.begin_relist(Kind::EndpointSlice);
        s.end_relist(Kind::EndpointSlice);
        let c = s.take_changes();
        assert!(c.all);
        assert!(c.services.contains("ns/b"));
        assert!(s.service("ns/b").is_none());
        assert!(s.slices_of("ns/b").is_empty());
        assert_eq!(s.counts(), (1, 0));
    }
}
