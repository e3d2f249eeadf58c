//! Compiles the `.proto` contracts with protox (a pure-Rust protobuf compiler,
//! so a fresh machine needs no `protoc`) and generates the Rust types with prost.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/adtrack/v1/tracking_event.proto",
        "proto/kpl/aggregated_record.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        .btree_map(["."])
        .bytes([".kpl"])
        .compile_fds(descriptors)?;
    Ok(())
}
