//! Generates the gRPC code from `proto/` with protox (a pure-Rust protobuf compiler),
//! so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["modelbox.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .codec_path("crate::api::codec::ValidatingCodec")
        .compile_fds(fds)?;
    Ok(())
}
