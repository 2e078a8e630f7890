//! Builds the eBPF programs (crate `egressd-ebpf`) for bpfel-unknown-none with the eBPF
//! toolchain that scripts/setup-toolchain.sh installs, and leaves the object in OUT_DIR.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=EGRESSD_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("EGRESSD_EBPF_TOOLCHAIN").unwrap_or_else(|_| "egressd-ebpf".to_owned());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    // Shared types change the programs too.
    println!("cargo:rerun-if-changed={manifest_dir}/common/src");
    // The eBPF toolchain is a stable rustc; -Z build-std=core needs unstable features on it.
    // SAFETY: the build script is single-threaded here; nothing else reads the environment.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "egressd-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
