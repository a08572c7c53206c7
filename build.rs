//! Compiles the BPF programs under bpf/ and generates their libbpf-rs
//! skeletons into OUT_DIR (included once, by src/datapath/skel.rs).

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

/// BPF programs, one per hook family: (source, skeleton name).
const PROGRAMS: &[(&str, &str)] = &[
    ("bpf/sock_lb.bpf.c", "sock_lb"),
    ("bpf/nodeport.bpf.c", "nodeport"),
    ("bpf/nodeport_xdp.bpf.c", "nodeport_xdp"),
];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // Debian ships versioned clang binaries only; KPR_CLANG overrides.
    let clang = env::var("KPR_CLANG").unwrap_or_else(|_| "clang-19".to_string());
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_string());
    let multiarch_include = format!("-I/usr/include/{arch}-linux-gnu");

    for (source, name) in PROGRAMS {
        SkeletonBuilder::new()
            .source(source)
            .clang(&clang)
            .clang_args([
                "-Wall",
                "-Werror",
                "-Ibpf/include",
                multiarch_include.as_str(),
            ])
            .build_and_generate(out.join(format!("{name}.skel.rs")))
            .unwrap_or_else(|e| panic!("building BPF program {source} with {clang}: {e:#}"));
    }

    println!("cargo:rerun-if-env-changed=KPR_CLANG");
    for dir in ["bpf", "bpf/include"] {
        for entry in std::fs::read_dir(dir).expect("bpf/ exists").flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "c" || e == "h") {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
