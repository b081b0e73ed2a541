//! The RTMP chunk stream: messages split into chunks on chunk streams.

mod reader;
mod writer;

pub use reader::{ChunkReader, Error, Limits};
pub use writer::{ChunkWriter, MAX_SLICES, Parts};

use bytes::Bytes;

/// Chunk size every connection starts with.
pub const DEFAULT_CHUNK_SIZE: u32 = 128;
/// Largest chunk size a peer may set. Nothing is allocated by chunk size,
/// but a huge chunk lets one chunk stream hog the connection.
pub const MAX_CHUNK_SIZE: u32 = 1 << 20;
/// Largest message a peer may send (a keyframe of a high-bitrate stream
/// fits many times over).
pub const MAX_MESSAGE_LEN: u32 = 16 << 20;
/// Largest number of chunk streams a peer may open on one connection.
pub const MAX_CHUNK_STREAMS: usize = 64;
/// Largest sum of partly received messages on one connection.
pub const MAX_PENDING_BYTES: usize = 32 << 20;
/// Timestamps at or above this value go into the extended timestamp field.
pub const EXTENDED_TIMESTAMP: u32 = 0x00FF_FFFF;

/// One reassembled RTMP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    /// Chunk stream it arrived on (or is to be sent on).
    pub csid: u32,
    /// Absolute timestamp in milliseconds (wraps at 2^32).
    pub timestamp: u32,
    /// Message type id (8 audio, 9 video, 20 AMF0 command, ...).
    pub type_id: u8,
    /// Message stream id (0 for protocol control and NetConnection).
    pub stream_id: u32,
    pub payload: Bytes,
}
