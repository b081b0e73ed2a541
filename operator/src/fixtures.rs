//! A mock API server for the reconcile and webhook tests (the controller-rs
//! pattern): the code under test talks to a `tower_test` mock service and an
//! [`ApiServerVerifier`] plays a [`Scenario`], asserting each request and
//! answering it. Ingest pods are real in-process pods (`ingest_testkit::lab`)
//! whose control API listens on 127.0.0.1, the IP the mocked pods report.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode};
use ingest_pod::drain::{DrainSpec, IncapablePolicy as PodPolicy, Phase as PodPhase};
use ingest_testkit::lab::LocalPod;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{reflector, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::config::Args;
use crate::controller::Context;
use crate::crd::{
    DrainPhase, FINALIZER, IngestDrain, IngestDrainStatus, NODE_LABEL, PodDrainStatus, PodState, TRIGGER_LABEL,
};
use crate::settings::Settings;
use crate::telemetry::Metrics;
use crate::webhook::Gate;

pub(crate) type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = tower_test::mock::SendResponse<Response<Body>>;

/// Namespace of the test objects.
pub(crate) const NS: &str = "ns";
/// Control token of the test pods.
pub(crate) const TOKEN: &str = "test-control-token";
/// Every wait in these tests is bounded by this.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);
const DRAINS: &str = "/apis/ingest.lossless.dev/v1alpha1";

/// Awaits `fut`, failing the test after [`TIMEOUT`].
pub(crate) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {TIMEOUT:?}"))
}

// ---- objects ---------------------------------------------------------------

/// An ingest pod on `node`, ready, reachable at 127.0.0.1.
pub(crate) fn ingest_pod(name: &str, ns: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": format!("uid-{name}"),
            "labels": { "app.kubernetes.io/component": "ingest" },
        },
        "spec": { "nodeName": node, "containers": [] },
        "status": {
            "podIP": "127.0.0.1",
            "conditions": [{ "type": "Ready", "status": "True" }],
        },
    }))
    .expect("pod")
}

/// A pod that is not an ingest pod.
pub(crate) fn other_pod(name: &str) -> Pod {
    let mut pod = ingest_pod(name, NS, "node-a");
    pod.metadata.labels = Some(BTreeMap::from([("app".to_owned(), "web".to_owned())]));
    pod
}

/// An IngestDrain of the ingest pods in [`NS`], uid `uid-<name>`; `spec`
/// overrides fields of the spec.
pub(crate) fn drain(name: &str, spec: Value) -> IngestDrain {
    let mut full = json!({ "selector": { "matchLabels": { "app.kubernetes.io/component": "ingest" } } });
    if let (Some(full), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
        full.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "ingest.lossless.dev/v1alpha1",
        "kind": "IngestDrain",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": format!("uid-{name}"),
            "resourceVersion": "7",
            "generation": 1,
        },
        "spec": full,
    }))
    .expect("IngestDrain")
}

/// `d` holding the operator's finalizer.
pub(crate) fn with_finalizer(mut d: IngestDrain) -> IngestDrain {
    d.finalizers_mut().push(FINALIZER.to_owned());
    d
}

/// `d` with a status of `phase`, started `ago`, with `rows`.
pub(crate) fn with_status(
    mut d: IngestDrain,
    phase: DrainPhase,
    ago: Duration,
    rows: Vec<PodDrainStatus>,
) -> IngestDrain {
    let started = Timestamp::now() - SignedDuration::try_from(ago).expect("duration");
    d.status = Some(IngestDrainStatus {
        phase,
        pods: rows,
        started_at: Some(Time(started)),
        observed_generation: Some(1),
        ..IngestDrainStatus::default()
    });
    d
}

/// The status row of [`ingest_pod`] `name` in `state`.
pub(crate) fn row(name: &str, state: PodState) -> PodDrainStatus {
    PodDrainStatus {
        name: name.to_owned(),
        uid: format!("uid-{name}"),
        node: Some("node-a".to_owned()),
        state,
        ..PodDrainStatus::default()
    }
}

/// A node, cordoned or not, with `taints` (keys).
pub(crate) fn node(name: &str, unschedulable: bool, taints: &[&str]) -> Node {
    let taints: Vec<Value> = taints
        .iter()
        .map(|k| json!({ "key": k, "effect": "NoSchedule" }))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "uid": format!("uid-{name}") },
        "spec": { "unschedulable": unschedulable, "taints": taints },
    }))
    .expect("node")
}

// ---- pods and context -----------------------------------------------------

/// A real ingest pod in this process; its control API is on 127.0.0.1 and
/// its drains leave the Service for 100 ms before they signal.
pub(crate) async fn local_pod(name: &str) -> LocalPod {
    LocalPod::start(name, &["--control-token", TOKEN, "--propagation-delay", "100ms"])
        .await
        .expect("local ingest pod")
}

/// Control port of `pod`.
pub(crate) fn control_port(pod: &LocalPod) -> u16 {
    pod.control.expect("the pod serves its control API").port()
}

/// Starts a drain on `pod` as an earlier reconcile did.
pub(crate) fn start_on_pod(pod: &LocalPod, id: &str, propagation: Duration) {
    pod.drainer
        .start(DrainSpec {
            id: id.to_owned(),
            deadline: Duration::from_secs(300),
            rate: 50.0,
            max_in_flight: 0,
            incapable: PodPolicy::Disconnect,
            redirects: Vec::new(),
            propagation_delay: propagation,
        })
        .expect("drain started on the pod");
}

/// Waits until the drain on `pod` is in `phase`.
pub(crate) async fn wait_pod_phase(pod: &LocalPod, phase: PodPhase) {
    within("the pod's drain phase", async {
        while pod.drainer.status().map(|s| s.phase) != Some(phase) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// When the pod's drain started.
pub(crate) fn pod_drain_started(pod: &LocalPod) -> SystemTime {
    pod.drainer.status().expect("the pod has a drain").started_at
}

/// A file holding [`TOKEN`].
pub(crate) fn token_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), TOKEN).expect("token written");
    file
}

/// Operator flags for pods whose control API is on `control_port`.
pub(crate) fn args(control_port: u16, token_file: &Path) -> Args {
    let port = control_port.to_string();
    let token = token_file.to_str().expect("UTF-8 temp path");
    clap::Parser::try_parse_from([
        "ingest-operator",
        "--control-port",
        &port,
        "--control-token-file",
        token,
    ])
    .expect("operator args")
}

fn mock_client() -> (Client, ApiServerVerifier) {
    let (client, handle) = raw_mock_client();
    (client, ApiServerVerifier(handle))
}

/// A client and the mock API server behind it, for tests that answer
/// requests one by one with [`answer`] (the plugin's).
pub(crate) fn raw_mock_client() -> (Client, ApiServerHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// Answers the next request, which must be a GET of `path`, with `code`
/// and `body`; returns its query.
pub(crate) async fn answer(
    handle: &mut ApiServerHandle,
    path: &str,
    code: StatusCode,
    body: Value,
) -> BTreeMap<String, String> {
    let (req, send) = within(&format!("GET {path}"), handle.next_request())
        .await
        .unwrap_or_else(|| panic!("the client went away before GET {path}"));
    assert_eq!((req.method(), req.uri().path()), (&Method::GET, path));
    let query = req.uri().query().map(parse_query).unwrap_or_default();
    reply(send, code, &body);
    query
}

/// The API server's 404 for `what` (`nodes "node-a"`).
pub(crate) fn not_found(what: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404
    })
}

impl Context {
    /// A context whose client talks to the returned verifier.
    /// `pods` are the cached ingest pods.
    pub(crate) fn test(control_port: u16, token_file: &Path, pods: Vec<Pod>) -> (Arc<Self>, ApiServerVerifier) {
        Self::test_with_drains(control_port, token_file, Vec::new(), pods)
    }

    /// [`Context::test`] with `drains` in the cache of IngestDrains.
    pub(crate) fn test_with_drains(
        control_port: u16,
        token_file: &Path,
        drains: Vec<IngestDrain>,
        pods: Vec<Pod>,
    ) -> (Arc<Self>, ApiServerVerifier) {
        let (client, verifier) = mock_client();
        let (pod_store, mut pod_writer) = reflector::store::<Pod>();
        for p in pods {
            pod_writer.apply_watcher_event(&watcher::Event::Apply(p));
        }
        let (drain_store, mut drain_writer) = reflector::store::<IngestDrain>();
        for d in drains {
            drain_writer.apply_watcher_event(&watcher::Event::Apply(d));
        }
        let reporter = Reporter {
            controller: "ingest-operator".into(),
            instance: None,
        };
        let settings = Settings::from_args(args(control_port, token_file)).expect("settings");
        let ctx = Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            ingest: settings.ingest,
            pod_access: settings.pod_access,
            drain_defaults: settings.drain_defaults,
            node_taints: settings.node_taints,
            metrics: Metrics::default(),
            // No controller runs here: the followers' wake-ups go nowhere.
            followers: crate::controller::Followers::new().0,
            drains: drain_store,
            pods: pod_store.into(),
            channels: Default::default(),
        };
        (Arc::new(ctx), verifier)
    }
}

impl Gate {
    /// A gate whose caches hold `pods` and `drains` and whose client talks
    /// to the returned verifier.
    pub(crate) fn test(pods: Vec<Pod>, drains: Vec<IngestDrain>) -> (Self, ApiServerVerifier) {
        let (client, verifier) = mock_client();
        let (pod_store, mut pod_writer) = reflector::store::<Pod>();
        for p in pods {
            pod_writer.apply_watcher_event(&watcher::Event::Apply(p));
        }
        let (drain_store, mut drain_writer) = reflector::store::<IngestDrain>();
        for d in drains {
            drain_writer.apply_watcher_event(&watcher::Event::Apply(d));
        }
        let args: Args = clap::Parser::try_parse_from(["ingest-operator"]).expect("operator args");
        let settings = Settings::from_args(args).expect("settings");
        let gate = Gate {
            client,
            pods: pod_store.into(),
            drains: drain_store,
            channels: Default::default(),
            ingest: settings.ingest,
            pod_access: settings.pod_access,
            drain_defaults: settings.drain_defaults,
            operator_username: settings.operator_username,
            metrics: Metrics::default(),
            first_holds: Default::default(),
            recorder: None,
            explained: Default::default(),
            counts: Default::default(),
        };
        (gate, verifier)
    }
}

// ---- the verifier ------------------------------------------------------------

/// One step of a drain reconcile, as the API server sees it.
pub(crate) struct Step {
    /// The drain being reconciled (its status is what the step starts from).
    pub(crate) drain: IngestDrain,
    /// Pods the step must evict, in order.
    pub(crate) evicted: Vec<&'static str>,
    /// The API server refuses those evictions (a PodDisruptionBudget).
    pub(crate) evictions_refused: bool,
    /// The event the step must publish: (type, reason).
    pub(crate) event: Option<(&'static str, &'static str)>,
    /// The phase the step must apply.
    pub(crate) phase: DrainPhase,
    /// The rows the step must apply: (pod, state).
    pub(crate) rows: Vec<(&'static str, PodState)>,
}

/// What the API server is asked, in order.
#[allow(clippy::large_enum_variant, reason = "built once per test")]
pub(crate) enum Scenario {
    /// A drain without the finalizer: the finalizer goes on, nothing else.
    FinalizerAdded(IngestDrain),
    /// One reconcile of a drain that holds the finalizer; a terminal phase
    /// also takes the finalizer off.
    Step(Step),
    /// A drain deleted while it runs: its pods' drains cancelled (no API
    /// request), then the finalizer taken off.
    Deleted { drain: IngestDrain },
    /// A signalled node: its drains listed by node label, one IngestDrain
    /// applied per namespace in `applied` (the node's ingest pods come from
    /// the cache).
    NodeDrains {
        node: Node,
        existing: Vec<IngestDrain>,
        applied: Vec<&'static str>,
    },
    /// A node back in service: its drains listed, each of `cancelled` (in
    /// namespace [`NS`]) patched with `spec.cancel`.
    NodeDrainsCancelled {
        node: Node,
        existing: Vec<IngestDrain>,
        cancelled: Vec<&'static str>,
    },
    /// The eviction gate applies an `evict-<pod>` drain.
    EvictionDrain(Pod),
    /// The eviction gate deletes a drain of the same name left by an
    /// earlier pod of that name (on the condition that it is still that one).
    StaleDrainDeleted(IngestDrain),
    /// `EvictionHeld` Events created on each `(kind, name)`, in any order
    /// (they are published in the background).
    HeldEvents(Vec<(&'static str, String)>),
    /// Nothing.
    NoRequest,
}

/// A request as the verifier saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) query: BTreeMap<String, String>,
    pub(crate) content_type: Option<String>,
    /// The JSON body (`Null` when empty).
    pub(crate) body: Value,
}

pub(crate) struct ApiServerVerifier(ApiServerHandle);

impl ApiServerVerifier {
    /// Plays `scenarios` in order, then checks that no further request comes
    /// before every client is dropped. Returns every request seen.
    pub(crate) fn run(self, scenarios: Vec<Scenario>) -> JoinHandle<Vec<Seen>> {
        tokio::spawn(async move {
            let mut v = Verifier {
                handle: self.0,
                seen: Vec::new(),
            };
            for s in scenarios {
                v.play(s).await;
            }
            if let Some((req, _)) = v.handle.next_request().await {
                panic!("unexpected request {} {}", req.method(), req.uri());
            }
            v.seen
        })
    }
}

struct Verifier {
    handle: ApiServerHandle,
    seen: Vec<Seen>,
}

impl Verifier {
    async fn play(&mut self, scenario: Scenario) {
        match scenario {
            Scenario::FinalizerAdded(d) => self.finalizer_patch(&d, true).await,
            Scenario::Step(step) => self.step(step).await,
            Scenario::Deleted { drain } => self.finalizer_patch(&drain, false).await,
            Scenario::NodeDrains {
                node,
                existing,
                applied,
            } => {
                self.drain_list_by_node(&node.name_any(), existing).await;
                for ns in applied {
                    self.node_drain_apply(&node, ns).await;
                }
            }
            Scenario::NodeDrainsCancelled {
                node,
                existing,
                cancelled,
            } => {
                self.drain_list_by_node(&node.name_any(), existing.clone()).await;
                for name in cancelled {
                    let path = format!("{DRAINS}/namespaces/{NS}/ingestdrains/{name}");
                    let (seen, send) = self.expect(Method::PATCH, &path).await;
                    assert_eq!(seen.content_type.as_deref(), Some("application/merge-patch+json"));
                    assert_eq!(seen.body, json!({ "spec": { "cancel": true } }));
                    let mut d = existing
                        .iter()
                        .find(|d| d.name_any() == name)
                        .expect("a listed drain")
                        .clone();
                    d.spec.cancel = true;
                    reply(send, StatusCode::OK, &to_json(&d));
                }
            }
            Scenario::EvictionDrain(pod) => self.eviction_drain_apply(&pod).await,
            Scenario::StaleDrainDeleted(drain) => {
                let path = format!("{DRAINS}/namespaces/{NS}/ingestdrains/{}", drain.name_any());
                let (seen, send) = self.expect(Method::DELETE, &path).await;
                assert_eq!(seen.body["preconditions"]["uid"], json!(drain.uid()));
                reply(send, StatusCode::OK, &to_json(&drain));
            }
            Scenario::HeldEvents(mut want) => {
                while !want.is_empty() {
                    let (seen, send) = self.next("an EvictionHeld Event").await;
                    assert_eq!(seen.method, Method::POST, "{}", seen.path);
                    assert!(
                        seen.path.starts_with("/apis/events.k8s.io/v1/namespaces/"),
                        "{}",
                        seen.path
                    );
                    assert_eq!(seen.body["reason"], json!("EvictionHeld"));
                    let regarding = &seen.body["regarding"];
                    let on = (
                        regarding["kind"].as_str().unwrap_or_default(),
                        regarding["name"].as_str().unwrap_or_default(),
                    );
                    let at = want
                        .iter()
                        .position(|(kind, name)| (*kind, name.as_str()) == on)
                        .unwrap_or_else(|| panic!("an Event on {on:?}, want {want:?}"));
                    want.remove(at);
                    reply(send, StatusCode::CREATED, &seen.body);
                }
            }
            Scenario::NoRequest => {}
        }
    }

    /// The next request, which must be `method path`.
    async fn expect(&mut self, method: Method, path: &str) -> (Seen, Responder) {
        let (seen, send) = self.next(&format!("{method} {path}")).await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&method, path),
            "unexpected request (query {:?}, body {})",
            seen.query,
            seen.body
        );
        (seen, send)
    }

    /// The next request, whatever it is (`what`: the one expected).
    async fn next(&mut self, what: &str) -> (Seen, Responder) {
        let (req, send) = within(&format!("expected {what}"), self.handle.next_request())
            .await
            .unwrap_or_else(|| panic!("the client went away before {what}"));
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.expect("request body");
        let seen = Seen {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(parse_query).unwrap_or_default(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("a JSON body")
            },
        };
        self.seen.push(seen.clone());
        (seen, send)
    }

    async fn finalizer_patch(&mut self, d: &IngestDrain, present: bool) {
        let path = format!("{DRAINS}/namespaces/{NS}/ingestdrains/{}", d.name_any());
        let (seen, send) = self.expect(Method::PATCH, &path).await;
        assert_eq!(seen.content_type.as_deref(), Some("application/merge-patch+json"));
        // The resourceVersion makes a concurrent change of the list fail.
        assert_eq!(seen.body["metadata"]["resourceVersion"], json!(d.resource_version()));
        let list: Vec<String> =
            serde_json::from_value(seen.body["metadata"]["finalizers"].clone()).expect("finalizers");
        assert_eq!(list.contains(&FINALIZER.to_owned()), present, "finalizers {list:?}");
        let mut next = d.clone();
        next.metadata.finalizers = Some(list);
        reply(send, StatusCode::OK, &to_json(&next));
    }

    async fn step(&mut self, step: Step) {
        let d = &step.drain;
        let name = d.name_any();

        for pod in &step.evicted {
            let path = format!("/api/v1/namespaces/{NS}/pods/{pod}/eviction");
            let (seen, send) = self.expect(Method::POST, &path).await;
            assert_eq!(seen.body["metadata"]["name"], json!(pod));
            if step.evictions_refused {
                reply(
                    send,
                    StatusCode::TOO_MANY_REQUESTS,
                    &json!({ "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                        "reason": "TooManyRequests", "code": 429,
                        "message": "Cannot evict pod as it would violate the pod's disruption budget." }),
                );
            } else {
                reply(
                    send,
                    StatusCode::CREATED,
                    &json!({ "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success", "code": 201 }),
                );
            }
        }

        if let Some((type_, reason)) = step.event {
            let path = format!("/apis/events.k8s.io/v1/namespaces/{NS}/events");
            let (seen, send) = self.expect(Method::POST, &path).await;
            assert_eq!(seen.body["type"], json!(type_), "event {}", seen.body);
            assert_eq!(seen.body["reason"], json!(reason), "event {}", seen.body);
            assert_eq!(seen.body["regarding"]["kind"], json!("IngestDrain"));
            assert_eq!(seen.body["regarding"]["name"], json!(name));
            reply(send, StatusCode::CREATED, &seen.body);
        }

        let path = format!("{DRAINS}/namespaces/{NS}/ingestdrains/{name}/status");
        let (seen, send) = self.expect(Method::PATCH, &path).await;
        assert_server_side_apply(&seen);
        assert_eq!(seen.body["kind"], json!("IngestDrain"));
        let status: IngestDrainStatus = serde_json::from_value(seen.body["status"].clone()).expect("a status");
        assert_eq!(status.phase, step.phase, "applied status {}", seen.body["status"]);
        let rows: Vec<(&str, PodState)> = status.pods.iter().map(|r| (r.name.as_str(), r.state)).collect();
        assert_eq!(rows, step.rows, "applied status {}", seen.body["status"]);
        assert_eq!(status.observed_generation, d.metadata.generation);
        assert!(status.started_at.is_some());
        assert_eq!(status.completed_at.is_some(), status.phase.is_terminal());
        let mut next = d.clone();
        next.status = Some(status);
        reply(send, StatusCode::OK, &to_json(&next));
        if step.phase.is_terminal() && d.finalizers().iter().any(|f| f == FINALIZER) {
            self.finalizer_patch(&next, false).await;
        }
    }

    async fn drain_list_by_node(&mut self, node: &str, existing: Vec<IngestDrain>) {
        let (seen, send) = self.expect(Method::GET, &format!("{DRAINS}/ingestdrains")).await;
        assert_eq!(seen.query["labelSelector"], format!("{NODE_LABEL}={node}"));
        reply(
            send,
            StatusCode::OK,
            &list("ingest.lossless.dev/v1alpha1", "IngestDrainList", &existing),
        );
    }

    async fn node_drain_apply(&mut self, node: &Node, ns: &str) {
        let node_name = node.name_any();
        let name = format!("node-{node_name}");
        let path = format!("{DRAINS}/namespaces/{ns}/ingestdrains/{name}");
        let (seen, send) = self.expect(Method::PATCH, &path).await;
        assert_server_side_apply(&seen);
        let meta = &seen.body["metadata"];
        assert_eq!(meta["name"], json!(name));
        assert_eq!(meta["namespace"], json!(ns));
        assert_eq!(meta["labels"][NODE_LABEL], json!(node_name));
        assert_eq!(meta["labels"][TRIGGER_LABEL], json!("node"));
        // Owned by the Node: it goes with the node, in every namespace.
        assert_eq!(
            meta["ownerReferences"],
            json!([{ "apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node.uid() }])
        );
        let spec = &seen.body["spec"];
        assert_eq!(spec["nodeName"], json!(node_name));
        assert_eq!(spec["evict"], json!(true));
        assert_eq!(
            spec["selector"],
            json!({ "matchLabels": { "app.kubernetes.io/component": "ingest" } })
        );
        let created: IngestDrain = serde_json::from_value(seen.body.clone()).expect("an IngestDrain");
        reply(send, StatusCode::OK, &to_json(&created));
    }

    async fn eviction_drain_apply(&mut self, pod: &Pod) {
        let pod_name = pod.name_any();
        let ns = pod.namespace().expect("a namespaced pod");
        let path = format!("{DRAINS}/namespaces/{ns}/ingestdrains/evict-{pod_name}");
        let (seen, send) = self.expect(Method::PATCH, &path).await;
        assert_server_side_apply(&seen);
        let meta = &seen.body["metadata"];
        assert_eq!(meta["labels"][TRIGGER_LABEL], json!("eviction"));
        assert_eq!(
            meta["ownerReferences"],
            json!([{ "apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod.uid() }])
        );
        assert_eq!(seen.body["spec"]["podNames"], json!([pod_name]));
        assert_eq!(seen.body["spec"]["evict"], json!(true));
        let created: IngestDrain = serde_json::from_value(seen.body.clone()).expect("an IngestDrain");
        reply(send, StatusCode::OK, &to_json(&created));
    }
}

/// Server-side apply by the operator's field manager, forced.
fn assert_server_side_apply(seen: &Seen) {
    assert_eq!(seen.content_type.as_deref(), Some("application/apply-patch+yaml"));
    assert_eq!(
        seen.query.get("fieldManager").map(String::as_str),
        Some("ingest-operator")
    );
    assert_eq!(seen.query.get("force").map(String::as_str), Some("true"));
}

fn to_json<T: serde::Serialize>(obj: &T) -> Value {
    serde_json::to_value(obj).expect("JSON")
}

fn list<T: serde::Serialize>(api_version: &str, kind: &str, items: &[T]) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": { "resourceVersion": "1" },
        "items": items,
    })
}

fn reply(send: Responder, code: StatusCode, body: &Value) {
    let bytes = serde_json::to_vec(body).expect("JSON");
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(bytes))
            .expect("a response"),
    );
}

/// `a=b&c=d`, decoded.
fn parse_query(q: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}
