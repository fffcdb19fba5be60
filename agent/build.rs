//! Compiles the in-guest write tracker (`bpf/tracker.bpf.c`) to BPF bytecode with clang.
//! Without clang (or libbpf's headers) the agent is built without `--source tracked`, and
//! says so when asked for it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/tracker.bpf.c");
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo::rustc-check-cfg=cfg(deltaback_bpf)");
    let Some(out_dir) = std::env::var_os("OUT_DIR") else {
        return;
    };
    let object = PathBuf::from(out_dir).join("tracker.bpf.o");
    // <linux/types.h> includes <asm/types.h>, which Debian keeps in the multiarch folder.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let compiled = Command::new(&clang)
        .args([
            "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg("-I")
        .arg(&multiarch)
        .arg("-c")
        .arg("bpf/tracker.bpf.c")
        .arg("-o")
        .arg(&object)
        .output();
    match compiled {
        Ok(output) if output.status.success() => println!("cargo:rustc-cfg=deltaback_bpf"),
        Ok(output) => println!(
            "cargo:warning=clang could not compile bpf/tracker.bpf.c, so this agent has no \
             --source tracked: {}",
            String::from_utf8_lossy(&output.stderr).replace('\n', " ")
        ),
        Err(e) => println!(
            "cargo:warning=`{clang}` did not run ({e}), so this agent has no --source tracked \
             (install clang and libbpf-dev)"
        ),
    }
}
