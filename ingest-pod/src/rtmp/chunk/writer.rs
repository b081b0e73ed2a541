//! Chunk writer: messages in, chunk bytes out, headers compressed the way
//! ffmpeg and librtmp do it.

use bytes::{BufMut, BytesMut};

use super::{DEFAULT_CHUNK_SIZE, EXTENDED_TIMESTAMP, RawMessage};

#[derive(Debug, Clone, Copy)]
struct Last {
    timestamp: u32,
    delta: u32,
    length: u32,
    type_id: u8,
    stream_id: u32,
}

#[derive(Debug)]
pub struct ChunkWriter {
    chunk_size: u32,
    /// Last header per chunk stream id (a handful: searched, not hashed).
    last: Vec<(u32, Last)>,
}

impl Default for ChunkWriter {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            last: Vec::new(),
        }
    }
}

impl ChunkWriter {
    /// Changes the outgoing chunk size. Send the Set Chunk Size message
    /// (with the old size) before writing anything with the new one.
    pub fn set_chunk_size(&mut self, size: u32) {
        self.chunk_size = size.max(1);
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Appends the chunks of `msg` to `out`.
    pub fn write(&mut self, msg: &RawMessage, out: &mut BytesMut) {
        let len = msg.payload.len() as u32;
        let index = self.last.iter().position(|(id, _)| *id == msg.csid);
        let prev = index.map(|i| self.last[i].1);
        let (fmt, field) = match prev {
            Some(p) if p.stream_id == msg.stream_id && msg.timestamp >= p.timestamp => {
                let delta = msg.timestamp - p.timestamp;
                if p.length != len || p.type_id != msg.type_id {
                    (1, delta)
                } else if p.delta != delta {
                    (2, delta)
                } else {
                    (3, delta)
                }
            }
            _ => (0, msg.timestamp),
        };
        let extended = field >= EXTENDED_TIMESTAMP;
        write_basic_header(out, fmt, msg.csid);
        if fmt <= 2 {
            out.put_uint(u64::from(field.min(EXTENDED_TIMESTAMP)), 3);
        }
        if fmt <= 1 {
            out.put_uint(u64::from(len), 3);
            out.put_u8(msg.type_id);
        }
        if fmt == 0 {
            out.put_u32_le(msg.stream_id);
        }
        // A format-3 header inherits "extended" from the previous header.
        let ext_on_every_chunk = if fmt == 3 {
            prev.is_some_and(|p| p.delta >= EXTENDED_TIMESTAMP)
        } else {
            extended
        };
        if ext_on_every_chunk {
            out.put_u32(field);
        }
        let mut rest = &msg.payload[..];
        let size = self.chunk_size as usize;
        out.reserve(rest.len() + rest.len() / size * 5);
        loop {
            let n = rest.len().min(size);
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if rest.is_empty() {
                break;
            }
            write_basic_header(out, 3, msg.csid);
            if ext_on_every_chunk {
                out.put_u32(field);
            }
        }
        let last = Last {
            timestamp: msg.timestamp,
            delta: field,
            length: len,
            type_id: msg.type_id,
            stream_id: msg.stream_id,
        };
        match index {
            Some(i) => self.last[i].1 = last,
            None => self.last.push((msg.csid, last)),
        }
    }
}

fn write_basic_header(out: &mut BytesMut, fmt: u8, csid: u32) {
    let fmt = fmt << 6;
    match csid {
        2..=63 => out.put_u8(fmt | csid as u8),
        64..=319 => {
            out.put_u8(fmt);
            out.put_u8((csid - 64) as u8);
        }
        _ => {
            let id = csid - 64;
            out.put_u8(fmt | 1);
            out.put_u8((id & 0xff) as u8);
            out.put_u8((id >> 8) as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::rtmp::chunk::ChunkReader;

    #[test]
    fn compresses_headers_of_a_steady_stream() {
        let mut w = ChunkWriter::default();
        let mut buf = BytesMut::new();
        let frames: Vec<RawMessage> = (0..5)
            .map(|i| RawMessage {
                csid: 6,
                timestamp: i * 33,
                type_id: 9,
                stream_id: 1,
                payload: Bytes::from(vec![i as u8; 20]),
            })
            .collect();
        let mut sizes = Vec::new();
        for f in &frames {
            let before = buf.len();
            w.write(f, &mut buf);
            sizes.push(buf.len() - before - 20);
        }
        // fmt0, fmt2 (delta 33 differs from the absolute 0), then fmt3 from there on.
        assert_eq!(sizes, vec![12, 4, 1, 1, 1]);
        let mut r = ChunkReader::default();
        for f in frames {
            assert_eq!(r.read(&mut buf).unwrap(), Some(f));
        }
    }
}
