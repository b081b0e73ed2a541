//! The async RTMP transport: handshake, then a message reader and writer on
//! the two halves of one TCP connection.

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, Sleep};

use super::chunk::{self, ChunkReader, ChunkWriter, Limits, RawMessage};
use super::handshake;
use super::message::{self, Message};

#[derive(Debug, Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake: {0}")]
    Handshake(#[from] handshake::Error),
    #[error("chunk stream: {0}")]
    Chunk(#[from] chunk::Error),
    #[error("message: {0}")]
    Message(#[from] message::Error),
    #[error("timed out after {0:?} {1}")]
    Timeout(Duration, &'static str),
    #[error("peer closed the connection in the middle of a message")]
    TruncatedStream,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Chunk size this side switches to right after the handshake (what OBS
/// and ffmpeg use); fewer headers per media message than the default 128.
pub const OUTGOING_CHUNK_SIZE: u32 = 4096;

/// Free space the server side offers each read: a 2.5 Mbit/s video frame
/// and the audio that arrived with it come in with one syscall.
pub const READ_BUFFER_SIZE: usize = 16 * 1024;
/// Free space the client side offers each read: a publishing client gets
/// only control messages and command replies back.
pub const CLIENT_READ_BUFFER_SIZE: usize = 4 * 1024;

fn now_ms() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u32)
        .unwrap_or(0)
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

async fn timed<T>(limit: Duration, what: &'static str, fut: impl Future<Output = std::io::Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::Timeout(limit, what)),
    }
}

/// Server side of the handshake, then the split transport.
pub async fn accept(mut stream: TcpStream, limit: Duration, limits: Limits) -> Result<(Reader, Writer)> {
    let mut c0c1 = vec![0u8; handshake::C0C1_SIZE];
    timed(limit, "waiting for C0/C1", stream.read_exact(&mut c0c1)).await?;
    let response = handshake::server_response(&c0c1, now_ms(), seed())?;
    timed(limit, "sending S0/S1/S2", stream.write_all(&response)).await?;
    let mut c2 = vec![0u8; handshake::HANDSHAKE_SIZE];
    timed(limit, "waiting for C2", stream.read_exact(&mut c2)).await?;
    handshake::check_c2(&c2)?;
    Ok(split(stream, limits, READ_BUFFER_SIZE))
}

/// Client side of the handshake, then the split transport.
pub async fn connect(mut stream: TcpStream, limit: Duration) -> Result<(Reader, Writer)> {
    let hello = handshake::client_hello(now_ms(), seed());
    timed(limit, "sending C0/C1", stream.write_all(&hello)).await?;
    let mut s = vec![0u8; handshake::S0S1S2_SIZE];
    timed(limit, "waiting for S0/S1/S2", stream.read_exact(&mut s)).await?;
    let c2 = handshake::client_ack(&s)?;
    timed(limit, "sending C2", stream.write_all(&c2)).await?;
    Ok(split(stream, Limits::default(), CLIENT_READ_BUFFER_SIZE))
}

fn split(stream: TcpStream, limits: Limits, read_size: usize) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (
        Reader {
            io: r,
            buf: BytesMut::new(),
            chunks: ChunkReader::new(limits),
            bytes_in: 0,
            window: 0,
            acked: 0,
            read_size,
            idle: None,
        },
        Writer {
            io: w,
            chunks: ChunkWriter::default(),
            buf: BytesMut::with_capacity(8192),
            bytes_out: 0,
        },
    )
}

/// Reading half: messages in, with the chunk-level control messages
/// (Set Chunk Size, Abort, Window Acknowledgement Size) applied.
#[derive(Debug)]
pub struct Reader {
    io: OwnedReadHalf,
    buf: BytesMut,
    chunks: ChunkReader,
    bytes_in: u64,
    /// The peer's acknowledgement window (0: none asked for).
    window: u32,
    acked: u64,
    /// Free space offered to each read.
    read_size: usize,
    idle: Option<Idle>,
}

/// The idle deadline of [`Reader::next_within`], pushed back by every read:
/// one timer per connection instead of one per message.
#[derive(Debug)]
struct Idle {
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
}

/// One read into `buf`, which is made to hold `size` bytes (cancel safe).
async fn read_some(io: &mut OwnedReadHalf, buf: &mut BytesMut, size: usize) -> std::io::Result<usize> {
    // Capacity `size` in all: the leftover of a partial chunk moves to the
    // front of the same allocation instead of doubling it.
    buf.reserve(size.saturating_sub(buf.len()).max(1));
    io.read_buf(buf).await
}

impl Reader {
    /// Next message, or `None` when the peer closed the connection cleanly.
    ///
    /// Cancel safe: bytes already read stay buffered.
    pub async fn next(&mut self) -> Result<Option<Message>> {
        loop {
            if let Some(msg) = self.try_next()? {
                return Ok(Some(msg));
            }
            let n = read_some(&mut self.io, &mut self.buf, self.read_size).await?;
            if !self.record_read(n) {
                return self.eof();
            }
        }
    }

    /// [`next`](Self::next), failing when the peer sends nothing for `limit`
    /// (counted from the last read, so a caller may stop and resume).
    pub async fn next_within(&mut self, limit: Duration) -> Result<Option<Message>> {
        loop {
            if let Some(msg) = self.try_next()? {
                return Ok(Some(msg));
            }
            let idle = match &mut self.idle {
                Some(idle) if idle.limit == limit => idle,
                slot => slot.insert(Idle {
                    limit,
                    deadline: Box::pin(tokio::time::sleep(limit)),
                }),
            };
            let n = tokio::select! {
                biased;
                n = read_some(&mut self.io, &mut self.buf, self.read_size) => n?,
                () = idle.deadline.as_mut() => return Err(Error::Timeout(limit, "waiting for the peer")),
            };
            if !self.record_read(n) {
                return self.eof();
            }
        }
    }

    /// The next message already buffered, without reading the socket.
    pub fn try_next(&mut self) -> Result<Option<Message>> {
        let Some(raw) = self.chunks.read(&mut self.buf)? else {
            return Ok(None);
        };
        let msg = Message::decode(raw)?;
        match &msg {
            Message::SetChunkSize(n) => self.chunks.set_chunk_size(*n)?,
            Message::Abort(csid) => self.chunks.abort(*csid),
            Message::WindowAckSize(n) => self.window = *n,
            _ => {}
        }
        Ok(Some(msg))
    }

    /// Counts a read of `n` bytes; `false` at end of stream.
    fn record_read(&mut self, n: usize) -> bool {
        if n == 0 {
            return false;
        }
        self.bytes_in += n as u64;
        if let Some(idle) = &mut self.idle {
            // Moving a deadline later is cheap: tokio re-files the timer only when it fires.
            idle.deadline.as_mut().reset(Instant::now() + idle.limit);
        }
        true
    }

    fn eof(&self) -> Result<Option<Message>> {
        if self.buf.is_empty() {
            Ok(None)
        } else {
            Err(Error::TruncatedStream)
        }
    }

    /// An Acknowledgement to send now, if the peer's window has filled.
    pub fn ack_due(&mut self) -> Option<Message> {
        if self.window > 0 && self.bytes_in - self.acked >= u64::from(self.window) {
            self.acked = self.bytes_in;
            return Some(Message::Acknowledgement(self.bytes_in as u32));
        }
        None
    }

    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    /// Acknowledges the next segments at once instead of delaying the ACK.
    /// Peers with Nagle on (nginx-rtmp, OBS) hold their next small write
    /// until our ACK: during a request/reply exchange that costs ~40 ms.
    /// Linux drops the mode by itself, so call it before each exchange.
    pub fn quick_ack(&self) {
        #[cfg(target_os = "linux")]
        {
            let _ = socket2::SockRef::from(self.io.as_ref()).set_tcp_quickack(true);
        }
    }
}

/// Writing half: queue messages, then flush.
#[derive(Debug)]
pub struct Writer {
    io: OwnedWriteHalf,
    chunks: ChunkWriter,
    buf: BytesMut,
    bytes_out: u64,
}

impl Writer {
    /// Encodes `msg` into the output buffer. A Set Chunk Size takes effect
    /// for the messages queued after it.
    pub fn queue(&mut self, msg: &Message) {
        self.chunks.write(&msg.encode(), &mut self.buf);
        if let Message::SetChunkSize(n) = msg {
            self.chunks.set_chunk_size(*n);
        }
    }

    pub fn queue_raw(&mut self, raw: &RawMessage) {
        self.chunks.write(raw, &mut self.buf);
    }

    /// Bytes queued and not yet flushed.
    pub fn queued(&self) -> usize {
        self.buf.len()
    }

    pub async fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            self.bytes_out += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.queue(msg);
        self.flush().await
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    /// Closes the sending direction (the peer reads EOF).
    pub async fn shutdown(&mut self) -> Result<()> {
        self.flush().await?;
        self.io.shutdown().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A reader on one end of a loopback connection, and the other end.
    async fn pair() -> (Reader, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (reader, _writer) = split(accepted.unwrap().0, Limits::default(), READ_BUFFER_SIZE);
        (reader, client.unwrap())
    }

    fn chunks(w: &mut ChunkWriter, msgs: &[Message]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        for m in msgs {
            w.write(&m.encode(), &mut buf);
        }
        buf.to_vec()
    }

    #[tokio::test]
    async fn idle_clock_runs_from_the_last_read() {
        let (mut reader, mut peer) = pair().await;
        let limit = Duration::from_millis(200);
        let mut w = ChunkWriter::default();
        let first = chunks(&mut w, &[Message::Acknowledgement(7)]);
        let trickle = async {
            // A byte every 50 ms: the message takes longer than `limit`, the connection is never idle that long.
            for b in &first {
                peer.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peer
        };
        let (got, mut peer) = tokio::join!(reader.next_within(limit), trickle);
        assert_eq!(got.unwrap(), Some(Message::Acknowledgement(7)));
        let both = chunks(&mut w, &[Message::Acknowledgement(8), Message::Acknowledgement(9)]);
        peer.write_all(&both).await.unwrap();
        assert_eq!(
            reader.next_within(limit).await.unwrap(),
            Some(Message::Acknowledgement(8))
        );
        // The next one came with the same read: there without touching the socket.
        assert_eq!(reader.try_next().unwrap(), Some(Message::Acknowledgement(9)));
        assert_eq!(reader.try_next().unwrap(), None);
        let started = Instant::now();
        let silent = reader.next_within(limit).await;
        assert!(matches!(silent, Err(Error::Timeout(..))), "{silent:?}");
        assert!(started.elapsed() >= limit / 2, "{:?}", started.elapsed());
    }
}
