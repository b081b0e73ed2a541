//! A local lab on loopback: in-process ingest pods, a readiness-aware TCP
//! balancer standing in for a Service, a link that can be cut, for the
//! demo, tests and benchmarks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use ingest_pod::config::Args;
use ingest_pod::drain::Drainer;
use ingest_pod::registry::Registry;
use ingest_pod::server::{self, Server};

use crate::origin::Origin;

/// An ingest pod running in this process.
pub struct LocalPod {
    pub name: String,
    pub rtmp: SocketAddr,
    pub http: SocketAddr,
    pub control: Option<SocketAddr>,
    pub registry: Arc<Registry>,
    pub drainer: Arc<Drainer>,
    sigterm: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), server::Error>>>,
}

impl LocalPod {
    /// Starts a pod on loopback ports with `extra` flags (see `ingest-pod --help`).
    pub async fn start(name: &str, extra: &[&str]) -> Result<Self, server::Error> {
        let mut argv = vec![
            "ingest-pod",
            "--rtmp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ];
        argv.extend(["--control-listen", "127.0.0.1:0", "--pod-name", name]);
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(&argv).map_err(|e| server::Error::Config(e.to_string()))?;
        let server = Server::bind(args).await?;
        let (tx, rx) = oneshot::channel::<()>();
        let mut pod = Self {
            name: name.to_owned(),
            rtmp: server.rtmp_addr(),
            http: server.http_addr(),
            control: server.control_addr(),
            registry: server.registry(),
            drainer: server.drainer(),
            sigterm: Some(tx),
            task: None,
        };
        pod.task = Some(tokio::spawn(server.run(async move {
            let _ = rx.await;
        })));
        Ok(pod)
    }

    /// [`LocalPod::start`] relaying every stream to `origin` (`--upstream`
    /// its template), with `extra` flags after.
    pub async fn start_relaying_to(name: &str, origin: &Origin, extra: &[&str]) -> Result<Self, server::Error> {
        let template = origin.template();
        let mut args = vec!["--upstream", template.as_str()];
        args.extend_from_slice(extra);
        Self::start(name, &args).await
    }

    /// What SIGTERM does to the real process: drain, then exit.
    pub fn sigterm(&mut self) {
        if let Some(tx) = self.sigterm.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the pod to exit (after [`sigterm`](Self::sigterm)).
    pub async fn wait(&mut self) -> Result<(), server::Error> {
        match self.task.take() {
            Some(t) => t
                .await
                .unwrap_or_else(|e| Err(server::Error::Config(format!("pod task failed: {e}")))),
            None => Ok(()),
        }
    }

    /// Connections publishing on this pod.
    pub fn publishers(&self) -> usize {
        self.registry
            .connections()
            .iter()
            .filter(|c| c.publishing_since.is_some())
            .count()
    }

    pub fn backend(&self) -> Backend {
        Backend {
            name: self.name.clone(),
            rtmp: self.rtmp,
            registry: self.registry.clone(),
        }
    }
}

impl Drop for LocalPod {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// An accept error (out of file descriptors, say) is logged and waited
/// out briefly rather than retried in a busy loop.
async fn accept_failed(what: &str, err: std::io::Error) {
    warn!(%err, "{what}: accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// One balancer target: a pod's RTMP address and its readiness.
#[derive(Clone)]
pub struct Backend {
    pub name: String,
    pub rtmp: SocketAddr,
    pub registry: Arc<Registry>,
}

/// A TCP balancer that, like a Service, sends each new connection to a
/// ready pod (round robin) and leaves existing connections alone.
pub struct Balancer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Balancer {
    pub async fn start(backends: Vec<Backend>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            loop {
                let (client, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        accept_failed("balancer", err).await;
                        continue;
                    }
                };
                let ready: Vec<&Backend> = backends.iter().filter(|b| b.registry.serving()).collect();
                if ready.is_empty() {
                    warn!(%peer, "balancer: no ready backend");
                    continue;
                }
                let target = ready[next.fetch_add(1, Ordering::Relaxed) % ready.len()].clone();
                debug!(%peer, backend = %target.name, "balancer: forwarding");
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(target.rtmp).await else {
                        return;
                    };
                    let mut client = client;
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP forwarder to one address that can fail like a network does:
/// [`Link::cut`] resets every open connection and, until [`Link::restore`],
/// resets new ones as soon as they arrive; [`Link::blackhole`] swallows
/// everything silently (a dead node); [`Link::stall`] stops carrying
/// anything, so what is sent piles up in socket buffers (a partition, a
/// hung origin); [`Link::reset_after`] resets the next connection in the
/// middle of what it carries.
pub struct Link {
    pub addr: SocketAddr,
    state: Arc<LinkState>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct LinkState {
    up: AtomicBool,
    /// Bytes are read and dropped both ways, nothing is answered, nothing reset.
    blackhole: AtomicBool,
    /// Nothing is read on either side: writes block once the buffers are full.
    stalled: AtomicBool,
    /// Client-to-target bytes the next forwarded connection carries before
    /// it is reset (0: no limit).
    reset_after: AtomicU64,
    forwarded: AtomicU64,
    refused: AtomicU64,
    swallowed: AtomicU64,
    resets_mid_stream: AtomicU64,
    open: Mutex<Vec<(CancellationToken, JoinHandle<()>)>>,
}

impl LinkState {
    fn open(&self) -> std::sync::MutexGuard<'_, Vec<(CancellationToken, JoinHandle<()>)>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn track(&self, cancel: CancellationToken, conn: JoinHandle<()>) {
        let mut open = self.open();
        open.retain(|(_, task)| !task.is_finished());
        open.push((cancel, conn));
    }
}

/// Closes with a reset (RST), as a crashed peer or a broken path does,
/// rather than an orderly FIN.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

impl Link {
    /// Forwards connections on a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::serve(TcpListener::bind("127.0.0.1:0").await?, target)
    }

    /// [`Link::start`] with a narrow path towards the link: a small
    /// segment size and receive window, as on a WAN connection before its
    /// buffers grow. Loopback lets the sender's kernel take megabytes in
    /// one write; here it takes a large write only in parts, so a reset can
    /// land in the middle of one.
    pub async fn start_narrow(target: SocketAddr) -> std::io::Result<Self> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        // Both are inherited by accepted connections; the segment size is
        // announced to the sender in the handshake.
        socket.set_tcp_mss(1000)?;
        socket.set_recv_buffer_size(4096)?;
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        socket.listen(128)?;
        socket.set_nonblocking(true)?;
        Self::serve(TcpListener::from_std(socket.into())?, target)
    }

    fn serve(listener: TcpListener, target: SocketAddr) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(LinkState::default());
        state.up.store(true, Ordering::SeqCst);
        let task = tokio::spawn(accept_loop(listener, target, state.clone()));
        Ok(Self { addr, state, task })
    }

    /// Resets every forwarded connection (both ends) and returns once they
    /// are closed; new connections are reset until [`Link::restore`].
    pub async fn cut(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        let open = std::mem::take(&mut *self.state.open());
        let count = open.len();
        for (cancel, task) in open {
            cancel.cancel();
            let _ = task.await;
        }
        info!(link = %self.addr, connections = count, "link cut");
    }

    /// The far side goes silent without a reset: bytes on open connections
    /// are read and dropped in both directions and nothing comes back; new
    /// connections are accepted and swallowed the same way.
    pub fn blackhole(&self) {
        self.state.blackhole.store(true, Ordering::SeqCst);
        info!(link = %self.addr, "link blackholed");
    }

    /// Nothing is carried any more, nothing answered, nothing reset: the
    /// sender's writes block once the socket buffers on the way are full.
    pub fn stall(&self) {
        self.state.stalled.store(true, Ordering::SeqCst);
        info!(link = %self.addr, "link stalled");
    }

    /// The next forwarded connection carries `bytes` from the client to the
    /// target, then both ends are reset: a reset in the middle of a write.
    pub fn reset_after(&self, bytes: u64) {
        self.state.reset_after.store(bytes, Ordering::SeqCst);
    }

    /// Forwards new connections again. Stalled connections go on where
    /// they were (a partition heals). After a blackhole the connections it
    /// swallowed are reset: what they carried is gone, so they cannot
    /// resume (like a node that comes back after a reboot).
    pub fn restore(&self) {
        self.state.stalled.store(false, Ordering::SeqCst);
        if self.state.blackhole.load(Ordering::SeqCst) {
            for (cancel, _) in std::mem::take(&mut *self.state.open()) {
                cancel.cancel();
            }
            self.state.blackhole.store(false, Ordering::SeqCst);
        }
        self.state.up.store(true, Ordering::SeqCst);
        info!(link = %self.addr, "link restored");
    }

    /// Connections forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// Connections reset on arrival while the link was cut.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Connections accepted while blackholed (never forwarded).
    pub fn swallowed(&self) -> u64 {
        self.state.swallowed.load(Ordering::SeqCst)
    }

    /// Connections reset by [`Link::reset_after`].
    pub fn resets_mid_stream(&self) -> u64 {
        self.state.resets_mid_stream.load(Ordering::SeqCst)
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, state: Arc<LinkState>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(err) => {
                accept_failed("link", err).await;
                continue;
            }
        };
        if !state.up.load(Ordering::SeqCst) {
            state.refused.fetch_add(1, Ordering::SeqCst);
            reset(client);
            continue;
        }
        let cancel = CancellationToken::new();
        if state.blackhole.load(Ordering::SeqCst) {
            state.swallowed.fetch_add(1, Ordering::SeqCst);
            let conn = tokio::spawn(swallow(client, cancel.clone()));
            state.track(cancel, conn);
            continue;
        }
        let Ok(upstream) = TcpStream::connect(target).await else {
            reset(client);
            continue;
        };
        state.forwarded.fetch_add(1, Ordering::SeqCst);
        let limit = state.reset_after.swap(0, Ordering::SeqCst);
        let conn = tokio::spawn(forward(client, upstream, cancel.clone(), state.clone(), limit));
        state.track(cancel, conn);
    }
}

/// Reads and drops what `client` sends until cancelled (then resets it).
async fn swallow(mut client: TcpStream, cancel: CancellationToken) {
    let mut sink = tokio::io::sink();
    tokio::select! {
        biased;
        () = cancel.cancelled() => reset(client),
        _ = tokio::io::copy(&mut client, &mut sink) => {}
    }
}

/// How one direction of a forwarded connection ended.
enum Ended {
    /// End of stream or an error: the other direction may go on.
    Closed,
    /// The byte budget of [`Link::reset_after`] is spent.
    Budget,
}

/// Copies `from` to `to`, reading nothing while the link is stalled and
/// dropping the bytes while it is blackholed; stops after `budget` bytes
/// when one is set.
async fn pump<R, W>(mut from: R, mut to: W, state: &LinkState, mut budget: Option<u64>) -> Ended
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while state.stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return Ended::Closed;
            }
            Ok(n) => n,
        };
        if state.blackhole.load(Ordering::SeqCst) {
            continue;
        }
        let n = budget.map_or(n, |b| n.min(usize::try_from(b).unwrap_or(usize::MAX)));
        if to.write_all(&buf[..n]).await.is_err() {
            return Ended::Closed;
        }
        if let Some(b) = &mut budget {
            *b -= n as u64;
            if *b == 0 {
                return Ended::Budget;
            }
        }
    }
}

async fn forward(
    mut client: TcpStream,
    mut upstream: TcpStream,
    cancel: CancellationToken,
    state: Arc<LinkState>,
    limit: u64,
) {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let budget = (limit > 0).then_some(limit);
    let reset_both = {
        let (client_rx, client_tx) = client.split();
        let (upstream_rx, upstream_tx) = upstream.split();
        let up = pump(client_rx, upstream_tx, &state, budget);
        let down = pump(upstream_rx, client_tx, &state, None);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                // Checked first: once cancelled, nothing more is forwarded.
                biased;
                () = cancel.cancelled() => break true,
                ended = &mut up, if !up_done => match ended {
                    Ended::Budget => {
                        state.resets_mid_stream.fetch_add(1, Ordering::SeqCst);
                        break true;
                    }
                    Ended::Closed => up_done = true,
                },
                _ = &mut down, if !down_done => down_done = true,
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if reset_both {
        reset(client);
        reset(upstream);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        for (cancel, _) in self.state.open.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            cancel.cancel();
        }
    }
}
