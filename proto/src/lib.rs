//! The control API of an ingest pod (`ingest.control.v1`), shared by the
//! server in `ingest-pod` and the client in the operator.

#![warn(unreachable_pub)]

/// Generated messages, client and server of `ingest.control.v1`.
pub mod v1 {
    tonic::include_proto!("ingest.control.v1");

    /// File descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ingest_control_v1_descriptor");
}

pub mod tls;
