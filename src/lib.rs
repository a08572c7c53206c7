pub mod datapath { pub mod skel; }
