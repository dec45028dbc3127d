//! Compiles the .proto files with protox (a Rust protobuf compiler), so no system protoc is needed.

fn main() -> anyhow::Result<()> {
    let files = ["agent.proto", "collector.proto", "externalscaler.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
