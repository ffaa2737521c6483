//! The bookstore's gRPC contract, generated from `recommendations.proto`.
//!
//! The proto has no `package`, so every item lives at the root of this crate and the method path
//! is `/Recommendations/Recommend`, exactly as in the original Python services.
#![allow(missing_debug_implementations, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/_.rs"));

/// The encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bookstore_descriptor.bin"));
