//! The `IngestDrain` custom resource: which ingest pods to drain and how,
//! and how far the drain got. Types only; the logic lives elsewhere.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the operator's resources.
pub const GROUP: &str = "ingest.lossless.dev";
/// Label on operator-made drains: the node that triggered them.
pub const NODE_LABEL: &str = "ingest.lossless.dev/node";
/// Label on drains: what made them (`node` or `eviction`: the operator;
/// `kubectl`: `kubectl ingest drain`).
pub const TRIGGER_LABEL: &str = "ingest.lossless.dev/trigger";
/// Finalizer that cancels the pods' drains when an IngestDrain is deleted mid-way.
pub const FINALIZER: &str = "ingest.lossless.dev/cancel-pod-drains";

/// Drains RTMP ingest pods without losing media: each selected pod leaves
/// its Service, asks capable publishers to reconnect elsewhere, and is done
/// when no publisher is left (or at the deadline).
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ingest.lossless.dev",
    version = "v1alpha1",
    kind = "IngestDrain",
    plural = "ingestdrains",
    shortname = "idr",
    namespaced,
    status = "IngestDrainStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.totals.pods"}"#,
    printcolumn = r#"{"name":"Drained","type":"integer","jsonPath":".status.totals.drainedPods"}"#,
    printcolumn = r#"{"name":"Remaining","type":"integer","description":"Publishers still on the pods","jsonPath":".status.totals.remainingPublishers"}"#,
    printcolumn = r#"{"name":"Migrated","type":"integer","jsonPath":".status.totals.migrated","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.selector.matchLabels) || has(self.selector.matchExpressions)").message("selector must have matchLabels or matchExpressions: an empty selector would drain every pod in the namespace"))]
#[x_kube(validation = Rule::new("!has(self.maxInFlight) || self.maxInFlight >= 0").message("maxInFlight must not be negative"))]
pub struct IngestDrainSpec {
    /// Ingest pods to drain, by label, in the IngestDrain's namespace.
    pub selector: LabelSelector,

    /// Only pods on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,

    /// Only these pods (by name), of those the selector matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) <= 1000").message("at most 1000 pod names"))]
    pub pod_names: Option<Vec<String>>,

    /// Seconds from the start until publishers that support no reconnect
    /// signal are handled by `incapablePolicy` and the pods may go anyway.
    #[serde(default = "default_deadline")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 86400").message("deadlineSeconds must be between 1 and 86400"))]
    pub deadline_seconds: i64,

    /// Reconnect signals per second on each pod; 0 means no limit.
    #[serde(default = "default_rate")]
    #[x_kube(validation = Rule::new("self >= 0.0").message("rate is signals per second and must not be negative"))]
    pub rate: f64,

    /// Signalled publishers still connected at once on each pod; 0 means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<i32>,

    /// What happens at the deadline to publishers that support no signal.
    #[serde(default)]
    pub incapable_policy: IncapablePolicy,

    /// Evict each pod once it is drained (node drains set this: the node
    /// drain then proceeds at once instead of at its next retry).
    #[serde(default)]
    pub evict: bool,

    /// Seconds between leaving the Service and the first signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 600").message("propagationDelaySeconds must be between 0 and 600"))]
    pub propagation_delay_seconds: Option<i64>,

    /// Where Reconnect Request sends publishers. Without it they reconnect
    /// to their own URL, whose load balancer no longer picks the drained pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,

    /// Cancel the drain: the pods serve again (what an uncordon does).
    #[serde(default)]
    pub cancel: bool,
}

fn default_deadline() -> i64 {
    300
}

fn default_rate() -> f64 {
    50.0
}

/// Reconnect Request target, rendered per healthy pod.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// URL template of a healthy pod as publishers outside the cluster reach
    /// it: `{pod}`, `{podIP}`, `{node}`, `{nodeIP}` and `{namespace}` are
    /// replaced. Example: `rtmp://{pod}.ingest.example.com/live`.
    #[x_kube(validation = Rule::new("self.startsWith('rtmp://') || self.startsWith('rtmps://')").message("redirect.urlTemplate must start with rtmp:// or rtmps://"))]
    pub url_template: String,
}

/// What a drain does at its deadline with publishers that support no signal.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema, clap::ValueEnum)]
pub enum IncapablePolicy {
    /// Keep them until they leave; the pod is released at the deadline anyway.
    Wait,
    /// Close their connections at the deadline.
    #[default]
    Disconnect,
}

/// Phase of a whole drain.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DrainPhase {
    /// Accepted, pods not yet contacted.
    #[default]
    Pending,
    /// Pods are draining.
    Draining,
    /// Every pod drained.
    Drained,
    /// The deadline passed before every pod drained.
    TimedOut,
    /// Cancelled; the pods serve again.
    Cancelled,
    /// The drain cannot proceed (see the conditions).
    Failed,
}

impl DrainPhase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            DrainPhase::Drained | DrainPhase::TimedOut | DrainPhase::Cancelled | DrainPhase::Failed
        )
    }
}

/// State of one pod in a drain.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PodState {
    /// Not contacted yet.
    #[default]
    Pending,
    /// Draining: unready, signalling publishers.
    Draining,
    /// No publisher left.
    Drained,
    /// The deadline passed; the pod may go.
    TimedOut,
    /// Evicted by the operator after draining.
    Evicted,
    /// The pod went away (or was replaced) during the drain.
    Gone,
    /// The pod's control API did not answer; retried until the deadline.
    Unreachable,
    /// The drain was cancelled on this pod.
    Cancelled,
}

impl PodState {
    /// The pod needs nothing more from the drain.
    pub fn is_done(self) -> bool {
        matches!(
            self,
            PodState::Drained | PodState::TimedOut | PodState::Evicted | PodState::Gone | PodState::Cancelled
        )
    }

    /// The pod may be evicted.
    pub fn releases_pod(self) -> bool {
        matches!(
            self,
            PodState::Drained | PodState::TimedOut | PodState::Evicted | PodState::Gone
        )
    }
}

/// Connections of a pod by what they announced.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Connections {
    pub go_away: i64,
    pub reconnect_request: i64,
    pub incapable: i64,
}

/// One pod's row in the status.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDrainStatus {
    pub name: String,
    /// The pod's uid when the drain started (a replacement is not drained).
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub state: PodState,
    #[serde(default)]
    pub connections: Connections,
    /// Publishers signalled on this pod.
    #[serde(default)]
    pub signalled: i64,
    /// Signalled publishers that left the pod.
    #[serde(default)]
    pub migrated: i64,
    /// Connections still on the pod.
    #[serde(default)]
    pub remaining: i64,
    /// Connections the pod's deadline found on it: cut under the
    /// Disconnect policy, left connected under Wait.
    #[serde(default)]
    pub left_at_deadline: i64,
    /// Why the pod is in this state, when it is not obvious.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<Time>,
}

/// Sums over the pods.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub pods: i64,
    pub drained_pods: i64,
    /// Publishers on the pods still draining.
    pub remaining_publishers: i64,
    /// Publishers the deadline found on the pods that timed out (cut under
    /// the Disconnect policy, left connected under Wait).
    #[serde(default)]
    pub left_at_deadline: i64,
    pub signalled: i64,
    pub migrated: i64,
}

/// How far the drain got. All drain state lives here, so a restarted or
/// newly elected operator carries on without signalling anyone twice.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestDrainStatus {
    #[serde(default)]
    pub phase: DrainPhase,
    #[serde(default)]
    pub pods: Vec<PodDrainStatus>,
    #[serde(default)]
    pub totals: Totals,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
