//! Compiles `proto/setpoint/v1/*.proto` with protox (pure Rust, no `protoc`) and generates the
//! message and service code with tonic-prost-build. The same file descriptor set is written to
//! `$OUT_DIR/setpoint_descriptor.bin` for server reflection.

use std::path::PathBuf;

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/setpoint/v1/instances.proto",
        "proto/setpoint/v1/work.proto",
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
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
