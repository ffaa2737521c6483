//! Compiles `recommendations.proto` with `protox` (a pure-Rust protobuf compiler), so building
//! needs no system `protoc` and nothing is downloaded at build time.

use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "recommendations.proto";
    println!("cargo:rerun-if-changed={proto}");

    let fds = protox::compile([proto], ["."])?;
    // The encoded descriptor set also feeds gRPC server reflection.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("bookstore_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
