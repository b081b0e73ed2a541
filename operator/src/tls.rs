//! The webhook's serving certificate, kept current. The files are read
//! again periodically and a changed pair is served without a restart, so a
//! renewal (cert-manager, or an updated Secret that the kubelet swaps into
//! the volume) never lets the served certificate expire. With the chart's
//! `failurePolicy: Ignore`, an expired certificate would silently let every
//! eviction through.

use std::path::PathBuf;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// PEM certificate chain and private key of the webhook.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

type Pem = (Vec<u8>, Vec<u8>);

impl CertFiles {
    async fn read(&self) -> std::io::Result<Pem> {
        Ok((tokio::fs::read(&self.cert).await?, tokio::fs::read(&self.key).await?))
    }
}

/// The pair being served, and the files it came from.
pub struct ServingCert {
    files: CertFiles,
    config: RustlsConfig,
    served: Pem,
    /// The last changed pair that failed to load, not to be tried (and
    /// logged) again until the files change once more.
    rejected: Option<Pem>,
}

impl ServingCert {
    pub async fn load(files: CertFiles) -> std::io::Result<Self> {
        let served = files.read().await?;
        let config = RustlsConfig::from_pem(served.0.clone(), served.1.clone()).await?;
        Ok(Self {
            files,
            config,
            served,
            rejected: None,
        })
    }

    /// The server configuration; reloads show through every clone.
    pub fn config(&self) -> RustlsConfig {
        self.config.clone()
    }

    /// Serves the files' pair if it changed and loads. `Ok(true)`: a new
    /// pair is served.
    pub async fn refresh(&mut self) -> std::io::Result<bool> {
        let pem = self.files.read().await?;
        if pem == self.served || self.rejected.as_ref() == Some(&pem) {
            return Ok(false);
        }
        match self.config.reload_from_pem(pem.0.clone(), pem.1.clone()).await {
            Ok(()) => {
                self.served = pem;
                self.rejected = None;
                Ok(true)
            }
            Err(err) => {
                self.rejected = Some(pem);
                Err(err)
            }
        }
    }

    /// Refreshes every `every` until `stop`; a pair that does not load
    /// leaves the previous one served.
    pub async fn keep_current(mut self, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            match self.refresh().await {
                Ok(true) => info!(cert = %self.files.cert.display(), "webhook certificate reloaded"),
                Ok(false) => {}
                Err(err) => warn!(
                    cert = %self.files.cert.display(),
                    %err,
                    "webhook certificate files changed but do not load; serving the previous pair"
                ),
            }
        }
    }
}

/// What the webhook does with each TCP connection before its TLS
/// handshake: counts it, and turns off Nagle's algorithm. Without
/// `TCP_NODELAY` a short answer written while an earlier small frame of the
/// same connection (an HTTP/2 PING or SETTINGS acknowledgement) waits for
/// the API server's delayed ACK sits in the kernel for up to 40 ms.
#[derive(Clone)]
pub struct Accepted {
    pub connections: prometheus_client::metrics::counter::Counter,
}

impl<S> axum_server::accept::Accept<tokio::net::TcpStream, S> for Accepted {
    type Stream = tokio::net::TcpStream;
    type Service = S;
    type Future = std::future::Ready<std::io::Result<(Self::Stream, S)>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        self.connections.inc();
        std::future::ready(stream.set_nodelay(true).map(|()| (stream, service)))
    }
}

#[cfg(test)]
mod tests {
    use axum_server::accept::Accept;
    use prometheus_client::metrics::counter::Counter;
    use tokio::net::{TcpListener, TcpStream};

    use super::Accepted;

    #[tokio::test]
    async fn accepted_connections_are_counted_and_sent_without_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Accepted {
            connections: Counter::default(),
        };
        for n in 1..=2 {
            let _client = TcpStream::connect(addr).await.unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            assert!(!tcp.nodelay().unwrap(), "a fresh socket delays small writes");
            let (tcp, ()) = accepted.accept(tcp, ()).await.unwrap();
            assert!(tcp.nodelay().unwrap());
            assert_eq!(accepted.connections.get(), n);
        }
    }
}
