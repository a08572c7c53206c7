//! kpr: a kube-proxy replacement. See README.md for the data flow.

pub mod datapath {
    pub mod skel;
}
pub mod http;
pub mod metrics;
pub mod skip;
pub mod source;
