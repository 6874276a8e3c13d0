//! Generates the tonic code from `proto/*.proto` with a vendored `protoc`, so
//! a fresh machine needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; prost-build reads PROTOC.
    // (`set_var` is unsafe in edition 2024, so pass the path explicitly.)
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let protos = ["proto/mesh.proto", "proto/peer.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
