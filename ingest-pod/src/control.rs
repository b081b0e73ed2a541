//! The control API (`ingest.control.v1`) served to the operator, with the
//! standard health service (NOT_SERVING while draining) and reflection.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ingest_proto::v1::ingest_control_server::{IngestControl, IngestControlServer};
use ingest_proto::v1::{
    CancelDrainRequest, CancelDrainResponse, Capabilities, ConnectionCounts, Drain, DrainPhase, GetStatusRequest,
    IncapablePolicy as PbPolicy, PodStatus, Publisher, SignalKind as PbSignal, StartDrainRequest, StartDrainResponse,
    WatchStatusRequest,
};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::drain::{CancelRefused, DrainSpec, DrainStatus, Drainer, IncapablePolicy, Phase};
use crate::registry::{Registry, SignalKind};

/// Default and floor of WatchStatus's `min_interval`.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(200);
pub const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(50);
/// Longest drain id accepted.
pub const MAX_DRAIN_ID_LEN: usize = 253;

/// The control service of one pod.
#[derive(Clone)]
pub struct ControlService {
    pub registry: Arc<Registry>,
    pub drainer: Arc<Drainer>,
    pub pod_name: String,
    /// Propagation delay of a drain that does not set one.
    pub default_propagation: Duration,
    /// Whether a caller may ask for clear stream keys.
    pub reveal_allowed: bool,
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or_default()
}

fn phase(p: Phase) -> DrainPhase {
    match p {
        Phase::Propagating => DrainPhase::Propagating,
        Phase::Signalling => DrainPhase::Signalling,
        Phase::Drained => DrainPhase::Drained,
        Phase::TimedOut => DrainPhase::TimedOut,
        Phase::Cancelled => DrainPhase::Cancelled,
    }
}

fn signal(k: SignalKind) -> PbSignal {
    match k {
        SignalKind::GoAway => PbSignal::GoAway,
        SignalKind::ReconnectRequest => PbSignal::ReconnectRequest,
    }
}

fn drain_view(d: &DrainStatus) -> Drain {
    Drain {
        id: d.spec.id.clone(),
        phase: phase(d.phase).into(),
        started_at: Some(ts(d.started_at)),
        deadline_at: Some(ts(d.deadline_at)),
        signalled: d.signalled,
        migrated: d.migrated,
        remaining: d.remaining,
        relays_active: d.relays_active,
        left_at_deadline: d.left_at_deadline,
        spec: Some(StartDrainRequest {
            drain_id: d.spec.id.clone(),
            deadline: Some(pb_duration(d.spec.deadline)),
            rate: d.spec.rate,
            max_in_flight: d.spec.max_in_flight,
            incapable_policy: match d.spec.incapable {
                IncapablePolicy::Wait => PbPolicy::Wait,
                IncapablePolicy::Disconnect => PbPolicy::Disconnect,
            }
            .into(),
            redirect_tc_urls: d.spec.redirects.clone(),
            propagation_delay: Some(pb_duration(d.spec.propagation_delay)),
        }),
    }
}

impl ControlService {
    /// The pod's status as the API shows it (without the publishers when
    /// `counts_only`).
    pub fn status(&self, reveal: bool, counts_only: bool) -> PodStatus {
        let conns = self.registry.connections();
        let mut counts = ConnectionCounts {
            total: conns.len() as u32,
            ..Default::default()
        };
        let publishers = conns
            .iter()
            .filter_map(|c| {
                match self.drainer.signals().choose(c.caps) {
                    Some(SignalKind::ReconnectRequest) => counts.reconnect_request += 1,
                    Some(SignalKind::GoAway) => counts.go_away += 1,
                    None => counts.incapable += 1,
                }
                if c.publishing_since.is_some() {
                    counts.publishing += 1;
                }
                (!counts_only).then(|| Publisher {
                    id: c.id,
                    app: c.app.clone().unwrap_or_default(),
                    stream: c
                        .stream
                        .as_deref()
                        .map(|s| {
                            if reveal {
                                s.to_owned()
                            } else {
                                self.registry.stream_keys().hash(s)
                            }
                        })
                        .unwrap_or_default(),
                    remote_addr: c.peer.to_string(),
                    capabilities: Some(Capabilities {
                        go_away: c.caps.go_away,
                        reconnect_request: c.caps.reconnect,
                    }),
                    connected_at: Some(ts(c.connected_at)),
                    publishing_since: c.publishing_since.map(ts),
                    bytes_received: c.bytes_in,
                    signalled_at: c.signalled.map(|(t, _)| ts(t)),
                    signal: c.signalled.map_or(PbSignal::Unspecified, |(_, k)| signal(k)).into(),
                })
            })
            .collect();
        let totals = self.registry.totals();
        PodStatus {
            pod: self.pod_name.clone(),
            serving: self.registry.serving(),
            counts: Some(counts),
            publishers,
            drain: self.drainer.status().as_ref().map(drain_view),
            relays_active: self.registry.relays_active(),
            total_signalled: totals.signalled,
            total_migrated: totals.migrated,
            total_ended: totals.ended,
        }
    }

    fn check_reveal(&self, reveal: bool) -> Result<bool, Status> {
        if reveal && !self.reveal_allowed {
            return Err(Status::permission_denied(
                "stream keys are hidden on this pod (--control-reveal-stream-keys is off)",
            ));
        }
        Ok(reveal)
    }

    fn spec(&self, req: StartDrainRequest) -> Result<DrainSpec, Status> {
        let duration = |d: Option<prost_types::Duration>, name: &str| -> Result<Option<Duration>, Status> {
            d.map(|d| {
                Duration::try_from(d).map_err(|_| Status::invalid_argument(format!("{name} must not be negative")))
            })
            .transpose()
        };
        if req.drain_id.is_empty() || req.drain_id.len() > MAX_DRAIN_ID_LEN {
            return Err(Status::invalid_argument(format!(
                "drain_id must have 1 to {MAX_DRAIN_ID_LEN} characters"
            )));
        }
        let deadline = duration(req.deadline, "deadline")?
            .filter(|d| !d.is_zero())
            .ok_or_else(|| Status::invalid_argument("deadline is required and must be positive"))?;
        if !req.rate.is_finite() || req.rate < 0.0 {
            return Err(Status::invalid_argument(format!(
                "rate must be >= 0 signals per second, got {}",
                req.rate
            )));
        }
        for url in &req.redirect_tc_urls {
            if !url.starts_with("rtmp://") && !url.starts_with("rtmps://") {
                return Err(Status::invalid_argument(format!(
                    "redirect tcUrl {url:?} is not an rtmp:// or rtmps:// URL"
                )));
            }
        }
        let incapable = match PbPolicy::try_from(req.incapable_policy) {
            Ok(PbPolicy::Wait) => IncapablePolicy::Wait,
            Ok(PbPolicy::Disconnect | PbPolicy::Unspecified) => IncapablePolicy::Disconnect,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown incapable_policy {}",
                    req.incapable_policy
                )));
            }
        };
        Ok(DrainSpec {
            id: req.drain_id,
            deadline,
            rate: req.rate,
            max_in_flight: req.max_in_flight,
            incapable,
            redirects: req.redirect_tc_urls,
            propagation_delay: duration(req.propagation_delay, "propagation_delay")?
                .unwrap_or(self.default_propagation),
        })
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<PodStatus, Status>> + Send>>;

#[tonic::async_trait]
impl IngestControl for ControlService {
    async fn get_status(&self, req: Request<GetStatusRequest>) -> Result<Response<PodStatus>, Status> {
        let reveal = self.check_reveal(req.get_ref().reveal_stream_keys)?;
        Ok(Response::new(self.status(reveal, req.get_ref().counts_only)))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(&self, req: Request<WatchStatusRequest>) -> Result<Response<StatusStream>, Status> {
        let req = req.into_inner();
        let reveal = self.check_reveal(req.reveal_stream_keys)?;
        let counts_only = req.counts_only;
        let interval = req
            .min_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(DEFAULT_WATCH_INTERVAL)
            .max(MIN_WATCH_INTERVAL);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let this = self.clone();
        let mut changes = self.registry.subscribe();
        tokio::spawn(async move {
            let mut last: Option<PodStatus> = None;
            loop {
                changes.borrow_and_update();
                let status = this.status(reveal, counts_only);
                // Byte counters move all the time; send when anything else changed.
                let unchanged = last.as_ref().is_some_and(|l| same_but_bytes(l, &status));
                if !unchanged {
                    if tx.send(Ok(status.clone())).await.is_err() {
                        return;
                    }
                    last = Some(status);
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
                // Coalesce a storm of changes into one message per interval.
                tokio::time::sleep(interval).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn start_drain(&self, req: Request<StartDrainRequest>) -> Result<Response<StartDrainResponse>, Status> {
        let peer = req.remote_addr();
        let spec = self.spec(req.into_inner())?;
        let before = self
            .drainer
            .status()
            .filter(|d| d.phase != Phase::Cancelled)
            .map(|d| d.spec.id);
        let id = spec.id.clone();
        let status = self
            .drainer
            .start(spec)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let started = before.is_none();
        let replaced = before.as_deref().is_some_and(|b| b != id);
        info!(?peer, drain = %id, started, replaced, "StartDrain");
        Ok(Response::new(StartDrainResponse {
            drain: Some(drain_view(&status)),
            started,
            replaced,
        }))
    }

    async fn cancel_drain(&self, req: Request<CancelDrainRequest>) -> Result<Response<CancelDrainResponse>, Status> {
        let want = req.into_inner().drain_id;
        let current = self.drainer.status().filter(|d| d.phase != Phase::Cancelled);
        let refuse = |reason: String| {
            info!(drain = %want, %reason, "CancelDrain refused");
            Ok(Response::new(CancelDrainResponse {
                drain: current.as_ref().map(drain_view),
                cancelled: false,
                reason,
            }))
        };
        match &current {
            None => return refuse(CancelRefused::NoDrain.to_string()),
            Some(d) if !want.is_empty() && d.spec.id != want => {
                return refuse(format!("the pod runs drain {}, not {want}", d.spec.id));
            }
            Some(_) => {}
        }
        match self.drainer.cancel() {
            Ok(cancelled) => {
                info!(drain = %want, "CancelDrain");
                Ok(Response::new(CancelDrainResponse {
                    drain: Some(drain_view(&cancelled)),
                    cancelled: true,
                    reason: String::new(),
                }))
            }
            Err(refused) => refuse(refused.to_string()),
        }
    }
}

fn same_but_bytes(a: &PodStatus, b: &PodStatus) -> bool {
    let strip = |s: &PodStatus| {
        let mut s = s.clone();
        for p in &mut s.publishers {
            p.bytes_received = 0;
        }
        s
    };
    strip(a) == strip(b)
}

/// Checks `authorization: Bearer <token>` in constant time.
#[derive(Clone)]
pub struct BearerAuth {
    token: Arc<[u8]>,
}

impl BearerAuth {
    pub fn new(token: &str) -> Self {
        Self {
            token: token.trim().as_bytes().into(),
        }
    }

    fn check(&self, req: &Request<()>) -> Result<(), Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| {
            let g = g.trim().as_bytes();
            g.len() == self.token.len() && g.iter().zip(self.token.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        });
        if ok {
            return Ok(());
        }
        warn!(peer = ?req.remote_addr(), reason = if given.is_some() { "wrong token" } else { "no bearer token" }, "control call refused");
        Err(Status::unauthenticated("a valid bearer token is required"))
    }
}

/// Serves the control API, health and reflection on `listener` (over TLS
/// when `tls` is given) until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<ingest_proto::tls::Watched<rustls::ServerConfig>>,
    service: ControlService,
    auth: BearerAuth,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let registry = service.registry.clone();
    let name = "ingest.control.v1.IngestControl";
    let health_stop = stop.clone();
    let mut changes = registry.subscribe();
    let serving_status = move |r: &Registry| {
        if r.serving() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        }
    };
    // Set before serving, so the first check already answers.
    health.set_service_status("", serving_status(&registry)).await;
    health.set_service_status(name, serving_status(&registry)).await;
    tokio::spawn(async move {
        loop {
            let status = serving_status(&registry);
            health.set_service_status("", status).await;
            health.set_service_status(name, status).await;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                () = health_stop.cancelled() => return,
            }
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ingest_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| {
            warn!(%e, "reflection unavailable");
            e
        })
        .ok();
    let control = IngestControlServer::with_interceptor(service, move |req: Request<()>| {
        auth.check(&req)?;
        Ok(req)
    });
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(control)
        .add_optional_service(reflection);
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(ingest_proto::tls::incoming(listener, tls), stop.cancelled_owned())
                .await
        }
        None => {
            // As over TLS: short answers go out at once (no Nagle).
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
        }
    }
}
