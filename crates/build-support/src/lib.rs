//! Build-script helper for crates that link libtorch through `tch`.
//!
//! `tch` sets no rpath, so binaries and test executables would need `LD_LIBRARY_PATH`. Call
//! [`link_libtorch`] from the `build.rs` of every crate that produces an executable linking tch (the
//! crate must depend on `torch-sys` directly so that cargo hands it `DEP_TCH_LIBTORCH_LIB`).

use std::path::Path;

/// Emits `-Wl,-rpath,<libtorch lib dir>` and, when the CUDA libraries that `libtorch_cuda.so` needs
/// are installed next to it, `-Wl,--no-as-needed -ltorch_cuda` so that CUDA is not dropped by the
/// linker. `MULO_LINK_CUDA=0|1` overrides the detection.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=MULO_LINK_CUDA");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: no rpath to libtorch (is torch-sys a direct dependency?)");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let link_cuda = match std::env::var("MULO_LINK_CUDA").ok().as_deref() {
        Some("1") => true,
        Some("0") => false,
        _ => cuda_libraries_present(Path::new(&lib)),
    };
    if link_cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// True when `libtorch_cuda.so` exists and cuDNN (the largest of its CUDA dependencies, absent from
/// the CPU-only install) can be found beside the pip wheel or on the system.
fn cuda_libraries_present(lib: &Path) -> bool {
    if !lib.join("libtorch_cuda.so").exists() {
        return false;
    }
    let pip_cudnn = lib.join("../../nvidia/cudnn/lib/libcudnn.so.9");
    let system = [
        "/usr/lib/x86_64-linux-gnu/libcudnn.so.9",
        "/usr/local/cuda/lib64/libcudnn.so.9",
    ];
    pip_cudnn.exists() || system.iter().any(|p| Path::new(p).exists())
}
