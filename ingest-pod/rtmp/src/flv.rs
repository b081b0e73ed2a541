//! FLV files: the writer for local recordings and the reader the loss
//! audit uses on the origin's recordings.

use std::io::{self, Read, Write};

use bytes::Bytes;
use thiserror::Error;

/// FLV tag types (the same ids as RTMP message types).
pub const TAG_AUDIO: u8 = 8;
pub const TAG_VIDEO: u8 = 9;
pub const TAG_SCRIPT: u8 = 18;
/// Largest tag the reader accepts (the tag size field is 24 bits).
pub const MAX_TAG_SIZE: usize = 0x00FF_FFFF;

#[derive(Debug, Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("not an FLV file (bad signature)")]
    BadSignature,
}

/// One FLV tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub tag_type: u8,
    pub timestamp: u32,
    pub data: Bytes,
}

/// Writes an FLV stream: header, then tags.
pub struct FlvWriter<W: Write> {
    out: W,
}

impl<W: Write> FlvWriter<W> {
    pub fn new(mut out: W, audio: bool, video: bool) -> io::Result<Self> {
        let flags = (u8::from(audio) << 2) | u8::from(video);
        out.write_all(&[b'F', b'L', b'V', 1, flags, 0, 0, 0, 9, 0, 0, 0, 0])?;
        Ok(Self { out })
    }

    pub fn write_tag(&mut self, tag_type: u8, timestamp: u32, data: &[u8]) -> io::Result<()> {
        let len = data.len().min(MAX_TAG_SIZE) as u32;
        let mut h = [0u8; 11];
        h[0] = tag_type;
        h[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
        h[4..7].copy_from_slice(&timestamp.to_be_bytes()[1..]);
        h[7] = (timestamp >> 24) as u8;
        self.out.write_all(&h)?;
        self.out.write_all(&data[..len as usize])?;
        self.out.write_all(&(len + 11).to_be_bytes())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Reads all tags of an FLV stream. A truncated last tag (a recording cut
/// while being written) ends the list without an error, and so does an
/// empty file (nginx-rtmp opens a recording before the first frame).
pub fn read_tags(mut input: impl Read) -> Result<Vec<Tag>, Error> {
    let mut header = [0u8; 9];
    match read_full(&mut input, &mut header)? {
        0 => return Ok(Vec::new()),
        9 => {}
        _ => return Err(Error::BadSignature),
    }
    if &header[..3] != b"FLV" {
        return Err(Error::BadSignature);
    }
    let offset = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
    io::copy(
        &mut (&mut input).take(offset.saturating_sub(9) as u64 + 4),
        &mut io::sink(),
    )?;
    let mut tags = Vec::new();
    loop {
        let mut h = [0u8; 11];
        if read_full(&mut input, &mut h)? < 11 {
            break;
        }
        let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
        let timestamp = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
        // Grow with the bytes that are really there, not by the announced size.
        let mut data = Vec::new();
        (&mut input).take(len as u64).read_to_end(&mut data)?;
        if data.len() < len {
            break;
        }
        let mut trailer = [0u8; 4];
        read_full(&mut input, &mut trailer)?;
        tags.push(Tag {
            tag_type: h[0] & 0x1f,
            timestamp,
            data: Bytes::from(data),
        });
    }
    Ok(tags)
}

fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read() {
        let mut buf = Vec::new();
        let mut w = FlvWriter::new(&mut buf, true, true).unwrap();
        w.write_tag(TAG_SCRIPT, 0, b"meta").unwrap();
        w.write_tag(TAG_VIDEO, 0x0123_4567, &[0x17, 1, 2]).unwrap();
        w.write_tag(TAG_AUDIO, 40, &[0xaf, 1]).unwrap();
        let tags = read_tags(&buf[..]).unwrap();
        assert_eq!(tags.len(), 3);
        assert_eq!(tags[1].timestamp, 0x0123_4567);
        assert_eq!(&tags[2].data[..], &[0xaf, 1]);
        // A cut recording still yields its whole tags.
        let cut = read_tags(&buf[..buf.len() - 6]).unwrap();
        assert_eq!(cut.len(), 2);
        assert!(matches!(read_tags(&b"NOTFLV123"[..]), Err(Error::BadSignature)));
        assert!(read_tags(&b""[..]).unwrap().is_empty());
        assert!(matches!(read_tags(&b"FLV"[..]), Err(Error::BadSignature)));
    }
}
