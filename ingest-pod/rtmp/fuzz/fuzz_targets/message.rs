//! Message decoding of arbitrary payloads under every type id.
#![no_main]

use bytes::Bytes;
use ingest_rtmp::chunk::RawMessage;
use ingest_rtmp::message::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&type_id, payload)) = data.split_first() else { return };
    let raw = RawMessage { csid: 3, timestamp: 0, type_id, stream_id: 1, payload: Bytes::copy_from_slice(payload) };
    if let Ok(msg) = Message::decode(raw) {
        let _ = msg.encode();
    }
});
