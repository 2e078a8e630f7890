//! Re-run when bpf-linker changes, so a rebuilt linker relinks the programs (as aya-template does).
fn main() {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
