//! A local lab on loopback: in-process ingest pods, a readiness-aware TCP
//! balancer standing in for a Service, for the demo, tests and benchmarks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

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
                let Ok((client, peer)) = listener.accept().await else {
                    continue;
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
