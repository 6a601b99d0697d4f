//! Builds the guest vDSO (`vdso/vdso.c`) into a position-independent shared object that the
//! loader maps into every sandbox (see `src/vdso.rs`). The C compiler is the one Rust links
//! with, found by the `cc` crate.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vdso");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("vdso.so");
    for file in ["vdso.c", "vdso.lds", "vdso.map"] {
        println!("cargo::rerun-if-changed=vdso/{file}");
    }
    let compiler = cc::Build::new().get_compiler();
    let status = Command::new(compiler.path())
        .args([
            "-O2",
            "-fPIC",
            "-shared",
            "-nostdlib",
            "-ffreestanding",
            "-fno-builtin",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fcf-protection=none",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,--hash-style=both",
            "-Wl,-soname=linux-vdso.so.1",
            "-Wl,--build-id=none",
            "-Wl,-z,max-page-size=4096",
            "-Wl,--no-undefined",
        ])
        .arg(format!("-Wl,-T,{}", dir.join("vdso.lds").display()))
        .arg(format!(
            "-Wl,--version-script={}",
            dir.join("vdso.map").display()
        ))
        .arg("-o")
        .arg(&out)
        .arg(dir.join("vdso.c"))
        .status()
        .expect("running the C compiler for the guest vDSO");
    assert!(status.success(), "building the guest vDSO failed");
}
