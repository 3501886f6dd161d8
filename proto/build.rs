//! Generates the gRPC code from proto/ccq.proto with a vendored protoc, so a fresh
//! machine needs nothing installed by hand.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/ccq.proto");
    tonic_prost_build::configure().compile_protos(&["proto/ccq.proto"], &["proto"])?;
    Ok(())
}
