//! The IngestDrain reconciler: contact each selected pod's control API,
//! follow its drain, write the status by server-side apply, evict drained
//! pods when asked, and cancel the pods' drains when the resource goes.

mod cancel;
mod drive;
mod evict;
mod followers;
mod phase_gauge;
mod rows;
mod status;
mod step;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

pub(crate) use self::followers::Followers;
use crate::crd::{FINALIZER, IngestDrain};
use crate::pods::Channels;
use crate::settings::{DrainDefaults, IngestPods, PodAccess};
use crate::state;
use crate::telemetry::{ErrorLabel, Metrics};

/// Field manager of everything the operator applies.
pub(crate) const MANAGER: &str = "ingest-operator";
/// Requeue while a drain runs; WatchStatus followers wake the drain sooner
/// on every change of a pod, this is the safety net.
pub(crate) const PROGRESS_REQUEUE: Duration = Duration::from_secs(5);
/// Requeue of a finished drain whose pods' evictions were refused.
pub(crate) const EVICTION_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub(crate) enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("control token: {0}")]
    Token(std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Label for the error metric.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Token(_) => "token",
            Error::Invalid(_) => "invalid",
        }
    }
}

/// What every reconcile (of drains and of nodes) needs.
pub(crate) struct Context {
    pub(crate) client: Client,
    /// Which pods are ingest pods (what node drains take).
    pub(crate) ingest: IngestPods,
    pub(crate) pod_access: PodAccess,
    /// What the node drains the operator creates ask for.
    pub(crate) drain_defaults: DrainDefaults,
    /// Taint keys that mark a node for removal.
    pub(crate) node_taints: Vec<String>,
    pub(crate) recorder: Recorder,
    pub(crate) metrics: Metrics,
    pub(crate) followers: Followers,
    /// Every IngestDrain (the webhook's cache): whose drain a pod runs.
    pub(crate) drains: Store<IngestDrain>,
    /// Every ingest pod (the webhook's cache): no reconcile lists pods.
    pub(crate) pods: crate::pods::PodCache,
    /// One gRPC channel per pod, shared by every drain.
    pub(crate) channels: Channels,
}

impl Context {
    /// The cached ingest pods of `drain`'s namespace that its selector takes
    /// (a drain takes ingest pods only: those of `--ingest-selector`).
    /// Channels to pods that are gone are dropped on the way.
    fn pods_of(&self, drain: &IngestDrain) -> Vec<Pod> {
        let all = self.pods.state();
        let live: HashSet<String> = all.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).collect();
        self.channels.retain(&live);
        let ns = drain.namespace();
        all.iter()
            .filter(|p| p.namespace() == ns && state::selector_matches(&drain.spec.selector, p.labels()))
            .map(|p| (**p).clone())
            .collect()
    }

    fn token(&self) -> Result<String, Error> {
        self.pod_access.token().map_err(Error::Token)
    }

    async fn event(&self, drain: &IngestDrain, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Drain".into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&ev, &drain.object_ref(&())).await {
            warn!(%err, "cannot publish an event");
        }
    }
}

/// Runs the IngestDrain controller until `stop`; `wake` carries the
/// followers' reconcile requests.
pub(crate) async fn run(
    ctx: Arc<Context>,
    wake: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<IngestDrain>>,
    stop: CancellationToken,
) {
    let drains: Api<IngestDrain> = Api::all(ctx.client.clone());
    // Running drains requeue every second, so pod changes need no watch here.
    let controller = Controller::new(drains, watcher::Config::default().any_semantic());
    tokio::spawn(phase_gauge::keep_counting(
        controller.store(),
        ctx.metrics.clone(),
        stop.clone(),
    ));
    controller
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(wake))
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(err) = res {
                warn!(%err, "reconcile failed");
            }
        })
        .await;
}

fn error_policy(_drain: Arc<IngestDrain>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabel { kind: err.kind() })
        .inc();
    warn!(%err, "reconcile error; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(drain: Arc<IngestDrain>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = drain
        .namespace()
        .ok_or_else(|| Error::Invalid("IngestDrain without a namespace".into()))?;
    let api: Api<IngestDrain> = Api::namespaced(ctx.client.clone(), &ns);
    let span = info_span!("reconcile", drain = %drain.name_any(), %ns);
    let result = reconcile_inner(&api, &drain, &ctx).instrument(span).await;
    ctx.metrics.reconcile_duration.observe(start.elapsed().as_secs_f64());
    result
}

/// The finalizer guards one external effect, pods left unready: it is held
/// only while the drain runs, so a finished drain (or one whose operator
/// is gone) never blocks deletion.
async fn reconcile_inner(api: &Api<IngestDrain>, drain: &IngestDrain, ctx: &Context) -> Result<Action, Error> {
    let has_finalizer = drain.finalizers().iter().any(|f| f == FINALIZER);
    if drain.metadata.deletion_timestamp.is_some() {
        if has_finalizer {
            cancel::cleanup(drain, ctx).await;
            set_finalizer(api, drain, false).await?;
        }
        return Ok(Action::await_change());
    }
    let phase = drain.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if !phase.is_terminal() && !drain.spec.cancel && !has_finalizer {
        set_finalizer(api, drain, true).await?;
        return Ok(Action::requeue(Duration::ZERO));
    }
    let (action, phase) = step::apply(drain, ctx).await?;
    if phase.is_terminal() && has_finalizer {
        set_finalizer(api, drain, false).await?;
    }
    Ok(action)
}

/// Adds or removes our finalizer; the resourceVersion guards the list.
async fn set_finalizer(api: &Api<IngestDrain>, drain: &IngestDrain, present: bool) -> Result<(), Error> {
    let mut list: Vec<String> = drain.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    if present {
        list.push(FINALIZER.to_owned());
    }
    let patch = json!({ "metadata": { "finalizers": list, "resourceVersion": drain.resource_version() } });
    api.patch(&drain.name_any(), &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn drain_id(drain: &IngestDrain) -> String {
    // The uid: stable for this object, new for a re-created one.
    drain.uid().unwrap_or_else(|| drain.name_any())
}

#[cfg(test)]
mod tests {
    use ingest_pod::drain::Phase as PodPhase;

    use super::*;
    use crate::crd::{DrainPhase, IngestDrainStatus, PodState};
    use crate::fixtures::*;

    fn drains_api(ctx: &Context) -> Api<IngestDrain> {
        Api::namespaced(ctx.client.clone(), NS)
    }

    /// Runs one reconcile as the controller would.
    async fn reconcile_once(ctx: &Context, drain: &IngestDrain) -> Action {
        within("reconcile", reconcile_inner(&drains_api(ctx), drain, ctx))
            .await
            .expect("reconcile")
    }

    #[tokio::test]
    async fn new_drain_adds_the_finalizer_then_starts_the_pods() {
        let pod = local_pod("ingest-0").await;
        let token = token_file();
        let (ctx, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![ingest_pod("ingest-0", NS, "node-a"), other_pod("web-0")],
        );
        // A long propagation keeps the pod's drain in its first phase.
        let fresh = drain("manual", json!({ "propagationDelaySeconds": 30 }));
        let held = with_finalizer(fresh.clone());
        let verifier = api_server.run(vec![
            Scenario::FinalizerAdded(fresh.clone()),
            Scenario::Step(Step {
                drain: held.clone(),
                evicted: vec![],
                evictions_refused: false,
                event: Some(("Normal", "Draining")),
                phase: DrainPhase::Draining,
                rows: vec![("ingest-0", PodState::Draining)],
            }),
        ]);

        // The finalizer goes on before any pod is touched.
        assert_eq!(reconcile_once(&ctx, &fresh).await, Action::requeue(Duration::ZERO));
        assert!(
            pod.drainer.status().is_none(),
            "the pod was contacted before the finalizer"
        );

        assert_eq!(reconcile_once(&ctx, &held).await, Action::requeue(PROGRESS_REQUEUE));
        let on_pod = pod.drainer.status().expect("StartDrain reached the pod");
        assert_eq!(on_pod.spec.id, held.uid().expect("uid"));
        assert_eq!(on_pod.phase, PodPhase::Propagating);
        assert_eq!(on_pod.spec.propagation_delay, Duration::from_secs(30));
        assert!(!pod.registry.serving(), "a draining pod leaves its Service");

        drop(ctx);
        let seen = within("verifier", verifier).await.expect("scenario");
        let status = &seen.iter().find(|s| s.path.ends_with("/status")).expect("status").body["status"];
        assert_eq!(status["pods"][0]["uid"], json!("uid-ingest-0"));
        assert_eq!(status["pods"][0]["node"], json!("node-a"));
        assert_eq!(status["totals"]["pods"], json!(1));
    }

    #[tokio::test]
    async fn a_pod_running_another_live_drain_is_followed_not_taken_over() {
        let pod = local_pod("ingest-0").await;
        let token = token_file();
        // The node drain reached the pod first; the eviction gate's drain
        // for the same pod comes a moment later.
        let node = with_status(
            with_finalizer(drain("node-node-a", json!({ "evict": true }))),
            DrainPhase::Draining,
            Duration::from_secs(2),
            vec![row("ingest-0", PodState::Draining)],
        );
        let node_id = node.uid().expect("uid");
        start_on_pod(&pod, &node_id, Duration::from_secs(30));
        let gate = with_status(
            with_finalizer(drain("evict-ingest-0", json!({ "evict": true }))),
            DrainPhase::Pending,
            Duration::from_secs(1),
            vec![row("ingest-0", PodState::Pending)],
        );
        let (ctx, api_server) = Context::test_with_drains(
            control_port(&pod),
            token.path(),
            vec![node, gate.clone()],
            vec![ingest_pod("ingest-0", NS, "node-a")],
        );
        let verifier = api_server.run(vec![Scenario::Step(Step {
            drain: gate.clone(),
            evicted: vec![],
            evictions_refused: false,
            event: Some(("Normal", "Draining")),
            phase: DrainPhase::Draining,
            rows: vec![("ingest-0", PodState::Draining)],
        })]);

        assert_eq!(reconcile_once(&ctx, &gate).await, Action::requeue(PROGRESS_REQUEUE));
        let on_pod = pod.drainer.status().expect("the pod drains");
        assert_eq!(
            on_pod.spec.id, node_id,
            "the second drain replaced the first on the pod"
        );
        assert_eq!(on_pod.phase, PodPhase::Propagating, "the pod's drain restarted");

        drop(ctx);
        let seen = within("verifier", verifier).await.expect("scenario");
        let status = &seen.iter().find(|s| s.path.ends_with("/status")).expect("status").body["status"];
        let message = status["pods"][0]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("node-node-a"),
            "the row does not say whom it follows: {message}"
        );
    }

    #[tokio::test]
    async fn drained_pod_is_evicted_and_the_finalizer_released() {
        let pod = local_pod("ingest-0").await;
        let token = token_file();
        let (ctx, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![ingest_pod("ingest-0", NS, "node-a")],
        );
        let d = with_status(
            with_finalizer(drain("node-node-a", json!({ "evict": true }))),
            DrainPhase::Draining,
            Duration::from_secs(10),
            vec![row("ingest-0", PodState::Draining)],
        );
        // The drain an earlier reconcile started: no publisher, so it is
        // drained once the 100 ms propagation delay is over.
        start_on_pod(&pod, &d.uid().expect("uid"), Duration::from_millis(100));
        wait_pod_phase(&pod, PodPhase::Drained).await;
        let verifier = api_server.run(vec![Scenario::Step(Step {
            drain: d.clone(),
            evicted: vec!["ingest-0"],
            evictions_refused: false,
            event: Some(("Normal", "Drained")),
            phase: DrainPhase::Drained,
            rows: vec![("ingest-0", PodState::Evicted)],
        })]);

        assert_eq!(reconcile_once(&ctx, &d).await, Action::await_change());

        drop(ctx);
        let seen = within("verifier", verifier).await.expect("scenario");
        let status = &seen.iter().find(|s| s.path.ends_with("/status")).expect("status").body["status"];
        assert_eq!(status["totals"]["drainedPods"], json!(1));
        assert_eq!(status["conditions"][0]["reason"], json!("AllPodsDrained"));
    }

    #[tokio::test]
    async fn refused_eviction_is_retried_after_the_drain_is_done() {
        let pod = local_pod("ingest-0").await;
        let token = token_file();
        let (ctx, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![ingest_pod("ingest-0", NS, "node-a")],
        );
        let d = with_status(
            with_finalizer(drain("node-node-a", json!({ "evict": true }))),
            DrainPhase::Draining,
            Duration::from_secs(10),
            vec![row("ingest-0", PodState::Draining)],
        );
        start_on_pod(&pod, &d.uid().expect("uid"), Duration::from_millis(100));
        wait_pod_phase(&pod, PodPhase::Drained).await;
        // What the first reconcile leaves: Drained, the pod not yet evicted.
        let mut done = with_status(
            drain("node-node-a", json!({ "evict": true })),
            DrainPhase::Drained,
            Duration::from_secs(10),
            vec![row("ingest-0", PodState::Drained)],
        );
        done.metadata.resource_version = Some("8".into());
        let verifier = api_server.run(vec![
            Scenario::Step(Step {
                drain: d.clone(),
                evicted: vec!["ingest-0"],
                evictions_refused: true,
                event: Some(("Normal", "Drained")),
                phase: DrainPhase::Drained,
                rows: vec![("ingest-0", PodState::Drained)],
            }),
            Scenario::Step(Step {
                drain: done.clone(),
                evicted: vec!["ingest-0"],
                evictions_refused: false,
                event: None,
                phase: DrainPhase::Drained,
                rows: vec![("ingest-0", PodState::Evicted)],
            }),
        ]);

        // A PodDisruptionBudget refuses: the drain is done but comes back.
        assert_eq!(reconcile_once(&ctx, &d).await, Action::requeue(EVICTION_RETRY));
        assert_eq!(reconcile_once(&ctx, &done).await, Action::await_change());

        drop(ctx);
        let seen = within("verifier", verifier).await.expect("scenario");
        let first = &seen.iter().find(|s| s.path.ends_with("/status")).expect("status").body["status"];
        assert!(
            first["pods"][0]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("eviction refused")),
            "{first}"
        );
    }

    #[tokio::test]
    async fn deadline_times_the_drain_out() {
        let pod = local_pod("ingest-0").await;
        let token = token_file();
        let (ctx, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![ingest_pod("ingest-0", NS, "node-a")],
        );
        let d = with_status(
            with_finalizer(drain("manual", json!({ "deadlineSeconds": 300 }))),
            DrainPhase::Draining,
            Duration::from_secs(3600),
            vec![row("ingest-0", PodState::Draining)],
        );
        start_on_pod(&pod, &d.uid().expect("uid"), Duration::from_secs(30));
        let verifier = api_server.run(vec![Scenario::Step(Step {
            drain: d.clone(),
            evicted: vec![],
            evictions_refused: false,
            event: Some(("Warning", "TimedOut")),
            phase: DrainPhase::TimedOut,
            rows: vec![("ingest-0", PodState::TimedOut)],
        })]);

        assert_eq!(reconcile_once(&ctx, &d).await, Action::await_change());

        drop(ctx);
        let seen = within("verifier", verifier).await.expect("scenario");
        let event = &seen.iter().find(|s| s.path.ends_with("/events")).expect("event").body;
        assert!(
            event["note"].as_str().is_some_and(|n| n.contains("deadline passed")),
            "{event}"
        );
    }

    #[tokio::test]
    async fn deadline_with_evict_releases_the_pod_and_still_reports_timed_out() {
        let pod = local_pod("ingest-0").await;
        // A publisher that announced no signal, still there at the deadline.
        let stop = tokio_util::sync::CancellationToken::new();
        let mut cfg = ingest_testkit::publisher::PublisherConfig::new(format!("rtmp://{}/live/ffmpeg", pod.rtmp));
        (cfg.go_away, cfg.reconnect) = (false, false);
        let publisher = ingest_testkit::publisher::Publisher::new(cfg).expect("publisher");
        let publishing = tokio::spawn(publisher.run(stop.clone()));
        within("the publisher on the pod", async {
            while pod.registry.connection_count() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let token = token_file();
        let (ctx, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![ingest_pod("ingest-0", NS, "node-a")],
        );
        let d = with_status(
            with_finalizer(drain("node-node-a", json!({ "deadlineSeconds": 300, "evict": true }))),
            DrainPhase::Draining,
            Duration::from_secs(3600),
            vec![row("ingest-0", PodState::Draining)],
        );
        start_on_pod(&pod, &d.uid().expect("uid"), Duration::from_secs(30));
        // A drain never holds a node beyond its deadline: the pod is evicted,
        // and the drain says it timed out rather than drained.
        let verifier = api_server.run(vec![Scenario::Step(Step {
            drain: d.clone(),
            evicted: vec!["ingest-0"],
            evictions_refused: false,
            event: Some(("Warning", "TimedOut")),
            phase: DrainPhase::TimedOut,
            rows: vec![("ingest-0", PodState::Evicted)],
        })]);

        assert_eq!(reconcile_once(&ctx, &d).await, Action::await_change());

        drop(ctx);
        let seen = within("verifier", verifier).await.expect("scenario");
        // The Event and the status count the publisher the deadline found,
        // though the row is Evicted by then.
        let event = &seen.iter().find(|s| s.path.ends_with("/events")).expect("event").body;
        assert_eq!(
            event["note"].as_str(),
            Some("deadline passed with 1 publishers left; the pods may go"),
            "{event}"
        );
        let status = &seen.iter().find(|s| s.path.ends_with("/status")).expect("status").body["status"];
        assert_eq!(
            (
                &status["pods"][0]["leftAtDeadline"],
                &status["totals"]["leftAtDeadline"]
            ),
            (&json!(1), &json!(1)),
            "{status}"
        );
        assert_eq!(
            status["pods"][0]["message"], "the deadline found 1 publisher(s) on the pod: disconnected",
            "{status}"
        );
        stop.cancel();
        let _ = publishing.await;
    }

    #[tokio::test]
    async fn cancel_serves_the_pod_again() {
        let pod = local_pod("ingest-0").await;
        let token = token_file();
        let (ctx, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![ingest_pod("ingest-0", NS, "node-a")],
        );
        let d = with_status(
            with_finalizer(drain("node-node-a", json!({ "cancel": true, "evict": true }))),
            DrainPhase::Draining,
            Duration::from_secs(10),
            vec![row("ingest-0", PodState::Draining)],
        );
        start_on_pod(&pod, &d.uid().expect("uid"), Duration::from_secs(30));
        assert!(!pod.registry.serving());
        let verifier = api_server.run(vec![Scenario::Step(Step {
            drain: d.clone(),
            evicted: vec![],
            evictions_refused: false,
            event: Some(("Normal", "Cancelled")),
            phase: DrainPhase::Cancelled,
            rows: vec![("ingest-0", PodState::Cancelled)],
        })]);

        assert_eq!(reconcile_once(&ctx, &d).await, Action::await_change());
        assert!(pod.registry.serving(), "CancelDrain reached the pod");
        assert_eq!(pod.drainer.status().map(|s| s.phase), Some(PodPhase::Cancelled));

        drop(ctx);
        within("verifier", verifier).await.expect("scenario");
    }

    #[tokio::test]
    async fn deleting_a_running_drain_cancels_its_pods_then_releases_it() {
        let pod = local_pod("ingest-0").await;
        let token = token_file();
        let (ctx, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![ingest_pod("ingest-0", NS, "node-a")],
        );
        let mut d = with_status(
            with_finalizer(drain("manual", json!({}))),
            DrainPhase::Draining,
            Duration::from_secs(10),
            vec![row("ingest-0", PodState::Draining)],
        );
        d.metadata.deletion_timestamp = Some(now());
        start_on_pod(&pod, &d.uid().expect("uid"), Duration::from_secs(30));
        assert!(!pod.registry.serving());
        let verifier = api_server.run(vec![Scenario::Deleted { drain: d.clone() }]);

        assert_eq!(reconcile_once(&ctx, &d).await, Action::await_change());
        assert!(pod.registry.serving(), "the deleted drain's pod serves again");
        assert_eq!(pod.drainer.status().map(|s| s.phase), Some(PodPhase::Cancelled));

        drop(ctx);
        within("verifier", verifier).await.expect("scenario");
    }

    #[tokio::test]
    async fn restart_mid_drain_resumes_without_a_second_start() {
        let pod = local_pod("ingest-0").await;
        let token = token_file();
        let (ctx, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![
                ingest_pod("ingest-0", NS, "node-a"),
                ingest_pod("ingest-1", NS, "node-b"),
            ],
        );
        let d = with_status(
            with_finalizer(drain("manual", json!({}))),
            DrainPhase::Draining,
            Duration::from_secs(10),
            vec![row("ingest-0", PodState::Draining)],
        );
        start_on_pod(&pod, &d.uid().expect("uid"), Duration::from_secs(30));
        let started = pod_drain_started(&pod);
        // A pod that appeared since the drain started is not taken: the pod
        // list was frozen in the status by the first reconcile.
        let verifier = api_server.run(vec![Scenario::Step(Step {
            drain: d.clone(),
            evicted: vec![],
            evictions_refused: false,
            event: None,
            phase: DrainPhase::Draining,
            rows: vec![("ingest-0", PodState::Draining)],
        })]);

        assert_eq!(reconcile_once(&ctx, &d).await, Action::requeue(PROGRESS_REQUEUE));
        // StartDrain with the same id changed nothing on the pod.
        assert_eq!(pod_drain_started(&pod), started);
        assert_eq!(pod.drainer.status().map(|s| s.phase), Some(PodPhase::Propagating));

        drop(ctx);
        let seen = within("verifier", verifier).await.expect("scenario");
        let status = &seen.iter().find(|s| s.path.ends_with("/status")).expect("status").body["status"];
        let old_start = serde_json::to_value(&d.status.as_ref().expect("status").started_at).expect("JSON");
        assert_eq!(status["startedAt"], old_start, "the start time survives the restart");
        // Nothing changed on the pod: its row keeps its lastUpdate (none).
        assert!(status["pods"][0]["lastUpdate"].is_null(), "{status}");
    }

    /// A pod already running this drain with redirect targets that changed
    /// since (a target started draining, or a new pod became ready) gets
    /// them again: StartDrain with the same id, which restarts nothing.
    #[tokio::test]
    async fn a_running_drain_gets_fresh_redirect_targets() {
        let pod = local_pod("ingest-0").await;
        let token = token_file();
        let d = with_status(
            with_finalizer(drain(
                "manual",
                json!({ "redirect": { "urlTemplate": "rtmp://{pod}.ingest:1935/live" } }),
            )),
            DrainPhase::Draining,
            Duration::from_secs(10),
            vec![row("ingest-0", PodState::Draining)],
        );
        // Started with no target: ingest-1 was not ready then.
        start_on_pod(&pod, &d.uid().expect("uid"), Duration::from_secs(30));
        let started = pod_drain_started(&pod);
        let (ctx, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![
                ingest_pod("ingest-0", NS, "node-a"),
                ingest_pod("ingest-1", NS, "node-b"),
            ],
        );
        let verifier = api_server.run(vec![Scenario::Step(Step {
            drain: d.clone(),
            evicted: vec![],
            evictions_refused: false,
            event: None,
            phase: DrainPhase::Draining,
            rows: vec![("ingest-0", PodState::Draining)],
        })]);

        assert_eq!(reconcile_once(&ctx, &d).await, Action::requeue(PROGRESS_REQUEUE));
        let on_pod = pod.drainer.status().expect("the pod drains");
        assert_eq!(
            on_pod.spec.redirects,
            vec!["rtmp://ingest-1.ingest:1935/live".to_owned()],
            "the draining pod itself is no target; the ready one is"
        );
        assert_eq!(pod_drain_started(&pod), started, "the pod's drain restarted");
        assert_eq!(on_pod.phase, PodPhase::Propagating);

        drop(ctx);
        within("verifier", verifier).await.expect("scenario");
    }

    /// A reconcile that finds nothing new writes nothing: no status patch,
    /// so no watch event that would wake the drain again.
    #[tokio::test]
    async fn an_unchanged_drain_writes_no_status() {
        let pod = local_pod("ingest-0").await;
        let token = token_file();
        let (ctx, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![ingest_pod("ingest-0", NS, "node-a")],
        );
        let d = with_status(
            with_finalizer(drain("manual", json!({}))),
            DrainPhase::Draining,
            Duration::from_secs(10),
            vec![row("ingest-0", PodState::Draining)],
        );
        start_on_pod(&pod, &d.uid().expect("uid"), Duration::from_secs(30));
        let verifier = api_server.run(vec![Scenario::Step(Step {
            drain: d.clone(),
            evicted: vec![],
            evictions_refused: false,
            event: None,
            phase: DrainPhase::Draining,
            rows: vec![("ingest-0", PodState::Draining)],
        })]);
        assert_eq!(reconcile_once(&ctx, &d).await, Action::requeue(PROGRESS_REQUEUE));
        drop(ctx);
        let seen = within("verifier", verifier).await;
        // The status as the API server now holds it, reconciled again.
        let written = seen.expect("scenario");
        let status: IngestDrainStatus = serde_json::from_value(
            written
                .iter()
                .find(|s| s.path.ends_with("/status"))
                .expect("status")
                .body["status"]
                .clone(),
        )
        .expect("status");
        let mut again = d.clone();
        again.status = Some(status);
        let (ctx2, api_server) = Context::test(
            control_port(&pod),
            token.path(),
            vec![ingest_pod("ingest-0", NS, "node-a")],
        );
        let verifier = api_server.run(vec![Scenario::NoRequest]);
        assert_eq!(reconcile_once(&ctx2, &again).await, Action::requeue(PROGRESS_REQUEUE));
        drop(ctx2);
        within("verifier", verifier).await.expect("no request at all");
    }

    #[tokio::test]
    async fn gone_pod_is_marked_gone() {
        let token = token_file();
        // No pod is contacted: nothing listens on the control port.
        let d = with_status(
            with_finalizer(drain("manual", json!({ "evict": true }))),
            DrainPhase::Draining,
            Duration::from_secs(10),
            vec![row("ingest-0", PodState::Draining), row("ingest-1", PodState::Draining)],
        );
        // ingest-0 is gone; ingest-1 was replaced by a pod of the same name.
        let mut replacement = ingest_pod("ingest-1", NS, "node-b");
        replacement.metadata.uid = Some("uid-replacement".into());
        let (ctx, api_server) = Context::test(1, token.path(), vec![replacement]);
        let verifier = api_server.run(vec![Scenario::Step(Step {
            drain: d.clone(),
            evicted: vec![],
            evictions_refused: false,
            event: Some(("Normal", "Drained")),
            phase: DrainPhase::Drained,
            rows: vec![("ingest-0", PodState::Gone), ("ingest-1", PodState::Gone)],
        })]);

        assert_eq!(reconcile_once(&ctx, &d).await, Action::await_change());

        drop(ctx);
        let seen = within("verifier", verifier).await.expect("scenario");
        let status = &seen.iter().find(|s| s.path.ends_with("/status")).expect("status").body["status"];
        assert_eq!(status["pods"][0]["message"], json!("the pod is gone"));
        assert_eq!(status["pods"][1]["message"], json!("the pod was replaced"));
    }
}
