//! The object store: current objects, the full change log, and one global
//! resourceVersion counter shared by every kind (like etcd's revision).
//!
//! Every change is kept, so the state at any resourceVersion can be rebuilt
//! (exact lists, consistent pagination) and a watch can resume from any
//! version — except versions older than the compaction point, which get
//! 410 Expired as on a real apiserver after etcd compaction.

use std::collections::BTreeMap;
use std::ops::Bound;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{json, Value};

/// The resource kinds the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` Service, namespaced.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice, namespaced.
    EndpointSlice,
    /// `v1` Node, cluster-scoped.
    Node,
}

impl Kind {
    /// Every kind, in counter-index order.
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    /// The object's `kind`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    /// The object's `apiVersion`.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The API group (`""` for core).
    pub fn group(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "",
            Kind::EndpointSlice => "discovery.k8s.io",
        }
    }

    /// The resource name in URL paths.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    /// Whether objects live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// `plural` or `plural.group`, as apiserver messages name a resource.
    pub fn qualified_plural(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            g => format!("{}.{g}", self.plural()),
        }
    }

    /// The kind named by an object's `apiVersion` and `kind`.
    pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Where an object lives: kind, namespace (`""` when cluster-scoped), name.
/// Ordered like the apiserver's etcd keys, so lists come out in that order.
pub type Key = (Kind, String, String);

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion this change created.
    pub rv: u64,
    pub key: Key,
    /// The object before the change, if it existed.
    pub old: Option<Value>,
    /// The object after the change; `None` for a deletion.
    pub new: Option<Value>,
}

impl Change {
    /// The object a DELETED event carries: the last state, stamped with
    /// the resourceVersion of the deletion (what the apiserver sends).
    pub fn old_at_this_version(&self) -> Option<Value> {
        self.old.clone().map(|mut o| {
            set_rv(&mut o, self.rv);
            o
        })
    }
}

/// Why a version cannot be served.
#[derive(Debug, Clone, PartialEq)]
pub enum VersionError {
    /// Older than the compaction point (410 Expired); carries the oldest
    /// version still available.
    Expired { oldest: u64 },
    /// Newer than anything issued yet.
    TooLarge { current: u64 },
}

#[derive(Debug)]
pub struct Store {
    /// The last resourceVersion issued.
    rv: u64,
    /// Versions below this are compacted away.
    oldest: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<Change>,
    next_uid: u64,
}

impl Store {
    pub fn new() -> Self {
        // Start above 0: "0" means "any version" in list and watch requests.
        Store {
            rv: 1,
            oldest: 1,
            objects: BTreeMap::new(),
            log: Vec::new(),
            next_uid: 1,
        }
    }

    /// The last resourceVersion issued.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The oldest resourceVersion that is not compacted.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// Creates or replaces an object, filling in what the apiserver owns
    /// (resourceVersion, uid, creationTimestamp, generation, default
    /// namespace). Returns the stored object.
    pub fn apply(&mut self, mut obj: Value) -> Result<(Value, Option<Change>), String> {
        let kind = kind_of(&obj)?;
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or("object has no metadata")?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or("object has no metadata.name")?
            .to_string();
        let namespace = if kind.namespaced() {
            let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
            let ns = if ns.is_empty() { "default" } else { ns }.to_string();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = (kind, namespace, name);
        let old = self.objects.get(&key).cloned();
        // Server-owned fields: whatever the caller sent is replaced.
        for field in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
            meta.remove(field);
        }
        match &old {
            Some(prev) => {
                for field in ["uid", "creationTimestamp"] {
                    if let Some(v) = prev.pointer(&format!("/metadata/{field}")) {
                        meta.insert(field.into(), v.clone());
                    }
                }
            }
            None => {
                meta.insert("uid".into(), json!(self.uid()));
                let now = Time(k8s_openapi::jiff::Timestamp::now());
                meta.insert("creationTimestamp".into(), json!(now));
            }
        }
        let generation = generation(kind, old.as_ref(), &obj);
        if let Some(g) = generation {
            obj["metadata"]["generation"] = json!(g);
        }
        if let Some(prev) = &old {
            // An apply that changes nothing is a no-op, as an update that
            // changes nothing is on the apiserver: no new version, no event.
            let mut same = prev.clone();
            set_rv(&mut obj, 0);
            set_rv(&mut same, 0);
            if same == obj {
                return Ok((prev.clone(), None));
            }
        }
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        self.objects.insert(key.clone(), obj.clone());
        let change = Change {
            rv: self.rv,
            key,
            old,
            new: Some(obj.clone()),
        };
        self.log.push(change.clone());
        Ok((obj, Some(change)))
    }

    /// Deletes an object; `None` when there was none.
    pub fn delete(&mut self, key: &Key) -> Option<Change> {
        let old = self.objects.remove(key)?;
        self.rv += 1;
        let change = Change {
            rv: self.rv,
            key: key.clone(),
            old: Some(old),
            new: None,
        };
        self.log.push(change.clone());
        Some(change)
    }

    /// The current object at `key`.
    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Makes every version issued so far too old, then issues a fresh one
    /// that lists report, so a relist is not itself expired at once.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.oldest = self.rv;
    }

    /// Checks that the state at `rv` can be served.
    pub fn check_version(&self, rv: u64) -> Result<(), VersionError> {
        if rv < self.oldest {
            Err(VersionError::Expired {
                oldest: self.oldest,
            })
        } else if rv > self.rv {
            Err(VersionError::TooLarge { current: self.rv })
        } else {
            Ok(())
        }
    }

    /// The objects of `kind` as they were at `rv` (already checked), in key
    /// order.
    pub fn snapshot(&self, kind: Kind, rv: u64) -> Vec<(Key, Value)> {
        let range = (kind, String::new(), String::new())..;
        let of_kind = |k: &Key| k.0 == kind;
        if rv >= self.rv {
            return self
                .objects
                .range(range)
                .take_while(|(k, _)| of_kind(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        let mut state = BTreeMap::new();
        for c in self.log.iter().take_while(|c| c.rv <= rv) {
            if !of_kind(&c.key) {
                continue;
            }
            match &c.new {
                Some(v) => state.insert(c.key.clone(), v.clone()),
                None => state.remove(&c.key),
            };
        }
        state.into_iter().collect()
    }

    /// One page of a list: the objects of `kind` at `rv` (already checked)
    /// whose namespace/name comes after `after` and that `keep` accepts, in
    /// key order, at most `limit` of them (cloned), and how many more there
    /// are. At the current version it starts at `after` and clones only
    /// the page, so listing N objects in pages costs O(N), not O(N²/page).
    pub fn page(
        &self,
        kind: Kind,
        rv: u64,
        after: Option<&(String, String)>,
        keep: impl Fn(&Key, &Value) -> bool,
        limit: Option<usize>,
    ) -> (Vec<(Key, Value)>, usize) {
        let mut page = Vec::new();
        let mut more = 0;
        let mut visit = |k: &Key, v: &Value| {
            if after.is_some_and(|a| (&k.1, &k.2) <= (&a.0, &a.1)) || !keep(k, v) {
                return;
            }
            if limit.is_some_and(|l| page.len() >= l) {
                more += 1;
            } else {
                page.push((k.clone(), v.clone()));
            }
        };
        if rv >= self.rv {
            let start = match after {
                Some((ns, name)) => Bound::Excluded((kind, ns.clone(), name.clone())),
                None => Bound::Included((kind, String::new(), String::new())),
            };
            for (k, v) in self
                .objects
                .range((start, Bound::Unbounded))
                .take_while(|(k, _)| k.0 == kind)
            {
                visit(k, v);
            }
        } else {
            for (k, v) in &self.snapshot(kind, rv) {
                visit(k, v);
            }
        }
        (page, more)
    }

    /// Changes of `kind` with a version above `after`, oldest first, and
    /// the version of the last change of any kind looked at (so a watch can
    /// advance past changes it does not report).
    pub fn changes_after(&self, kind: Kind, after: u64) -> (Vec<Change>, u64) {
        let start = self.log.partition_point(|c| c.rv <= after);
        let tail = &self.log[start..];
        let last = tail.last().map_or(after, |c| c.rv);
        let changes = tail.iter().filter(|c| c.key.0 == kind).cloned().collect();
        (changes, last)
    }

    fn uid(&mut self) -> String {
        let n = self.next_uid;
        self.next_uid += 1;
        format!("6b70722d-0000-4000-8000-{n:012x}")
    }
}

/// The kind an object declares.
pub fn kind_of(obj: &Value) -> Result<Kind, String> {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    Kind::of(api_version, kind).ok_or_else(|| {
        format!("unsupported object {api_version:?}/{kind:?}: the stand-in serves v1 Service, discovery.k8s.io/v1 EndpointSlice and v1 Node")
    })
}

/// Sets `metadata.resourceVersion` (0 removes it).
pub fn set_rv(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if rv == 0 {
            meta.remove("resourceVersion");
        } else {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
        }
    }
}

/// `metadata.generation` as the apiserver's strategies set it: 1 on
/// create, +1 when anything outside metadata and status changes. Services
/// and EndpointSlices have one; Nodes do not.
fn generation(kind: Kind, old: Option<&Value>, new: &Value) -> Option<i64> {
    if kind == Kind::Node {
        return None;
    }
    let Some(old) = old else { return Some(1) };
    let prev = old
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let body = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("metadata");
            o.remove("status");
        }
        v
    };
    Some(if body(old) == body(new) {
        prev
    } else {
        prev + 1
    })
}
