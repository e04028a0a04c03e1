//! gRPC contracts of ferroclaw, generated from `proto/ferroclaw/v1/*.proto`.
//!
//! The generated code is committed so that a normal build needs no protoc and runs no build
//! script. `tests/codegen.rs` regenerates it with a vendored protoc and fails on any diff;
//! run it with `FERROCLAW_REGENERATE=1` after editing a `.proto` file.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!("gen/ferroclaw.v1.rs");
}

/// Encoded `FileDescriptorSet` of every ferroclaw proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/descriptor.bin");
