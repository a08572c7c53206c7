//! One document into objects: read its apiVersion/kind, decode the kinds
//! kpr consumes, flatten a `v1` `List`, default the namespace of the
//! namespaced kinds (a Node has none), and hand
//! each object to [`validate`](super::validate). Pure: no I/O, no state, so
//! a document whose text did not change never needs to come back here.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceSpec, ServiceStatus};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::documents::{exceeds_depth, Document};
use super::validate::{self, Rules};
use super::{Limits, DEFAULT_NAMESPACE};
use crate::skip::SkipReason;
use crate::source::slim::{self, SlimSlice};

/// The kinds a manifest can define.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    /// Cluster-scoped: its key's namespace is empty.
    Node,
    /// Read for its hostPorts.
    Pod,
}

impl ObjectKind {
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Service => Service::KIND,
            ObjectKind::EndpointSlice => EndpointSlice::KIND,
            ObjectKind::Node => Node::KIND,
            ObjectKind::Pod => Pod::KIND,
        }
    }

    fn namespaced(self) -> bool {
        self != ObjectKind::Node
    }
}

/// Which object: kind, namespace, name (what the API server keeps unique).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

/// A decoded, validated object, shared with the object store (never copied).
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<SlimSlice>),
    /// Slimmed as the Kubernetes source's Node is ([`slim::node`]).
    Node(Arc<Node>),
    /// Slimmed to what hostPorts need ([`slim::pod`]).
    Pod(Arc<Pod>),
}

impl Object {
    /// Same object: the same allocation, or equal content.
    pub fn same(&self, other: &Object) -> bool {
        match (self, other) {
            (Object::Service(a), Object::Service(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::EndpointSlice(a), Object::EndpointSlice(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::Node(a), Object::Node(b)) => Arc::ptr_eq(a, b) || a == b,
            (Object::Pod(a), Object::Pod(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        }
    }
}

/// Something in a document that was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    pub reason: SkipReason,
    /// Escaped, single-line specifics (a `List` item's start with `items[N]: `).
    pub detail: String,
}

/// A Service the validation refused: it is not programmed, and shows as
/// such (`kpr_services_unprogrammed`, `kpr status`) while a manifest
/// defines it so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// `namespace/name`, escaped.
    pub service: String,
    pub reason: SkipReason,
    pub detail: String,
}

/// What one document yields.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    /// Objects in document order (a List's in item order).
    pub objects: Vec<(ObjectKey, Object)>,
    pub skipped: Vec<Skip>,
    /// Services refused by the validation (also in `skipped`).
    pub rejected: Vec<Rejected>,
}

/// Parses one document of a YAML (`json: false`) or JSON file.
pub fn parse_document(doc: &Document<'_>, json: bool, limits: &Limits, rules: &Rules) -> Parsed {
    let mut out = Parsed::default();
    if doc.body.len() > limits.max_document_bytes {
        out.skip(
            None,
            SkipReason::TooLarge,
            format!(
                "document of {} bytes, over --manifest-max-document-bytes {}",
                doc.body.len(),
                limits.max_document_bytes
            ),
        );
    } else if exceeds_depth(doc.body, limits.max_depth) {
        out.skip(
            None,
            SkipReason::TooDeep,
            format!(
                "nested deeper than --manifest-max-depth {}",
                limits.max_depth
            ),
        );
    } else {
        let body = if json {
            Body::Json(doc)
        } else {
            Body::Yaml(doc)
        };
        out.document(&body, None, rules);
    }
    // Kept as long as the document is unchanged: no spare capacity.
    out.objects.shrink_to_fit();
    out
}

/// Fewest documents worth a second thread: below, starting it costs more
/// than it saves.
const DOCUMENTS_PER_THREAD: usize = 64;
/// Most threads a file's documents are parsed on.
const MAX_PARSE_THREADS: usize = 4;

/// Parses `docs` ([`parse_document`] each), on up to [`MAX_PARSE_THREADS`]
/// threads when there are enough of them: decoding is most of a large
/// reload's time, and documents are independent. Results in `docs` order.
pub fn parse_documents(
    docs: &[&Document<'_>],
    json: bool,
    limits: &Limits,
    rules: &Rules,
) -> Vec<Parsed> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (docs.len() / DOCUMENTS_PER_THREAD).clamp(1, cores.min(MAX_PARSE_THREADS));
    let parse = |chunk: &[&Document<'_>]| -> Vec<Parsed> {
        chunk
            .iter()
            .map(|doc| parse_document(doc, json, limits, rules))
            .collect()
    };
    if threads == 1 {
        return parse(docs);
    }
    let chunk = docs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let (first, rest) = docs.split_at(chunk.min(docs.len()));
        let others: Vec<_> = rest
            .chunks(chunk)
            .map(|part| scope.spawn(move || parse(part)))
            .collect();
        let mut out = parse(first);
        for handle in others {
            match handle.join() {
                Ok(parsed) => out.extend(parsed),
                // A panic is a bug: surface it as the caller's.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// The apiVersion/kind of a document, read before choosing the type to decode.
#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

/// Every top-level field of the two kinds kpr reads (a Service's and an
/// EndpointSlice's are disjoint but for `metadata`), so that one decode of
/// a document yields its kind and its object: parsing the text is most of
/// a manifest's cost. The fields decode as the API types' own do, which
/// ignore unknown fields and leave missing ones unset. A document this
/// does not decode (a field of the other kind that does not fit, a
/// duplicate field, a syntax error) takes the two-step path instead,
/// kind first and then the type, whose outcome and errors are reported.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyObject {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<ObjectMeta>,
    spec: Option<ServiceSpec>,
    status: Option<ServiceStatus>,
    address_type: Option<String>,
    endpoints: Option<Vec<Endpoint>>,
    ports: Option<Vec<EndpointPort>>,
}

/// A `v1` `List`; items stay generic until their own apiVersion/kind is read.
#[derive(Deserialize)]
struct ListDoc {
    #[serde(default)]
    items: Option<Vec<serde_json::Value>>,
}

/// One document's source, decodable into any type.
enum Body<'a> {
    Yaml(&'a Document<'a>),
    Json(&'a Document<'a>),
    /// A `List` item.
    Item(&'a serde_json::Value),
}

impl Body<'_> {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, String> {
        match self {
            Body::Yaml(doc) => doc.decode(|text| serde_yaml_ng::from_str::<T>(text)),
            Body::Json(doc) => doc.decode(|text| serde_json::from_str::<T>(text)),
            Body::Item(value) => T::deserialize(*value).map_err(|e| e.to_string()),
        }
    }
}

impl Parsed {
    fn skip(&mut self, item: Option<usize>, reason: SkipReason, detail: impl Into<String>) {
        let detail = escape(&detail.into());
        let detail = match item {
            None => detail,
            Some(item) => format!("items[{item}]: {detail}"),
        };
        self.skipped.push(Skip { reason, detail });
    }

    fn document(&mut self, body: &Body<'_>, item: Option<usize>, rules: &Rules) {
        if let Ok(Some(any)) = body.decode::<Option<AnyObject>>() {
            match (any.api_version.as_deref(), any.kind.as_deref()) {
                (Some(Service::API_VERSION), Some(Service::KIND)) => {
                    let svc = Service {
                        metadata: any.metadata.unwrap_or_default(),
                        spec: any.spec,
                        status: any.status,
                    };
                    return self.service(svc, item, rules);
                }
                (Some(EndpointSlice::API_VERSION), Some(EndpointSlice::KIND)) => {
                    let slice = EndpointSlice {
                        metadata: any.metadata.unwrap_or_default(),
                        address_type: any.address_type.unwrap_or_default(),
                        endpoints: any.endpoints.unwrap_or_default(),
                        ports: any.ports,
                    };
                    return self.slice(slice, item, rules);
                }
                _ => {}
            }
        }
        let meta = match body.decode::<Option<TypeMeta>>() {
            Ok(Some(meta)) => meta,
            Ok(None) => return, // an explicit `null` / `~` document
            Err(e) => return self.skip(item, SkipReason::Malformed, e),
        };
        let (Some(api_version), Some(kind)) = (meta.api_version, meta.kind) else {
            return self.skip(
                item,
                SkipReason::Malformed,
                "apiVersion and kind are required",
            );
        };
        match (api_version.as_str(), kind.as_str()) {
            (Service::API_VERSION, Service::KIND) => match body.decode() {
                Ok(svc) => self.service(svc, item, rules),
                Err(e) => self.skip(item, SkipReason::Malformed, e),
            },
            (EndpointSlice::API_VERSION, EndpointSlice::KIND) => match body.decode() {
                Ok(slice) => self.slice(slice, item, rules),
                Err(e) => self.skip(item, SkipReason::Malformed, e),
            },
            (Node::API_VERSION, Node::KIND) => match body.decode::<Node>() {
                Ok(node) => {
                    if let Some((key, node)) = self.object(node, item, ObjectKind::Node, rules) {
                        self.objects
                            .push((key, Object::Node(Arc::new(slim::node(node)))));
                    }
                }
                Err(e) => self.skip(item, SkipReason::Malformed, e),
            },
            (Pod::API_VERSION, Pod::KIND) => match body.decode::<Pod>() {
                Ok(pod) => {
                    if let Some((key, pod)) = self.object(pod, item, ObjectKind::Pod, rules) {
                        self.objects
                            .push((key, Object::Pod(Arc::new(slim::pod(pod)))));
                    }
                }
                Err(e) => self.skip(item, SkipReason::Malformed, e),
            },
            ("v1", "List") if item.is_some() => {
                self.skip(item, SkipReason::UnsupportedKind, "a List nested in a List")
            }
            ("v1", "List") => match body.decode::<ListDoc>() {
                Err(e) => self.skip(item, SkipReason::Malformed, e),
                Ok(list) => {
                    for (i, value) in list.items.unwrap_or_default().iter().enumerate() {
                        self.document(&Body::Item(value), Some(i), rules);
                    }
                }
            },
            _ => self.skip(
                item,
                SkipReason::UnsupportedKind,
                format!("{api_version}/{kind} (kpr reads v1/Service, discovery.k8s.io/v1/EndpointSlice, v1/Node and v1/Pod)"),
            ),
        }
    }

    fn service(&mut self, svc: Service, item: Option<usize>, rules: &Rules) {
        if let Some((key, svc)) = self.object(svc, item, ObjectKind::Service, rules) {
            self.objects
                .push((key, Object::Service(Arc::new(slim::service(svc)))));
        }
    }

    fn slice(&mut self, slice: EndpointSlice, item: Option<usize>, rules: &Rules) {
        if let Some((key, slice)) = self.object(slice, item, ObjectKind::EndpointSlice, rules) {
            self.objects
                .push((key, Object::EndpointSlice(Arc::new(SlimSlice::from(slice)))));
        }
    }

    /// Checks the name, defaults the namespace (clears it for a
    /// cluster-scoped kind) and validates.
    fn object<T>(
        &mut self,
        mut object: T,
        item: Option<usize>,
        kind: ObjectKind,
        rules: &Rules,
    ) -> Option<(ObjectKey, T)>
    where
        T: Metadata<Ty = ObjectMeta> + validate::Validate,
    {
        let meta = object.metadata_mut();
        let name = match meta.name.as_deref() {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => {
                self.skip(
                    item,
                    SkipReason::Malformed,
                    format!("{} without metadata.name", kind.name()),
                );
                return None;
            }
        };
        let namespace = match meta.namespace.as_deref() {
            _ if !kind.namespaced() => String::new(),
            Some(namespace) if !namespace.is_empty() => namespace.to_string(),
            _ => DEFAULT_NAMESPACE.to_string(),
        };
        meta.namespace = kind.namespaced().then(|| namespace.clone());
        if let Err((reason, detail)) = object.validate(rules) {
            if kind == ObjectKind::Service {
                self.rejected.push(Rejected {
                    service: escape(&format!("{namespace}/{name}")),
                    reason,
                    detail: escape(&detail),
                });
            }
            let shown = if kind.namespaced() {
                format!("{namespace}/{name}")
            } else {
                name.clone()
            };
            let detail = format!("{} {shown:?}: {detail}", kind.name());
            self.skip(item, reason, detail);
            return None;
        }
        Some((
            ObjectKey {
                kind,
                namespace,
                name,
            },
            object,
        ))
    }
}

/// `text` on one line with control characters escaped (as Rust's `{:?}`
/// does, without the quotes): text from a manifest never forges a log line.
pub fn escape(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
