use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "mulo/v1/info.proto",
        "mulo/v1/common.proto",
        "mulo/v1/drafter.proto",
        "mulo/v1/verifier.proto",
        "mulo/v1/gateway.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Vendored protoc unless the caller points PROTOC at one.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("mulo_descriptor.bin"))
        .compile_protos(&files.map(|f| root.join(f)), &[root])?;
    Ok(())
}
