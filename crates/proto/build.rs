//! Generates the prost types from `proto/omcb.proto` with protox, a pure-Rust
//! protobuf compiler, so building omcb needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = "../../proto";
    let file = format!("{proto_dir}/omcb.proto");
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file.as_str()], [proto_dir])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
