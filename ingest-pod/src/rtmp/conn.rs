//! The async RTMP transport: handshake, then a message reader and writer on
//! the two halves of one TCP connection.

use std::collections::HashMap;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::task::AtomicWaker;
use mio::unix::SourceFd;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior, Sleep};

use ingest_rtmp::chunk::{self, ChunkReader, ChunkWriter, Limits, MAX_SLICES, Parts, RawMessage};
use ingest_rtmp::handshake;
use ingest_rtmp::message::{self, Message};

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
/// Free space each read offers on a clocked connection, which reads
/// everything that arrived during one interval: reads that fill it are
/// followed by another at once.
pub const CLOCKED_READ_SIZE: usize = 64 * 1024;
/// Longest a clocked connection waits for the peer to take what we send
/// (control messages only: a few bytes now and then).
pub const CLOCKED_WRITE_STALL: Duration = Duration::from_secs(10);

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

/// The transport of a connection whose handshake is left out (tests).
#[cfg(test)]
pub(crate) fn transport(stream: TcpStream) -> (Reader, Writer) {
    split(stream, Limits::default(), CLIENT_READ_BUFFER_SIZE)
}

fn split(stream: TcpStream, limits: Limits, read_size: usize) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (
        Reader {
            io: ReadIo::Ready(r),
            buf: BytesMut::new(),
            chunks: ChunkReader::new(limits),
            bytes_in: 0,
            window: 0,
            acked: 0,
            read_size,
            idle: None,
        },
        Writer {
            io: WriteIo::Ready(w),
            chunks: ChunkWriter::default(),
            parts: Parts::default(),
            bytes_out: 0,
        },
    )
}

/// The clock clocked connections read on (see [`clocked`]). Their sockets
/// sit in an epoll set of the clock's own that the event loop never waits
/// on: at every tick one non-blocking look at it finds the connections that
/// received something since, and only those wake. Copies share it; it
/// stops when the last copy is dropped.
#[derive(Debug, Clone)]
pub struct Clock {
    shared: Arc<ClockShared>,
}

#[derive(Debug)]
struct ClockShared {
    registry: mio::Registry,
    /// The wake-up of each clocked connection, by token.
    waiting: Mutex<HashMap<usize, Arc<Ready>>>,
    /// Tokens are never reused: a late event of a closed socket wakes nobody.
    next_token: AtomicUsize,
    /// Looks at the epoll set so far.
    ticks: AtomicU64,
    /// Wakes the idle clock: a connection was clocked, or the clock is gone.
    wake: Arc<Notify>,
}

impl Drop for ClockShared {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

impl Clock {
    /// Starts a clock on the current runtime.
    pub fn start(interval: Duration) -> std::io::Result<Self> {
        let mut poll = mio::Poll::new()?;
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(ClockShared {
            registry: poll.registry().try_clone()?,
            waiting: Mutex::new(HashMap::new()),
            next_token: AtomicUsize::new(0),
            ticks: AtomicU64::new(0),
            wake: wake.clone(),
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let mut timer = tokio::time::interval(interval);
            timer.set_missed_tick_behavior(MissedTickBehavior::Skip);
            let mut events = mio::Events::with_capacity(1024);
            loop {
                // Every connection and the server are gone.
                let Some(idle) = weak.upgrade().map(|s| s.lock().is_empty()) else {
                    return;
                };
                if idle {
                    // No connection is clocked: no tick until one is (an idle
                    // pod does not wake every interval).
                    wake.notified().await;
                    continue;
                }
                timer.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                shared.ticks.fetch_add(1, Ordering::Relaxed);
                loop {
                    // A zero timeout: looks, never blocks the runtime.
                    match poll.poll(&mut events, Some(Duration::ZERO)) {
                        Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                        Err(err) => {
                            // Wake everyone: each reads until its socket is empty.
                            tracing::warn!(?err, "media read clock: polling failed");
                            shared.lock().values().for_each(|r| r.wake());
                            break;
                        }
                        Ok(()) => {}
                    }
                    let waiting = shared.lock();
                    for event in &events {
                        if let Some(ready) = waiting.get(&event.token().0) {
                            if event.is_read_closed() || event.is_error() {
                                ready.closed.store(true, Ordering::Relaxed);
                            }
                            ready.wake();
                        }
                    }
                    if events.iter().count() < events.capacity() {
                        break;
                    }
                }
            }
        });
        Ok(Self { shared })
    }
}

impl ClockShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<Ready>>> {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A socket in a clock's epoll set; leaves it on drop.
#[derive(Debug)]
struct Registration {
    clock: Clock,
    token: usize,
    fd: RawFd,
    ready: Arc<Ready>,
}

/// What the clock tells a clocked connection.
#[derive(Debug, Default)]
struct Ready {
    /// Set at the first tick after the socket received something, taken by
    /// the reader it wakes (a flag and a waker: no lock per wake-up).
    received: AtomicBool,
    waker: AtomicWaker,
    /// The peer closed (or the socket failed): read until the end even
    /// after a short read, since no further event will come.
    closed: AtomicBool,
}

impl Ready {
    fn wake(&self) {
        self.received.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves once the clock saw something arrive (cancel safe: a wake-up
    /// not taken stays set).
    async fn received(&self) {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.received.swap(false, Ordering::Acquire) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
    }
}

impl Registration {
    fn new(clock: Clock, stream: &std::net::TcpStream) -> std::io::Result<Self> {
        let shared = &clock.shared;
        let token = shared.next_token.fetch_add(1, Ordering::Relaxed);
        let fd = stream.as_raw_fd();
        let ready = Arc::new(Ready::default());
        shared.lock().insert(token, ready.clone());
        shared.wake.notify_one();
        // Edge-triggered: one event per arrival, nothing while data waits unread.
        if let Err(err) = shared
            .registry
            .register(&mut SourceFd(&fd), mio::Token(token), mio::Interest::READABLE)
        {
            shared.lock().remove(&token);
            return Err(err);
        }
        Ok(Self {
            clock,
            token,
            fd,
            ready,
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // The socket is still open: the stream is dropped after this.
        let _ = self.clock.shared.registry.deregister(&mut SourceFd(&self.fd));
        self.clock.shared.lock().remove(&self.token);
    }
}

/// Switches a connection from reading on readiness to reading on `clock`:
/// at the first tick after something arrived, it reads everything that
/// arrived since.
///
/// The socket leaves the event loop, so a media packet no longer wakes the
/// process: one wake-up per tick serves every clocked connection that
/// received something, and each makes one read (and its relay one write)
/// per tick instead of one per packet. The price is up to one interval of
/// added latency. Writes (acknowledgements, pings, signals) go out at once.
pub fn clocked(reader: Reader, writer: Writer, clock: Clock) -> Result<(Reader, Writer)> {
    let (ReadIo::Ready(r), WriteIo::Ready(w)) = (reader.io, writer.io) else {
        return Err(Error::Io(std::io::Error::other("connection is clocked already")));
    };
    let stream = r
        .reunite(w)
        .map_err(|_| std::io::Error::other("halves of different connections"))?;
    // Leaves the event loop; the socket stays non-blocking.
    let stream = stream.into_std()?;
    let registration = Registration::new(clock, &stream)?;
    let stream = Arc::new(stream);
    Ok((
        Reader {
            io: ReadIo::Clocked {
                registration,
                stream: stream.clone(),
                // What arrived before the switch made no event: read it at once.
                more: true,
            },
            read_size: CLOCKED_READ_SIZE,
            ..reader
        },
        Writer {
            io: WriteIo::Clocked(stream),
            ..writer
        },
    ))
}

/// Switches a clocked connection back to reading on readiness.
pub fn unclocked(reader: Reader, writer: Writer) -> Result<(Reader, Writer)> {
    let (
        ReadIo::Clocked {
            registration, stream, ..
        },
        WriteIo::Clocked(other),
    ) = (reader.io, writer.io)
    else {
        return Err(Error::Io(std::io::Error::other("connection is not clocked")));
    };
    drop((registration, other));
    let stream = Arc::try_unwrap(stream).map_err(|_| std::io::Error::other("socket still shared"))?;
    // Back into the event loop of the current runtime.
    let (r, w) = TcpStream::from_std(stream)?.into_split();
    Ok((
        Reader {
            io: ReadIo::Ready(r),
            read_size: READ_BUFFER_SIZE,
            ..reader
        },
        Writer {
            io: WriteIo::Ready(w),
            ..writer
        },
    ))
}

thread_local! {
    /// Where clocked connections read into (initialised once per thread).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; CLOCKED_READ_SIZE]);
}

#[derive(Debug)]
enum ReadIo {
    /// Read when the event loop says the socket is readable.
    Ready(OwnedReadHalf),
    /// Read on a clock (see [`clocked`]).
    Clocked {
        /// Before `stream`: leaves the epoll set while the socket is open.
        registration: Registration,
        stream: Arc<std::net::TcpStream>,
        /// The last read filled the buffer: read again before the next tick.
        more: bool,
    },
}

#[derive(Debug)]
enum WriteIo {
    Ready(OwnedWriteHalf),
    Clocked(Arc<std::net::TcpStream>),
}

/// Reading half: messages in, with the chunk-level control messages
/// (Set Chunk Size, Abort, Window Acknowledgement Size) applied.
#[derive(Debug)]
pub struct Reader {
    io: ReadIo,
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
async fn read_some(io: &mut ReadIo, buf: &mut BytesMut, size: usize) -> std::io::Result<usize> {
    match io {
        ReadIo::Ready(io) => {
            // Capacity `size` in all: the leftover of a partial chunk moves to the
            // front of the same allocation instead of doubling it.
            buf.reserve(size.saturating_sub(buf.len()).max(1));
            io.read_buf(buf).await
        }
        ReadIo::Clocked {
            registration,
            stream,
            more,
        } => loop {
            let size = size.min(CLOCKED_READ_SIZE);
            if !*more {
                registration.ready.received().await;
            }
            // Nothing awaits from here on: a cancelled call loses no bytes.
            // Read into the thread's scratch, then copy what came: zeroing
            // `size` bytes of `buf` for each read would cost more.
            let read = SCRATCH.with_borrow_mut(|scratch| {
                let n = (&**stream).read(&mut scratch[..size])?;
                if buf.is_empty() {
                    // An allocation of what came: a burst leaves no large
                    // buffer behind (payloads cut from it free it once relayed).
                    *buf = BytesMut::from(&scratch[..n]);
                } else {
                    buf.extend_from_slice(&scratch[..n]);
                }
                Ok::<_, std::io::Error>(n)
            });
            match read {
                Ok(n) => {
                    // A short read took all there was, unless the peer's
                    // close came with it: the end is read next, not at the
                    // idle limit.
                    *more = n == size || registration.ready.closed.load(Ordering::Relaxed);
                    return Ok(n);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => *more = false,
                // Nothing was read: read again now, not at the next event
                // (the one that woke us is taken).
                Err(err) if err.kind() == ErrorKind::Interrupted => *more = true,
                Err(err) => return Err(err),
            }
        },
    }
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
            let _ = match &self.io {
                ReadIo::Ready(io) => socket2::SockRef::from(io.as_ref()).set_tcp_quickack(true),
                ReadIo::Clocked { stream, .. } => socket2::SockRef::from(&**stream).set_tcp_quickack(true),
            };
        }
    }

    /// Reads on a clock (see [`clocked`]).
    pub fn is_clocked(&self) -> bool {
        matches!(self.io, ReadIo::Clocked { .. })
    }
}

/// Writing half: queue messages, then flush. Payloads are not copied:
/// queued chunks reference them, and a flush writes them with vectored I/O.
#[derive(Debug)]
pub struct Writer {
    io: WriteIo,
    chunks: ChunkWriter,
    parts: Parts,
    bytes_out: u64,
}

impl Writer {
    /// Encodes `msg` for the next flush. A Set Chunk Size takes effect for
    /// the messages queued after it.
    pub fn queue(&mut self, msg: &Message) {
        self.chunks.write_parts(&msg.encode(), &mut self.parts);
        if let Message::SetChunkSize(n) = msg {
            self.chunks.set_chunk_size(*n);
        }
    }

    pub fn queue_raw(&mut self, raw: &RawMessage) {
        self.chunks.write_parts(raw, &mut self.parts);
    }

    /// Bytes queued and not yet flushed.
    pub fn queued(&self) -> usize {
        self.parts.len()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        let mut stalled_since: Option<Instant> = None;
        let mut progress = self.bytes_out;
        while !self.try_flush()? {
            if self.bytes_out > progress {
                progress = self.bytes_out;
                stalled_since = None;
            }
            match &self.io {
                WriteIo::Ready(io) => io.writable().await?,
                // Outside the event loop: the peer reads too slowly; look again shortly.
                WriteIo::Clocked(_) => {
                    if stalled_since.get_or_insert_with(Instant::now).elapsed() >= CLOCKED_WRITE_STALL {
                        return Err(Error::Timeout(CLOCKED_WRITE_STALL, "the peer to read what we sent"));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        Ok(())
    }

    /// Writes what is queued as far as the socket takes it without waiting:
    /// `Ok(false)` leaves the rest for [`flush`](Self::flush).
    pub fn try_flush(&mut self) -> Result<bool> {
        while !self.parts.is_empty() {
            let mut slots = [IoSlice::new(&[]); MAX_SLICES];
            let slices = self.parts.slices(&mut slots);
            let written = match &mut self.io {
                WriteIo::Ready(io) => io.try_write_vectored(slices),
                WriteIo::Clocked(stream) => (&**stream).write_vectored(slices),
            };
            match written {
                Ok(0) => return Err(Error::Io(ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.parts.advance(n);
                    self.bytes_out += n as u64;
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(err) => return Err(err.into()),
            }
        }
        Ok(true)
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
        match &mut self.io {
            WriteIo::Ready(io) => io.shutdown().await?,
            WriteIo::Clocked(stream) => stream.shutdown(Shutdown::Write)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::net::TcpListener;

    use super::*;
    use crate::stress::{lcg, rounds};

    /// Both halves of one end of a loopback connection, and the other end.
    async fn connection() -> (Reader, Writer, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (reader, writer) = split(accepted.unwrap().0, Limits::default(), READ_BUFFER_SIZE);
        (reader, writer, client.unwrap())
    }

    /// A reader on one end of a loopback connection, and the other end.
    async fn pair() -> (Reader, TcpStream) {
        let (reader, _writer, peer) = connection().await;
        (reader, peer)
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

    #[tokio::test]
    async fn a_clocked_connection_reads_all_that_came_in_order_writes_at_once_and_unclocks() {
        let (reader, writer, mut peer) = connection().await;
        let (mut reader, mut writer) =
            clocked(reader, writer, Clock::start(Duration::from_millis(20)).unwrap()).unwrap();
        assert!(reader.is_clocked());

        // More than one read's worth arrives within one interval.
        let big = Message::Video {
            stream_id: 1,
            timestamp: 40,
            payload: Bytes::from(vec![0x27; 3 * CLOCKED_READ_SIZE + 17]),
        };
        let mut w = ChunkWriter::default();
        let sent = [Message::Acknowledgement(1), big.clone(), Message::Acknowledgement(2)];
        peer.write_all(&chunks(&mut w, &sent)).await.unwrap();
        for want in &sent {
            let got = reader.next_within(Duration::from_secs(5)).await.unwrap();
            assert_eq!(got.as_ref(), Some(want));
        }

        // Writing is not clocked: the peer reads it at once.
        writer.send(&Message::Acknowledgement(9)).await.unwrap();
        let mut back = ChunkReader::new(Limits::default());
        let mut buf = BytesMut::new();
        let raw = loop {
            if let Some(raw) = back.read(&mut buf).unwrap() {
                break raw;
            }
            assert!(peer.read_buf(&mut buf).await.unwrap() > 0, "connection closed");
        };
        assert_eq!(Message::decode(raw).unwrap(), Message::Acknowledgement(9));

        // Back on readiness, the connection goes on where it was.
        let (mut reader, _writer) = unclocked(reader, writer).unwrap();
        assert!(!reader.is_clocked());
        peer.write_all(&chunks(&mut w, &[Message::Acknowledgement(3)]))
            .await
            .unwrap();
        assert_eq!(
            reader.next_within(Duration::from_secs(5)).await.unwrap(),
            Some(Message::Acknowledgement(3))
        );

        // The peer closing ends the stream cleanly.
        drop(peer);
        assert_eq!(reader.next_within(Duration::from_secs(5)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_close_that_arrives_with_the_last_bytes_is_seen_at_once() {
        let (reader, writer, mut peer) = connection().await;
        // A long interval: the last message and the close arrive within one tick.
        let clock = Clock::start(Duration::from_millis(200)).unwrap();
        let (mut reader, _writer) = clocked(reader, writer, clock.clone()).unwrap();
        // The first tick finds nothing: what came before the switch is read.
        let idle = tokio::time::timeout(Duration::from_millis(300), reader.next()).await;
        assert!(idle.is_err(), "a message out of nothing: {idle:?}");
        let mut w = ChunkWriter::default();
        peer.write_all(&chunks(&mut w, &[Message::Acknowledgement(7)]))
            .await
            .unwrap();
        drop(peer);
        assert_eq!(
            reader.next_within(Duration::from_secs(5)).await.unwrap(),
            Some(Message::Acknowledgement(7))
        );
        // Not at the idle limit: the publisher left, its stream is free at once.
        let closed = tokio::time::timeout(Duration::from_secs(2), reader.next_within(Duration::from_secs(30))).await;
        assert!(matches!(closed, Ok(Ok(None))), "the close went unnoticed: {closed:?}");
    }

    #[tokio::test]
    async fn a_clocked_connection_wakes_for_what_arrives_later_and_for_the_close() {
        let (reader, writer, mut peer) = connection().await;
        let clock = Clock::start(Duration::from_millis(5)).unwrap();
        let (mut reader, _writer) = clocked(reader, writer, clock.clone()).unwrap();
        let mut w = ChunkWriter::default();
        for n in 0..3 {
            // Nothing buffered: the reader waits for the clock to see the socket.
            let pending = tokio::time::timeout(Duration::from_millis(30), reader.next()).await;
            assert!(pending.is_err(), "a message out of nothing: {pending:?}");
            peer.write_all(&chunks(&mut w, &[Message::Acknowledgement(n)]))
                .await
                .unwrap();
            assert_eq!(
                reader.next_within(Duration::from_secs(5)).await.unwrap(),
                Some(Message::Acknowledgement(n))
            );
        }
        drop(peer);
        assert_eq!(reader.next_within(Duration::from_secs(5)).await.unwrap(), None);
        drop(reader);
        assert!(clock.shared.lock().is_empty(), "the socket left the clock");
    }

    /// Many connections on one clock, each sent messages of random sizes
    /// at random moments: every message arrives well before the idle
    /// limit, and every close is seen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clocked_connections_miss_nothing_under_random_traffic() {
        let clock = Clock::start(Duration::from_millis(5)).unwrap();
        for round in 0..rounds(3) {
            let mut tasks = Vec::new();
            for c in 0..16u64 {
                let (reader, writer, mut peer) = connection().await;
                let (mut reader, writer) = clocked(reader, writer, clock.clone()).unwrap();
                let mut seed = round * 1000 + c * 17 + 3;
                let mut next = move || lcg(&mut seed);
                let n = 200u32;
                let sending = tokio::spawn(async move {
                    let mut w = ChunkWriter::default();
                    for i in 0..n {
                        let len = (next() % 150_000) as usize;
                        let msg = Message::Video {
                            stream_id: 1,
                            timestamp: i,
                            payload: Bytes::from(vec![0x27; len]),
                        };
                        let bytes = chunks(&mut w, &[msg]);
                        // Sometimes split, so that parts arrive in separate ticks.
                        let cut = (next() as usize) % (bytes.len() + 1);
                        peer.write_all(&bytes[..cut]).await.unwrap();
                        if next() % 4 == 0 {
                            tokio::time::sleep(Duration::from_millis(next() % 12)).await;
                        }
                        peer.write_all(&bytes[cut..]).await.unwrap();
                        if next() % 3 == 0 {
                            tokio::time::sleep(Duration::from_millis(next() % 12)).await;
                        }
                    }
                    // The close, sometimes right after the last bytes.
                    drop(peer);
                });
                let clock = clock.clone();
                tasks.push(tokio::spawn(async move {
                    let mut writer = writer;
                    let mut seed = round * 77 + c;
                    for i in 0..n {
                        if lcg(&mut seed).is_multiple_of(10) {
                            // Off the clock and back, as a signalled publisher is.
                            (reader, writer) = if reader.is_clocked() {
                                unclocked(reader, writer).unwrap()
                            } else {
                                clocked(reader, writer, clock.clone()).unwrap()
                            };
                        }
                        // Cancelled at random moments, as the session's select does.
                        let got = loop {
                            let patience = Duration::from_micros(lcg(&mut seed) % 4000);
                            if let Ok(got) =
                                tokio::time::timeout(patience, reader.next_within(Duration::from_secs(3))).await
                            {
                                break got;
                            }
                        };
                        match got {
                            Ok(Some(Message::Video { timestamp, .. })) => assert_eq!(timestamp, i),
                            other => panic!("round {round} conn {c} message {i}: {other:?}"),
                        }
                    }
                    let end = reader.next_within(Duration::from_secs(3)).await;
                    assert!(matches!(end, Ok(None)), "round {round} conn {c}: the close: {end:?}");
                    sending.await.unwrap();
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_ticks_only_while_a_connection_is_clocked() {
        let clock = Clock::start(Duration::from_millis(5)).unwrap();
        let ticks = || clock.shared.ticks.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(ticks(), 0, "an idle pod's clock ticked");
        let (reader, writer, _peer) = connection().await;
        let (reader, writer) = clocked(reader, writer, clock.clone()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(ticks() >= 10, "a clocked connection was not served: {} ticks", ticks());
        drop((reader, writer));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let after = ticks();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(ticks() <= after + 1, "the clock kept ticking with nothing clocked");
    }
}
