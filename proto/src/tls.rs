//! TLS for the control API, both ends. The pod serves it with a
//! certificate and, given a CA, asks the caller for a client certificate
//! signed by it (mutual TLS); the operator verifies the pod's certificate
//! against a CA and a fixed server name (pods are dialled by IP; one
//! certificate names them all) and presents its own certificate.
//!
//! Each side's PEM files are read again periodically and a changed set is
//! used for the next connection, so a renewal (cert-manager, or a Secret the
//! kubelet swaps into the volume) never needs a restart. A set that does not
//! load leaves the previous one in use.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, info, warn};

/// How long a caller has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once; further connections wait to be accepted.
const MAX_HANDSHAKES: usize = 64;

/// Why a set of PEM files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {what}")]
    Pem {
        path: PathBuf,
        what: rustls::pki_types::pem::Error,
    },
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// Files of the serving side: certificate chain and key, and the CA that
/// signs client certificates (then required).
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Files of the calling side: the CA that signs the servers' certificates,
/// and the client certificate and key to present (for mutual TLS).
#[derive(Debug, Clone)]
pub struct ClientFiles {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ServerFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }

    /// The server configuration, kept current (see the module's doc).
    pub fn watch(&self, every: Duration) -> Result<Watched<ServerConfig>, Error> {
        Watched::load(self.paths(), server_config, every, "control API serving certificate")
    }
}

impl ClientFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.ca.clone()];
        if let Some((cert, key)) = &self.identity {
            paths.extend([cert.clone(), key.clone()]);
        }
        paths
    }

    /// The client configuration, kept current (see the module's doc).
    pub fn watch(&self, every: Duration) -> Result<Watched<ClientConfig>, Error> {
        Watched::load(self.paths(), client_config, every, "control API client certificate")
    }
}

/// A config built from files, rebuilt when their contents change, for as
/// long as a clone of it lives.
pub struct Watched<T> {
    current: Arc<RwLock<Arc<T>>>,
}

impl<T> Clone for Watched<T> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
        }
    }
}

type Pems = Vec<(PathBuf, Vec<u8>)>;

fn read_all(paths: &[PathBuf]) -> Result<Pems, Error> {
    paths
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|bytes| (p.clone(), bytes))
                .map_err(|source| Error::Read {
                    path: p.clone(),
                    source,
                })
        })
        .collect()
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// Builds from `paths` now (an error if they do not load), then, from a
    /// task on the current runtime, every `every` (0: never) while a clone lives.
    fn load(
        paths: Vec<PathBuf>,
        build: fn(&Pems) -> Result<T, Error>,
        every: Duration,
        what: &'static str,
    ) -> Result<Self, Error> {
        let mut used = read_all(&paths)?;
        let current = Arc::new(RwLock::new(Arc::new(build(&used)?)));
        if !every.is_zero() {
            let weak = Arc::downgrade(&current);
            tokio::spawn(async move {
                let mut rejected = None;
                loop {
                    tokio::time::sleep(every).await;
                    let Some(current) = Weak::upgrade(&weak) else { return };
                    let pems = match read_all(&paths) {
                        Ok(p) => p,
                        // A Secret volume swaps its files atomically; a
                        // failed read is retried at the next tick.
                        Err(err) => {
                            debug!(%err, what, "cannot read the files; retrying");
                            continue;
                        }
                    };
                    if pems == used || rejected.as_ref() == Some(&pems) {
                        continue;
                    }
                    match build(&pems) {
                        Ok(config) => {
                            *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                            info!(what, file = %paths[0].display(), "reloaded");
                            (used, rejected) = (pems, None);
                        }
                        Err(err) => {
                            warn!(what, %err, "the files changed but do not load; the previous ones stay in use");
                            rejected = Some(pems);
                        }
                    }
                }
            });
        }
        Ok(Self { current })
    }

    /// The config in use now.
    pub fn get(&self) -> Arc<T> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs((path, pem): &(PathBuf, Vec<u8>)) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|what| Error::Pem {
            path: path.clone(),
            what,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate { path: path.clone() });
    }
    Ok(certs)
}

fn key((path, pem): &(PathBuf, Vec<u8>)) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|what| Error::Pem {
        path: path.clone(),
        what,
    })
}

fn roots(file: &(PathBuf, Vec<u8>)) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in certs(file)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// HTTP/2 only: gRPC.
fn h2() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec()]
}

fn server_config(pems: &Pems) -> Result<ServerConfig, Error> {
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match pems.get(2) {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots(ca)?.into(), provider()).build()?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs(&pems[0])?, key(&pems[1])?)?;
    config.alpn_protocols = h2();
    Ok(config)
}

fn client_config(pems: &Pems) -> Result<ClientConfig, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&pems[0])?);
    let mut config = match (pems.get(1), pems.get(2)) {
        (Some(cert), Some(key_file)) => builder.with_client_auth_cert(certs(cert)?, key(key_file)?)?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = h2();
    Ok(config)
}

/// A TLS connection accepted by [`incoming`].
pub struct TlsIo(tokio_rustls::server::TlsStream<TcpStream>);

impl TlsIo {
    /// The TCP connection under the TLS session.
    pub fn tcp(&self) -> &TcpStream {
        self.0.get_ref().0
    }
}

impl Connected for TlsIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The TLS connections accepted on `listener`, for tonic's
/// `serve_with_incoming`. Handshakes run apart from the accept loop (a slow
/// or silent caller holds up no one), at most [`MAX_HANDSHAKES`] at once and
/// within [`HANDSHAKE_TIMEOUT`]; a failed one is logged and closed.
/// Accepting stops when the stream is dropped.
pub fn incoming(listener: TcpListener, config: Watched<ServerConfig>) -> ReceiverStream<io::Result<TlsIo>> {
    let (tx, rx) = tokio::sync::mpsc::channel(32);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            // A flood of silent connections holds at most this many tasks.
            let permit = tokio::select! {
                p = handshakes.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                () = tx.closed() => return,
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        // Out of descriptors, most likely: wait, do not spin.
                        warn!(%err, "control API: cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            // Answers are short: never hold one back for an ACK (Nagle).
            if let Err(err) = tcp.set_nodelay(true) {
                warn!(%peer, %err, "control API: cannot set TCP_NODELAY");
            }
            let (tx, acceptor) = (tx.clone(), tokio_rustls::TlsAcceptor::from(config.get()));
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsIo(tls))).await;
                    }
                    Ok(Err(err)) => warn!(%peer, %err, "control API: TLS handshake failed"),
                    Err(_) => warn!(%peer, "control API: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
                }
                drop(permit);
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Dials pods for tonic (`Endpoint::connect_with_connector`): TCP to the
/// URI's address, then TLS verifying `server_name`.
#[derive(Clone)]
pub struct Connector {
    config: Watched<ClientConfig>,
    server_name: ServerName<'static>,
}

impl Connector {
    pub fn new(config: Watched<ClientConfig>, server_name: &str) -> Result<Self, Error> {
        let server_name =
            ServerName::try_from(server_name.to_owned()).map_err(|_| Error::ServerName(server_name.to_owned()))?;
        Ok(Self { config, server_name })
    }
}

type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Io;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config.get());
        let name = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(connector.connect(name, tcp).await?))
        })
    }
}
