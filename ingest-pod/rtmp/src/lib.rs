//! RTMP without I/O, layer by layer: [`handshake`] → [`chunk`] (reader and
//! writer of the chunk stream) → [`amf0`] → [`message`], with [`url`] for
//! `rtmp://` addresses, [`flv`] for recordings and [`media`] to classify
//! audio and video (keyframes, sequence headers) and fingerprint frames.
//!
//! Every parser takes bytes and returns a value, "need more", or an error
//! naming the rule the peer broke; limits are checked before any allocation
//! the peer sizes. No tokio here: the ingest pod's transport, its sessions
//! and relays, and the test publisher drive these types over sockets. The
//! fuzz targets (`fuzz/`) feed them arbitrary bytes.

#![warn(unreachable_pub)]

pub mod amf0;
pub mod chunk;
pub mod flv;
pub mod handshake;
pub mod media;
pub mod message;
pub mod url;
