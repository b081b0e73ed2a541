//! The pod: RTMP accept loop with a connection cap, the HTTP endpoints,
//! and the shutdown sequence (SIGTERM drain, then stop).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Args;
use crate::control::{self, BearerAuth, ControlService};
use crate::drain::Drainer;
use crate::http::{self, HttpState};
use crate::keys::{self, StreamKeys};
use crate::metrics::Metrics;
use crate::registry::{Registry, SessionCommand};
use crate::relay;
use crate::rtmp::conn;
use crate::session::{self, Context};

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Config(String),
}

/// A bound, not yet running ingest pod.
pub struct Server {
    args: Args,
    rtmp: TcpListener,
    http: TcpListener,
    /// The control API; `None` when no token is configured.
    control: Option<ControlListener>,
    registry: Arc<Registry>,
    drainer: Arc<Drainer>,
    prometheus: Arc<prometheus_client::registry::Registry>,
    tasks: TaskTracker,
}

/// Where and how the control API is served.
struct ControlListener {
    listener: TcpListener,
    token: String,
    /// TLS, when a certificate is configured.
    tls: Option<ingest_proto::tls::Watched<rustls::ServerConfig>>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Refuses an upstream template that does not render to an RTMP URL.
fn check_upstream(args: &Args) -> Result<(), Error> {
    if let Some(t) = &args.upstream {
        let probe = ingest_rtmp::url::render(t, "app", "stream");
        ingest_rtmp::url::RtmpUrl::parse(&probe)
            .map_err(|e| Error::Config(format!("--upstream {:?}: {e}", keys::redact_query(t))))?;
    }
    Ok(())
}

/// The control API's bearer token, from the flag or its file; `None`: no
/// control API.
fn control_token(args: &Args) -> Result<Option<String>, Error> {
    let token = match (&args.control_token, &args.control_token_file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(path)) => Some(
            ingest_runtime::read_secret(path)
                .map_err(|e| Error::Config(format!("--control-token-file {}: {e}", path.display())))?,
        ),
        (None, None) => None,
    };
    if token.as_deref().is_some_and(str::is_empty) {
        return Err(Error::Config("the control token is empty".into()));
    }
    Ok(token)
}

/// The control API's listener, with TLS when a certificate is configured;
/// `None` without a token.
async fn control_listener(args: &Args, token: Option<String>) -> Result<Option<ControlListener>, Error> {
    let tls = match (&args.control_tls_cert, &args.control_tls_key) {
        (Some(cert), Some(key)) => {
            let files = ingest_proto::tls::ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.control_tls_client_ca.clone(),
            };
            let tls = files
                .watch(args.control_tls_reload)
                .map_err(|e| Error::Config(format!("control API TLS: {e}")))?;
            Some(tls)
        }
        _ => None,
    };
    let Some(token) = token else {
        warn!("no control token configured: the control API is not served");
        return Ok(None);
    };
    let listener = bind(args.control_listen).await?;
    match &tls {
        Some(_) => info!(
            addr = %args.control_listen,
            mutual = args.control_tls_client_ca.is_some(),
            "control API served over TLS"
        ),
        None => {
            warn!(addr = %args.control_listen, "control API served in plaintext: its token crosses the network in clear")
        }
    }
    Ok(Some(ControlListener { listener, token, tls }))
}

impl Server {
    /// Binds both listeners (port 0 picks a free port; see the `*_addr` methods).
    pub async fn bind(args: Args) -> Result<Self, Error> {
        check_upstream(&args)?;
        if args.drain_deadline > args.grace_period {
            warn!(deadline = ?args.drain_deadline, grace = ?args.grace_period, "drain deadline is longer than the grace period");
        }
        let token = control_token(&args)?;
        // Keyed by the control token, a secret of the release: hashes match
        // across its pods. Without a token, by a key of this process.
        let stream_keys = match (&token, args.control_reveal_stream_keys) {
            (_, true) => StreamKeys::new(b"", true),
            (Some(t), false) => StreamKeys::new(t.as_bytes(), false),
            (None, false) => StreamKeys::random(),
        };
        let rtmp = bind(args.rtmp_listen).await?;
        let http = bind(args.http_listen).await?;
        let control = control_listener(&args, token).await?;
        let metrics = Metrics::default();
        let mut prometheus = prometheus_client::registry::Registry::default();
        metrics.register(&mut prometheus);
        let registry = Registry::new(metrics);
        registry.set_stream_keys(stream_keys);
        let tasks = TaskTracker::new();
        let drainer = Drainer::new(registry.clone(), args.signals(), tasks.clone());
        Ok(Self {
            args,
            rtmp,
            http,
            control,
            registry,
            drainer,
            prometheus: Arc::new(prometheus),
            tasks,
        })
    }

    pub fn rtmp_addr(&self) -> SocketAddr {
        self.rtmp.local_addr().unwrap_or(self.args.rtmp_listen)
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().unwrap_or(self.args.http_listen)
    }

    /// Address of the control API, if it is served.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control.as_ref().and_then(|c| c.listener.local_addr().ok())
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    pub fn drainer(&self) -> Arc<Drainer> {
        self.drainer.clone()
    }

    /// Serves until `shutdown` resolves (SIGTERM), then drains: exits when
    /// no publisher and no relay is left, or when the grace period ends.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Server {
            args,
            rtmp,
            http,
            control,
            registry,
            drainer,
            prometheus,
            tasks,
        } = self;
        let stop = CancellationToken::new();
        let relays = TaskTracker::new();
        let ctx = session_context(&args, &registry, &relays, &stop)?;
        info!(rtmp = %rtmp.local_addr().map_err(|e| Error::Config(e.to_string()))?, http = %http.local_addr().map_err(|e| Error::Config(e.to_string()))?,
            upstream = args.upstream.as_deref().map_or_else(|| "none".to_owned(), keys::redact_query), go_away = args.signal_go_away,
            reconnect_request = args.signal_reconnect_request, "ingest pod serving");

        tasks.spawn(
            accept_loop(rtmp, ctx, args.max_connections, tasks.clone(), stop.clone()).instrument(info_span!("rtmp")),
        );
        let state = HttpState {
            registry: registry.clone(),
            drainer: drainer.clone(),
            metrics: prometheus,
            pod_name: args.pod_name.clone(),
        };
        tasks.spawn(serve_http(http, state, stop.clone()));
        if let Some(control) = control {
            let service = ControlService {
                registry: registry.clone(),
                drainer: drainer.clone(),
                pod_name: args.pod_name.clone(),
                default_propagation: args.propagation_delay,
                reveal_allowed: args.control_reveal_stream_keys,
            };
            tasks.spawn(serve_control(control, service, stop.clone()).instrument(info_span!("control")));
        }

        shutdown.await;
        info!(grace = ?args.grace_period, "SIGTERM: draining");
        // A drain already under way (from the operator) goes on, within the
        // SIGTERM deadline; from now on no CancelDrain stops it.
        if let Err(err) = drainer.terminate(args.sigterm_drain()) {
            error!(%err, "cannot start the SIGTERM drain");
        }
        drain_out(&registry, tokio::time::Instant::now() + args.grace_period).await;
        stop.cancel();
        drainer.stop();
        relays.close();
        tasks.close();
        if tokio::time::timeout(Duration::from_secs(2), async {
            relays.wait().await;
            tasks.wait().await;
        })
        .await
        .is_err()
        {
            warn!("some tasks did not stop within 2s");
        }
        info!("stopped");
        Ok(())
    }
}

/// What every publishing session shares: settings, relay budget, the media
/// read clock.
fn session_context(
    args: &Args,
    registry: &Arc<Registry>,
    relays: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Context, Error> {
    let mut session_config = args.session_config();
    session_config.auth = args
        .publish_auth_url
        .as_deref()
        .map(|url| crate::auth::PublishAuth::new(url, args.publish_auth_timeout))
        .transpose()
        .map_err(|e| Error::Config(e.to_string()))?;
    let budget = args.relay_memory_budget.unwrap_or_else(relay::default_budget);
    registry.metrics().relay_budget_bytes.set(budget as i64);
    Ok(Context {
        registry: registry.clone(),
        config: Arc::new(session_config),
        relays: relays.clone(),
        stop: stop.clone(),
        media_clock: Some(args.media_read_interval)
            .filter(|i| !i.is_zero())
            .map(conn::Clock::start),
        budget: relay::Budget::new(budget),
    })
}

async fn serve_http(listener: TcpListener, state: HttpState, stop: CancellationToken) {
    let serve = axum::serve(listener, http::router(state)).with_graceful_shutdown(stop.cancelled_owned());
    if let Err(err) = serve.await {
        error!(%err, "http server failed");
    }
}

async fn serve_control(control: ControlListener, service: ControlService, stop: CancellationToken) {
    let ControlListener { listener, token, tls } = control;
    if let Err(err) = control::serve(listener, tls, service, BearerAuth::new(&token), stop).await {
        error!(%err, "control server failed");
    }
}

/// Waits until no publisher and no relay is left, or until `grace_end`,
/// when it closes what remains.
async fn drain_out(registry: &Registry, grace_end: tokio::time::Instant) {
    let mut changes = registry.subscribe();
    loop {
        // An empty pod has nobody to protect: no need to wait for propagation.
        if registry.connection_count() == 0 && registry.relays_active() == 0 {
            info!("drained: no publisher and no relay left");
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(grace_end) => {
                let left = registry.connections();
                warn!(publishers = left.len(), relays = registry.relays_active(), "grace period over: closing what remains");
                for c in left {
                    registry.command(c.id, SessionCommand::Disconnect { reason: "grace period over" });
                }
                return;
            }
            _ = changes.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

async fn accept_loop(listener: TcpListener, ctx: Context, max: usize, tasks: TaskTracker, stop: CancellationToken) {
    let limit = Arc::new(Semaphore::new(max));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, max, "connection limit reached: closing");
            drop(stream);
            continue;
        };
        let ctx = ctx.clone();
        tasks.spawn(async move {
            session::serve(stream, peer, ctx).await;
            drop(permit);
        });
    }
}
