//! Generates the tonic code from `proto/*.proto` with a vendored `protoc`, so
//! a fresh machine needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/mesh.proto", "proto/peer.proto", "proto/raft.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().build_server(true).build_client(true).compile_with_config(
        config,
        &protos,
        &["proto"],
    )?;
    Ok(())
}
