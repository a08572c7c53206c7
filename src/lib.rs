//! kpr: a kube-proxy replacement. See README.md for the data flow.

pub mod cli;
pub mod datapath;
pub mod host;
pub mod model;
pub mod reconcile;
pub mod skip;
pub mod svc_list;
pub mod testbed;
pub mod translate;
