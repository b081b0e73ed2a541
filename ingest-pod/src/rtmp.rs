//! RTMP, layer by layer: handshake → chunk → AMF0 → message (no I/O), and
//! `conn`, the async transport that the server session, the relay and the
//! test publisher share.

pub mod amf0;
pub mod chunk;
pub mod client;
pub mod conn;
pub mod handshake;
pub mod message;
pub mod url;
