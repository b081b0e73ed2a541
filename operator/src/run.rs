//! Wiring: caches, the webhook on every replica, the controllers on the
//! leader only, health and metrics, and shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum_server::tls_rustls::RustlsAcceptor;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use thiserror::Error;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Args;
use crate::controller::{self, Context, Followers};
use crate::crd::IngestDrain;
use crate::pods::{Channels, PodCache};
use crate::settings::{ControlTls, IngestPods, Settings, WebhookServing};
use crate::telemetry::{self, Health, Metrics};
use crate::{leader, nodes, state, tls, webhook};

#[derive(Debug, Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("webhook TLS: {0}")]
    Tls(std::io::Error),
    #[error("control API TLS: {0}")]
    ControlTls(#[from] ingest_proto::tls::Error),
}

/// Name of the operator in the Events it publishes.
const CONTROLLER: &str = "ingest-operator";

/// Runs the operator with `client` until `shutdown` resolves.
pub async fn run(args: Args, client: Client, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let Settings {
        ingest,
        pod_access,
        control_tls,
        http_listen,
        webhook: webhook_serving,
        node_drains,
        node_taints,
        drain_defaults,
        operator_username,
        lease,
    } = Settings::from_args(args).map_err(|e| Error::Config(e.to_string()))?;
    let stop = CancellationToken::new();
    let metrics = Metrics::default();
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();

    // Caches the webhook answers from, on every replica.
    let pods = pod_cache(&client, &ingest, &mut tasks);
    let channels = control_channels(control_tls)?;
    let drains = drain_cache(&client, &mut tasks);
    tasks.spawn(mark_ready(pods.clone(), drains.clone(), ready.clone()));
    serve_health(http_listen, &metrics, ready, &stop, &mut tasks).await?;

    let reporter = Reporter {
        controller: CONTROLLER.into(),
        instance: Some(lease.identity.clone()),
    };
    match webhook_serving {
        Some(serving) => {
            let gate = webhook::Gate {
                client: client.clone(),
                pods: pods.clone(),
                channels: channels.clone(),
                drains: drains.clone(),
                ingest: ingest.clone(),
                pod_access: pod_access.clone(),
                drain_defaults: drain_defaults.clone(),
                operator_username,
                metrics: metrics.clone(),
                first_holds: webhook::FirstHolds::default(),
                recorder: Some(Recorder::new(client.clone(), reporter.clone())),
                explained: webhook::FirstHolds::default(),
                counts: webhook::Counts::default(),
            };
            serve_webhook(serving, gate, &stop, &mut tasks).await?;
        }
        None => warn!("no webhook certificate: the eviction gate is not served"),
    }

    // Controllers run on the leader only.
    let (leader_tx, leader_rx) = watch::channel(false);
    tasks.spawn(leader::run(client.clone(), lease, leader_tx, stop.clone()));
    let (followers, wake) = Followers::new();
    let ctx = Arc::new(Context {
        client: client.clone(),
        ingest,
        pod_access,
        drain_defaults,
        node_taints,
        recorder: Recorder::new(client, reporter),
        metrics,
        followers,
        drains,
        pods,
        channels,
    });
    let current = forward_wakes(wake, &mut tasks);
    tasks.spawn(lead_when_elected(ctx, leader_rx, current, node_drains, stop.clone()));

    shutdown.await;
    info!("shutting down");
    stop.cancel();
    wind_down(tasks).await;
    Ok(())
}

/// Gives the tasks 5 s to end after the stop.
async fn wind_down(mut tasks: JoinSet<()>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// One cache of ingest pods per ingest namespace: the chart grants pods
/// there only.
fn pod_cache(client: &Client, ingest: &IngestPods, tasks: &mut JoinSet<()>) -> PodCache {
    let selector = state::selector_string(&ingest.selector);
    let pod_apis: Vec<Api<Pod>> = if ingest.namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        ingest
            .namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let mut pod_stores = Vec::new();
    for api in pod_apis {
        let (store, writer) = reflector::store::<Pod>();
        pod_stores.push(store);
        let stream = reflector(writer, watcher(api, watcher::Config::default().labels(&selector)))
            .default_backoff()
            .touched_objects()
            .for_each(|_| async {});
        tasks.spawn(stream.instrument(info_span!("pod-cache")));
    }
    PodCache::new(pod_stores)
}

/// The cache of every IngestDrain.
fn drain_cache(client: &Client, tasks: &mut JoinSet<()>) -> Store<IngestDrain> {
    let (drains, drains_writer) = reflector::store::<IngestDrain>();
    let drain_api: Api<IngestDrain> = Api::all(client.clone());
    let drain_stream = reflector(drains_writer, watcher(drain_api, watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .for_each(|_| async {});
    tasks.spawn(drain_stream.instrument(info_span!("drain-cache")));
    drains
}

/// Sets `ready` once both caches have listed their objects.
async fn mark_ready(pods: PodCache, drains: Store<IngestDrain>, ready: Arc<AtomicBool>) {
    if pods.wait_until_ready().await && drains.wait_until_ready().await.is_ok() {
        ready.store(true, Ordering::Relaxed);
        info!("caches synced");
    }
}

/// The gRPC channels to the pods' control API: over TLS when configured.
fn control_channels(tls: Option<ControlTls>) -> Result<Channels, Error> {
    let Some(ControlTls {
        files,
        server_name,
        reload,
    }) = tls
    else {
        warn!("calling the pods' control API in plaintext: the control token crosses the network in clear");
        return Ok(Channels::default());
    };
    let mutual = files.identity.is_some();
    let connector = ingest_proto::tls::Connector::new(files.watch(reload)?, &server_name)?;
    info!(server_name = %server_name, mutual, "calling the pods' control API over TLS");
    Ok(Channels::with_tls(connector))
}

/// Serves /healthz, /readyz and /metrics on `addr` until `stop`.
async fn serve_health(
    addr: SocketAddr,
    metrics: &Metrics,
    ready: Arc<AtomicBool>,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<(), Error> {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let http = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let health = Health {
        registry: Arc::new(registry),
        ready,
    };
    let http_stop = stop.clone();
    tasks.spawn(async move {
        if let Err(err) = axum::serve(http, telemetry::router(health))
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await
        {
            error!(%err, "http server failed");
        }
    });
    Ok(())
}

/// Serves the eviction webhook over TLS until `stop`, its certificate kept
/// current.
async fn serve_webhook(
    serving: WebhookServing,
    gate: webhook::Gate,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<(), Error> {
    let WebhookServing { listen, cert, reload } = serving;
    let accepted = tls::Accepted {
        connections: gate.metrics.webhook_connections.clone(),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let serving = tls::ServingCert::load(cert).await.map_err(Error::Tls)?;
    let tls = serving.config();
    if !reload.is_zero() {
        tasks.spawn(serving.keep_current(reload, stop.clone()));
    }
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    let webhook_stop = stop.clone();
    tasks.spawn(async move {
        webhook_stop.cancelled().await;
        stopper.graceful_shutdown(Some(Duration::from_secs(2)));
    });
    info!(addr = %listen, "eviction webhook serving");
    tasks.spawn(async move {
        let acceptor = RustlsAcceptor::new(tls).acceptor(accepted);
        if let Err(err) = axum_server::bind(listen)
            .acceptor(acceptor)
            .handle(handle)
            .serve(webhook::router(gate).into_make_service())
            .await
        {
            error!(%err, "webhook server failed");
        }
    });
    Ok(())
}

/// Where the followers' wake-ups go: the drain controller running now.
type WakeTarget = Arc<Mutex<Option<UnboundedSender<ObjectRef<IngestDrain>>>>>;

/// Forwards the followers' wake-ups to whichever controller runs now
/// (leadership may come and go).
fn forward_wakes(mut wake: UnboundedReceiver<ObjectRef<IngestDrain>>, tasks: &mut JoinSet<()>) -> WakeTarget {
    let current = WakeTarget::default();
    let target = current.clone();
    tasks.spawn(async move {
        while let Some(r) = wake.recv().await {
            if let Some(tx) = target.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                let _ = tx.send(r);
            }
        }
    });
    current
}

/// Starts the controllers whenever this replica becomes the leader, and
/// stops them when it no longer is, until `stop`.
async fn lead_when_elected(
    ctx: Arc<Context>,
    mut leader_rx: watch::Receiver<bool>,
    current: WakeTarget,
    node_drains: bool,
    stop: CancellationToken,
) {
    let mut term: Option<CancellationToken> = None;
    loop {
        let leading = *leader_rx.borrow_and_update();
        ctx.metrics.leader.set(i64::from(leading));
        match (leading, &term) {
            (true, None) => {
                let t = stop.child_token();
                info!("leading: starting the controllers");
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
                tokio::spawn(controller::run(ctx.clone(), rx, t.clone()).instrument(info_span!("drains")));
                if node_drains {
                    tokio::spawn(nodes::run(ctx.clone(), t.clone()).instrument(info_span!("nodes")));
                }
                term = Some(t);
            }
            (false, Some(t)) => {
                info!("not leading: stopping the controllers");
                t.cancel();
                term = None;
            }
            _ => {}
        }
        tokio::select! {
            r = leader_rx.changed() => if r.is_err() { return },
            () = stop.cancelled() => return,
        }
    }
}
