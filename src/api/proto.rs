//! The generated code of `proto/setpoint/v1` (messages, clients and servers) and the file
//! descriptor set that server reflection serves.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("setpoint.v1");
// The servers, generated with setpoint's request codec (see build.rs and `super::codec`).
include!(concat!(env!("OUT_DIR"), "/server/setpoint.v1.rs"));

/// The encoded `FileDescriptorSet` of `proto/setpoint/v1` (with its imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/setpoint_descriptor.bin"));
