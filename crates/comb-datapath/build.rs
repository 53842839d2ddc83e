//! Compiles bpf/*.c with clang into BPF objects and generates libbpf-rs skeletons that embed
//! them, so the agent binary carries its own datapath.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use libbpf_cargo::SkeletonBuilder;

/// BPF programs, each becoming `<name>.skel.rs` in OUT_DIR.
const PROGRAMS: &[&str] = &[
    "splice",
    "lb_sock",
    "policy",
    "proxy_splice",
    "uplink",
    "proxy_lookup",
];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let bpf = manifest.join("../../bpf");
    let bpf = bpf.canonicalize().unwrap_or(bpf);
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    // A directory makes cargo rescan every file below it.
    println!("cargo:rerun-if-changed={}", bpf.display());
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = env::var_os("CLANG").map_or_else(|| PathBuf::from("clang"), PathBuf::from);
    check_clang(&clang);

    let mut args: Vec<String> = ["-Wall", "-Werror"].iter().map(|s| s.to_string()).collect();
    for dir in [bpf.join("include"), bpf.join("lib")] {
        args.push(format!("-I{}", dir.display()));
    }
    // -target bpf drops the multiarch include dir, where Debian keeps <asm/types.h>.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = Path::new("/usr/include").join(format!("{arch}-linux-gnu"));
    if multiarch.is_dir() {
        args.push(format!("-I{}", multiarch.display()));
    }

    for prog in PROGRAMS {
        let src = bpf.join(format!("{prog}.c"));
        // libbpf-cargo insists on a `.bpf.c` name; compile a copy so bpf/ keeps plain names.
        // Includes resolve through -I, so the copy's location does not matter.
        let copy = out.join(format!("{prog}.bpf.c"));
        if let Err(e) = std::fs::copy(&src, &copy) {
            panic!("copying {}: {e}", src.display());
        }
        let result = SkeletonBuilder::new()
            .source(&copy)
            .obj(out.join(format!("{prog}.bpf.o")))
            .clang(&clang)
            .clang_args(&args)
            .build_and_generate(out.join(format!("{prog}.skel.rs")));
        if let Err(e) = result {
            panic!("building {}: {e:#}", src.display());
        }
    }
}

fn check_clang(clang: &Path) {
    let ok = Command::new(clang)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        panic!(
            "`{}` not found or not working: it is needed to compile bpf/ (eBPF programs). \
             Run `make deps` at the repository root to install clang, libbpf-dev and friends, \
             or set CLANG to a clang binary.",
            clang.display()
        );
    }
}
