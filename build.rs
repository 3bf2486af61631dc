//! Generates the gRPC code from `proto/` with protox (a pure-Rust protobuf compiler),
//! so no system `protoc` is needed. Also writes the encoded descriptor set that
//! server reflection serves, and the table of the web view's files under `web/`,
//! which the binary embeds.

use std::path::{Path, PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=web");
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .open_file("modelbox.proto")?
        .file_descriptor_set();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("modelbox_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .codec_path("crate::api::codec::ValidatingCodec")
        .compile_fds(fds)?;
    web_assets(Path::new("web"), &out.join("web_assets.rs"))?;
    Ok(())
}

/// Writes `ASSETS: &[(&str, &[u8])]`: every file under `dir` by its path below it.
fn web_assets(dir: &Path, out: &Path) -> std::io::Result<()> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, files)?;
            } else {
                files.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    if dir.exists() {
        walk(dir, &mut files)?;
    }
    files.sort();
    // Paths relative to the manifest directory, so a target directory shared by
    // checkouts at different places (CI clones) never embeds another checkout's files.
    let mut code = String::from("pub(crate) static ASSETS: &[(&str, &[u8])] = &[\n");
    for f in files {
        let rel = f.strip_prefix(dir).unwrap_or(&f);
        let name = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        let path = format!("/{}/{name}", dir.display());
        code.push_str(&format!(
            "    ({name:?}, include_bytes!(concat!(env!(\"CARGO_MANIFEST_DIR\"), {path:?}))),\n"
        ));
    }
    code.push_str("];\n");
    std::fs::write(out, code)
}
