//! The eviction gate: a validating webhook on `pods/eviction`. Served by
//! every replica from its own caches; holds an ingest pod's eviction with
//! 429 (which kubectl drain, cluster-autoscaler and Karpenter retry) until
//! the pod is drained, starting its drain if none runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::post;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{DeleteParams, Preconditions};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::response::StatusSummary;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::crd::IngestDrain;
use crate::drains::{self, Subject};
use crate::pods::Channels;
use crate::settings::{DrainDefaults, IngestPods, PodAccess};
use crate::state::{self, Verdict};
use crate::telemetry::{DecisionLabel, Metrics};

/// What the handler answers from.
#[derive(Clone)]
pub(crate) struct Gate {
    pub(crate) client: Client,
    pub(crate) pods: crate::pods::PodCache,
    pub(crate) drains: Store<IngestDrain>,
    /// gRPC channels to the pods, shared with the controller.
    pub(crate) channels: Channels,
    pub(crate) ingest: IngestPods,
    pub(crate) pod_access: PodAccess,
    /// What the drains the gate starts ask for.
    pub(crate) drain_defaults: DrainDefaults,
    /// The operator's own API username: it evicts only pods it drained.
    pub(crate) operator_username: Option<String>,
    pub(crate) metrics: Metrics,
    /// When this replica first held each pod (by uid) with no drain covering it.
    pub(crate) first_holds: FirstHolds,
    /// Publishes why an eviction is held, as an Event on the pod (what
    /// `kubectl describe pod` shows while `kubectl drain` waits); `None`: no Events.
    pub(crate) recorder: Option<Recorder>,
    /// When each held pod (by uid) last got that Event.
    pub(crate) explained: FirstHolds,
    /// The last publisher count of each held pod (by uid).
    pub(crate) counts: Counts,
}

/// Publisher counts of held pods, asked in the background and named by
/// the next 429.
#[derive(Clone, Default)]
pub(crate) struct Counts(Arc<Mutex<CountsInner>>);

#[derive(Default)]
struct CountsInner {
    /// The last count of each pod, and when it was measured.
    measured: HashMap<String, (u32, Instant)>,
    /// When each pod was last asked: one question at a time per pod,
    /// however often its eviction is retried.
    asked: HashMap<String, Instant>,
}

impl Counts {
    fn put(&self, uid: &str, n: u32) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        inner
            .measured
            .retain(|_, (_, at)| now.duration_since(*at) < COUNT_FRESH);
        inner.measured.insert(uid.to_owned(), (n, now));
    }

    /// `uid`'s count if it was measured within `fresh`.
    fn get(&self, uid: &str, fresh: Duration) -> Option<u32> {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .measured
            .get(uid)
            .filter(|(_, at)| at.elapsed() < fresh)
            .map(|(n, _)| *n)
    }

    /// True if `uid` may be asked now: not asked within [`COUNT_TIMEOUT`]
    /// (the longest a question can be under way).
    fn ask(&self, uid: &str) -> bool {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        inner.asked.retain(|_, at| now.duration_since(*at) < COUNT_TIMEOUT);
        if inner.asked.contains_key(uid) {
            return false;
        }
        inner.asked.insert(uid.to_owned(), now);
        true
    }
}

/// How often a held pod gets an Event saying why.
const EXPLAIN_EVERY: Duration = Duration::from_secs(30);

/// The backstop of a hold no drain covers (its drain cannot be created, or
/// does not take the pod): this replica lets the eviction through once it
/// has held the pod for a drain deadline plus [`state::HOLD_GRACE`].
#[derive(Clone, Default)]
pub(crate) struct FirstHolds(Arc<Mutex<HashMap<String, Instant>>>);

impl FirstHolds {
    /// How long `uid` has been held, counting from this first call.
    fn held_for(&self, uid: &str, forget_after: Duration) -> Duration {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Pods evicted long ago are forgotten: the map stays small.
        map.retain(|_, first| now.duration_since(*first) < forget_after);
        now.duration_since(*map.entry(uid.to_owned()).or_insert(now))
    }

    /// Starts `uid`'s clock over at its next hold.
    fn forget(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }

    /// True at most once per `every` for `uid` (the first call included).
    fn due(&self, uid: &str, every: Duration) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, last| now.duration_since(*last) < every);
        if map.contains_key(uid) {
            return false;
        }
        map.insert(uid.to_owned(), now);
        true
    }

    #[cfg(test)]
    pub(crate) fn set(&self, uid: &str, first: Instant) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_owned(), first);
    }
}

/// The eviction webhook's routes.
pub(crate) fn router(gate: Gate) -> Router {
    Router::new()
        .route("/validate-eviction", post(review))
        .with_state(Arc::new(gate))
}

/// Name of the drain the gate starts for one pod.
pub fn drain_name(pod: &str) -> String {
    format!("evict-{pod}")
}

async fn review(
    State(gate): State<Arc<Gate>>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let start = Instant::now();
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(err) => {
            warn!(%err, "malformed admission review");
            count(&gate, "error");
            return Json(AdmissionResponse::invalid(err.to_string()).into_review());
        }
    };
    let resp = decide(&gate, &req).await;
    gate.metrics.webhook_duration.observe(start.elapsed().as_secs_f64());
    Json(resp.into_review())
}

fn too_many_requests(req: &AdmissionRequest<DynamicObject>, message: String) -> AdmissionResponse {
    let mut resp = AdmissionResponse::from(req).deny(&message);
    resp.result.code = 429;
    resp.result.reason = "TooManyRequests".into();
    resp.result.status = Some(StatusSummary::Failure);
    resp
}

fn count(gate: &Gate, decision: &'static str) {
    gate.metrics
        .webhook_decisions
        .get_or_create(&DecisionLabel { decision })
        .inc();
}

fn allow(gate: &Gate, req: &AdmissionRequest<DynamicObject>, why: &str) -> AdmissionResponse {
    count(gate, "allow");
    tracing::debug!(pod = %req.name, why, "eviction allowed");
    AdmissionResponse::from(req)
}

async fn decide(gate: &Gate, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    if req.sub_resource.as_deref() != Some("eviction") {
        return allow(gate, req, "not an eviction");
    }
    let Some(ns) = req.namespace.clone() else {
        return allow(gate, req, "no namespace");
    };
    // The operator evicts only pods it has drained.
    if gate.operator_username.is_some() && req.user_info.username == gate.operator_username {
        return allow(gate, req, "evicted by the operator after its drain");
    }
    if !gate.ingest.watches(&ns) {
        return allow(gate, req, "namespace not watched");
    }
    let pod = gate.pods.get(&ObjectRef::new(&req.name).within(&ns));
    let drains = gate.drains.state();
    let in_ns = drains
        .iter()
        .map(AsRef::as_ref)
        .filter(|d: &&IngestDrain| d.metadata.namespace.as_deref() == Some(ns.as_str()));
    let now = k8s_openapi::jiff::Timestamp::now();
    match state::eviction_verdict(pod.as_deref(), &gate.ingest.selector, in_ns, now) {
        Verdict::Allow(why) => allow(gate, req, &why),
        Verdict::Hold { message, node } => {
            count(gate, "hold");
            // A drain covers the pod and bounds this hold by its deadline.
            // Should it go away, a new hold (and the pod's own drain) starts
            // from now.
            if let Some(p) = pod.as_deref() {
                gate.first_holds.forget(&p.uid().unwrap_or_default());
            }
            info!(pod = %req.name, %ns, %message, "eviction held");
            if let Some(p) = pod.as_deref().filter(|_| !req.dry_run) {
                explain(gate, p, &message);
                if let Some(node) = node {
                    explain_node(gate, &node, &message);
                }
            }
            too_many_requests(req, message)
        }
        Verdict::StartAndHold(message) => {
            count(gate, "start");
            match pod.as_deref() {
                Some(pod) => start_and_hold(gate, req, pod, message),
                None => too_many_requests(req, message),
            }
        }
    }
}

/// Holds the eviction of a pod no drain covers yet, starting its drain;
/// lets it through once held for a drain deadline without one.
fn start_and_hold(gate: &Gate, req: &AdmissionRequest<DynamicObject>, pod: &Pod, message: String) -> AdmissionResponse {
    let ns = req.namespace.as_deref().unwrap_or_default();
    let limit = gate.drain_defaults.deadline + state::HOLD_GRACE.unsigned_abs();
    let held = gate.first_holds.held_for(&pod.uid().unwrap_or_default(), 4 * limit);
    if held >= limit {
        warn!(pod = %req.name, %ns, ?held, "no drain took the pod over: eviction allowed");
        return allow(gate, req, "held for a drain deadline without a drain covering it");
    }
    // Start the drain (a dry run only answers: sideEffects
    // NoneOnDryRun) without waiting for the API server: the answer
    // stays fast, and a drain that could not be created is created
    // at the next retry. Meanwhile the pod tells how many publishers
    // it has.
    if !req.dry_run {
        let (gate, pod, name) = (gate.clone(), pod.clone(), req.name.clone());
        tokio::spawn(async move {
            if let Err(err) = start_drain(&gate, &pod).await {
                warn!(pod = %name, %err, "cannot start the pod's drain");
            }
        });
    }
    // The pod tells how many publishers it has in the background
    // too: the answer never waits on a pod, and a retry names the
    // count (until the drain's own row does).
    let uid = pod.uid().unwrap_or_default();
    if gate.counts.ask(&uid) {
        let (g, p) = (gate.clone(), pod.clone());
        tokio::spawn(async move {
            if let Some(n) = publishers_on(&g, &p).await {
                g.counts.put(&uid, n);
            }
        });
    }
    let message = match gate.counts.get(&pod.uid().unwrap_or_default(), COUNT_FRESH) {
        Some(n) => format!(
            "pod {}: {n} publishers remain; starting its drain, retry shortly",
            req.name
        ),
        None => message,
    };
    info!(pod = %req.name, %ns, dry_run = req.dry_run, %message, "eviction held: drain started");
    if !req.dry_run {
        explain(gate, pod, &message);
    }
    too_many_requests(req, message)
}

/// Says on the pod why its eviction is held (an Event, at most every
/// [`EXPLAIN_EVERY`] per pod), without delaying the answer.
fn explain(gate: &Gate, pod: &Pod, message: &str) {
    if gate.explained.due(&pod.uid().unwrap_or_default(), EXPLAIN_EVERY) {
        publish_held(gate, pod.object_ref(&()), message);
    }
}

/// Says it on the node a node drain empties too (`kubectl describe node`
/// while `kubectl drain` waits), at most every [`EXPLAIN_EVERY`] per node:
/// one held pod speaks for all of the node's.
fn explain_node(gate: &Gate, node: &str, message: &str) {
    if gate.explained.due(&format!("node/{node}"), EXPLAIN_EVERY) {
        publish_held(gate, node_reference(node), message);
    }
}

/// A reference to a node as `kubectl describe node` finds its Events: the
/// kubelet's convention of the node's name for its uid (describe looks
/// under both the uid and the name).
fn node_reference(node: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.to_owned()),
        uid: Some(node.to_owned()),
        ..ObjectReference::default()
    }
}

/// Publishes an `EvictionHeld` Event on `reference` in the background.
fn publish_held(gate: &Gate, reference: ObjectReference, message: &str) {
    let Some(recorder) = gate.recorder.clone() else { return };
    let event = Event {
        type_: EventType::Normal,
        reason: "EvictionHeld".into(),
        note: Some(format!("eviction held: {message}")),
        action: "HoldEviction".into(),
        secondary: None,
    };
    tokio::spawn(async move {
        if let Err(err) = recorder.publish(&event, &reference).await {
            warn!(%err, "cannot publish why an eviction is held");
        }
    });
}

/// The publishers on a pod, from its control API, if it answers within
/// [`COUNT_TIMEOUT`].
async fn publishers_on(gate: &Gate, pod: &Pod) -> Option<u32> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    let token = gate.pod_access.token().ok()?;
    let ask = async {
        let mut client = gate.channels.client(&ip, gate.pod_access.control_port, &token).ok()?;
        client.status().await.ok()?.counts.map(|c| c.total)
    };
    tokio::time::timeout(COUNT_TIMEOUT, ask).await.ok().flatten()
}

/// How long the background count waits for a pod.
const COUNT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a pod's count may be named in a 429.
const COUNT_FRESH: Duration = Duration::from_secs(15);

/// Creates (server-side apply, so every replica may race) a drain of one
/// pod, owned by the pod: it goes when the pod goes. A drain of that name
/// that is there already is left as it is (edits to it stay), unless an
/// earlier pod of the same name owns it: that one is deleted, and the
/// next retry creates the pod's own.
async fn start_drain(gate: &Gate, pod: &Pod) -> Result<(), kube::Error> {
    let ns = pod.namespace().unwrap_or_default();
    let name = drain_name(&pod.name_any());
    let Some(existing) = gate.drains.get(&ObjectRef::new(&name).within(&ns)) else {
        let drain = drains::operator_drain(Subject::Pod(pod), &ns, &gate.ingest.selector, &gate.drain_defaults);
        return drains::apply(&gate.client, &drain).await;
    };
    let owned_by_pod = existing
        .owner_references()
        .iter()
        .any(|o| o.kind == "Pod" && Some(&o.uid) == pod.uid().as_ref());
    if owned_by_pod || existing.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    info!(drain = %name, %ns, "deleting the drain an earlier pod of this name left");
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    Api::<IngestDrain>::namespaced(gate.client.clone(), &ns)
        .delete(&name, &params)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::core::admission::AdmissionReview;
    use kube::runtime::events::Reporter;
    use serde_json::json;

    use super::*;
    use crate::crd::{DrainPhase, PodDrainStatus, PodState};
    use crate::fixtures::*;

    /// What the API server sends for `kubectl drain`'s eviction of `pod`.
    fn eviction(pod: &str, dry_run: bool) -> AdmissionRequest<DynamicObject> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "review-1",
                "kind": { "group": "policy", "version": "v1", "kind": "Eviction" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "subResource": "eviction",
                "name": pod,
                "namespace": NS,
                "operation": "CREATE",
                "userInfo": { "username": "kubernetes-admin" },
                "object": {
                    "apiVersion": "policy/v1",
                    "kind": "Eviction",
                    "metadata": { "name": pod, "namespace": NS },
                },
                "dryRun": dry_run,
            },
        }))
        .expect("an AdmissionReview");
        review.try_into().expect("an AdmissionRequest")
    }

    /// Answers the review and checks which API requests it made.
    async fn review(
        pods: Vec<Pod>,
        drains: Vec<IngestDrain>,
        req: AdmissionRequest<DynamicObject>,
        scenario: Scenario,
    ) -> AdmissionResponse {
        let (gate, api_server) = Gate::test(pods, drains);
        let verifier = api_server.run(vec![scenario]);
        let resp = within("webhook", decide(&gate, &req)).await;
        drop(gate);
        within("verifier", verifier).await.expect("scenario");
        assert_eq!(resp.uid, "review-1");
        resp
    }

    fn assert_held(resp: &AdmissionResponse) {
        assert!(!resp.allowed);
        assert_eq!(resp.result.code, 429);
        assert_eq!(resp.result.reason, "TooManyRequests");
    }

    fn draining(phase: DrainPhase, row: PodDrainStatus) -> IngestDrain {
        with_status(
            drain("node-node-a", json!({ "nodeName": "node-a" })),
            phase,
            Duration::from_secs(10),
            vec![row],
        )
    }

    #[tokio::test]
    async fn the_operators_own_eviction_passes_at_once() {
        let mut r = row("ingest-0", PodState::Draining);
        r.remaining = 2;
        let (mut gate, api_server) = Gate::test(
            vec![ingest_pod("ingest-0", NS, "node-a")],
            vec![draining(DrainPhase::Draining, r)],
        );
        let mut req = eviction("ingest-0", false);
        req.user_info.username = Some("system:serviceaccount:ops:ingest-operator".into());
        // Someone else with the same pod is held...
        assert!(
            !within("webhook", decide(&gate, &eviction("ingest-0", false)))
                .await
                .allowed
        );
        // ...the operator, which evicts only what it drained, is not.
        gate.operator_username = Some("system:serviceaccount:ops:ingest-operator".into());
        assert!(within("webhook", decide(&gate, &req)).await.allowed);
        drop(gate);
        within("verifier", api_server.run(vec![Scenario::NoRequest]))
            .await
            .expect("no API request");
    }

    #[tokio::test]
    async fn non_ingest_pod_is_allowed() {
        let resp = review(
            vec![other_pod("web-0")],
            vec![],
            eviction("web-0", false),
            Scenario::NoRequest,
        )
        .await;
        assert!(resp.allowed);
    }

    #[tokio::test]
    async fn draining_pod_is_held_with_429_naming_the_publishers() {
        let mut r = row("ingest-0", PodState::Draining);
        (r.remaining, r.signalled, r.migrated) = (3, 2, 1);
        let resp = review(
            vec![ingest_pod("ingest-0", NS, "node-a")],
            vec![draining(DrainPhase::Draining, r)],
            eviction("ingest-0", false),
            Scenario::NoRequest,
        )
        .await;
        assert_held(&resp);
        let msg = &resp.result.message;
        assert!(
            msg.starts_with(
                "pod ingest-0 is draining (IngestDrain node-node-a): 3 publishers remain (2 signalled, 1 migrated); released within "
            ),
            "{msg}"
        );
    }

    /// `kubectl describe` explains a node drain's hold on the pod and on
    /// the node, at most once per interval each.
    #[tokio::test]
    async fn a_node_drains_hold_is_explained_on_the_pod_and_the_node() {
        let mut r = row("ingest-0", PodState::Draining);
        r.remaining = 12;
        let (mut gate, api_server) = Gate::test(
            vec![ingest_pod("ingest-0", NS, "node-a")],
            vec![draining(DrainPhase::Draining, r)],
        );
        let reporter = Reporter {
            controller: "ingest-operator".into(),
            instance: None,
        };
        gate.recorder = Some(Recorder::new(gate.client.clone(), reporter));
        let verifier = api_server.run(vec![Scenario::HeldEvents(vec![
            ("Pod", "ingest-0".into()),
            ("Node", "node-a".into()),
        ])]);
        for _ in 0..3 {
            assert_held(&within("webhook", decide(&gate, &eviction("ingest-0", false))).await);
        }
        drop(gate);
        within("verifier", verifier).await.expect("two Events");
        let node = node_reference("node-a");
        assert_eq!(node.uid.as_deref(), Some("node-a"), "where kubectl describe node looks");
    }

    #[tokio::test]
    async fn drained_or_timed_out_pod_is_allowed() {
        let drained = review(
            vec![ingest_pod("ingest-0", NS, "node-a")],
            vec![draining(DrainPhase::Draining, row("ingest-0", PodState::Drained))],
            eviction("ingest-0", false),
            Scenario::NoRequest,
        )
        .await;
        assert!(drained.allowed);
        let timed_out = review(
            vec![ingest_pod("ingest-0", NS, "node-a")],
            vec![draining(DrainPhase::TimedOut, row("ingest-0", PodState::Draining))],
            eviction("ingest-0", false),
            Scenario::NoRequest,
        )
        .await;
        assert!(timed_out.allowed);
    }

    #[tokio::test]
    async fn undrained_pod_without_a_drain_starts_one_and_is_held() {
        let pod = ingest_pod("ingest-0", NS, "node-a");
        let resp = review(
            vec![pod.clone()],
            vec![],
            eviction("ingest-0", false),
            Scenario::EvictionDrain(pod),
        )
        .await;
        assert_held(&resp);
        assert!(
            resp.result.message.contains("starting its drain"),
            "{}",
            resp.result.message
        );
    }

    /// A StatefulSet's pod comes back with the same name: the drain its
    /// predecessor's eviction started (owned by that pod, ended, not yet
    /// collected) is deleted, never taken over. Taken over, its old end
    /// would let the new pod's evictions through undrained.
    #[tokio::test]
    async fn a_drain_left_by_an_earlier_pod_of_the_name_is_deleted_not_reused() {
        let pod = ingest_pod("ingest-0", NS, "node-a");
        let mut earlier = row("ingest-0", PodState::Drained);
        earlier.uid = "uid-of-the-earlier-ingest-0".into();
        let mut stale = with_status(
            drain(
                &drain_name("ingest-0"),
                json!({ "podNames": ["ingest-0"], "evict": true }),
            ),
            DrainPhase::Drained,
            Duration::from_secs(600),
            vec![earlier],
        );
        stale.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: "ingest-0".into(),
            uid: "uid-of-the-earlier-ingest-0".into(),
            ..OwnerReference::default()
        }]);
        let resp = review(
            vec![pod],
            vec![stale.clone()],
            eviction("ingest-0", false),
            Scenario::StaleDrainDeleted(stale),
        )
        .await;
        assert_held(&resp);
    }

    /// A pod held with no drain covering it for a whole drain deadline
    /// (its drain could not be created, or does not take it) is let go.
    #[tokio::test]
    async fn a_hold_without_a_covering_drain_ends_after_a_deadline() {
        let pod = ingest_pod("ingest-0", NS, "node-a");
        let (gate, api_server) = Gate::test(vec![pod], vec![]);
        let long_ago = Instant::now()
            .checked_sub(gate.drain_defaults.deadline + Duration::from_secs(20))
            .expect("an instant in the past");
        gate.first_holds.set("uid-ingest-0", long_ago);
        let resp = within("webhook", decide(&gate, &eviction("ingest-0", false))).await;
        drop(gate);
        within("verifier", api_server.run(vec![Scenario::NoRequest]))
            .await
            .expect("no API request");
        assert!(resp.allowed, "held again: {}", resp.result.message);
    }

    /// A drain that covered the pod and went away (deleted mid-drain)
    /// leaves a fresh hold behind, with a drain of the pod's own: the time
    /// the deleted drain held it does not count against the backstop.
    #[tokio::test]
    async fn a_hold_starts_over_after_a_covering_drain_goes_away() {
        let pod = ingest_pod("ingest-0", NS, "node-a");
        let mut r = row("ingest-0", PodState::Draining);
        r.remaining = 2;
        let (covered, covered_api) = Gate::test(vec![pod.clone()], vec![draining(DrainPhase::Draining, r)]);
        // First held (with no drain) a deadline ago; covered since.
        let long_ago = Instant::now()
            .checked_sub(covered.drain_defaults.deadline + Duration::from_secs(20))
            .expect("an instant in the past");
        covered.first_holds.set("uid-ingest-0", long_ago);
        assert_held(&within("webhook", decide(&covered, &eviction("ingest-0", true))).await);
        // The drain is deleted: the next eviction finds none.
        let (mut uncovered, uncovered_api) = Gate::test(vec![pod], vec![]);
        uncovered.first_holds = covered.first_holds.clone();
        let resp = within("webhook", decide(&uncovered, &eviction("ingest-0", true))).await;
        drop((covered, uncovered));
        for api in [covered_api, uncovered_api] {
            within("verifier", api.run(vec![Scenario::NoRequest]))
                .await
                .expect("no API request");
        }
        assert_held(&resp);
    }

    #[test]
    fn a_held_pod_is_explained_at_most_once_per_interval() {
        let explained = FirstHolds::default();
        assert!(explained.due("uid-a", EXPLAIN_EVERY));
        assert!(
            !explained.due("uid-a", EXPLAIN_EVERY),
            "the second hold within the interval"
        );
        assert!(explained.due("uid-b", EXPLAIN_EVERY), "another pod");
        let long_ago = Instant::now()
            .checked_sub(EXPLAIN_EVERY * 2)
            .expect("an instant in the past");
        explained.set("uid-a", long_ago);
        assert!(explained.due("uid-a", EXPLAIN_EVERY), "again after the interval");
    }

    #[test]
    fn a_count_is_named_while_fresh() {
        let counts = Counts::default();
        assert_eq!(counts.get("uid-a", COUNT_FRESH), None, "never measured");
        counts.put("uid-a", 12);
        assert_eq!(counts.get("uid-a", COUNT_FRESH), Some(12));
        assert_eq!(counts.get("uid-b", COUNT_FRESH), None, "another pod");
        assert_eq!(counts.get("uid-a", Duration::ZERO), None, "stale");
        assert!(counts.ask("uid-a"), "the first question");
        assert!(!counts.ask("uid-a"), "a second one while the first may be under way");
        assert!(counts.ask("uid-b"), "another pod");
    }

    #[tokio::test]
    async fn dry_run_answers_without_starting_a_drain() {
        let resp = review(
            vec![ingest_pod("ingest-0", NS, "node-a")],
            vec![],
            eviction("ingest-0", true),
            Scenario::NoRequest,
        )
        .await;
        assert_held(&resp);
    }
}
