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
use crate::keys;
use crate::metrics::Metrics;
use crate::registry::{Registry, SessionCommand};
use crate::relay;
use crate::rtmp::conn;
use crate::session::{self, Context, SessionConfig};
use crate::settings::{ControlSettings, Listen, Serving, Settings};

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Config(String),
    #[error("cannot start the media read clock: {0}")]
    Clock(std::io::Error),
}

/// A bound, not yet running ingest pod.
pub struct Server {
    listen: Listen,
    serving: Serving,
    rtmp: TcpListener,
    http: TcpListener,
    /// The control API; `None` when no token is configured.
    control: Option<ControlListener>,
    registry: Arc<Registry>,
    drainer: Arc<Drainer>,
    prometheus: Arc<prometheus_client::registry::Registry>,
    tasks: TaskTracker,
}

/// The control API's listener and how it is served.
struct ControlListener {
    listener: TcpListener,
    settings: ControlSettings,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// The control API's listener; `None` without a token.
async fn control_listener(control: Option<ControlSettings>) -> Result<Option<ControlListener>, Error> {
    let Some(settings) = control else {
        warn!("no control token configured: the control API is not served");
        return Ok(None);
    };
    let listener = bind(settings.listen).await?;
    match &settings.tls {
        Some(tls) => info!(addr = %settings.listen, mutual = tls.mutual, "control API served over TLS"),
        None => {
            warn!(addr = %settings.listen, "control API served in plaintext: its token crosses the network in clear")
        }
    }
    Ok(Some(ControlListener { listener, settings }))
}

impl Server {
    /// Checks the flags, then binds the listeners (port 0 picks a free
    /// port; see the `*_addr` methods).
    pub async fn bind(args: Args) -> Result<Self, Error> {
        let Settings {
            listen,
            control,
            stream_keys,
            signals,
            serving,
        } = Settings::from_args(args).map_err(|e| Error::Config(e.to_string()))?;
        let rtmp = bind(listen.rtmp).await?;
        let http = bind(listen.http).await?;
        let control = control_listener(control).await?;
        let metrics = Metrics::default();
        let mut prometheus = prometheus_client::registry::Registry::default();
        metrics.register(&mut prometheus);
        let registry = Registry::new(metrics);
        registry.set_stream_keys(stream_keys);
        let tasks = TaskTracker::new();
        let drainer = Drainer::new(registry.clone(), signals, tasks.clone());
        Ok(Self {
            listen,
            serving,
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
        self.rtmp.local_addr().unwrap_or(self.listen.rtmp)
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().unwrap_or(self.listen.http)
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
            listen: _,
            serving,
            rtmp,
            http,
            control,
            registry,
            drainer,
            prometheus,
            tasks,
        } = self;
        let Serving {
            pod_name,
            session,
            max_connections,
            media_read_interval,
            relay_memory_budget,
            grace_period,
            sigterm_drain,
        } = serving;
        let stop = CancellationToken::new();
        let relays = TaskTracker::new();
        let ctx = session_context(
            session,
            media_read_interval,
            relay_memory_budget,
            &registry,
            &relays,
            &stop,
        )?;
        let config = &ctx.config;
        info!(rtmp = %rtmp.local_addr().map_err(|e| Error::Config(e.to_string()))?, http = %http.local_addr().map_err(|e| Error::Config(e.to_string()))?,
            upstream = config.upstream.as_deref().map_or_else(|| "none".to_owned(), keys::redact_query), go_away = config.signals.go_away,
            reconnect_request = config.signals.reconnect_request, "ingest pod serving");

        tasks
            .spawn(accept_loop(rtmp, ctx, max_connections, tasks.clone(), stop.clone()).instrument(info_span!("rtmp")));
        let state = HttpState {
            registry: registry.clone(),
            drainer: drainer.clone(),
            metrics: prometheus,
            pod_name: pod_name.clone(),
        };
        tasks.spawn(serve_http(http, state, stop.clone()));
        if let Some(control) = control {
            let service = ControlService {
                registry: registry.clone(),
                drainer: drainer.clone(),
                pod_name,
                default_propagation: control.settings.default_propagation,
                reveal_allowed: control.settings.reveal_stream_keys,
            };
            tasks.spawn(serve_control(control, service, stop.clone()).instrument(info_span!("control")));
        }

        shutdown.await;
        info!(grace = ?grace_period, "SIGTERM: draining");
        // A drain already under way (from the operator) goes on, within the
        // SIGTERM deadline; from now on no CancelDrain stops it.
        if let Err(err) = drainer.terminate(sigterm_drain) {
            error!(%err, "cannot start the SIGTERM drain");
        }
        drain_out(&registry, tokio::time::Instant::now() + grace_period).await;
        stop.cancel();
        drainer.stop();
        wind_down(relays, tasks).await;
        info!("stopped");
        Ok(())
    }
}

/// Gives the relays and the other tasks 2 s to end after the stop.
async fn wind_down(relays: TaskTracker, tasks: TaskTracker) {
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
}

/// What every publishing session shares: settings, relay budget, the media
/// read clock.
fn session_context(
    config: SessionConfig,
    media_read_interval: Option<Duration>,
    relay_budget: usize,
    registry: &Arc<Registry>,
    relays: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Context, Error> {
    let media_clock = media_read_interval
        .map(conn::Clock::start)
        .transpose()
        .map_err(Error::Clock)?;
    registry.metrics().relay_budget_bytes.set(relay_budget as i64);
    Ok(Context {
        registry: registry.clone(),
        config: Arc::new(config),
        relays: relays.clone(),
        stop: stop.clone(),
        media_clock,
        budget: relay::Budget::new(relay_budget),
    })
}

async fn serve_http(listener: TcpListener, state: HttpState, stop: CancellationToken) {
    let serve = axum::serve(listener, http::router(state)).with_graceful_shutdown(stop.cancelled_owned());
    if let Err(err) = serve.await {
        error!(%err, "http server failed");
    }
}

async fn serve_control(control: ControlListener, service: ControlService, stop: CancellationToken) {
    let ControlListener { listener, settings } = control;
    let tls = settings.tls.map(|t| t.config);
    if let Err(err) = control::serve(listener, tls, service, BearerAuth::new(&settings.token), stop).await {
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
