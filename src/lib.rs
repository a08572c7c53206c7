//! kpr: a kube-proxy replacement. See README.md for the data flow.

pub mod datapath;
pub mod model;
pub mod skip;
