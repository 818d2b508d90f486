//! Compiles `proto/webhook/v1/*.proto` into the plugin's gRPC server and client.
//!
//! protox (pure Rust) compiles the files, so the build needs no `protoc`; the encoded file
//! descriptor set is written to `$OUT_DIR/webhook_descriptor.bin`, which tonic-prost-build reads
//! back through `file_descriptor_set_path` (instead of running protoc) and which the plugin
//! hands to the engine for reflection and the API's gate.

use std::path::PathBuf;

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/webhook/v1/deliveries.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let descriptors = PathBuf::from(std::env::var("OUT_DIR")?).join("webhook_descriptor.bin");
    std::fs::write(&descriptors, fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .skip_protoc_run()
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
