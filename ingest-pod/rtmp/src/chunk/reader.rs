//! Chunk reader: bytes in, whole messages out, never more memory than the
//! limits allow.

use bytes::{Buf, BytesMut};
use thiserror::Error;

use super::{
    DEFAULT_CHUNK_SIZE, EXTENDED_TIMESTAMP, MAX_CHUNK_SIZE, MAX_CHUNK_STREAMS, MAX_MESSAGE_LEN, MAX_PENDING_BYTES,
    RawMessage,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("message of {len} bytes exceeds the limit of {max}")]
    MessageTooLong { len: u32, max: u32 },
    #[error("more than {max} chunk streams on one connection")]
    TooManyChunkStreams { max: usize },
    #[error("partly received messages exceed {max} bytes")]
    TooMuchPending { max: usize },
    #[error("chunk size {0} is outside 1..={MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    #[error("chunk of format {fmt} on chunk stream {csid} which has no previous header")]
    NoPreviousHeader { fmt: u8, csid: u32 },
    #[error("message header changed in the middle of a message on chunk stream {csid}")]
    HeaderChangedMidMessage { csid: u32 },
}

pub(super) type Result<T, E = Error> = std::result::Result<T, E>;

/// Limits applied to one connection's chunk stream.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message_len: u32,
    pub max_chunk_streams: usize,
    pub max_pending_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_len: MAX_MESSAGE_LEN,
            max_chunk_streams: MAX_CHUNK_STREAMS,
            max_pending_bytes: MAX_PENDING_BYTES,
        }
    }
}

#[derive(Debug, Default)]
struct StreamState {
    timestamp: u32,
    /// The timestamp field of the last header: a delta for formats 1 and 2,
    /// the absolute value for format 0. A format-3 chunk that starts a new
    /// message adds it again (what ffmpeg and librtmp assume when writing).
    delta: u32,
    length: u32,
    type_id: u8,
    stream_id: u32,
    /// The last header carried an extended timestamp, so format-3 chunks do too.
    extended: bool,
    /// The message being reassembled, if one is under way.
    partial: Option<BytesMut>,
}

/// Reassembles messages from chunks. Pure: feed it a buffer, it consumes
/// whole chunks only and says `Ok(None)` when it needs more bytes.
#[derive(Debug)]
pub struct ChunkReader {
    chunk_size: u32,
    limits: Limits,
    /// State per chunk stream id. A few streams in practice and at most
    /// `max_chunk_streams`: a linear search beats hashing on every chunk.
    streams: Vec<(u32, StreamState)>,
    pending_bytes: usize,
}

impl Default for ChunkReader {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl ChunkReader {
    pub fn new(limits: Limits) -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            limits,
            streams: Vec::new(),
            pending_bytes: 0,
        }
    }

    /// Applies the peer's Set Chunk Size.
    pub fn set_chunk_size(&mut self, size: u32) -> Result<()> {
        if size == 0 || size > MAX_CHUNK_SIZE {
            return Err(Error::BadChunkSize(size));
        }
        self.chunk_size = size;
        Ok(())
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Applies the peer's Abort Message: drops the partial message of `csid`.
    pub fn abort(&mut self, csid: u32) {
        if let Some(i) = self.index(csid)
            && self.streams[i].1.partial.take().is_some()
        {
            self.pending_bytes -= self.streams[i].1.length as usize;
        }
    }

    fn index(&self, csid: u32) -> Option<usize> {
        self.streams.iter().position(|(id, _)| *id == csid)
    }

    /// Reads chunks from `buf` until a message is complete (returned) or the
    /// buffer holds no whole chunk (`Ok(None)`; nothing of a partial chunk is
    /// consumed).
    pub fn read(&mut self, buf: &mut BytesMut) -> Result<Option<RawMessage>> {
        loop {
            match self.read_chunk(buf)? {
                Step::Incomplete => return Ok(None),
                Step::Message(msg) => return Ok(Some(msg)),
                Step::Continue => {}
            }
        }
    }

    fn read_chunk(&mut self, buf: &mut BytesMut) -> Result<Step> {
        let data: &[u8] = buf;
        let Some((fmt, csid, mut pos)) = basic_header(data) else {
            return Ok(Step::Incomplete);
        };
        if data.len() < pos + MESSAGE_HEADER_LEN[usize::from(fmt)] {
            return Ok(Step::Incomplete);
        }
        let index = self.index(csid);
        if index.is_none() && self.streams.len() >= self.limits.max_chunk_streams {
            return Err(Error::TooManyChunkStreams {
                max: self.limits.max_chunk_streams,
            });
        }
        if index.is_none() && fmt == 3 {
            return Err(Error::NoPreviousHeader { fmt, csid });
        }
        let prev = index.map(|i| &self.streams[i].1);
        let in_message = prev.is_some_and(|s| s.partial.is_some());
        // Decoded still without consuming anything.
        let Some(header) = message_header(fmt, &data[pos..], prev) else {
            return Ok(Step::Incomplete);
        };
        pos += header.len;
        if header.length > self.limits.max_message_len {
            return Err(Error::MessageTooLong {
                len: header.length,
                max: self.limits.max_message_len,
            });
        }
        if in_message && fmt != 3 {
            // A new header in the middle of a message: some encoders resend
            // format 0 after an Abort they never sent. Refuse: the stream is corrupt.
            return Err(Error::HeaderChangedMidMessage { csid });
        }
        let received = prev.and_then(|s| s.partial.as_ref()).map_or(0, BytesMut::len);
        let want = (header.length as usize - received).min(self.chunk_size as usize);
        if data.len() < pos + want {
            return Ok(Step::Incomplete);
        }
        if !in_message && self.pending_bytes + header.length as usize > self.limits.max_pending_bytes {
            return Err(Error::TooMuchPending {
                max: self.limits.max_pending_bytes,
            });
        }
        // The whole chunk is here: commit.
        let i = index.unwrap_or_else(|| {
            self.streams.push((csid, StreamState::default()));
            self.streams.len() - 1
        });
        if !in_message {
            // Sized by the bytes that are here already, never by the peer's
            // announced length alone: a frame that came in one read is
            // gathered without reallocating.
            let here = (header.length as usize).min(data.len() - pos);
            self.streams[i].1.start_message(fmt, &header, here);
            self.pending_bytes += header.length as usize;
        }
        buf.advance(pos);
        let state = &mut self.streams[i].1;
        let partial = state.partial.get_or_insert_with(BytesMut::new);
        partial.extend_from_slice(&buf[..want]);
        buf.advance(want);
        if partial.len() < state.length as usize {
            return Ok(Step::Continue);
        }
        let payload = state.partial.take().map(BytesMut::freeze).unwrap_or_default();
        self.pending_bytes -= state.length as usize;
        Ok(Step::Message(RawMessage {
            csid,
            timestamp: state.timestamp,
            type_id: state.type_id,
            stream_id: state.stream_id,
            payload,
        }))
    }
}

/// Length of the message header of each chunk format (0 to 3).
const MESSAGE_HEADER_LEN: [usize; 4] = [11, 7, 3, 0];

/// A chunk's basic header: its format, chunk stream id and length; `None`
/// while incomplete.
fn basic_header(data: &[u8]) -> Option<(u8, u32, usize)> {
    let b0 = *data.first()?;
    let (csid, len) = match b0 & 0x3f {
        0 => (64 + u32::from(*data.get(1)?), 2),
        1 => (64 + u32::from(*data.get(1)?) + 256 * u32::from(*data.get(2)?), 3),
        n => (u32::from(n), 1),
    };
    Some((b0 >> 6, csid, len))
}

/// A chunk's message header, its fields filled from the chunk stream's
/// previous header where the format leaves them out.
struct Header {
    length: u32,
    type_id: u8,
    stream_id: u32,
    /// The timestamp field (extended if need be): absolute for format 0, a
    /// delta for 1 and 2, unused for 3.
    timestamp: u32,
    extended: bool,
    /// Bytes of the message header and extended timestamp.
    len: usize,
}

/// Decodes the message header at the start of `data` (after the basic
/// header); `None` while incomplete.
fn message_header(fmt: u8, data: &[u8], prev: Option<&StreamState>) -> Option<Header> {
    let mut len = MESSAGE_HEADER_LEN[usize::from(fmt)];
    let h = data.get(..len)?;
    let ts_field = if fmt <= 2 {
        u32::from_be_bytes([0, h[0], h[1], h[2]])
    } else {
        0
    };
    let (mut length, mut type_id, mut stream_id) = prev.map_or((0, 0, 0), |s| (s.length, s.type_id, s.stream_id));
    if fmt <= 1 {
        length = u32::from_be_bytes([0, h[3], h[4], h[5]]);
        type_id = h[6];
    }
    if fmt == 0 {
        stream_id = u32::from_le_bytes([h[7], h[8], h[9], h[10]]);
    }
    let extended = if fmt <= 2 {
        ts_field == EXTENDED_TIMESTAMP
    } else {
        prev.is_some_and(|s| s.extended)
    };
    let mut timestamp = ts_field;
    if extended {
        let ext = data.get(len..len + 4)?;
        if fmt <= 2 {
            timestamp = u32::from_be_bytes([ext[0], ext[1], ext[2], ext[3]]);
        }
        len += 4;
    }
    Some(Header {
        length,
        type_id,
        stream_id,
        timestamp,
        extended,
        len,
    })
}

impl StreamState {
    /// A new message starts on this chunk stream with `header`; `here` of
    /// its bytes are already read.
    fn start_message(&mut self, fmt: u8, header: &Header, here: usize) {
        match fmt {
            0 => {
                self.timestamp = header.timestamp;
                self.delta = header.timestamp;
            }
            1 | 2 => {
                self.timestamp = self.timestamp.wrapping_add(header.timestamp);
                self.delta = header.timestamp;
            }
            _ => self.timestamp = self.timestamp.wrapping_add(self.delta),
        }
        self.length = header.length;
        self.type_id = header.type_id;
        self.stream_id = header.stream_id;
        self.extended = header.extended;
        self.partial = Some(BytesMut::with_capacity(here));
    }
}

enum Step {
    Incomplete,
    Continue,
    Message(RawMessage),
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::chunk::ChunkWriter;

    fn msg(csid: u32, ts: u32, type_id: u8, sid: u32, len: usize) -> RawMessage {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + csid as usize) as u8).collect();
        RawMessage {
            csid,
            timestamp: ts,
            type_id,
            stream_id: sid,
            payload: Bytes::from(payload),
        }
    }

    fn read_all(reader: &mut ChunkReader, buf: &mut BytesMut) -> Vec<RawMessage> {
        let mut out = Vec::new();
        while let Some(m) = reader.read(buf).unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn format0_single_chunk() {
        // csid 3, ts 1000, len 4, type 20, stream 0, payload 01 02 03 04
        let mut buf = BytesMut::from(&[0x03, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x04, 0x14, 0, 0, 0, 0, 1, 2, 3, 4][..]);
        let m = ChunkReader::default().read(&mut buf).unwrap().unwrap();
        assert_eq!((m.csid, m.timestamp, m.type_id, m.stream_id), (3, 1000, 20, 0));
        assert_eq!(&m.payload[..], &[1, 2, 3, 4]);
        assert!(buf.is_empty());
    }

    #[test]
    fn every_header_format_and_continuations() {
        // fmt0 (ts 10), fmt1 (delta 5, new length/type), fmt2 (delta 7), fmt3 (delta 7 again).
        let mut bytes = vec![0x04, 0, 0, 10, 0, 0, 2, 9, 1, 0, 0, 0, 0xaa, 0xbb];
        bytes.extend_from_slice(&[0x44, 0, 0, 5, 0, 0, 3, 8, 1, 2, 3]);
        bytes.extend_from_slice(&[0x84, 0, 0, 7, 4, 5, 6]);
        bytes.extend_from_slice(&[0xc4, 7, 8, 9]);
        let mut buf = BytesMut::from(&bytes[..]);
        let got = read_all(&mut ChunkReader::default(), &mut buf);
        let summary: Vec<_> = got
            .iter()
            .map(|m| (m.timestamp, m.type_id, m.stream_id, m.payload.len()))
            .collect();
        assert_eq!(
            summary,
            vec![(10, 9, 1, 2), (15, 8, 1, 3), (22, 8, 1, 3), (29, 8, 1, 3)]
        );
        assert_eq!(&got[3].payload[..], &[7, 8, 9]);
    }

    #[test]
    fn two_and_three_byte_chunk_stream_ids() {
        let mut w = ChunkWriter::default();
        let mut buf = BytesMut::new();
        let a = msg(64 + 200, 1, 9, 1, 300);
        let b = msg(64 + 300 + 256 * 40, 2, 8, 1, 50);
        w.write(&a, &mut buf);
        w.write(&b, &mut buf);
        assert_eq!(buf[0] & 0x3f, 0);
        let got = read_all(&mut ChunkReader::default(), &mut buf);
        assert_eq!(got, vec![a, b]);
    }

    #[test]
    fn extended_timestamps_on_every_chunk() {
        let mut w = ChunkWriter::default();
        let mut buf = BytesMut::new();
        let a = msg(6, 0x0100_0000, 9, 1, 500);
        let b = msg(6, 0x0100_0040, 9, 1, 500);
        w.write(&a, &mut buf);
        w.write(&b, &mut buf);
        // 500 bytes at chunk size 128: continuation chunks carry the 4 extended
        // bytes too; the second message has a small delta and needs none.
        assert_eq!(buf.len(), (12 + 4 + 3 * (1 + 4)) + 500 + (4 + 3) + 500);
        let got = read_all(&mut ChunkReader::default(), &mut buf);
        assert_eq!(got, vec![a, b]);
    }

    #[test]
    fn interleaved_streams_and_byte_by_byte_feeding() {
        // Video on csid 6 and audio on csid 4 interleaved at chunk granularity.
        let video = msg(6, 40, 9, 1, 400);
        let audio = msg(4, 41, 8, 1, 100);
        let mut w = ChunkWriter::default();
        let mut v = BytesMut::new();
        w.write(&video, &mut v);
        let mut a = BytesMut::new();
        w.write(&audio, &mut a);
        // Put the whole audio message between the first and second video chunk.
        let first = 12 + 128;
        let mut bytes = v[..first].to_vec();
        bytes.extend_from_slice(&a);
        bytes.extend_from_slice(&v[first..]);
        let mut reader = ChunkReader::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in bytes {
            buf.extend_from_slice(&[b]);
            if let Some(m) = reader.read(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![audio, video]);
    }

    #[test]
    fn chunk_size_changes_both_ways() {
        let mut w = ChunkWriter::default();
        let mut r = ChunkReader::default();
        let m1 = msg(4, 1, 9, 1, 5000);
        let mut buf = BytesMut::new();
        w.set_chunk_size(4096);
        r.set_chunk_size(4096).unwrap();
        w.write(&m1, &mut buf);
        assert_eq!(r.read(&mut buf).unwrap(), Some(m1.clone()));
        w.set_chunk_size(1);
        r.set_chunk_size(1).unwrap();
        w.write(&m1, &mut buf);
        assert_eq!(r.read(&mut buf).unwrap(), Some(m1));
        assert_eq!(r.set_chunk_size(0), Err(Error::BadChunkSize(0)));
        assert!(r.set_chunk_size(u32::MAX).is_err());
    }

    #[test]
    fn abort_drops_the_partial_message() {
        let mut w = ChunkWriter::default();
        let mut buf = BytesMut::new();
        w.write(&msg(4, 1, 9, 1, 300), &mut buf);
        buf.truncate(12 + 128); // only the first chunk arrives
        let mut r = ChunkReader::default();
        assert_eq!(r.read(&mut buf).unwrap(), None);
        assert_eq!(r.pending_bytes, 300);
        r.abort(4);
        assert_eq!(r.pending_bytes, 0);
        // The next message on that chunk stream starts afresh.
        let m = msg(4, 2, 9, 1, 10);
        let mut w2 = ChunkWriter::default();
        w2.write(&m, &mut buf);
        assert_eq!(r.read(&mut buf).unwrap(), Some(m));
    }

    #[test]
    fn limits_are_enforced_before_allocation() {
        // A header announcing a 1 MiB message to a reader that takes 64 KiB.
        let mut buf = BytesMut::from(&[0x04, 0, 0, 0, 0x10, 0x00, 0x00, 9, 1, 0, 0, 0][..]);
        let limits = Limits {
            max_message_len: 64 * 1024,
            ..Limits::default()
        };
        assert_eq!(
            ChunkReader::new(limits).read(&mut buf),
            Err(Error::MessageTooLong {
                len: 1 << 20,
                max: 64 * 1024
            })
        );

        let limits = Limits {
            max_chunk_streams: 2,
            ..Limits::default()
        };
        let mut r = ChunkReader::new(limits);
        let mut w = ChunkWriter::default();
        let mut buf = BytesMut::new();
        for csid in 3..6 {
            w.write(&msg(csid, 0, 9, 1, 1), &mut buf);
        }
        assert!(r.read(&mut buf).unwrap().is_some());
        assert!(r.read(&mut buf).unwrap().is_some());
        assert_eq!(r.read(&mut buf), Err(Error::TooManyChunkStreams { max: 2 }));

        let limits = Limits {
            max_pending_bytes: 1000,
            ..Limits::default()
        };
        let mut r = ChunkReader::new(limits);
        let mut buf = BytesMut::new();
        let mut w = ChunkWriter::default();
        w.write(&msg(3, 0, 9, 1, 900), &mut buf);
        buf.truncate(12 + 128);
        let mut more = BytesMut::new();
        w.write(&msg(4, 0, 9, 1, 900), &mut more);
        buf.extend_from_slice(&more[..12 + 128]);
        assert_eq!(r.read(&mut buf), Err(Error::TooMuchPending { max: 1000 }));
    }

    #[test]
    fn format3_without_history_is_an_error() {
        let mut buf = BytesMut::from(&[0xc5, 1, 2][..]);
        assert_eq!(
            ChunkReader::default().read(&mut buf),
            Err(Error::NoPreviousHeader { fmt: 3, csid: 5 })
        );
    }
}
