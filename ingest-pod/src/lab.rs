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

use crate::config::Args;
use crate::drain::Drainer;
use crate::registry::Registry;
use crate::server::{self, Server};

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

/// A TCP forwarder to one address that can be cut, like a network outage
/// between a pod and its origin: [`Link::cut`] resets every open connection
/// and, until [`Link::restore`], resets new ones as soon as they arrive.
pub struct Link {
    pub addr: SocketAddr,
    state: Arc<LinkState>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct LinkState {
    up: AtomicBool,
    forwarded: AtomicU64,
    refused: AtomicU64,
    open: Mutex<Vec<(CancellationToken, JoinHandle<()>)>>,
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
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(LinkState::default());
        state.up.store(true, Ordering::SeqCst);
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let client = match listener.accept().await {
                    Ok((client, _)) => client,
                    Err(err) => {
                        accept_failed("link", err).await;
                        continue;
                    }
                };
                if !shared.up.load(Ordering::SeqCst) {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    reset(client);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(target).await else {
                    reset(client);
                    continue;
                };
                shared.forwarded.fetch_add(1, Ordering::SeqCst);
                let cancel = CancellationToken::new();
                let conn = tokio::spawn(forward(client, upstream, cancel.clone()));
                let mut open = shared.open.lock().unwrap_or_else(|e| e.into_inner());
                open.retain(|(_, task)| !task.is_finished());
                open.push((cancel, conn));
            }
        });
        Ok(Self { addr, state, task })
    }

    /// Resets every forwarded connection (both ends) and returns once they
    /// are closed; new connections are reset until [`Link::restore`].
    pub async fn cut(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        let open = std::mem::take(&mut *self.state.open.lock().unwrap_or_else(|e| e.into_inner()));
        let count = open.len();
        for (cancel, task) in open {
            cancel.cancel();
            let _ = task.await;
        }
        info!(link = %self.addr, connections = count, "link cut");
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
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
}

async fn forward(mut client: TcpStream, mut upstream: TcpStream, cancel: CancellationToken) {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let cut = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => false,
        () = cancel.cancelled() => true,
    };
    if cut {
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
