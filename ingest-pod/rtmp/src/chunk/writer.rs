//! Chunk writer: messages in, chunk bytes out, headers compressed the way
//! ffmpeg and librtmp do it.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};

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
        self.encode(msg, out);
    }

    /// Appends the chunks of `msg` to `out` without copying its payload.
    pub fn write_parts(&mut self, msg: &RawMessage, out: &mut Parts) {
        self.encode(msg, out);
        out.seal();
    }

    fn encode(&mut self, msg: &RawMessage, out: &mut impl Sink) {
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
        let h = out.headers();
        write_basic_header(h, fmt, msg.csid);
        if fmt <= 2 {
            h.put_uint(u64::from(field.min(EXTENDED_TIMESTAMP)), 3);
        }
        if fmt <= 1 {
            h.put_uint(u64::from(len), 3);
            h.put_u8(msg.type_id);
        }
        if fmt == 0 {
            h.put_u32_le(msg.stream_id);
        }
        // A format-3 header inherits "extended" from the previous header.
        let ext_on_every_chunk = if fmt == 3 {
            prev.is_some_and(|p| p.delta >= EXTENDED_TIMESTAMP)
        } else {
            extended
        };
        if ext_on_every_chunk {
            h.put_u32(field);
        }
        let size = self.chunk_size as usize;
        let total = msg.payload.len();
        out.reserve(total + total / size * 5);
        let mut at = 0;
        loop {
            let n = (total - at).min(size);
            out.payload(&msg.payload, at, n);
            at += n;
            if at == total {
                break;
            }
            let h = out.headers();
            write_basic_header(h, 3, msg.csid);
            if ext_on_every_chunk {
                h.put_u32(field);
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

/// Where encoded chunks go.
trait Sink {
    /// Header bytes are appended here.
    fn headers(&mut self) -> &mut BytesMut;
    /// `len` payload bytes from `at` follow the headers written so far.
    fn payload(&mut self, payload: &Bytes, at: usize, len: usize);
    fn reserve(&mut self, _additional: usize) {}
}

impl Sink for BytesMut {
    fn headers(&mut self) -> &mut BytesMut {
        self
    }

    fn payload(&mut self, payload: &Bytes, at: usize, len: usize) {
        self.extend_from_slice(&payload[at..at + len]);
    }

    fn reserve(&mut self, additional: usize) {
        BytesMut::reserve(self, additional);
    }
}

/// Chunks as a list of header bytes and payload slices, written with
/// vectored I/O: payloads are referenced, not copied, and no buffer grows
/// to the size of the largest burst.
#[derive(Debug, Default)]
pub struct Parts {
    headers: BytesMut,
    parts: VecDeque<Bytes>,
    len: usize,
}

/// Most slices handed to one vectored write.
pub const MAX_SLICES: usize = 64;

impl Parts {
    /// Bytes not yet written.
    pub fn len(&self) -> usize {
        self.len + self.headers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends the current run of header bytes.
    fn seal(&mut self) {
        if !self.headers.is_empty() {
            let h = self.headers.split().freeze();
            self.len += h.len();
            self.parts.push_back(h);
        }
    }

    /// The next bytes to write, for one vectored write: fills the front of
    /// `out` (no allocation per write) and returns that part.
    pub fn slices<'a, 'o>(&'a self, out: &'o mut [IoSlice<'a>; MAX_SLICES]) -> &'o [IoSlice<'a>] {
        let mut n = 0;
        for (slot, part) in out.iter_mut().zip(&self.parts) {
            *slot = IoSlice::new(part);
            n += 1;
        }
        &out[..n]
    }

    /// Drops the first `n` bytes (written).
    pub fn advance(&mut self, mut n: usize) {
        self.len -= n.min(self.len);
        while n > 0 {
            let Some(front) = self.parts.front_mut() else { break };
            if front.len() > n {
                front.advance(n);
                break;
            }
            n -= front.len();
            self.parts.pop_front();
        }
    }
}

impl Sink for Parts {
    fn headers(&mut self) -> &mut BytesMut {
        &mut self.headers
    }

    fn payload(&mut self, payload: &Bytes, at: usize, len: usize) {
        self.seal();
        if len > 0 {
            self.len += len;
            self.parts.push_back(payload.slice(at..at + len));
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
    use crate::chunk::ChunkReader;

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

    #[test]
    fn parts_hold_the_same_bytes_as_a_buffer_and_advance_across_them() {
        let msgs: Vec<RawMessage> = [0usize, 5, 128, 129, 300, 1000]
            .iter()
            .enumerate()
            .map(|(i, len)| RawMessage {
                csid: 4 + (i as u32 % 2),
                timestamp: i as u32 * 40 + if i == 5 { EXTENDED_TIMESTAMP } else { 0 },
                type_id: 8,
                stream_id: 1,
                payload: Bytes::from((0..*len).map(|b| b as u8).collect::<Vec<u8>>()),
            })
            .collect();
        let (mut a, mut b) = (ChunkWriter::default(), ChunkWriter::default());
        let mut buf = BytesMut::new();
        let mut parts = Parts::default();
        for m in &msgs {
            a.write(m, &mut buf);
            b.write_parts(m, &mut parts);
        }
        assert_eq!(parts.len(), buf.len());
        // Written in uneven pieces, as short writes do.
        let mut out = Vec::new();
        while !parts.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let first: Vec<u8> = parts
                .slices(&mut slices)
                .iter()
                .flat_map(|s| s.iter().copied())
                .take(7)
                .collect();
            out.extend_from_slice(&first);
            parts.advance(first.len());
        }
        assert_eq!(out, buf.to_vec());
    }
}
