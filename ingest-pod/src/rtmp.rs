//! The RTMP transport over tokio sockets, on top of the codec in
//! `ingest_rtmp`: [`conn`] (reader and writer halves of a connection, with
//! the read modes and limits the server session, the relay and the test
//! publisher share) and [`client`] (the publishing client the relay uses
//! towards the origin).

pub mod client;
pub mod conn;
