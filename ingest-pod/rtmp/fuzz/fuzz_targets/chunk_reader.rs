//! The chunk reader on arbitrary bytes, split at an arbitrary point, with
//! Set Chunk Size and Abort applied as a connection would.
#![no_main]

use bytes::BytesMut;
use ingest_rtmp::chunk::{ChunkReader, Limits};
use ingest_rtmp::message::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let split = (split as usize * data.len() / 256).min(data.len());
    let limits = Limits { max_message_len: 1 << 20, max_chunk_streams: 16, max_pending_bytes: 4 << 20 };
    let mut reader = ChunkReader::new(limits);
    let mut buf = BytesMut::new();
    for piece in [&data[..split], &data[split..]] {
        buf.extend_from_slice(piece);
        loop {
            match reader.read(&mut buf) {
                Ok(Some(raw)) => match Message::decode(raw) {
                    Ok(Message::SetChunkSize(n)) => {
                        if reader.set_chunk_size(n).is_err() {
                            return;
                        }
                    }
                    Ok(Message::Abort(csid)) => reader.abort(csid),
                    _ => {}
                },
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
