//! Generates the control API with protox, a protobuf compiler written in
//! Rust, so building needs no system `protoc` nor its well-known-type
//! includes: protox carries `google/protobuf/*.proto` itself.

use std::path::PathBuf;

const PROTO: &str = "ingest/control/v1/control.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={PROTO}");

    let mut compiler = protox::Compiler::new(["."])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file(PROTO)?;
    // The encoded set feeds gRPC server reflection; the decoded one the
    // code generator (which also takes doc comments from its source info).
    std::fs::write(
        out.join("ingest_control_v1_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure().compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
