//! The drain's pure logic: which pods, what their control status means,
//! the drain's phase, node signals and the eviction verdict. No I/O, so it
//! is tested directly.

use std::collections::BTreeMap;

use ingest_proto::v1::{DrainPhase as PodPhase, PodStatus};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::crd::{
    Connections, DrainPhase, IncapablePolicy, IngestDrain, IngestDrainSpec, IngestDrainStatus, PodDrainStatus,
    PodState, Totals,
};

/// Parses `k=v,k2=v2` (equality only), the operator's ingest selector flag.
pub(crate) fn parse_selector(s: &str) -> Result<LabelSelector, String> {
    let mut labels = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    if labels.is_empty() {
        return Err("the ingest selector is empty".into());
    }
    Ok(LabelSelector {
        match_labels: Some(labels),
        match_expressions: None,
    })
}

/// Renders a selector for list calls (`k=v,k2 in (a,b)`).
pub(crate) fn selector_string(sel: &LabelSelector) -> String {
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

fn requirement_matches(req: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&req.key);
    let values = req.values.as_deref().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

/// Whether `labels` match `sel` (an empty selector matches nothing here:
/// draining every pod of a namespace by accident is worse than nothing).
pub(crate) fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let ml = sel.match_labels.as_ref().filter(|m| !m.is_empty());
    let me = sel.match_expressions.as_ref().filter(|m| !m.is_empty());
    if ml.is_none() && me.is_none() {
        return false;
    }
    ml.into_iter().flatten().all(|(k, v)| labels.get(k) == Some(v))
        && me.into_iter().flatten().all(|r| requirement_matches(r, labels))
}

/// Whether the drain selects `pod`.
pub(crate) fn pod_selected(spec: &IngestDrainSpec, pod: &Pod) -> bool {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    selector_matches(&spec.selector, pod.labels())
        && spec.node_name.as_deref().is_none_or(|n| node == Some(n))
        && spec
            .pod_names
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| *n == pod.name_any()))
}

/// The pods a new drain takes, frozen in its status: pods that appear
/// later (replacements, scale-ups) are not drained by it.
pub(crate) fn initial_rows(spec: &IngestDrainSpec, pods: &[Pod]) -> Vec<PodDrainStatus> {
    let mut rows: Vec<PodDrainStatus> = pods
        .iter()
        .filter(|p| pod_selected(spec, p) && p.metadata.deletion_timestamp.is_none())
        .map(|p| PodDrainStatus {
            name: p.name_any(),
            uid: p.uid().unwrap_or_default(),
            node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            ..PodDrainStatus::default()
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    rows
}

/// Updates a pod's row from its control API status; `lastUpdate` moves
/// only when something else in the row did.
pub(crate) fn row_from_status(row: &PodDrainStatus, status: &PodStatus, drain_id: &str, now: Time) -> PodDrainStatus {
    let mut next = row_content(row, status, drain_id);
    next.last_update = if next == *row {
        row.last_update.clone()
    } else {
        Some(now)
    };
    next
}

fn row_content(row: &PodDrainStatus, status: &PodStatus, drain_id: &str) -> PodDrainStatus {
    let counts = status.counts.unwrap_or_default();
    let mut next = PodDrainStatus {
        connections: Connections {
            go_away: i64::from(counts.go_away),
            reconnect_request: i64::from(counts.reconnect_request),
            incapable: i64::from(counts.incapable),
        },
        remaining: i64::from(counts.total),
        message: None,
        ..row.clone()
    };
    match status.drain.as_ref().filter(|d| d.id == drain_id) {
        Some(d) => {
            next.signalled = d.signalled as i64;
            next.migrated = d.migrated as i64;
            next.left_at_deadline = d.left_at_deadline as i64;
            next.state = match d.phase() {
                PodPhase::Drained => PodState::Drained,
                PodPhase::TimedOut => PodState::TimedOut,
                PodPhase::Cancelled => PodState::Cancelled,
                _ => PodState::Draining,
            };
        }
        None => {
            next.state = PodState::Pending;
            next.message = Some(match &status.drain {
                Some(other) => format!("the pod runs another drain ({})", other.id),
                None => "the pod has no drain yet".into(),
            });
        }
    }
    next
}

/// Rows that timed out keep how many publishers their deadline found: the
/// pod's own count, else (timed out by the operator's clock first, or
/// unreachable) the connections it last reported. Done rows are not asked
/// again: this is the count as of the deadline.
pub(crate) fn keep_left_at_deadline(rows: &mut [PodDrainStatus]) {
    for r in rows.iter_mut().filter(|r| r.state == PodState::TimedOut) {
        r.left_at_deadline = r.left_at_deadline.max(r.remaining);
    }
}

/// A row whose deadline found publishers says what `policy` did to them,
/// unless it says something else already (a refused eviction, an
/// unreachable pod): also once its pod is evicted or gone.
pub(crate) fn say_left_at_deadline(rows: &mut [PodDrainStatus], policy: IncapablePolicy) {
    let done = match policy {
        IncapablePolicy::Disconnect => "disconnected",
        IncapablePolicy::Wait => "left connected (incapablePolicy Wait)",
    };
    for r in rows
        .iter_mut()
        .filter(|r| r.left_at_deadline > 0 && r.message.is_none())
    {
        r.message = Some(format!(
            "the deadline found {} publisher(s) on the pod: {done}",
            r.left_at_deadline
        ));
    }
}

/// Sums of the rows.
pub(crate) fn totals(rows: &[PodDrainStatus]) -> Totals {
    Totals {
        pods: rows.len() as i64,
        drained_pods: rows.iter().filter(|r| r.state.releases_pod()).count() as i64,
        remaining_publishers: rows.iter().filter(|r| !r.state.is_done()).map(|r| r.remaining).sum(),
        // Evicted rows keep theirs.
        left_at_deadline: rows.iter().map(|r| r.left_at_deadline).sum(),
        signalled: rows.iter().map(|r| r.signalled).sum(),
        migrated: rows.iter().map(|r| r.migrated).sum(),
    }
}

/// The drain's phase from its rows.
pub(crate) fn overall_phase(rows: &[PodDrainStatus], past_deadline: bool) -> DrainPhase {
    if rows.iter().all(|r| r.state.is_done()) {
        if rows
            .iter()
            .all(|r| matches!(r.state, PodState::Drained | PodState::Evicted | PodState::Gone))
        {
            return DrainPhase::Drained;
        }
        return DrainPhase::TimedOut;
    }
    if past_deadline {
        return DrainPhase::TimedOut;
    }
    if rows.iter().all(|r| r.state == PodState::Pending) {
        DrainPhase::Pending
    } else {
        DrainPhase::Draining
    }
}

/// Why a node is being emptied, if it is: cordoned, or a removal taint.
pub(crate) fn node_signal(node: &Node, taints: &[String]) -> Option<String> {
    let spec = node.spec.as_ref()?;
    if let Some(t) = spec.taints.iter().flatten().find(|t| taints.contains(&t.key)) {
        return Some(format!("taint {}", t.key));
    }
    spec.unschedulable.unwrap_or(false).then(|| "cordoned".to_owned())
}

/// Renders a redirect URL template for a target pod.
pub(crate) fn render_redirect(template: &str, pod: &Pod) -> String {
    let status = pod.status.as_ref();
    template
        .replace("{pod}", &pod.name_any())
        .replace("{namespace}", &pod.namespace().unwrap_or_default())
        .replace("{podIP}", status.and_then(|s| s.pod_ip.as_deref()).unwrap_or_default())
        .replace(
            "{nodeIP}",
            status.and_then(|s| s.host_ip.as_deref()).unwrap_or_default(),
        )
        .replace(
            "{node}",
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or_default(),
        )
}

/// Targets for Reconnect Request, rendered from the drain's template:
/// ready pods of its selector, not being deleted, and not in `draining`
/// (pods any live drain still holds).
pub(crate) fn redirect_targets(
    drain: &IngestDrain,
    pods: &[Pod],
    draining: &std::collections::HashSet<String>,
) -> Vec<String> {
    let Some(template) = drain.spec.redirect.as_ref().map(|r| r.url_template.as_str()) else {
        return Vec::new();
    };
    pods.iter()
        .filter(|p| selector_matches(&drain.spec.selector, p.labels()))
        .filter(|p| pod_ready(p) && p.metadata.deletion_timestamp.is_none())
        .filter(|p| !draining.contains(&p.name_any()))
        .map(|p| render_redirect(template, p))
        .collect()
}

/// True if the pod is Ready.
pub(crate) fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The answer to an eviction of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Let it go: not an ingest pod, or drained, or past its deadline.
    Allow(String),
    /// Hold it: its drain runs (429, retried by kubectl drain and autoscalers).
    Hold {
        message: String,
        /// The node a live node drain that covers the pod empties.
        node: Option<String>,
    },
    /// Hold it and start a drain for it (no drain covers it yet).
    StartAndHold(String),
}

/// How long past a drain's deadline the gate still holds its pods: time
/// for the controller to time the drain out and evict them itself. After
/// it, the gate lets the eviction through whatever the status says.
pub(crate) const HOLD_GRACE: SignedDuration = SignedDuration::from_secs(15);

/// The eviction gate's decision for `pod` given the drains of its namespace.
///
/// Every hold ends: a drain covers a pod only through a row for it (or
/// before it listed its pods at all), and only until its deadline, counted
/// from its start (its creation if no status was ever written) plus
/// [`HOLD_GRACE`]. Neither depends on the controller writing status.
pub(crate) fn eviction_verdict<'a>(
    pod: Option<&Pod>,
    ingest: &LabelSelector,
    drains: impl IntoIterator<Item = &'a IngestDrain>,
    now: Timestamp,
) -> Verdict {
    let Some(pod) = pod else {
        return Verdict::Allow("pod not found".into());
    };
    if !selector_matches(ingest, pod.labels()) {
        return Verdict::Allow("not an ingest pod".into());
    }
    let name = pod.name_any();
    // The first live drain that covers the pod, else the first ended one;
    // and the node a live node drain that covers it empties.
    let uid = pod.uid().unwrap_or_default();
    let (mut live, mut ended, mut node) = (None, None, None);
    for d in drains {
        let Some(row) = covers(d, pod, &name, &uid) else {
            continue;
        };
        if phase(d).is_terminal() {
            ended.get_or_insert((d, row));
            continue;
        }
        live.get_or_insert((d, row));
        if node.is_none() {
            node.clone_from(&d.spec.node_name);
        }
    }
    let Some((drain, row)) = live.or(ended) else {
        return Verdict::StartAndHold(format!(
            "pod {name} may have live publishers: starting its drain; retry shortly"
        ));
    };
    if let Some(r) = row.filter(|r| r.state.releases_pod()) {
        return Verdict::Allow(format!("pod {name} is {:?}", r.state));
    }
    if phase(drain) == DrainPhase::TimedOut {
        return Verdict::Allow(format!("drain {} timed out", drain.name_any()));
    }
    let Some(end) = hold_end(drain) else {
        return Verdict::Allow(format!("drain {} has no start time", drain.name_any()));
    };
    if now >= end {
        return Verdict::Allow(format!(
            "drain {} passed its deadline ({} s) and grace",
            drain.name_any(),
            drain.spec.deadline_seconds
        ));
    }
    let left = end.duration_since(now).as_secs();
    let message = match row {
        Some(r) => format!(
            "pod {name} is draining (IngestDrain {}): {} publishers remain ({} signalled, {} migrated); released within {left} s",
            drain.name_any(),
            r.remaining,
            r.signalled,
            r.migrated
        ),
        None => format!(
            "pod {name} is about to drain (IngestDrain {}); released within {left} s",
            drain.name_any()
        ),
    };
    Verdict::Hold { message, node }
}

/// Whether the live drain `d` holds `pod` (named `name`, with `uid`), and
/// the pod's row if it has one yet. A drain that listed its pods without
/// this one does not (it froze its rows before the pod landed in its scope).
/// Borrows: the webhook asks this of every drain in the namespace, rows and all.
fn covers<'d>(d: &'d IngestDrain, pod: &Pod, name: &str, uid: &str) -> Option<Option<&'d PodDrainStatus>> {
    if d.spec.cancel || d.metadata.deletion_timestamp.is_some() || phase(d) == DrainPhase::Cancelled {
        return None;
    }
    let Some(status) = d.status.as_ref() else {
        return pod_selected(&d.spec, pod).then_some(None);
    };
    match status
        .pods
        .iter()
        .find(|r| r.name == name && (r.uid.is_empty() || r.uid == uid))
    {
        Some(r) => Some(Some(r)),
        None if status.started_at.is_none() && status.pods.is_empty() && pod_selected(&d.spec, pod) => Some(None),
        None => None,
    }
}

fn phase(d: &IngestDrain) -> DrainPhase {
    d.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// When the gate stops holding `d`'s pods: the deadline from the drain's
/// start (its creation before a status was written) plus [`HOLD_GRACE`].
pub(crate) fn hold_end(d: &IngestDrain) -> Option<Timestamp> {
    let start = d
        .status
        .as_ref()
        .and_then(|s| s.started_at.as_ref())
        .or(d.metadata.creation_timestamp.as_ref())?;
    Some(start.0 + SignedDuration::from_secs(d.spec.deadline_seconds.max(0)) + HOLD_GRACE)
}

/// Status conditions from the rows and phase.
pub(crate) fn conditions(
    phase: DrainPhase,
    rows: &[PodDrainStatus],
    generation: Option<i64>,
    now: &Time,
    old: &IngestDrainStatus,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    let unreachable: Vec<&str> = rows
        .iter()
        .filter(|r| r.state == PodState::Unreachable)
        .map(|r| r.name.as_str())
        .collect();
    let make = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" }.to_owned();
        // Keep the transition time while the status stays the same.
        let last = old
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: last,
        }
    };
    let (ok, reason, message) = match phase {
        DrainPhase::Drained => (true, "AllPodsDrained", format!("{} pods drained", rows.len())),
        DrainPhase::TimedOut => (
            true,
            "DeadlinePassed",
            "the deadline passed; the pods may go".to_owned(),
        ),
        DrainPhase::Cancelled => (false, "Cancelled", "the drain was cancelled".to_owned()),
        DrainPhase::Failed => (false, "Failed", "the drain cannot proceed".to_owned()),
        DrainPhase::Pending | DrainPhase::Draining => {
            let t = totals(rows);
            (
                false,
                "Draining",
                format!(
                    "{} of {} pods drained, {} publishers remain",
                    t.drained_pods, t.pods, t.remaining_publishers
                ),
            )
        }
    };
    vec![
        make("Complete", ok, reason, message),
        if unreachable.is_empty() {
            make(
                "PodsReachable",
                true,
                "AllReachable",
                "every pod's control API answers".into(),
            )
        } else {
            make(
                "PodsReachable",
                false,
                "Unreachable",
                format!("no answer from {}", unreachable.join(", ")),
            )
        },
    ]
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeSpec, PodSpec, Taint};
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(name: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                labels: Some(labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    fn spec(sel: &str) -> IngestDrainSpec {
        IngestDrainSpec {
            selector: parse_selector(sel).unwrap(),
            node_name: None,
            pod_names: None,
            deadline_seconds: 60,
            rate: 10.0,
            max_in_flight: None,
            incapable_policy: IncapablePolicy::Disconnect,
            evict: false,
            propagation_delay_seconds: None,
            redirect: None,
            cancel: false,
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> = [("app".into(), "ingest".into()), ("tier".into(), "a".into())].into();
        assert!(selector_matches(&parse_selector("app=ingest").unwrap(), &labels));
        assert!(!selector_matches(&parse_selector("app=other").unwrap(), &labels));
        assert!(
            !selector_matches(&LabelSelector::default(), &labels),
            "empty selects nothing"
        );
        let expr = |op: &str, values: Option<Vec<String>>| LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: op.into(),
                values,
            }]),
        };
        assert!(selector_matches(
            &expr("In", Some(vec!["a".into(), "b".into()])),
            &labels
        ));
        assert!(!selector_matches(&expr("NotIn", Some(vec!["a".into()])), &labels));
        assert!(selector_matches(&expr("Exists", None), &labels));
        assert!(!selector_matches(&expr("DoesNotExist", None), &labels));
        assert_eq!(
            selector_string(&expr("In", Some(vec!["a".into(), "b".into()]))),
            "tier in (a,b)"
        );
        assert!(parse_selector("").is_err());
        assert!(parse_selector("novalue").is_err());
    }

    #[test]
    fn rows_follow_node_and_names_and_are_frozen() {
        let pods = vec![
            pod("i-1", "node-a", &[("app", "ingest")]),
            pod("i-2", "node-b", &[("app", "ingest")]),
            pod("other", "node-a", &[("app", "web")]),
        ];
        let mut s = spec("app=ingest");
        assert_eq!(initial_rows(&s, &pods).len(), 2);
        s.node_name = Some("node-a".into());
        let rows = initial_rows(&s, &pods);
        assert_eq!(
            (rows.len(), rows[0].name.as_str(), rows[0].uid.as_str()),
            (1, "i-1", "uid-i-1")
        );
        s.node_name = None;
        s.pod_names = Some(vec!["i-2".into()]);
        assert_eq!(initial_rows(&s, &pods)[0].name, "i-2");
    }

    #[test]
    fn publishers_left_at_the_deadline_count_those_cut_and_those_kept() {
        use ingest_proto::v1::{ConnectionCounts, Drain};
        let row = crate::fixtures::row("p", PodState::Draining);
        let timed_out = |total: u32, left: u64| PodStatus {
            counts: Some(ConnectionCounts {
                total,
                incapable: total,
                ..ConnectionCounts::default()
            }),
            drain: Some(Drain {
                id: "d".into(),
                phase: PodPhase::TimedOut.into(),
                left_at_deadline: left,
                ..Drain::default()
            }),
            ..PodStatus::default()
        };
        // Disconnect: the pod cut them, none remains, the row says how many.
        let cut = row_from_status(&row, &timed_out(0, 2), "d", now());
        assert_eq!(
            (cut.state, cut.remaining, cut.left_at_deadline),
            (PodState::TimedOut, 0, 2)
        );
        // Timed out by the operator's clock before the pod answered: its last count.
        let stale = PodDrainStatus {
            remaining: 4,
            ..crate::fixtures::row("q", PodState::TimedOut)
        };
        // Evicted once timed out (after a refused eviction, whose message
        // went with it): it keeps what the deadline found, and says it again.
        let evicted = PodDrainStatus {
            left_at_deadline: 3,
            remaining: 3,
            ..crate::fixtures::row("e", PodState::Evicted)
        };
        // Another message stays.
        let unreachable = PodDrainStatus {
            remaining: 1,
            message: Some("connection refused".into()),
            ..crate::fixtures::row("u", PodState::TimedOut)
        };
        let mut rows = [
            cut,
            stale,
            evicted,
            unreachable,
            crate::fixtures::row("r", PodState::Drained),
        ];
        keep_left_at_deadline(&mut rows);
        say_left_at_deadline(&mut rows, IncapablePolicy::Disconnect);
        let found: Vec<(i64, Option<&str>)> = rows
            .iter()
            .map(|r| (r.left_at_deadline, r.message.as_deref()))
            .collect();
        assert_eq!(
            found,
            [
                (2, Some("the deadline found 2 publisher(s) on the pod: disconnected")),
                (4, Some("the deadline found 4 publisher(s) on the pod: disconnected")),
                (3, Some("the deadline found 3 publisher(s) on the pod: disconnected")),
                (1, Some("connection refused")),
                (0, None),
            ]
        );
        // Remaining counts only pods still draining: a done row is not
        // asked again, so its connections are history.
        let t = totals(&rows);
        assert_eq!((t.left_at_deadline, t.remaining_publishers), (10, 0));

        // Wait: they stay connected.
        let mut kept = [row_from_status(&row, &timed_out(1, 1), "d", now())];
        keep_left_at_deadline(&mut kept);
        say_left_at_deadline(&mut kept, IncapablePolicy::Wait);
        assert_eq!((kept[0].remaining, kept[0].left_at_deadline), (1, 1));
        assert_eq!(
            kept[0].message.as_deref(),
            Some("the deadline found 1 publisher(s) on the pod: left connected (incapablePolicy Wait)")
        );
    }

    #[test]
    fn pod_rows_and_phase_from_control_status() {
        use ingest_proto::v1::{ConnectionCounts, Drain};
        let row = PodDrainStatus {
            name: "p".into(),
            ..PodDrainStatus::default()
        };
        let mut st = PodStatus {
            counts: Some(ConnectionCounts {
                total: 3,
                go_away: 1,
                reconnect_request: 1,
                incapable: 1,
                publishing: 3,
            }),
            drain: Some(Drain {
                id: "d".into(),
                phase: PodPhase::Signalling.into(),
                signalled: 2,
                migrated: 1,
                ..Drain::default()
            }),
            ..PodStatus::default()
        };
        let r = row_from_status(&row, &st, "d", now());
        assert_eq!(
            (r.state, r.remaining, r.signalled, r.migrated, r.connections.incapable),
            (PodState::Draining, 3, 2, 1, 1)
        );
        assert_eq!(overall_phase(std::slice::from_ref(&r), false), DrainPhase::Draining);
        assert_eq!(overall_phase(std::slice::from_ref(&r), true), DrainPhase::TimedOut);
        st.drain.as_mut().unwrap().phase = PodPhase::Drained.into();
        let done = row_from_status(&row, &st, "d", now());
        assert_eq!(done.state, PodState::Drained);
        assert_eq!(
            overall_phase(
                &[
                    done.clone(),
                    PodDrainStatus {
                        state: PodState::Gone,
                        ..done.clone()
                    }
                ],
                false
            ),
            DrainPhase::Drained
        );
        assert_eq!(
            overall_phase(
                &[
                    done.clone(),
                    PodDrainStatus {
                        state: PodState::TimedOut,
                        ..done
                    }
                ],
                false
            ),
            DrainPhase::TimedOut
        );
        // Another drain id on the pod is not ours.
        let other = row_from_status(&row, &st, "mine", now());
        assert_eq!(other.state, PodState::Pending);
        assert!(other.message.unwrap().contains("another drain"));
        assert_eq!(overall_phase(&[PodDrainStatus::default()], false), DrainPhase::Pending);
    }

    #[test]
    fn node_signals() {
        let taints = vec![
            "ToBeDeletedByClusterAutoscaler".to_owned(),
            "karpenter.sh/disrupted".to_owned(),
        ];
        let mut node = Node {
            spec: Some(NodeSpec::default()),
            ..Node::default()
        };
        assert_eq!(node_signal(&node, &taints), None);
        node.spec.as_mut().unwrap().unschedulable = Some(true);
        assert_eq!(node_signal(&node, &taints).as_deref(), Some("cordoned"));
        node.spec.as_mut().unwrap().unschedulable = Some(false);
        node.spec.as_mut().unwrap().taints = Some(vec![Taint {
            key: "karpenter.sh/disrupted".into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        }]);
        assert_eq!(
            node_signal(&node, &taints).as_deref(),
            Some("taint karpenter.sh/disrupted")
        );
        node.spec.as_mut().unwrap().taints = Some(vec![Taint {
            key: "other".into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        }]);
        assert_eq!(node_signal(&node, &taints), None);
    }

    #[test]
    fn redirect_targets_skip_draining_unready_and_deleted_pods() {
        let ready = |name: &str| {
            let mut p = pod(name, "node-a", &[("app", "ingest")]);
            p.status = Some(k8s_openapi::api::core::v1::PodStatus {
                conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            });
            p
        };
        let mut deleted = ready("i-deleted");
        deleted.metadata.deletion_timestamp = Some(now());
        let pods = vec![
            ready("i-1"),
            ready("i-2"),
            pod("i-unready", "node-a", &[("app", "ingest")]),
            deleted,
        ];
        let mut s = spec("app=ingest");
        s.redirect = Some(crate::crd::Redirect {
            url_template: "rtmp://{pod}/live".into(),
        });
        let d = IngestDrain::new("d", s);
        let none = std::collections::HashSet::new();
        assert_eq!(
            redirect_targets(&d, &pods, &none),
            ["rtmp://i-1/live", "rtmp://i-2/live"]
        );
        let draining = std::collections::HashSet::from(["i-1".to_owned()]);
        assert_eq!(redirect_targets(&d, &pods, &draining), ["rtmp://i-2/live"]);
    }

    #[test]
    fn redirect_templates() {
        let mut p = pod("ingest-7", "node-b", &[]);
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some("10.0.0.7".into()),
            host_ip: Some("192.0.2.2".into()),
            ..Default::default()
        });
        assert_eq!(
            render_redirect("rtmp://{pod}.{namespace}.example/live", &p),
            "rtmp://ingest-7.ns.example/live"
        );
        assert_eq!(
            render_redirect("rtmp://{nodeIP}:1935/live?via={node}&ip={podIP}", &p),
            "rtmp://192.0.2.2:1935/live?via=node-b&ip=10.0.0.7"
        );
    }

    /// A drain that listed its pods without this one (applied before the
    /// pod landed on its node, or while the pod was terminating) does not
    /// hold the pod: the gate starts the pod's own drain instead.
    #[test]
    fn a_drain_without_a_row_for_the_pod_does_not_hold_it() {
        let ingest = parse_selector("app=ingest").unwrap();
        let p = pod("i-1", "node-b", &[("app", "ingest")]);
        let mut s = spec("app=ingest");
        s.node_name = Some("node-b".into());
        let mut d = IngestDrain::new("pre-node-b", s);
        d.status = Some(IngestDrainStatus {
            phase: DrainPhase::Drained,
            pods: vec![],
            started_at: Some(Time(Timestamp::now())),
            ..Default::default()
        });
        match eviction_verdict(Some(&p), &ingest, std::slice::from_ref(&d), Timestamp::now()) {
            Verdict::StartAndHold(_) => {}
            other => panic!("a drain with no row for i-1 still covers it: {other:?}"),
        }
    }

    /// Every hold ends at the drain's deadline from its start (its
    /// creation, when no status was ever written) plus a grace, whatever
    /// the controller did.
    #[test]
    fn a_drain_whose_status_is_never_written_holds_only_until_its_deadline() {
        let ingest = parse_selector("app=ingest").unwrap();
        let p = pod("i-1", "node-a", &[("app", "ingest")]);
        let mut d = IngestDrain::new("evict-i-1", spec("app=ingest"));
        let created = Timestamp::now() - SignedDuration::from_secs(600);
        d.metadata.creation_timestamp = Some(Time(created));
        match eviction_verdict(Some(&p), &ingest, std::slice::from_ref(&d), Timestamp::now()) {
            Verdict::Allow(_) => {}
            other => panic!("a drain created 600 s ago with a 60 s deadline still holds: {other:?}"),
        }
        // A status that stopped being written: started 600 s ago, still Draining.
        d.status = Some(IngestDrainStatus {
            phase: DrainPhase::Draining,
            pods: vec![PodDrainStatus {
                name: "i-1".into(),
                uid: "uid-i-1".into(),
                state: PodState::Draining,
                remaining: 2,
                ..Default::default()
            }],
            started_at: Some(Time(created)),
            ..Default::default()
        });
        match eviction_verdict(Some(&p), &ingest, std::slice::from_ref(&d), Timestamp::now()) {
            Verdict::Allow(_) => {}
            other => panic!("a drain started 600 s ago with a 60 s deadline still holds: {other:?}"),
        }
    }

    /// A pod held by its own drain while a node drain covers it too (the
    /// first eviction came before the cordon's drain): the hold names the
    /// node, whichever drain the cache lists first.
    #[test]
    fn a_hold_names_the_node_a_live_node_drain_empties() {
        let ingest = parse_selector("app=ingest").unwrap();
        let p = pod("i-1", "node-a", &[("app", "ingest")]);
        let draining = |name: &str, node: Option<&str>| {
            let mut d = IngestDrain::new(name, spec("app=ingest"));
            d.spec.node_name = node.map(str::to_owned);
            d.status = Some(IngestDrainStatus {
                phase: DrainPhase::Draining,
                pods: vec![PodDrainStatus {
                    name: "i-1".into(),
                    uid: "uid-i-1".into(),
                    state: PodState::Draining,
                    remaining: 2,
                    ..Default::default()
                }],
                started_at: Some(Time(Timestamp::now())),
                ..Default::default()
            });
            d
        };
        let own = draining("evict-i-1", None);
        let node = draining("node-node-a", Some("node-a"));
        for drains in [[own.clone(), node.clone()], [node, own]] {
            match eviction_verdict(Some(&p), &ingest, &drains, Timestamp::now()) {
                Verdict::Hold { node, .. } => assert_eq!(node.as_deref(), Some("node-a")),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn eviction_verdicts() {
        let ingest = parse_selector("app=ingest").unwrap();
        let p = pod("i-1", "node-a", &[("app", "ingest")]);
        let web = pod("web", "node-a", &[("app", "web")]);
        assert!(matches!(
            eviction_verdict(None, &ingest, &[], Timestamp::now()),
            Verdict::Allow(_)
        ));
        assert!(matches!(
            eviction_verdict(Some(&web), &ingest, &[], Timestamp::now()),
            Verdict::Allow(_)
        ));
        assert!(matches!(
            eviction_verdict(Some(&p), &ingest, &[], Timestamp::now()),
            Verdict::StartAndHold(_)
        ));

        let mut d = IngestDrain::new("node-node-a", spec("app=ingest"));
        d.status = Some(IngestDrainStatus {
            phase: DrainPhase::Draining,
            pods: vec![PodDrainStatus {
                name: "i-1".into(),
                uid: "uid-i-1".into(),
                state: PodState::Draining,
                remaining: 4,
                signalled: 3,
                migrated: 1,
                ..Default::default()
            }],
            started_at: Some(Time(Timestamp::now())),
            ..Default::default()
        });
        match eviction_verdict(Some(&p), &ingest, std::slice::from_ref(&d), Timestamp::now()) {
            Verdict::Hold { message, node } => {
                assert!(message.contains("4 publishers remain"), "{message}");
                assert_eq!(node, None, "not a node drain");
            }
            other => panic!("{other:?}"),
        }
        d.status.as_mut().unwrap().pods[0].state = PodState::Drained;
        assert!(matches!(
            eviction_verdict(Some(&p), &ingest, std::slice::from_ref(&d), Timestamp::now()),
            Verdict::Allow(_)
        ));
        d.status.as_mut().unwrap().pods[0].state = PodState::Draining;
        d.status.as_mut().unwrap().phase = DrainPhase::TimedOut;
        assert!(matches!(
            eviction_verdict(Some(&p), &ingest, std::slice::from_ref(&d), Timestamp::now()),
            Verdict::Allow(_)
        ));
        // A cancelled drain does not cover the pod any more.
        d.spec.cancel = true;
        assert!(matches!(
            eviction_verdict(Some(&p), &ingest, &[d], Timestamp::now()),
            Verdict::StartAndHold(_)
        ));
    }
}
