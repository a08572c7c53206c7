//! Where the reconciler's input comes from. The reconciler consumes v1
//! Services and discovery.k8s.io/v1 EndpointSlices; this module holds the
//! sources that produce them, so the reconciler does not care whether they
//! came from an API server or from files.

pub mod kube;
pub mod manifests;
pub mod slim;
pub mod store;
