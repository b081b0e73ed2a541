//! Wiring: caches, the webhook on every replica, the controllers on the
//! leader only, health and metrics, and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Args;
use crate::controller::{self, Context};
use crate::crd::IngestDrain;
use crate::settings::{ControlTls, Settings, WebhookServing};
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
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));

    // Caches the webhook answers from, on every replica.
    let selector = state::selector_string(&ingest.selector);
    let mut tasks = tokio::task::JoinSet::new();
    // One watch per ingest namespace: the chart grants pods there only.
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
    let pods = crate::pods::PodCache::new(pod_stores);
    let channels = match control_tls {
        Some(ControlTls {
            files,
            server_name: name,
            reload,
        }) => {
            let connector = ingest_proto::tls::Connector::new(files.watch(reload)?, &name)?;
            info!(server_name = %name, mutual = files.identity.is_some(), "calling the pods' control API over TLS");
            crate::pods::Channels::with_tls(connector)
        }
        None => {
            warn!("calling the pods' control API in plaintext: the control token crosses the network in clear");
            crate::pods::Channels::default()
        }
    };
    let (drains, drains_writer) = reflector::store::<IngestDrain>();
    let drain_api: Api<IngestDrain> = Api::all(client.clone());
    let drain_stream = reflector(drains_writer, watcher(drain_api, watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .for_each(|_| async {});
    tasks.spawn(drain_stream.instrument(info_span!("drain-cache")));
    {
        let (pods, drains, ready) = (pods.clone(), drains.clone(), ready.clone());
        tasks.spawn(async move {
            if pods.wait_until_ready().await && drains.wait_until_ready().await.is_ok() {
                ready.store(true, Ordering::Relaxed);
                info!("caches synced");
            }
        });
    }

    let http = tokio::net::TcpListener::bind(http_listen)
        .await
        .map_err(|source| Error::Bind {
            addr: http_listen,
            source,
        })?;
    let health = Health {
        registry: Arc::new(registry),
        ready: ready.clone(),
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

    if let Some(WebhookServing { listen, cert, reload }) = webhook_serving {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let serving = tls::ServingCert::load(cert).await.map_err(Error::Tls)?;
        let tls = serving.config();
        if !reload.is_zero() {
            tasks.spawn(serving.keep_current(reload, stop.clone()));
        }
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
            recorder: Some(Recorder::new(
                client.clone(),
                Reporter {
                    controller: "ingest-operator".into(),
                    instance: Some(lease.identity.clone()),
                },
            )),
            explained: webhook::FirstHolds::default(),
            counts: webhook::Counts::default(),
        };
        let handle = axum_server::Handle::new();
        let stopper = handle.clone();
        let webhook_stop = stop.clone();
        tasks.spawn(async move {
            webhook_stop.cancelled().await;
            stopper.graceful_shutdown(Some(std::time::Duration::from_secs(2)));
        });
        let addr = listen;
        info!(%addr, "eviction webhook serving");
        tasks.spawn(async move {
            if let Err(err) = axum_server::bind_rustls(addr, tls)
                .handle(handle)
                .serve(webhook::router(gate).into_make_service())
                .await
            {
                error!(%err, "webhook server failed");
            }
        });
    } else {
        warn!("no webhook certificate: the eviction gate is not served");
    }

    // Controllers run on the leader only.
    let (leader_tx, mut leader_rx) = watch::channel(false);
    let reporter = Reporter {
        controller: "ingest-operator".into(),
        instance: Some(lease.identity.clone()),
    };
    tasks.spawn(leader::run(client.clone(), lease, leader_tx, stop.clone()));
    let (followers, mut wake) = controller::Followers::new();
    let ctx = Arc::new(Context {
        client: client.clone(),
        ingest,
        pod_access,
        drain_defaults,
        node_taints,
        recorder: Recorder::new(client.clone(), reporter),
        metrics: metrics.clone(),
        followers,
        drains: drains.clone(),
        pods,
        channels,
    });
    // Followers' wake-ups go to whichever controller runs now (leadership may come and go).
    let current: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<_>>>> = Arc::default();
    {
        let current = current.clone();
        tasks.spawn(async move {
            while let Some(r) = wake.recv().await {
                if let Some(tx) = current.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    let _ = tx.send(r);
                }
            }
        });
    }
    let leading_stop = stop.clone();
    tasks.spawn(async move {
        let mut term: Option<CancellationToken> = None;
        loop {
            let leading = *leader_rx.borrow_and_update();
            ctx.metrics.leader.set(i64::from(leading));
            match (leading, &term) {
                (true, None) => {
                    let t = leading_stop.child_token();
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
                () = leading_stop.cancelled() => return,
            }
        }
    });

    shutdown.await;
    info!("shutting down");
    stop.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// Logging from `RUST_LOG` (default `info`).
/// Logs to stdout in `format`, filtered by RUST_LOG (default `info`); no
/// escape codes unless stdout is a terminal.
pub fn init_tracing(format: crate::config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = match format {
        crate::config::LogFormat::Text => builder.with_ansi(std::io::stdout().is_terminal()).try_init(),
        crate::config::LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
