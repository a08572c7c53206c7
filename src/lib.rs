//! kpr: a kube-proxy replacement. See README.md for the data flow.

// FFI lives in `sys` (process) and `datapath::sys` (BPF, netlink); they
// allow `unsafe`, nothing else does.
#![deny(unsafe_code)]

pub mod agent;
pub mod applied_state;
pub mod bpf_root;
pub mod cli;
pub mod datapath;
pub mod explain;
pub mod features;
pub mod healthcheck;
pub mod host;
pub mod http;
pub mod kube_proxy_cleanup;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod preflight;
pub mod reconcile;
pub mod selftest;
pub mod skip;
pub mod source;
pub mod status;
pub mod svc_list;
pub mod sys;
pub mod translate;
pub mod verify;
pub mod web_ui;
