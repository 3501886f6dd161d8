//! Generates the gRPC code from proto/ccq.proto with a vendored protoc, so a fresh
//! machine needs nothing installed by hand.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The vendored protoc goes to prost-build through its config rather than the PROTOC
    // environment variable: `std::env::set_var` is unsafe (other threads may read the
    // environment), and nothing else here needs it set.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto/ccq.proto");
    tonic_prost_build::configure().compile_with_config(config, &["proto/ccq.proto"], &["proto"])?;
    Ok(())
}
