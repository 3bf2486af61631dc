//! Generates the gRPC code from `proto/` with protox (a pure-Rust protobuf compiler),
//! so no system `protoc` is needed. Also writes the encoded descriptor set that
//! server reflection serves.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .open_file("modelbox.proto")?
        .file_descriptor_set();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("modelbox_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .codec_path("crate::api::codec::ValidatingCodec")
        .compile_fds(fds)?;
    Ok(())
}
