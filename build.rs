//! Compiles the gRPC contract with a vendored protoc, so building needs no system protoc.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        // Reflection serves this set, so grpcurl needs no .proto files.
        .file_descriptor_set_path(out_dir.join("apikeys_descriptor.bin"))
        // Undecodable requests are the caller's error, not INTERNAL (src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::ProtoCodec")
        // Maps as BTreeMap: sorted wherever they are shown, and an empty one (the common
        // case, in every ValidateKey answer) is made without a hasher's random state.
        .btree_map(".")
        .compile_with_config(
            config,
            &[PathBuf::from("proto/cloodot/apikeys/v1/api_keys.proto")],
            &[PathBuf::from("proto"), well_known],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
