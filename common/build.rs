//! Compiles the wire protocol. protoc comes from `protoc-bin-vendored` unless $PROTOC is set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto/mgd3.proto");
    tonic_prost_build::configure().compile_protos(&["proto/mgd3.proto"], &["proto"])?;
    Ok(())
}
