//! mulo's gRPC contract (`proto/mulo/v1`): generated messages, clients and servers.

/// Version 1 of the contract.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("mulo.v1");
}

/// Encoded file descriptor set of every mulo proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mulo_descriptor");
