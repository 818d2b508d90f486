//! Compiles `proto/setpoint/v1/*.proto` with protox (pure Rust, no `protoc`) and generates the
//! message and service code with tonic-prost-build. The same file descriptor set is written to
//! `$OUT_DIR/setpoint_descriptor.bin` for server reflection.
//!
//! Two runs: the first writes the messages (each with its protobuf name, `prost::Name`) and the
//! clients, which use tonic's `ProstCodec`; the second writes only the servers, into
//! `$OUT_DIR/server/`, with setpoint's own codec (`crate::api::codec::RequestCodec`, which
//! answers a request that does not decode with `INVALID_ARGUMENT`) and the first run's
//! messages (`extern_path`). A service added to the .proto files gets both by itself.

use std::path::PathBuf;

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/setpoint/v1/instances.proto",
        "proto/setpoint/v1/work.proto",
        "proto/setpoint/v1/resources.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate!("./migrations") embeds the files it saw when the crate was compiled; a new
    // migration alone would not recompile the crate without this.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("setpoint_descriptor.bin"), fds.encode_to_vec())?;
    let mut messages = tonic_prost_build::Config::new();
    messages.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds_with_config(fds.clone(), messages)?;
    let servers = out.join("server");
    std::fs::create_dir_all(&servers)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .codec_path("crate::api::codec::RequestCodec")
        .extern_path(".setpoint.v1", "crate::api::proto")
        .out_dir(&servers)
        .compile_fds(fds)?;
    Ok(())
}
