//! The generated libbpf-rs skeletons; the only place they are included.
#![allow(
    unsafe_code,
    clippy::all,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    dead_code
)]

pub mod sock_lb {
    include!(concat!(env!("OUT_DIR"), "/sock_lb.skel.rs"));
}

pub mod nodeport {
    include!(concat!(env!("OUT_DIR"), "/nodeport.skel.rs"));
}

pub mod nodeport_xdp {
    include!(concat!(env!("OUT_DIR"), "/nodeport_xdp.skel.rs"));
}

pub mod sock_destroy {
    include!(concat!(env!("OUT_DIR"), "/sock_destroy.skel.rs"));
}
